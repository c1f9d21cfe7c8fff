//! KV cache for incremental decoding.

use crate::tensor_util::as_dtype;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, IntDType};

/// What a Mode-I prefill leaves in the decode cache (spec §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeCache {
    /// `[G ; L ; tokens]` with the local slots in their true (head, slot) order (default).
    #[default]
    Slots,
    /// Tokens only: decode steps see no slots (`INCLUDE_HICI_IN_KV_CACHE = False`).
    Tokens,
    /// `[G ; L ; tokens]` with the local slots scrambled across heads exactly as the reference
    /// implementation stores them (a reshape bug, spec §4.4). Only for reproducing the
    /// reference's `greedy_decode` outputs.
    ReferenceScrambled,
}

/// How a [`LayerCache`] holds its entries (`--kv-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvStorage {
    /// In the model's dtype (default).
    #[default]
    Model,
    /// As f16: half the memory of f32, read back in the model's dtype. Needs a backend with
    /// f16 tensors (wgpu, CUDA; not ndarray).
    F16,
    /// 8 bits: every block of 32 values of an entry (one token of one KV head; the whole entry
    /// when `hd` is not a multiple of 32) as i8 `q = round(x / s)` with one f32 scale
    /// `s = max|x| / 127` (llama.cpp's q8_0 cache layout), i.e. 1.125 bytes per value, 0.28x
    /// of f32; error at most `s / 2` per value. Read back by dequantizing the valid entries
    /// at every step (a transient of the f32 size, one layer at a time).
    Q8,
}

impl KvStorage {
    /// `model`, `f16`, `q8`.
    pub fn name(self) -> &'static str {
        match self {
            KvStorage::Model => "model",
            KvStorage::F16 => "f16",
            KvStorage::Q8 => "q8",
        }
    }
}

/// The buffers of a [`LayerCache`], `[b, nkv, capacity, hd]` each.
#[derive(Debug, Clone)]
enum Store<B: Backend> {
    /// Keys and values as floats (the model's dtype or f16).
    Float { k: Tensor<B, 4>, v: Tensor<B, 4> },
    /// i8 keys and values with one f32 scale per block (`[b, nkv, capacity, hd / block]`).
    Q8 {
        k: Tensor<B, 4, Int>,
        v: Tensor<B, 4, Int>,
        k_scale: Tensor<B, 4>,
        v_scale: Tensor<B, 4>,
    },
}

impl<B: Backend> Store<B> {
    fn capacity(&self) -> usize {
        match self {
            Store::Float { k, .. } => k.dims()[2],
            Store::Q8 { k, .. } => k.dims()[2],
        }
    }
}

/// Values per scale of a q8 entry of `d` values (see [`KvStorage::Q8`]).
fn q8_block(d: usize) -> usize {
    if d.is_multiple_of(32) {
        32
    } else {
        d
    }
}

/// `x [b, h, n, d]` as i8 values `[b, h, n, d]` and f32 scales `[b, h, n, d / block]` (see
/// [`KvStorage::Q8`]).
fn quantize_rows<B: Backend>(x: Tensor<B, 4>) -> (Tensor<B, 4, Int>, Tensor<B, 4>) {
    let [b, h, n, d] = x.dims();
    let g = q8_block(d);
    let x = as_dtype(x, DType::F32).reshape([b, h, n * d / g, g]);
    let scale = x.clone().abs().max_dim(3).div_scalar(127.0);
    // an all-zero block has scale 0 and values 0
    let q = x
        .div(scale.clone().clamp_min(f32::MIN_POSITIVE))
        .round()
        .clamp(-127.0, 127.0)
        .cast(IntDType::I8)
        .reshape([b, h, n, d]);
    (q, scale.reshape([b, h, n, d / g]))
}

/// The first `len` entries of `t` along the sequence axis.
fn narrow_to<B: Backend, K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>>(
    t: &Tensor<B, 4, K>,
    len: usize,
) -> Tensor<B, 4, K> {
    if t.dims()[2] == len {
        t.clone()
    } else {
        t.clone().narrow(2, 0, len)
    }
}

/// `t` with `capacity - len` zero entries after its first `len`.
fn extend_to<B: Backend, K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>>(
    t: Tensor<B, 4, K>,
    len: usize,
    capacity: usize,
) -> Tensor<B, 4, K> {
    let [b, h, _, d] = t.dims();
    let valid = narrow_to(&t, len);
    let tail =
        Tensor::<B, 4, K>::zeros([b, h, capacity - len, d], (&valid.device(), valid.dtype()));
    Tensor::cat(vec![valid, tail], 2)
}

/// Per-layer keys and values, `[b, nkv, len, hd]` each (keys of tokens are RoPE'd, slot keys
/// are not).
///
/// The entries live in buffers of `capacity >= len` along the sequence axis. Appending writes
/// into the free tail in place (`slice_assign` on a uniquely held buffer), so a decode step
/// costs O(new entries), not a copy of the whole cache; the buffers grow geometrically when
/// full, or once up front with [`Self::reserve`]. The buffers hold the entries as
/// [`KvStorage`] says ([`Self::store_as`]); [`Self::keys`] / [`Self::values`] always return
/// the model's dtype.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `None` only while being replaced.
    buf: Option<Store<B>>,
    len: usize,
    /// The dtype of the entries given and returned (the model's).
    compute: DType,
}

impl<B: Backend> LayerCache<B> {
    /// A cache holding exactly `k`/`v` `[b, nkv, len, hd]` (capacity = len), in their dtype.
    pub fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        let compute = k.dtype();
        Self {
            buf: Some(Store::Float { k, v }),
            len,
            compute,
        }
    }

    fn store(&self) -> &Store<B> {
        self.buf
            .as_ref()
            .expect("LayerCache buffers are only absent inside append")
    }

    /// Re-stores the entries as `storage` says (every later append is stored so too).
    pub fn store_as(&mut self, storage: KvStorage) {
        let store = self.buf.take().expect("LayerCache buffers present");
        let float = |k: Tensor<B, 4>, v: Tensor<B, 4>, dtype: DType| Store::Float {
            k: as_dtype(k, dtype),
            v: as_dtype(v, dtype),
        };
        let (k, v) = match store {
            Store::Float { k, v } => (k, v),
            q8 @ Store::Q8 { .. } if storage == KvStorage::Q8 => {
                self.buf = Some(q8);
                return;
            }
            Store::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => (
                dequantize_rows(k, k_scale, self.compute),
                dequantize_rows(v, v_scale, self.compute),
            ),
        };
        self.buf = Some(match storage {
            KvStorage::Model => float(k, v, self.compute),
            KvStorage::F16 => float(k, v, DType::F16),
            KvStorage::Q8 => {
                let ((k, k_scale), (v, v_scale)) = (quantize_rows(k), quantize_rows(v));
                Store::Q8 {
                    k,
                    v,
                    k_scale,
                    v_scale,
                }
            }
        });
    }

    /// Keys `[b, nkv, len, hd]` in the model's dtype (a view of the buffer where the backend
    /// supports views and the buffer holds that dtype).
    pub fn keys(&self) -> Tensor<B, 4> {
        match self.store() {
            Store::Float { k, .. } => as_dtype(narrow_to(k, self.len), self.compute),
            Store::Q8 { k, k_scale, .. } => dequantize_rows(
                narrow_to(k, self.len),
                narrow_to(k_scale, self.len),
                self.compute,
            ),
        }
    }

    /// Values `[b, nkv, len, hd]` in the model's dtype.
    pub fn values(&self) -> Tensor<B, 4> {
        match self.store() {
            Store::Float { v, .. } => as_dtype(narrow_to(v, self.len), self.compute),
            Store::Q8 { v, v_scale, .. } => dequantize_rows(
                narrow_to(v, self.len),
                narrow_to(v_scale, self.len),
                self.compute,
            ),
        }
    }

    /// Entries the buffers can hold without growing.
    pub fn capacity(&self) -> usize {
        self.store().capacity()
    }

    /// Bytes the buffers hold (capacity, not just the valid entries).
    pub fn nbytes(&self) -> usize {
        let bytes = |dims: [usize; 4], dtype: DType| dims.iter().product::<usize>() * dtype.size();
        match self.store() {
            Store::Float { k, v } => bytes(k.dims(), k.dtype()) + bytes(v.dims(), v.dtype()),
            Store::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                bytes(k.dims(), k.dtype())
                    + bytes(v.dims(), v.dtype())
                    + bytes(k_scale.dims(), k_scale.dtype())
                    + bytes(v_scale.dims(), v_scale.dtype())
            }
        }
    }

    /// Makes room for at least `additional` more entries (one reallocation now instead of
    /// growth steps later).
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len + additional;
        if need > self.capacity() {
            self.grow_to(need);
        }
    }

    fn grow_to(&mut self, capacity: usize) {
        let len = self.len;
        self.buf = Some(match self.buf.take().expect("LayerCache buffers present") {
            Store::Float { k, v } => Store::Float {
                k: extend_to(k, len, capacity),
                v: extend_to(v, len, capacity),
            },
            Store::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => Store::Q8 {
                k: extend_to(k, len, capacity),
                v: extend_to(v, len, capacity),
                k_scale: extend_to(k_scale, len, capacity),
                v_scale: extend_to(v_scale, len, capacity),
            },
        });
    }

    /// Appends `k`/`v` `[b, nkv, new, hd]` along the sequence axis.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let n = k.dims()[2];
        let need = self.len + n;
        let cap = self.capacity();
        if need > cap {
            // geometric growth (1/8, at least 64 entries): amortised O(1) copies per entry
            self.grow_to(need.max(cap + (cap / 8).max(64)));
        }
        let [b, h, _, d] = k.dims();
        let range = [0..b, 0..h, self.len..need, 0..d];
        let scales = [0..b, 0..h, self.len..need, 0..d / q8_block(d)];
        self.buf = Some(match self.buf.take().expect("LayerCache buffers present") {
            Store::Float { k: kb, v: vb } => {
                let dtype = kb.dtype();
                Store::Float {
                    k: kb.slice_assign(range.clone(), as_dtype(k, dtype)),
                    v: vb.slice_assign(range, as_dtype(v, dtype)),
                }
            }
            Store::Q8 {
                k: kb,
                v: vb,
                k_scale,
                v_scale,
            } => {
                let ((kq, ks), (vq, vs)) = (quantize_rows(k), quantize_rows(v));
                Store::Q8 {
                    k: kb.slice_assign(range.clone(), kq),
                    v: vb.slice_assign(range, vq),
                    k_scale: k_scale.slice_assign(scales.clone(), ks),
                    v_scale: v_scale.slice_assign(scales, vs),
                }
            }
        });
        self.len = need;
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `q [b, h, n, d]` i8 times `scale [b, h, n, d / block]`, in `dtype`.
fn dequantize_rows<B: Backend>(
    q: Tensor<B, 4, Int>,
    scale: Tensor<B, 4>,
    dtype: DType,
) -> Tensor<B, 4> {
    let [b, h, n, d] = q.dims();
    let blocks = scale.dims()[3];
    let x = q
        .cast(FloatDType::F32)
        .reshape([b, h, n * blocks, d / blocks])
        .mul(scale.reshape([b, h, n * blocks, 1]));
    as_dtype(x.reshape([b, h, n, d]), dtype)
}

/// The model's cache: one [`LayerCache`] per layer plus the token position counter.
///
/// Positions are NOT the cache length: the `K+M` slot entries carry no position
/// (spec §4.4), so the next token's RoPE position is tracked separately.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// RoPE position of the next token fed to the model.
    pub next_position: usize,
    /// Slot entries at the front of every layer's cache (`K+M`, or 0).
    pub prefix_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Cache entries per layer (slots + tokens).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room in every layer for `additional` more entries (e.g. the tokens a generation
    /// may still produce), so decoding never reallocates.
    pub fn reserve(&mut self, additional: usize) {
        for layer in &mut self.layers {
            layer.reserve(additional);
        }
    }

    /// Bytes held by every layer's buffers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(LayerCache::nbytes).sum()
    }
}
