//! The generation loop: prefill (Mode F or Mode I), then one decode step per new token,
//! streaming text as it becomes complete.

use crate::error::RuntimeError;
use crate::sampler::{Sampler, SamplingConfig};
use crate::tokenizer::{HiciTokenizer, StreamDecoder};
use burn::prelude::*;
use hici_model::{to_vec_f32, AttentionMode, DecodeCache, HiciLlama, Logits};
use serde::Serialize;
use std::time::Instant;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString,
    /// Prompt + generated tokens reached the context limit ([`GenerateOptions::max_context`]).
    Context,
    Interrupted,
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop when one of these ids is produced (EOS, end-of-turn; empty: never).
    pub stop_ids: Vec<u32>,
    /// Stop when the generated text contains one of these.
    pub stop: Vec<String>,
    /// [`AttentionMode::Full`] (standard cache) or [`AttentionMode::Inference`] (Mode I).
    pub mode: AttentionMode,
    pub decode_cache: DecodeCache,
    /// The context limit: prompt + generated tokens never exceed it (the model's context,
    /// or less). Generation stops with [`StopReason::Context`] when it is reached, and no
    /// more cache than it needs is reserved.
    pub max_context: usize,
}

/// Wall-clock timings (seconds) and rates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// LongBench-style truncation: keeps the first and last `max_len / 2` tokens.
pub fn truncate_middle(ids: &[u32], max_len: usize) -> Vec<u32> {
    if ids.len() <= max_len {
        return ids.to_vec();
    }
    let head = max_len / 2;
    let tail = max_len - head;
    let mut out = ids[..head].to_vec();
    out.extend_from_slice(&ids[ids.len() - tail..]);
    out
}

/// Generates from `prompt` (ids, BOS included). `on_text` receives streamed text (needs a
/// tokenizer; without one nothing is streamed and `text` stays empty). `cancel` is polled
/// between tokens.
pub fn generate<B: Backend>(
    model: &HiciLlama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    tokenizer: Option<&HiciTokenizer>,
    on_text: &mut dyn FnMut(&str),
    cancel: &dyn Fn() -> bool,
) -> Result<GenerateOutput, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Input("the prompt is empty".into()));
    }
    if !matches!(opts.mode, AttentionMode::Full | AttentionMode::Inference) {
        return Err(RuntimeError::Input(
            "generation supports modes `full` and `hici` (Mode I); segmented modes have no \
             decoding in the reference"
                .into(),
        ));
    }
    if prompt.len() > opts.max_context {
        return Err(RuntimeError::Input(format!(
            "the prompt has {} tokens, more than the context of {} tokens",
            prompt.len(),
            opts.max_context
        )));
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = tokenizer.map(StreamDecoder::new);
    let mut text = String::new();
    let mut generated = Vec::new();
    let mut history = prompt.to_vec();

    let t0 = Instant::now();
    let prompt_ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
    let (logits, mut cache) =
        model.prefill_tokens(&prompt_ids, opts.mode, opts.decode_cache, Logits::Last)?;
    // room for every token this call may still append (never past the context): decoding
    // then never reallocates
    cache.reserve(
        opts.max_new_tokens
            .min(opts.max_context - prompt.len())
            .saturating_sub(1),
    );
    let mut row = to_vec_f32(logits);
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut ttft = 0.0;
    let t1 = Instant::now();
    let mut stop = StopReason::MaxTokens;
    for step in 0..opts.max_new_tokens {
        if cancel() {
            stop = StopReason::Interrupted;
            break;
        }
        let next = sampler.sample(&row, &history, generated.len());
        if step == 0 {
            ttft = t0.elapsed().as_secs_f64();
        }
        if opts.stop_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        generated.push(next);
        history.push(next);
        if let Some(s) = stream.as_mut() {
            let piece = s.push(next)?;
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
            if opts
                .stop
                .iter()
                .any(|st| !st.is_empty() && text.contains(st.as_str()))
            {
                stop = StopReason::StopString;
                break;
            }
        }
        if step + 1 == opts.max_new_tokens {
            break;
        }
        if prompt.len() + generated.len() >= opts.max_context {
            stop = StopReason::Context;
            break;
        }
        row = to_vec_f32(model.decode_tokens(&[next as i64], &mut cache)?);
    }
    if let Some(s) = stream.as_mut() {
        let rest = s.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let n_dec = generated.len().saturating_sub(1);
    Ok(GenerateOutput {
        prompt_tokens: prompt.len(),
        generated_tokens: generated.len(),
        generated_ids: generated,
        text,
        stop_reason: stop,
        timings: Timings {
            prefill_s,
            decode_s,
            time_to_first_token_s: ttft,
            prefill_tokens_per_s: prompt.len() as f64 / prefill_s.max(1e-9),
            decode_tokens_per_s: if n_dec > 0 {
                n_dec as f64 / decode_s.max(1e-9)
            } else {
                0.0
            },
        },
    })
}
