//! Stage 3, top-down broadcast (spec §4): how a sequence is cut into segments and how each
//! segment's keys/values are prefixed with `[G ; L_n]`.
//!
//! The attention rule itself (bottom-right causal, prefix always visible) lives in
//! [`crate::attention::attend`]; this module decides the segments and builds the prefix.

use crate::error::ModelError;
use burn::prelude::*;

/// How the sequence of one forward is segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentRule {
    /// Mode T: `N` equal segments of `S/N` tokens (error when `N` does not divide `S`).
    Equal(usize),
    /// Mode T-SFT (spec §4.3): one segment when `S % 4096 == 0`, else the largest divisor
    /// `10 <= d <= S/2` as segment length, else one segment.
    Sft,
    /// Mode I prefill: the whole prompt is one segment.
    Whole,
}

/// Number of segments for a sequence of `len` tokens under `rule`.
pub fn segment_count(len: usize, rule: SegmentRule) -> Result<usize, ModelError> {
    if len == 0 {
        return Err(ModelError::Input("empty sequence".into()));
    }
    match rule {
        SegmentRule::Whole => Ok(1),
        SegmentRule::Equal(n) => {
            if n == 0 {
                return Err(ModelError::Config("number of segments must be > 0".into()));
            }
            if !len.is_multiple_of(n) {
                return Err(ModelError::SegmentsDoNotDivide { len, segments: n });
            }
            Ok(n)
        }
        SegmentRule::Sft => Ok(len / sft_segment_len(len)),
    }
}

/// Segment length `T` of the SFT rule (spec §4.3).
pub fn sft_segment_len(len: usize) -> usize {
    if len.is_multiple_of(4096) || len < 20 {
        return len;
    }
    (10..=len / 2)
        .rev()
        .find(|&d| len.is_multiple_of(d))
        .unwrap_or(len)
}

/// Builds each segment's slot prefix `[G ; L_n]`.
///
/// `g: [b, K, H]`, `local: [b*N, M, H]` (segment-major within each sequence)
/// -> `[b*N, K+M, H]`.
pub fn slot_prefix<B: Backend>(g: Tensor<B, 3>, local: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, k, h] = g.dims();
    let bn = local.dims()[0];
    let n = bn / b;
    let g = g
        .unsqueeze_dim::<4>(1)
        .expand([b, n, k, h])
        .reshape([bn, k, h]);
    Tensor::cat(vec![g, local], 1)
}
