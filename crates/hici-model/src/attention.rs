//! The one attention entry point every mode goes through.
//!
//! Rule (spec §4.1): query `i` of `q_len` sees key `j` of `k_len` iff `j <= i + (k_len - q_len)`
//! — the causal diagonal is anchored bottom-right, so a prefix of `k_len - q_len` keys
//! (`[G ; L]`, or a decode cache) is always visible. Full causal attention is the special case
//! `k_len == q_len`.
//!
//! Memory: queries are processed in blocks of [`QUERY_BLOCK`] rows and each block only reads the
//! keys it may see. With the exact kernel, a block that sees more than [`KEY_BLOCK`] keys walks
//! them in chunks of `KEY_BLOCK` with an online softmax (running max and sum, flash-attention
//! style), so the largest score tensor is `[b, heads, QUERY_BLOCK, KEY_BLOCK]` whatever the
//! length: never `n x n`, nor even `QUERY_BLOCK x n` (512 MiB per block for the 7B at 16K, f32).

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

/// Keys scored at once by the exact kernel (beyond this, online softmax over key chunks).
pub const KEY_BLOCK: usize = 2048;

/// Tile sizes of [`attend_tiled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    /// Query rows per block.
    pub query: usize,
    /// Keys per chunk of the exact kernel's online softmax.
    pub key: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        Tiles {
            query: QUERY_BLOCK,
            key: KEY_BLOCK,
        }
    }
}

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
    attend_tiled(q, k, v, kernel, Tiles::default())
}

/// [`attend`] with explicit tile sizes (tests use small ones to cross every boundary).
pub fn attend_tiled<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    kernel: AttentionKernel,
    tiles: Tiles,
) -> Tensor<B, 4> {
    assert!(tiles.query > 0 && tiles.key > 0, "attend: empty tiles");
    let [b, nh, q_len, d] = q.dims();
    let k_len = k.dims()[2];
    assert!(k_len >= q_len, "attend: k_len {k_len} < q_len {q_len}");
    let offset = k_len - q_len;
    let nkv = k.dims()[1];
    assert!(nh % nkv == 0, "attend: {nh} query heads for {nkv} KV heads");
    // GQA without copies of K/V: the `rep` query heads of a KV head become `rep` row groups
    // of one head (`[b, nh, qb, d]` -> `[b, nkv, rep * qb, d]`); row `g * qb + r` is query row
    // `r`, so each mask is the per-row mask repeated `rep` times.
    let rep = nh / nkv;
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
    let mut outs = Vec::with_capacity(q_len.div_ceil(tiles.query));
    let mut q0 = 0;
    while q0 < q_len {
        let qb = tiles.query.min(q_len - q0);
        // last query row of the block sees keys 0 ..= q0 + qb - 1 + offset
        let kb = (q0 + qb + offset).min(k_len);
        let qs = q.clone().narrow(2, q0, qb).reshape([b, nkv, rep * qb, d]);
        let unfold = |o: Tensor<B, 4>| o.reshape([b, nh, qb, d]);
        if kernel == AttentionKernel::Exact && kb > tiles.key {
            let diag = (q0 + offset) as i64;
            outs.push(unfold(online_softmax_block(
                qs, &k, &v, kb, diag, tiles.key, rep,
            )));
            q0 += qb;
            continue;
        }
        let ks = k.clone().narrow(2, 0, kb);
        let vs = v.clone().narrow(2, 0, kb);
        // row r (global q0 + r) may see key j iff j <= q0 + r + offset
        let diag = (q0 + offset) as i64;
        let mask = ((kb as i64) - 1 > diag)
            .then(|| grouped_mask::<B>([b, nkv, rep, qb, kb], diag, &device));
        outs.push(unfold(attention(qs, ks, vs, mask, None, opts)));
        q0 += qb;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(outs, 2)
    };
    as_dtype(out, dtype)
}

/// The hidden-key mask of a GQA-folded block, full shape `[b, nkv, rep * qb, kc]`: row
/// `g * qb + r` hides key `c` iff `c > diag + r` (the `[qb, kc]` causal mask, `rep` times).
fn grouped_mask<B: Backend>(
    [b, nkv, rep, qb, kc]: [usize; 5],
    diag: i64,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    Tensor::<B, 2, Bool>::tril_mask([qb, kc], diag, device)
        .reshape([1, 1, 1, qb, kc])
        .expand([b, nkv, rep, qb, kc])
        .reshape([b, nkv, rep * qb, kc])
}

/// One query block against keys `0..kb`, walked in chunks of `chunk` keys with a running max
/// `m`, running sum `l` and unnormalised output `acc` (all f32), initialised from the first chunk.
///
/// `qs: [b, nkv, rep * qb, d]` (GQA-folded, see [`attend_tiled`]), `k`/`v`: `[b, nkv, k_len,
/// d]`; row `g * qb + r` of the block may see key `j` iff `j <= diag + r` -> `[b, nkv, rep * qb,
/// d]`. Key 0 is visible to every row, so `m` is finite after the first chunk and a fully masked
/// later chunk adds exact zeros.
fn online_softmax_block<B: Backend>(
    qs: Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    kb: usize,
    diag: i64,
    chunk: usize,
    rep: usize,
) -> Tensor<B, 4> {
    let [b, nkv, rows, d] = qs.dims();
    let qb = rows / rep;
    let device = qs.device();
    let qs = qs.mul_scalar(1.0 / (d as f64).sqrt());
    // scores of keys k0 .. k0 + kc, the hidden ones at -inf: [b, nkv, rep * qb, kc]
    let scores = |k0: usize, kc: usize| {
        let s = qs
            .clone()
            .matmul(k.clone().narrow(2, k0, kc).swap_dims(2, 3));
        // global key k0 + c is hidden from row r iff k0 + c > diag + r
        let local_diag = diag - k0 as i64;
        if (kc as i64) - 1 > local_diag {
            let mask = grouped_mask::<B>([b, nkv, rep, qb, kc], local_diag, &device);
            s.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            s
        }
    };
    let kc = chunk.min(kb);
    let s = scores(0, kc);
    let mut m = s.clone().max_dim(3); // [b, nh, qb, 1]
    let p = s.sub(m.clone()).exp();
    let mut l = p.clone().sum_dim(3); // [b, nh, qb, 1]
    let mut acc = p.matmul(v.clone().narrow(2, 0, kc)); // [b, nh, qb, d]
    let mut k0 = kc;
    while k0 < kb {
        let kc = chunk.min(kb - k0);
        let s = scores(k0, kc);
        let m_new = m.clone().max_pair(s.clone().max_dim(3));
        let alpha = m.sub(m_new.clone()).exp();
        let p = s.sub(m_new.clone()).exp();
        l = l.mul(alpha.clone()).add(p.clone().sum_dim(3));
        acc = acc.mul(alpha).add(p.matmul(v.clone().narrow(2, k0, kc)));
        m = m_new;
        k0 += kc;
    }
    acc.div(l)
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
