//! The one attention entry point every mode goes through.
//!
//! Rule (spec §4.1): query `i` of `q_len` sees key `j` of `k_len` iff `j <= i + (k_len - q_len)`
//! — the causal diagonal is anchored bottom-right, so a prefix of `k_len - q_len` keys
//! (`[G ; L]`, or a decode cache) is always visible. Full causal attention is the special case
//! `k_len == q_len`.
//!
//! Memory: queries are processed in blocks of [`QUERY_BLOCK`] rows and each block only reads the
//! keys it may see, so the largest score tensor is `[b, heads, QUERY_BLOCK, k_len]` — linear in
//! the sequence length, never `n x n`.

use crate::tensor_util::{as_dtype, as_f32};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// Which implementation burn's `attention` op may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// Exact softmax attention in the working precision on every backend (an explicit scale
    /// forces burn's decomposed path). Used for parity; the default.
    #[default]
    Exact,
    /// Lets wgpu/CUDA autotune pick a flash kernel (f16 tiles, ~1e-3 abs error on logits).
    /// On CPU backends identical to `Exact`.
    Flash,
}

/// Query rows processed at once.
pub const QUERY_BLOCK: usize = 256;

/// Expands `nkv` KV heads to `nh` query heads (query head `h` uses KV head `h / (nh/nkv)`).
///
/// `x: [b, nkv, s, d] -> [b, nh, s, d]`.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_heads: usize) -> Tensor<B, 4> {
    let [b, nkv, s, d] = x.dims();
    if nkv == n_heads {
        return x;
    }
    let rep = n_heads / nkv;
    x.unsqueeze_dim::<5>(2)
        .expand([b, nkv, rep, s, d])
        .reshape([b, n_heads, s, d])
}

/// Bottom-right causal attention with an always-visible prefix.
///
/// `q: [b, nh, q_len, d]`, `k`/`v`: `[b, nkv, k_len, d]` with `k_len >= q_len`
/// -> `[b, nh, q_len, d]`. Scale `1/sqrt(d)`.
///
/// Each query block goes through burn's `attention` op with an explicit bool mask (never
/// `is_causal`, whose diagonal is anchored differently on flash and fallback kernels).
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    kernel: AttentionKernel,
) -> Tensor<B, 4> {
    let [b, nh, q_len, d] = q.dims();
    let k_len = k.dims()[2];
    assert!(k_len >= q_len, "attend: k_len {k_len} < q_len {q_len}");
    let offset = k_len - q_len;
    let k = repeat_kv(k, nh);
    let v = repeat_kv(v, nh);
    let opts = AttentionModuleOptions {
        scale: match kernel {
            AttentionKernel::Exact => Some(1.0 / (d as f64).sqrt()),
            AttentionKernel::Flash => None,
        },
        softcap: None,
        is_causal: false,
    };
    // The exact kernel computes in f32 whatever the working precision.
    let dtype = q.dtype();
    let (q, k, v) = match kernel {
        AttentionKernel::Exact => (as_f32(q), as_f32(k), as_f32(v)),
        AttentionKernel::Flash => (q, k, v),
    };
    let device = q.device();
    let mut outs = Vec::with_capacity(q_len.div_ceil(QUERY_BLOCK));
    let mut q0 = 0;
    while q0 < q_len {
        let qb = QUERY_BLOCK.min(q_len - q0);
        // last query row of the block sees keys 0 ..= q0 + qb - 1 + offset
        let kb = (q0 + qb + offset).min(k_len);
        let qs = q.clone().narrow(2, q0, qb);
        let ks = k.clone().narrow(2, 0, kb);
        let vs = v.clone().narrow(2, 0, kb);
        // row r (global q0 + r) may see key j iff j <= q0 + r + offset
        let diag = (q0 + offset) as i64;
        let mask = ((kb as i64) - 1 > diag).then(|| {
            Tensor::<B, 2, Bool>::tril_mask([qb, kb], diag, &device)
                .reshape([1, 1, qb, kb])
                .expand([b, nh, qb, kb])
        });
        outs.push(attention(qs, ks, vs, mask, None, opts));
        q0 += qb;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(outs, 2)
    };
    as_dtype(out, dtype)
}

/// Reference implementation materialising the whole `[q_len, k_len]` score matrix with an
/// explicit mask. Used by tests (and benchmarks) to check [`attend`].
pub fn attend_naive<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, nh, q_len, d] = q.dims();
    let k_len = k.dims()[2];
    let k = repeat_kv(k, nh);
    let v = repeat_kv(v, nh);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    let mask =
        Tensor::<B, 2, Bool>::tril_mask([q_len, k_len], (k_len - q_len) as i64, &scores.device())
            .reshape([1, 1, q_len, k_len])
            .expand([b, nh, q_len, k_len]);
    softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3).matmul(v)
}
