//! KV cache for incremental decoding.

use burn::prelude::*;

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

/// Per-layer keys and values, `[b, nkv, len, hd]` each (keys of tokens are RoPE'd, slot keys
/// are not).
///
/// The entries live in buffers of `capacity >= len` along the sequence axis. Appending writes
/// into the free tail in place (`slice_assign` on a uniquely held buffer), so a decode step
/// costs O(new entries), not a copy of the whole cache; the buffers grow geometrically when
/// full, or once up front with [`Self::reserve`].
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `(keys, values)`, `[b, nkv, capacity, hd]` each; `None` only while being replaced.
    buf: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    len: usize,
}

impl<B: Backend> LayerCache<B> {
    /// A cache holding exactly `k`/`v` `[b, nkv, len, hd]` (capacity = len).
    pub fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        Self {
            buf: Some((k, v)),
            len,
        }
    }

    fn buffers(&self) -> &(Tensor<B, 4>, Tensor<B, 4>) {
        self.buf
            .as_ref()
            .expect("LayerCache buffers are only absent inside append")
    }

    /// Keys `[b, nkv, len, hd]` (a view of the buffer where the backend supports views).
    pub fn keys(&self) -> Tensor<B, 4> {
        self.valid(&self.buffers().0)
    }

    /// Values `[b, nkv, len, hd]`.
    pub fn values(&self) -> Tensor<B, 4> {
        self.valid(&self.buffers().1)
    }

    fn valid(&self, t: &Tensor<B, 4>) -> Tensor<B, 4> {
        if t.dims()[2] == self.len {
            t.clone()
        } else {
            t.clone().narrow(2, 0, self.len)
        }
    }

    /// Entries the buffers can hold without growing.
    pub fn capacity(&self) -> usize {
        self.buffers().0.dims()[2]
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
        let (k, v) = self.buf.take().expect("LayerCache buffers present");
        let grow = |t: Tensor<B, 4>| {
            let [b, h, _, d] = t.dims();
            let valid = if t.dims()[2] == self.len {
                t
            } else {
                t.narrow(2, 0, self.len)
            };
            let tail = Tensor::zeros([b, h, capacity - self.len, d], &valid.device());
            let tail = crate::tensor_util::as_dtype(tail, valid.dtype());
            Tensor::cat(vec![valid, tail], 2)
        };
        self.buf = Some((grow(k), grow(v)));
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
        let (kb, vb) = self.buf.take().expect("LayerCache buffers present");
        let [b, h, _, d] = kb.dims();
        let range = [0..b, 0..h, self.len..need, 0..d];
        let kb = kb.slice_assign(range.clone(), k);
        let vb = vb.slice_assign(range, v);
        self.buf = Some((kb, vb));
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
}
