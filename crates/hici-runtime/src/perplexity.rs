//! Sliding-window perplexity over a flat token stream (spec §5.3, the reference's
//! `eval_distributed_hici.py`, used for PG-19 and Proof-pile).
//!
//! Protocol:
//! * the data is a raw little-endian token stream (`u16` for Llama-2, `u32` when the vocabulary
//!   does not fit), see [`read_token_file`];
//! * windows start at `0, stride, 2*stride, ...` while `start < len - seq_len` (see
//!   [`window_starts`]); each window is `tokens[start..start+seq_len]`, evaluated with no
//!   earlier context;
//! * each window contributes its `seq_len - 1` next-token predictions; the log-softmax is taken
//!   in f64 on the host over all `V` columns of the f32 logits;
//! * `PPL = exp(Σ NLL / Σ predictions)` over all windows (torchmetrics `Perplexity`).
//!
//! Not reproduced: the reference's `DistributedSampler` pads the window list with a few
//! duplicate windows to a multiple of the world size; here every window is counted once.

use crate::error::RuntimeError;
use burn::prelude::*;
use hici_model::hici::{segment_count, SegmentRule};
use hici_model::{to_vec_f32, AttentionMode, HiciLlama, ModelError};
use serde::Serialize;
use std::path::Path;

/// Default window stride of the reference.
pub const DEFAULT_STRIDE: usize = 256;

/// Logit rows read back to the host at a time (bounds host memory at `ROW_CHUNK * V` floats).
const ROW_CHUNK: usize = 256;

/// Element width of a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TokenWidth {
    /// Little-endian `u16` (Llama-2 `.bin` files).
    U16,
    /// Little-endian `u32`.
    U32,
}

impl TokenWidth {
    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The width the reference's data preparation uses for a vocabulary: `u16` up to 65 535
    /// entries, `u32` above.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size > 65_535 {
            TokenWidth::U32
        } else {
            TokenWidth::U16
        }
    }
}

/// Reads a flat little-endian token stream (no header). An empty file, or a byte length that
/// is not a multiple of the width, is an [`RuntimeError::Input`] naming the file.
pub fn read_token_file(path: &Path, width: TokenWidth) -> Result<Vec<u32>, RuntimeError> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::File {
        path: path.display().to_string(),
        source,
    })?;
    decode_tokens(&bytes, width)
        .map_err(|msg| RuntimeError::Input(format!("token file {}: {msg}", path.display())))
}

/// Decodes a little-endian token stream; the error text does not name a file.
fn decode_tokens(bytes: &[u8], width: TokenWidth) -> Result<Vec<u32>, String> {
    let w = width.bytes();
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let chunks = bytes.chunks_exact(w);
    if !chunks.remainder().is_empty() {
        return Err(format!(
            "byte length {} is not a multiple of {w} ({width:?} tokens)",
            bytes.len()
        ));
    }
    Ok(match width {
        TokenWidth::U16 => chunks
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        TokenWidth::U32 => chunks
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

/// Options of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PplOptions {
    /// Evaluated window length `S` (>= 2).
    pub seq_len: usize,
    /// Distance between window starts (>= 1; the reference uses [`DEFAULT_STRIDE`]).
    pub stride: usize,
    /// Evaluate only the first `n` windows (a quick subset); `None` = all.
    pub max_windows: Option<usize>,
    /// Attention mode; the paper tables use [`AttentionMode::Full`].
    pub mode: AttentionMode,
}

impl PplOptions {
    /// Reference settings for a window length: stride 256, all windows, Mode F.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            stride: DEFAULT_STRIDE,
            max_windows: None,
            mode: AttentionMode::Full,
        }
    }
}

/// Result of a perplexity run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PplResult {
    /// Σ NLL over all predictions (nats, f64).
    pub nll_sum: f64,
    /// Number of next-token predictions (`windows * (seq_len - 1)`).
    pub predictions: usize,
    /// Number of windows evaluated.
    pub windows: usize,
    /// `nll_sum / predictions`.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
}

/// Window starts of the reference: `0, stride, 2*stride, ...` while `start < len - seq_len`.
///
/// The rule is strict, so a stream of exactly `seq_len` tokens (or fewer) has no window; a
/// stream needs at least `seq_len + 1` tokens. A `stride` of 0 yields no windows.
pub fn window_starts(len: usize, seq_len: usize, stride: usize) -> Vec<usize> {
    if stride == 0 || len <= seq_len {
        return Vec::new();
    }
    (0..len - seq_len).step_by(stride).collect()
}

/// Checks the options against the model and the stream before any compute.
fn validate<B: Backend>(
    model: &HiciLlama<B>,
    tokens: &[u32],
    opts: &PplOptions,
) -> Result<(), RuntimeError> {
    if opts.seq_len < 2 {
        return Err(RuntimeError::Input(format!(
            "perplexity window length must be at least 2 tokens, got {}",
            opts.seq_len
        )));
    }
    if opts.stride == 0 {
        return Err(RuntimeError::Input(
            "perplexity stride must be at least 1".into(),
        ));
    }
    if opts.max_windows == Some(0) {
        return Err(RuntimeError::Input(
            "max_windows must be at least 1 when given".into(),
        ));
    }
    if let AttentionMode::Segmented { segments } = opts.mode {
        // Same typed errors as the model (zero segments, or segments not dividing seq_len).
        segment_count(opts.seq_len, SegmentRule::Equal(segments))?;
    }
    if opts.mode.uses_hici() && model.config().hici.is_none() {
        return Err(ModelError::NoHici.into());
    }
    if tokens.len() <= opts.seq_len {
        return Err(RuntimeError::Input(format!(
            "the token stream has {} tokens; a window of {} needs at least {} (the reference's \
             windows start strictly before len - seq_len)",
            tokens.len(),
            opts.seq_len,
            opts.seq_len + 1
        )));
    }
    let vocab = model.vocab_size();
    if let Some((pos, &id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(RuntimeError::Input(format!(
            "token id {id} at position {pos} is out of range for a vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Negative log-likelihood of `target` under one row of logits, with the log-softmax in f64.
fn row_nll(row: &[f32], target: usize) -> f64 {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln() - f64::from(row[target])
}

/// Σ NLL of one window's `S - 1` next-token predictions.
///
/// `window` holds the `S` ids; the model maps `[1, S]` ids to `[1, S, V]` logits, and row `t`
/// predicts `window[t + 1]`. Rows are read back `ROW_CHUNK` at a time.
fn window_nll<B: Backend>(
    model: &HiciLlama<B>,
    device: &B::Device,
    window: &[u32],
    mode: AttentionMode,
) -> Result<f64, RuntimeError> {
    let s = window.len();
    let ids: Vec<i64> = window.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, s]), device);
    let logits = model.forward(ids, mode)?;
    let [_, rows, v] = logits.dims();
    if rows != s {
        return Err(ModelError::Config(format!(
            "model returned {rows} logit rows for a window of {s} tokens"
        ))
        .into());
    }
    let mut nll = 0.0;
    let mut r0 = 0;
    while r0 < s - 1 {
        let n = ROW_CHUNK.min(s - 1 - r0);
        let chunk = to_vec_f32(logits.clone().narrow(1, r0, n));
        for (i, row) in chunk.chunks_exact(v).enumerate() {
            nll += row_nll(row, window[r0 + i + 1] as usize);
        }
        r0 += n;
    }
    Ok(nll)
}

/// Perplexity of `tokens` under `model` (spec §5.3).
///
/// Each window `tokens[start..start + seq_len]` (starts from [`window_starts`], truncated to
/// `max_windows`) goes through [`HiciLlama::forward`] as `[1, seq_len]` ids, giving
/// `[1, seq_len, V]` f32 logits; its `seq_len - 1` next-token NLLs are computed in f64 on the
/// host and summed.
///
/// `on_window(done, total)` is called after each window; `cancel()` is polled before each
/// window and returning `true` stops with [`RuntimeError::Interrupted`].
///
/// Errors before any compute: `seq_len < 2`, `stride == 0`, `max_windows == Some(0)`, Mode T
/// segments that do not divide `seq_len` ([`ModelError::SegmentsDoNotDivide`]), a HiCI mode on
/// a model without HiCI, a stream of at most `seq_len` tokens (the reference rule needs
/// `seq_len + 1`), or any token id `>= vocab` (the error names the id and its position; the
/// whole stream is checked, including tokens no window reaches). Non-finite logits are not
/// rejected: they propagate into the result as NaN/inf.
pub fn evaluate<B: Backend>(
    model: &HiciLlama<B>,
    device: &B::Device,
    tokens: &[u32],
    opts: &PplOptions,
    on_window: &mut dyn FnMut(usize, usize),
    cancel: &dyn Fn() -> bool,
) -> Result<PplResult, RuntimeError> {
    validate(model, tokens, opts)?;
    let mut starts = window_starts(tokens.len(), opts.seq_len, opts.stride);
    if let Some(max) = opts.max_windows {
        starts.truncate(max);
    }
    let total = starts.len();
    let mut nll_sum = 0.0;
    for (done, &start) in starts.iter().enumerate() {
        if cancel() {
            return Err(RuntimeError::Interrupted);
        }
        let window = &tokens[start..start + opts.seq_len];
        nll_sum += window_nll(model, device, window, opts.mode)?;
        on_window(done + 1, total);
    }
    let predictions = total * (opts.seq_len - 1);
    let mean_nll = nll_sum / predictions as f64;
    Ok(PplResult {
        nll_sum,
        predictions,
        windows: total,
        mean_nll,
        ppl: mean_nll.exp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_nll_matches_direct_formula() {
        let row = [1.0f32, 2.0, 3.0];
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((row_nll(&row, 0) - (lse - 1.0)).abs() < 1e-12);
        assert!((row_nll(&row, 2) - (lse - 3.0)).abs() < 1e-12);
    }

    #[test]
    fn decode_widths() {
        assert_eq!(
            decode_tokens(&[1, 0, 0xff, 0xff], TokenWidth::U16).unwrap(),
            vec![1, 65535]
        );
        assert_eq!(
            decode_tokens(&[1, 0, 1, 0], TokenWidth::U32).unwrap(),
            vec![65537]
        );
        assert!(decode_tokens(&[], TokenWidth::U16).is_err());
        assert!(decode_tokens(&[1, 2, 3], TokenWidth::U16).is_err());
    }
}
