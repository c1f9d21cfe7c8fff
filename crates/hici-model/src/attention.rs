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
    /// Calls burn's `attention` op in flash-eligible form (no scale, no broadcast mask; see
    /// [`flash_plan`]) so that wgpu/CUDA autotune may pick a flash kernel (f16 tiles, ~1e-3 abs
    /// error on logits). Meant for the GPU backends: burn's CPU backends run the decomposed
    /// fallback, which materialises each call's whole score matrix (use `Exact` there).
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
/// `Exact`: query blocks with explicit bool masks and an explicit scale ([`attend_tiled`]).
/// `Flash`: the calls of [`flash_plan`] ([`attend_flash_with`]).
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    kernel: AttentionKernel,
) -> Tensor<B, 4> {
    match kernel {
        AttentionKernel::Exact => attend_tiled(q, k, v, Tiles::default()),
        AttentionKernel::Flash => {
            attend_flash_with(q, k, v, FLASH_MASK_ELEMS, |q, k, v, mask, opts| {
                attention(q, k, v, mask, None, opts)
            })
        }
    }
}

/// Largest mask of a [`FlashCall::Masked`] call, in elements (`b * nh * rows * keys`).
pub const FLASH_MASK_ELEMS: usize = 1 << 24;

/// One call of burn's `attention` op in the flash form of [`attend`]. None passes a scale
/// (burn's GPU backends send an explicit scale to the naive fallback); none passes a
/// broadcast mask (wrong on the flash path in f16, burn#4778).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashCall {
    /// Every query sees every key (`q_len == 1`, decode): one call without mask, the `rep`
    /// query heads of each KV head folded into its rows (`[b, nkv, rep, d]`).
    Unmasked,
    /// The query heads `n * rep + group` of every KV head `n` (`[b, nkv, q_len, d]`), padded
    /// at the front with `pad = k_len - q_len` zero rows so that the call is square
    /// (`[k_len, k_len]`) and `is_causal` means the same on every kernel (the flash kernels
    /// anchor the diagonal top-left, the fallback bottom-right; they agree on a square); the
    /// outputs of the pad rows are dropped. No mask, no copy of K/V.
    Causal {
        /// Query group `0..rep`.
        group: usize,
        /// Zero rows in front of the queries.
        pad: usize,
    },
    /// Query rows `q0 .. q0 + rows` (all heads, GQA-folded) against the keys they may see,
    /// with an explicit full-shape mask: for a short chunk after a long prefix, where padding
    /// would multiply the work.
    Masked {
        /// First query row.
        q0: usize,
        /// Query rows in the call.
        rows: usize,
    },
}

/// The calls [`attend`] makes with [`AttentionKernel::Flash`] for `q_len` queries against
/// `k_len` keys, `batch` sequences, `n_heads` query heads over `n_kv_heads` KV heads:
///
/// - `q_len == 1`: one [`FlashCall::Unmasked`];
/// - `k_len - q_len <= q_len` (a segment after its `[G ; L]` prefix, a prompt, a chunk after a
///   short cache): one square [`FlashCall::Causal`] per query group (one call for multi-head
///   attention, `n_heads / n_kv_heads` with GQA), padding costs at most 2x;
/// - otherwise [`FlashCall::Masked`] chunks of queries, each mask at most
///   `mask_elems` elements ([`FLASH_MASK_ELEMS`] in [`attend`]).
pub fn flash_plan(
    q_len: usize,
    k_len: usize,
    batch: usize,
    n_heads: usize,
    n_kv_heads: usize,
    mask_elems: usize,
) -> Vec<FlashCall> {
    assert!(
        q_len >= 1 && k_len >= q_len,
        "flash_plan: q {q_len} k {k_len}"
    );
    let offset = k_len - q_len;
    if q_len == 1 {
        return vec![FlashCall::Unmasked];
    }
    if offset <= q_len {
        let rep = n_heads / n_kv_heads;
        return (0..rep)
            .map(|group| FlashCall::Causal { group, pad: offset })
            .collect();
    }
    let rows = (mask_elems / (batch * n_heads * k_len).max(1)).clamp(1, q_len);
    (0..q_len)
        .step_by(rows)
        .map(|q0| FlashCall::Masked {
            q0,
            rows: rows.min(q_len - q0),
        })
        .collect()
}

/// The flash form of [`attend`] with the mask budget and the attention op passed in
/// (`op(q, k, v, mask, options)`: burn's `attention` without bias in [`attend`]; tests force a
/// particular kernel and count the calls). Runs the calls of [`flash_plan`] in the working
/// precision.
///
/// `q: [b, nh, q_len, d]`, `k`/`v`: `[b, nkv, k_len, d]` -> `[b, nh, q_len, d]`.
pub fn attend_flash_with<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask_elems: usize,
    mut op: impl FnMut(
        Tensor<B, 4>,
        Tensor<B, 4>,
        Tensor<B, 4>,
        Option<Tensor<B, 4, Bool>>,
        AttentionModuleOptions,
    ) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, nh, q_len, d] = q.dims();
    let [_, nkv, k_len, _] = k.dims();
    assert!(k_len >= q_len, "attend: k_len {k_len} < q_len {q_len}");
    assert!(nh % nkv == 0, "attend: {nh} query heads for {nkv} KV heads");
    let rep = nh / nkv;
    let offset = k_len - q_len;
    let opts = |is_causal| AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    let device = q.device();
    let plan = flash_plan(q_len, k_len, b, nh, nkv, mask_elems);
    let mut groups = Vec::new();
    let mut blocks = Vec::new();
    for call in plan {
        match call {
            FlashCall::Unmasked => {
                let qf = q.clone().reshape([b, nkv, rep * q_len, d]);
                let o = op(qf, k.clone(), v.clone(), None, opts(false));
                return o.reshape([b, nh, q_len, d]);
            }
            FlashCall::Causal { group, pad } => {
                let qg = if rep == 1 {
                    q.clone()
                } else {
                    q.clone()
                        .reshape([b, nkv, rep, q_len, d])
                        .narrow(2, group, 1)
                        .reshape([b, nkv, q_len, d])
                };
                let qg = if pad == 0 {
                    qg
                } else {
                    let zeros = Tensor::<B, 4>::zeros([b, nkv, pad, d], (&device, qg.dtype()));
                    Tensor::cat(vec![zeros, qg], 2)
                };
                let o = op(qg, k.clone(), v.clone(), None, opts(true));
                groups.push(o.narrow(2, pad, q_len)); // [b, nkv, q_len, d]
            }
            FlashCall::Masked { q0, rows } => {
                let kb = (q0 + rows + offset).min(k_len);
                let qs = q
                    .clone()
                    .narrow(2, q0, rows)
                    .reshape([b, nkv, rep * rows, d]);
                let diag = (q0 + offset) as i64;
                let mask = ((kb as i64) - 1 > diag)
                    .then(|| grouped_mask::<B>([b, nkv, rep, rows, kb], diag, &device));
                let o = op(
                    qs,
                    k.clone().narrow(2, 0, kb),
                    v.clone().narrow(2, 0, kb),
                    mask,
                    opts(false),
                );
                blocks.push(o.reshape([b, nh, rows, d]));
            }
        }
    }
    if !groups.is_empty() {
        return if rep == 1 {
            groups.pop().expect("one group")
        } else {
            // [b, nkv, rep, q_len, d]: query head n * rep + g is group g of KV head n
            Tensor::stack::<5>(groups, 2).reshape([b, nh, q_len, d])
        };
    }
    if blocks.len() == 1 {
        blocks.pop().expect("one block")
    } else {
        Tensor::cat(blocks, 2)
    }
}

/// The exact form of [`attend`] with explicit tile sizes (tests use small ones to cross every
/// boundary): each query block goes through burn's `attention` op with an explicit bool mask
/// and an explicit scale (never `is_causal`, whose diagonal is anchored differently on flash
/// and fallback kernels), in f32 whatever the working precision.
pub fn attend_tiled<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
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
        scale: Some(1.0 / (d as f64).sqrt()),
        softcap: None,
        is_causal: false,
    };
    let dtype = q.dtype();
    let (q, k, v) = (as_f32(q), as_f32(k), as_f32(v));
    let device = q.device();
    let mut outs = Vec::with_capacity(q_len.div_ceil(tiles.query));
    let mut q0 = 0;
    while q0 < q_len {
        let qb = tiles.query.min(q_len - q0);
        // last query row of the block sees keys 0 ..= q0 + qb - 1 + offset
        let kb = (q0 + qb + offset).min(k_len);
        let qs = q.clone().narrow(2, q0, qb).reshape([b, nkv, rep * qb, d]);
        let unfold = |o: Tensor<B, 4>| o.reshape([b, nh, qb, d]);
        if kb > tiles.key {
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
