//! One type-erased model behind [`Engine`], so that a caller (the server's worker thread) picks
//! the backend at run time without being generic over it.

use crate::load::{load, LoadSpec, Loaded};
use anyhow::Result;
use burn::prelude::*;
use hici_model::{AttentionMode, KvCache, Logits};
use hici_runtime::cancel::CancelToken;
use hici_runtime::generate::{
    generate, last_row, read_id, read_ids, GenerateOptions, GenerateOutput, Sequence,
};
use hici_runtime::sampler::SamplingConfig;
use hici_runtime::template::ChatFormat;
use hici_runtime::tokenizer::HiciTokenizer;
use hici_runtime::RuntimeError;
use std::collections::HashMap;
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
    /// KV-cache bytes one cached entry (token or slot) takes, over all layers.
    pub kv_bytes_per_entry: u64,
    /// Slot entries a generation's cache holds besides its tokens (Mode I `[G ; L]`, or 0).
    pub kv_prefix_entries: usize,
}

impl EngineInfo {
    /// KV-cache bytes a generation of `prompt + max_new` tokens needs at most.
    pub fn kv_bytes(&self, prompt: usize, max_new: usize) -> u64 {
        (self.kv_prefix_entries + prompt + max_new) as u64 * self.kv_bytes_per_entry
    }
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

    /// Batched generation, step 1: prefills `prompt` in `opts.mode` into a new cache kept under
    /// `id` (with room for `reserve` more entries). With `seq`, its next token is chosen from
    /// the last position on the device ([`Sequence::choose`]) and returned; without, nothing
    /// is read back.
    fn prefill(
        &mut self,
        id: u64,
        prompt: &[u32],
        opts: &GenerateOptions,
        reserve: usize,
        seq: Option<&mut Sequence<'_>>,
    ) -> Result<Option<u32>, RuntimeError>;

    /// Batched generation, chunked prefill: appends `tokens` (the next chunk of a prompt,
    /// full attention) to the cache under `id`; with `seq`, as for [`Engine::prefill`].
    fn extend(
        &mut self,
        id: u64,
        tokens: &[u32],
        seq: Option<&mut Sequence<'_>>,
    ) -> Result<Option<u32>, RuntimeError>;

    /// Batched generation, step 2: one decode step for every item at once (the weights are
    /// read once); returns each sequence's next token, chosen on the device, in order (one
    /// read for all of them).
    fn decode_batch(&mut self, items: &mut [StepItem<'_, '_>]) -> Result<Vec<u32>, RuntimeError>;

    /// Frees the cache kept under `id`.
    fn release(&mut self, id: u64);

    /// Caches held (sequences prefilled and not released).
    fn cached(&self) -> usize;
}

/// One sequence of a batched decode step.
pub struct StepItem<'a, 't> {
    /// The sequence's cache.
    pub id: u64,
    /// Its next input token.
    pub token: u32,
    /// The sequence, which chooses its next token from its logits row.
    pub seq: &'a mut Sequence<'t>,
}

struct Typed<B: Backend> {
    loaded: Loaded<B>,
    info: EngineInfo,
    caches: HashMap<u64, KvCache<B>>,
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

    fn prefill(
        &mut self,
        id: u64,
        prompt: &[u32],
        opts: &GenerateOptions,
        reserve: usize,
        seq: Option<&mut Sequence<'_>>,
    ) -> Result<Option<u32>, RuntimeError> {
        let ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
        let (logits, mut cache) =
            self.loaded
                .model
                .prefill_tokens(&ids, opts.mode, opts.decode_cache, Logits::Last)?;
        cache.reserve(reserve);
        self.caches.insert(id, cache);
        Ok(seq.map(|s| read_id(s.choose(last_row(logits)))))
    }

    fn extend(
        &mut self,
        id: u64,
        tokens: &[u32],
        seq: Option<&mut Sequence<'_>>,
    ) -> Result<Option<u32>, RuntimeError> {
        let cache = self
            .caches
            .get_mut(&id)
            .ok_or_else(|| RuntimeError::Input(format!("no cache for sequence {id}")))?;
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let logits = self.loaded.model.decode_tokens(&ids, cache)?;
        Ok(seq.map(|s| read_id(s.choose(last_row(logits)))))
    }

    fn decode_batch(&mut self, items: &mut [StepItem<'_, '_>]) -> Result<Vec<u32>, RuntimeError> {
        let mut taken = Vec::with_capacity(items.len());
        for it in items.iter() {
            match self.caches.remove(&it.id) {
                Some(c) => taken.push((it.id, c)),
                None => {
                    for (i, c) in taken {
                        self.caches.insert(i, c);
                    }
                    return Err(RuntimeError::Input(format!(
                        "no cache for sequence {}",
                        it.id
                    )));
                }
            }
        }
        let ids: Vec<i64> = items.iter().map(|it| it.token as i64).collect();
        let mut refs: Vec<&mut KvCache<B>> = taken.iter_mut().map(|(_, c)| c).collect();
        let out = self.loaded.model.decode_batch(&ids, &mut refs);
        for (i, c) in taken {
            self.caches.insert(i, c);
        }
        let out = out?;
        let [n, _, v] = out.dims();
        let logits = out.reshape([n, v]);
        let ids = items
            .iter_mut()
            .enumerate()
            .map(|(i, it)| it.seq.choose(logits.clone().narrow(0, i, 1).reshape([v])))
            .collect();
        Ok(read_ids(ids))
    }

    fn release(&mut self, id: u64) {
        self.caches.remove(&id);
    }

    fn cached(&self) -> usize {
        self.caches.len()
    }
}

/// Loads the model `spec` names onto its device, on the calling thread.
pub fn load_engine(spec: &LoadSpec) -> Result<Box<dyn Engine>> {
    crate::device::check_available(spec.device)?;
    crate::with_backend!(spec.device, spec.fused(), |B, dev| {
        let loaded = load::<B>(spec, &dev)?;
        let cfg = loaded.model.config();
        let l = &cfg.llama;
        let elem = loaded.model.dtype().size() as u64;
        let kv_prefix_entries = match (loaded.mode, spec.decode_cache, &cfg.hici) {
            (AttentionMode::Inference, d, Some(h)) if d != hici_model::DecodeCache::Tokens => {
                h.prefix_len()
            }
            _ => 0,
        };
        let info = EngineInfo {
            kv_bytes_per_entry: (l.num_hidden_layers * 2 * l.kv_heads() * l.head_dim()) as u64
                * elem,
            kv_prefix_entries,
            max_context: loaded.max_context,
            mode: loaded.mode,
            vocab_size: loaded.model.vocab_size(),
            stop_ids: loaded.stop_ids(),
            device: spec.device.to_string(),
            embedded: loaded.embedded,
        };
        Ok(Box::new(Typed {
            loaded,
            info,
            caches: HashMap::new(),
        }) as Box<dyn Engine>)
    })
}
