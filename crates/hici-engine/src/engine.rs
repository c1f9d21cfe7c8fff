//! One type-erased model behind [`Engine`], so that a caller (the server's worker thread) picks
//! the backend at run time without being generic over it.

use crate::load::{check_fusion, load, LoadSpec, Loaded};
use anyhow::Result;
use burn::prelude::*;
use hici_model::AttentionMode;
use hici_runtime::cancel::CancelToken;
use hici_runtime::generate::{generate, GenerateOptions, GenerateOutput};
use hici_runtime::sampler::SamplingConfig;
use hici_runtime::template::ChatFormat;
use hici_runtime::tokenizer::HiciTokenizer;
use hici_runtime::RuntimeError;
use std::sync::Arc;

/// What callers need to know about a loaded model, without its backend type.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The longest prompt + generation the model supports (tokens).
    pub max_context: usize,
    /// The attention mode generation runs in.
    pub mode: AttentionMode,
    pub vocab_size: usize,
    /// Ids that end a generation: the tokenizer's EOS / end-of-turn ids, else the config's EOS.
    pub stop_ids: Vec<u32>,
    /// The device it runs on, as text (`ndarray`, `wgpu`, `cuda:0`).
    pub device: String,
    /// Whether this is the embedded tiny test model.
    pub embedded: bool,
}

/// A loaded model on some backend: generation, its tokenizer and chat format.
///
/// Not `Send`: an engine lives on the thread that loaded it (burn's GPU backends bind their
/// streams to threads); share its tokenizer and chat format, which are.
pub trait Engine {
    fn info(&self) -> &EngineInfo;
    /// The model's tokenizer, when it has one.
    fn tokenizer(&self) -> Option<Arc<HiciTokenizer>>;
    /// How chat messages become a prompt.
    fn chat(&self) -> Arc<ChatFormat>;
    /// Options for this model: `max_new_tokens` and `sampling` as given, the model's stop ids,
    /// mode, decode cache and context.
    fn options(&self, max_new_tokens: usize, sampling: SamplingConfig) -> GenerateOptions;
    /// Generates from `prompt` (ids, BOS included), streaming text to `on_text`, stopping early
    /// (stop reason `interrupted`) once `cancel` is cancelled.
    fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        cancel: &CancelToken,
    ) -> Result<GenerateOutput, RuntimeError>;
}

struct Typed<B: Backend> {
    loaded: Loaded<B>,
    info: EngineInfo,
}

impl<B: Backend> Engine for Typed<B> {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn tokenizer(&self) -> Option<Arc<HiciTokenizer>> {
        self.loaded.tokenizer.clone()
    }

    fn chat(&self) -> Arc<ChatFormat> {
        self.loaded.chat.clone()
    }

    fn options(&self, max_new_tokens: usize, sampling: SamplingConfig) -> GenerateOptions {
        self.loaded.options(max_new_tokens, sampling)
    }

    fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        cancel: &CancelToken,
    ) -> Result<GenerateOutput, RuntimeError> {
        generate(
            &self.loaded.model,
            prompt,
            opts,
            self.loaded.tokenizer.as_deref(),
            on_text,
            &|| cancel.is_cancelled(),
        )
    }
}

/// Loads the model `spec` names onto its device, on the calling thread.
pub fn load_engine(spec: &LoadSpec) -> Result<Box<dyn Engine>> {
    crate::device::check_available(spec.device)?;
    check_fusion(spec)?;
    crate::with_backend!(spec.device, spec.fused(), |B, dev| {
        let loaded = load::<B>(spec, &dev)?;
        let info = EngineInfo {
            max_context: loaded.max_context,
            mode: loaded.mode,
            vocab_size: loaded.model.vocab_size(),
            stop_ids: loaded.stop_ids(),
            device: spec.device.to_string(),
            embedded: loaded.embedded,
        };
        Ok(Box::new(Typed { loaded, info }) as Box<dyn Engine>)
    })
}
