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
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends `k`/`v` `[b, nkv, new, hd]` along the sequence axis.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        self.k = Tensor::cat(vec![self.k.clone(), k], 2);
        self.v = Tensor::cat(vec![self.v.clone(), v], 2);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.k.dims()[2]
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
}
