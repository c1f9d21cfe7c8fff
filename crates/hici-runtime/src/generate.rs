//! The generation loop: prefill (Mode F or Mode I), then one decode step per new token,
//! streaming text as it becomes complete.

use crate::error::RuntimeError;
use crate::sampler::{Sampler, SamplingConfig};
use crate::tokenizer::{HiciTokenizer, StreamDecoder};
use burn::prelude::*;
use hici_model::{AttentionMode, DecodeCache, HiciLlama, Logits};
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

/// One generation in progress: sampling, streaming detokenization and the stop rules, fed one
/// logits row at a time. [`generate`] drives one; a batch scheduler drives many, each with its
/// own cache, and gets the same tokens for each as [`generate`] would.
pub struct Sequence<'t> {
    opts: GenerateOptions,
    sampler: Sampler,
    stream: Option<StreamDecoder<'t>>,
    text: String,
    generated: Vec<u32>,
    history: Vec<u32>,
    prompt_len: usize,
    steps: usize,
    stop: Option<StopReason>,
    t0: Instant,
    prefill_s: f64,
    ttft: f64,
    t1: Instant,
}

impl<'t> Sequence<'t> {
    /// Checks `prompt` against `opts` and starts the clock (prefill is timed from here).
    pub fn new(
        prompt: &[u32],
        opts: &GenerateOptions,
        tokenizer: Option<&'t HiciTokenizer>,
    ) -> Result<Self, RuntimeError> {
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
        let now = Instant::now();
        Ok(Self {
            opts: opts.clone(),
            sampler: Sampler::new(opts.sampling.clone()),
            stream: tokenizer.map(StreamDecoder::new),
            text: String::new(),
            generated: Vec::new(),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            steps: 0,
            stop: None,
            t0: now,
            prefill_s: 0.0,
            ttft: 0.0,
            t1: now,
        })
    }

    /// Cache entries still to reserve after the prefill: every token this generation may
    /// append, never past the context.
    pub fn reserve_hint(&self) -> usize {
        self.opts
            .max_new_tokens
            .min(self.opts.max_context - self.prompt_len)
            .saturating_sub(1)
    }

    /// Marks the end of the prefill (decode timing starts here).
    pub fn prefilled(&mut self) {
        self.prefill_s = self.t0.elapsed().as_secs_f64();
        self.t1 = Instant::now();
    }

    /// Ids generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Why it stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// Stops it (reason `interrupted`) unless it has already stopped.
    pub fn interrupt(&mut self) {
        self.stop.get_or_insert(StopReason::Interrupted);
    }

    /// Takes the logits row `[V]` after the last token fed: samples the next id, streams its
    /// text to `on_text` and applies the stop rules. Returns the id to feed next, or `None`
    /// when the generation is over.
    pub fn advance(
        &mut self,
        row: &[f32],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>, RuntimeError> {
        if !self.wants_token() {
            return Ok(None);
        }
        let next = self
            .sampler
            .sample(row, &self.history, self.generated.len());
        self.accept(next, on_text)
    }

    /// Chooses the next token from the last position's logits `row` `[V]` on the device
    /// ([`Sampler::sample_on_device`], or the argmax): the id as a `[1]` tensor, the only
    /// thing a decode step then reads back ([`read_ids`]); [`Self::advance_picked`] takes it.
    pub fn choose<B: Backend>(&mut self, row: Tensor<B, 1>) -> Tensor<B, 1, Int> {
        if self.sampler.is_plain_argmax() {
            return row.argmax(0);
        }
        let generated = self.generated.len();
        self.sampler.sample_on_device(row, &self.history, generated)
    }

    /// [`Self::advance`] with the next id already picked (by [`Self::choose`] on the device).
    pub fn advance_picked(
        &mut self,
        next: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>, RuntimeError> {
        if !self.wants_token() {
            return Ok(None);
        }
        self.accept(next, on_text)
    }

    /// False (and the stop reason set) once no further token may be generated.
    fn wants_token(&mut self) -> bool {
        if self.stop.is_some() {
            return false;
        }
        if self.steps >= self.opts.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return false;
        }
        true
    }

    /// Records `next`: streams its text and applies the stop rules.
    fn accept(
        &mut self,
        next: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>, RuntimeError> {
        if self.steps == 0 {
            self.ttft = self.t0.elapsed().as_secs_f64();
        }
        self.steps += 1;
        if self.opts.stop_ids.contains(&next) {
            self.stop = Some(StopReason::Eos);
            return Ok(None);
        }
        self.generated.push(next);
        self.history.push(next);
        if let Some(s) = self.stream.as_mut() {
            let piece = s.push(next)?;
            if !piece.is_empty() {
                on_text(&piece);
                self.text.push_str(&piece);
            }
            if self
                .opts
                .stop
                .iter()
                .any(|st| !st.is_empty() && self.text.contains(st.as_str()))
            {
                self.stop = Some(StopReason::StopString);
                return Ok(None);
            }
        }
        if self.steps == self.opts.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        if self.prompt_len + self.generated.len() >= self.opts.max_context {
            self.stop = Some(StopReason::Context);
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// Flushes the held-back text to `on_text` and returns the result.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> Result<GenerateOutput, RuntimeError> {
        if let Some(s) = self.stream.as_mut() {
            let rest = s.finish()?;
            if !rest.is_empty() {
                on_text(&rest);
                self.text.push_str(&rest);
            }
        }
        let decode_s = self.t1.elapsed().as_secs_f64();
        let prefill_s = self.prefill_s;
        let n_dec = self.generated.len().saturating_sub(1);
        Ok(GenerateOutput {
            prompt_tokens: self.prompt_len,
            generated_tokens: self.generated.len(),
            generated_ids: self.generated,
            text: self.text,
            stop_reason: self.stop.unwrap_or(StopReason::MaxTokens),
            timings: Timings {
                prefill_s,
                decode_s,
                time_to_first_token_s: self.ttft,
                prefill_tokens_per_s: self.prompt_len as f64 / prefill_s.max(1e-9),
                decode_tokens_per_s: if n_dec > 0 {
                    n_dec as f64 / decode_s.max(1e-9)
                } else {
                    0.0
                },
            },
        })
    }
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
    let mut seq = Sequence::new(prompt, opts, tokenizer)?;
    let prompt_ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
    let (logits, mut cache) =
        model.prefill_tokens(&prompt_ids, opts.mode, opts.decode_cache, Logits::Last)?;
    // room for every token this call may still append (never past the context): decoding
    // then never reallocates
    cache.reserve(seq.reserve_hint());
    // the next id is chosen on the device: a step reads back one id, not the `[V]` logits row
    let mut logits = logits;
    seq.prefilled();
    loop {
        if cancel() {
            seq.interrupt();
        }
        let next = read_id(seq.choose(last_row(logits)));
        let step = seq.advance_picked(next, on_text)?;
        match step {
            Some(next) => logits = model.decode_tokens(&[next as i64], &mut cache)?,
            None => break,
        }
    }
    seq.finish(on_text)
}

/// Reads several sequences' chosen ids (`[1]` each, from [`Sequence::choose`]) back in one
/// read, in order.
pub fn read_ids<B: Backend>(ids: Vec<Tensor<B, 1, Int>>) -> Vec<u32> {
    if ids.is_empty() {
        return Vec::new();
    }
    Tensor::cat(ids, 0)
        .into_data()
        .iter::<i64>()
        .map(|x| x as u32)
        .collect()
}

/// One sequence's chosen id read back ([`read_ids`] of one).
pub fn read_id<B: Backend>(id: Tensor<B, 1, Int>) -> u32 {
    read_ids(vec![id])[0]
}

/// The last position's logits row `[V]` of `logits` `[1, s, V]`.
pub fn last_row<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 1> {
    let [_, s, v] = logits.dims();
    logits.narrow(1, s - 1, 1).reshape([v])
}

/// The argmax of the last position's logits (`[1, s, V]`), computed on the device; only the
/// id is read back.
pub fn argmax_last<B: Backend>(logits: Tensor<B, 3>) -> u32 {
    let id = last_row(logits)
        .argmax(0)
        .into_data()
        .iter::<i64>()
        .next()
        .expect("one id");
    id as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::argmax;

    /// The device argmax picks what the host sampler's greedy rule picks, first index on ties
    /// included, from the last position only.
    #[test]
    fn device_argmax_equals_host_argmax() {
        type B = burn::backend::NdArray<f32>;
        let dev = Default::default();
        let v = 37;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for case in 0..20 {
            let mut rows: Vec<f32> = (0..3 * v)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect();
            if case % 2 == 1 {
                // a tie for the maximum in the last row: the first index wins
                let last = &mut rows[2 * v..];
                let m = last.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
                last[5 + case] = m;
                last[20 + case / 2] = m;
            }
            let want = argmax(&rows[2 * v..]);
            let t = Tensor::<B, 3>::from_data(TensorData::new(rows, [1, 3, v]), &dev);
            assert_eq!(argmax_last(t), want, "case {case}");
        }
    }
}
