//! The whole model: embeddings, decoder layers, final norm, `lm_head`, and the four attention
//! modes of spec §4 as a typed value.

use crate::attention::AttentionKernel;
use crate::cache::{DecodeCache, KvCache, KvStorage};
use crate::config::{LoraConfig, LoraMode, ModelConfig};
use crate::error::ModelError;
use crate::hici::broadcast::{segment_count, SegmentRule};
use crate::layer::{DecoderLayer, RmsNorm};
use crate::lora::{Linear, LinearWeight, QuantWeight};
use crate::rope::{Rope, RopeTables};
use crate::tensor_util::to_param;
use crate::weights::{take_quantized_shaped, take_shaped, BlockQuant, WeightSource};
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;
use std::sync::Arc;

/// Attention mode of a forward pass (replaces the reference's module-level switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// **F**: plain causal attention over all tokens; HiCI modules unused (paper PPL tables).
    Full,
    /// **T**: `segments` equal segments, shared `G`, each segment attends to `[G ; L_n ; own
    /// tokens]` (pre-training forward). Errors when `segments` does not divide the length.
    Segmented { segments: usize },
    /// **T-SFT**: segments chosen by the SFT rule (spec §4.3).
    SftSegmented,
    /// **I**: SFT inference — the whole prompt is one segment; the decode cache keeps
    /// `[G ; L ; tokens]` (see [`DecodeCache`]).
    Inference,
}

impl AttentionMode {
    /// Whether the mode runs the HiCI modules.
    pub fn uses_hici(&self) -> bool {
        !matches!(self, AttentionMode::Full)
    }

    fn segment_rule(&self) -> Option<SegmentRule> {
        match *self {
            AttentionMode::Full => None,
            AttentionMode::Segmented { segments } => Some(SegmentRule::Equal(segments)),
            AttentionMode::SftSegmented => Some(SegmentRule::Sft),
            AttentionMode::Inference => Some(SegmentRule::Whole),
        }
    }
}

/// Which prefill rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position `[b, S, V]` (perplexity, parity tests).
    All,
    /// Only the last position `[b, 1, V]` (generation: avoids an `S x V` tensor).
    Last,
}

/// Per-layer values captured during a forward (for diagnostics and parity tests).
#[derive(Debug, Clone)]
pub struct LayerTrace<B: Backend> {
    /// `[b, S, H]` input of the attention (after `input_layernorm`).
    pub attn_in: Tensor<B, 3>,
    /// `[b, S, H]` attention output (after `o_proj`).
    pub attn_out: Tensor<B, 3>,
    /// `[b, N, M, H]` local slots.
    pub local: Option<Tensor<B, 4>>,
    /// `[b, K, H]` global slots.
    pub global: Option<Tensor<B, 3>>,
}

/// Final hidden states `[b, S, H]`, the decode cache (if asked) and per-layer traces.
type RunOutput<B> = (Tensor<B, 3>, Option<KvCache<B>>, Vec<LayerTrace<B>>);

/// The token embedding as read: float, or block-quantized.
enum Embed {
    Dense(crate::weights::HostTensor),
    Quantized(Arc<BlockQuant>),
}

/// Llama-2 with HiCI in every attention layer.
#[derive(Module, Debug)]
pub struct HiciLlama<B: Backend> {
    /// `[V, H]` float table on the device; `None` when the table is quantized (then
    /// `embed_host` holds it).
    pub embed_tokens: Option<Param<Tensor<B, 2>>>,
    /// `[V, H]` block-quantized table kept on the host (as llama.cpp keeps its token
    /// embeddings on the CPU): a lookup dequantizes the rows it needs and uploads `[b, S, H]`.
    #[module(skip)]
    pub embed_host: Option<Arc<BlockQuant>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `H -> V`, untied.
    pub lm_head: Linear<B>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: Rope,
    /// `rope`'s cos table `[P, hd]` (f32) for positions `0..P` (`P` the context, at most
    /// [`ROPE_TABLE_MAX_POSITIONS`]), built once on the device at load: forward passes and
    /// decode steps take its rows instead of building and uploading tables per call.
    pub rope_cos: Tensor<B, 2>,
    /// The sin table, as `rope_cos`.
    pub rope_sin: Tensor<B, 2>,
    /// Attention implementation choice (see [`AttentionKernel`]).
    #[module(skip)]
    pub kernel: AttentionKernel,
    /// How decode caches hold their keys and values (see [`KvStorage`]).
    #[module(skip)]
    pub kv_storage: KvStorage,
}

/// Most positions whose RoPE tables a model keeps on its device (32K: 32 MiB at head size
/// 128); positions past them get tables built per call.
pub const ROPE_TABLE_MAX_POSITIONS: usize = 1 << 15;

/// Positions of a model's RoPE table: its context (`max_position_embeddings` x the linear
/// factor), at most [`ROPE_TABLE_MAX_POSITIONS`].
fn rope_positions(cfg: &ModelConfig) -> usize {
    cfg.context().clamp(1, ROPE_TABLE_MAX_POSITIONS)
}

impl<B: Backend> HiciLlama<B> {
    /// RoPE tables for positions `start..start + len`: rows of [`Self::rope_cos`] /
    /// [`Self::rope_sin`] when they cover them (no host work, no upload), else built on the
    /// host (the same values).
    pub fn rope_tables(&self, start: usize, len: usize, device: &B::Device) -> RopeTables<B> {
        if start + len <= self.rope_cos.dims()[0] {
            return RopeTables {
                start,
                cos: self.rope_cos.clone().narrow(0, start, len),
                sin: self.rope_sin.clone().narrow(0, start, len),
            };
        }
        self.rope.tables_for::<B>(start, len, device)
    }

    /// `(cos, sin)` rows `[n, hd]` for one position per row (a batched decode step): selected
    /// from the tables kept on the device (an upload of `n` indices) when they cover them all.
    pub fn rope_rows(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        if positions.iter().all(|&p| p < self.rope_cos.dims()[0]) {
            let idx: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let idx =
                Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [positions.len()]), device);
            return (
                self.rope_cos.clone().select(0, idx.clone()),
                self.rope_sin.clone().select(0, idx),
            );
        }
        let tables: Vec<_> = positions
            .iter()
            .map(|&p| self.rope.tables_for::<B>(p, 1, device))
            .collect();
        let cos = Tensor::cat(tables.iter().map(|t| t.cos.clone()).collect(), 0);
        let sin = Tensor::cat(tables.iter().map(|t| t.sin.clone()).collect(), 0);
        (cos, sin)
    }
}

impl<B: Backend> HiciLlama<B> {
    /// Builds the model from named weights (see [`crate::weights`] for the names).
    ///
    /// `lora` gives `r`/`alpha` when the source holds LoRA tensors; `mode` merges them at load
    /// time or keeps the low-rank path. Every tensor is shape-checked; a missing one is an error
    /// naming it. Tensors the model does not use stay in `src`.
    pub fn from_weights(
        cfg: &ModelConfig,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let l = &cfg.llama;
        let (v, h) = (l.vocab_size, l.hidden_size);
        let embed_name = "model.embed_tokens.weight";
        let embed = match take_quantized_shaped(src, embed_name, [v, h])? {
            Some(q) => Embed::Quantized(Arc::new(q)),
            None => Embed::Dense(take_shaped(src, embed_name, &[v, h])?),
        };
        let mut layers = Vec::with_capacity(l.num_hidden_layers);
        for i in 0..l.num_hidden_layers {
            layers.push(DecoderLayer::load(src, i, cfg, lora, mode, device)?);
        }
        let norm = RmsNorm::load(src, "model.norm.weight", h, l.rms_norm_eps, device)?;
        let lm_head = match (&embed, l.tie_word_embeddings) {
            // the embedding as a contiguous `[H, V]` weight (a transposed view of the `[V, H]`
            // embedding would make every logits product walk it with a stride of V)
            (Embed::Dense(e), true) => Linear {
                weight: LinearWeight::Dense(to_param::<B, 2>(
                    crate::tensor_util::transpose_host(e),
                    device,
                )),
            },
            // a quantized table is already in the `[out, in]` layout of a quantized weight
            (Embed::Quantized(q), true) => Linear {
                weight: LinearWeight::Quantized(QuantWeight::from_blocks(
                    q,
                    src.quant_product(),
                    device,
                )),
            },
            (_, false) => Linear::load(src, "lm_head.weight", h, v, device)?,
        };
        let rope = Rope::new(l.head_dim(), l.rope_theta, cfg.rope_factor);
        let table = rope.tables_for::<B>(0, rope_positions(cfg), device);
        let (embed_tokens, embed_host) = match embed {
            Embed::Dense(e) => (Some(to_param(e, device)), None),
            Embed::Quantized(q) => (None, Some(q)),
        };
        Ok(Self {
            embed_tokens,
            embed_host,
            layers,
            norm,
            lm_head,
            config: cfg.clone(),
            rope_cos: table.cos,
            rope_sin: table.sin,
            rope,
            kernel: AttentionKernel::Exact,
            kv_storage: KvStorage::Model,
        })
    }

    /// Casts every weight to `dtype` (activations follow the weights; RMSNorm, LayerNorm,
    /// softmax and the GI statistics still accumulate in f32, logits are f32).
    ///
    /// Errors when the device does not support `dtype` (ndarray: f32/f64 only; wgpu: no bf16).
    pub fn with_dtype(self, dtype: DType) -> Result<Self, ModelError> {
        let device = self.device();
        if !B::supports_dtype(&device, dtype) {
            return Err(ModelError::Config(format!(
                "this device does not support {dtype:?} tensors"
            )));
        }
        if self.dtype() == dtype {
            return Ok(self);
        }
        struct Cast(DType);
        impl<B: Backend> ModuleMapper<B> for Cast {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                // quantized weights stay quantized (their matmul yields the input's dtype)
                param.map(|t| match t.dtype() {
                    DType::QFloat(_) => t,
                    _ => t.cast(self.0),
                })
            }
        }
        Ok(self.map(&mut Cast(dtype)))
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.norm.weight.dtype()
    }

    /// Chooses how decode caches store keys and values (default [`KvStorage::Model`]).
    ///
    /// Errors when the device has no tensors of that type (f16 on ndarray).
    pub fn with_kv_storage(mut self, storage: KvStorage) -> Result<Self, ModelError> {
        let needs = match storage {
            KvStorage::Model => None,
            KvStorage::F16 => Some(DType::F16),
            KvStorage::Q8 => Some(DType::I8),
        };
        if let Some(dtype) = needs.filter(|d| !B::supports_dtype(&self.device(), *d)) {
            return Err(ModelError::Config(format!(
                "a {} KV cache needs {dtype:?} tensors, which this device does not support",
                storage.name()
            )));
        }
        self.kv_storage = storage;
        Ok(self)
    }

    /// Chooses the attention implementation (default [`AttentionKernel::Exact`]).
    pub fn with_attention_kernel(mut self, kernel: AttentionKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Vocabulary size (rows of the embedding).
    pub fn vocab_size(&self) -> usize {
        self.config.llama.vocab_size
    }

    /// Whether any linear weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.embed_host.is_some()
            || self.lm_head.weight.is_quantized()
            || self
                .layers
                .iter()
                .any(|l| l.mlp.down_proj.weight.is_quantized())
    }

    /// `ids: [b, S]` -> `[b, S, H]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let h = self.config.llama.hidden_size;
        let Some(table) = &self.embed_tokens else {
            // ids were range-checked by the callers; one read-back of b*S ids
            let ids = ids.into_data().convert::<i64>();
            let ids = ids.as_slice::<i64>().expect("i64 ids after convert");
            return self.embed_host_rows(ids, [b, s]);
        };
        table
            .val()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, h])
    }

    /// [`Self::embed`] from host ids `[b * S]` (row-major `[b, S]`, range-checked by the
    /// caller) -> `[b, S, H]`: a table kept quantized on the host dequantizes its rows from
    /// them directly, so a decode step reads nothing back from the device for its input.
    fn embed_host_ids(&self, ids: &[i64], [b, s]: [usize; 2]) -> Tensor<B, 3> {
        if self.embed_tokens.is_none() {
            return self.embed_host_rows(ids, [b, s]);
        }
        let t =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, s]), &self.device());
        self.embed(t)
    }

    /// The host-kept quantized table's rows for `ids` `[b * S]` -> `[b, S, H]`.
    fn embed_host_rows(&self, ids: &[i64], [b, s]: [usize; 2]) -> Tensor<B, 3> {
        let h = self.config.llama.hidden_size;
        let table = self.embed_host.as_ref().expect("a token embedding table");
        let mut rows = vec![0f32; b * s * h];
        for (out, &id) in rows.chunks_exact_mut(h).zip(ids) {
            table.dequantize_row(id as usize, out);
        }
        let x = Tensor::<B, 3>::from_data(TensorData::new(rows, [b, s, h]), &self.device());
        crate::tensor_util::as_dtype(x, self.dtype())
    }

    /// Validates ids held in a device tensor (reads them back: one device sync).
    fn check_ids(&self, ids: &Tensor<B, 2, Int>) -> Result<(), ModelError> {
        let [b, s] = ids.dims();
        if b == 0 || s == 0 {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        let data = ids.to_data().convert::<i64>();
        let vals = data
            .as_slice::<i64>()
            .map_err(|e| ModelError::Input(format!("token ids: {e:?}")))?;
        self.check_host_ids(vals)
    }

    /// Validates host token ids: non-empty and inside the vocabulary.
    pub fn check_host_ids(&self, ids: &[i64]) -> Result<(), ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        let v = self.vocab_size() as i64;
        if let Some(bad) = ids.iter().find(|&&x| x < 0 || x >= v) {
            return Err(ModelError::Input(format!(
                "token id {bad} is out of range for a vocabulary of {v}"
            )));
        }
        Ok(())
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.norm.weight.device()
    }

    /// Host token ids `[n]` (checked on the host) -> a batch-1 id tensor `[1, n]`.
    pub fn token_tensor(&self, ids: &[i64]) -> Result<Tensor<B, 2, Int>, ModelError> {
        self.check_host_ids(ids)?;
        Ok(Tensor::from_data(
            TensorData::new(ids.to_vec(), [1, ids.len()]),
            &self.device(),
        ))
    }

    fn head(&self, x: Tensor<B, 3>, which: Logits) -> Tensor<B, 3> {
        let x = match which {
            Logits::All => x,
            Logits::Last => {
                let s = x.dims()[1];
                x.narrow(1, s - 1, 1)
            }
        };
        // logits in f32 whatever the working precision
        crate::tensor_util::as_f32(self.lm_head.forward(self.norm.forward(x)))
    }

    /// Runs every layer of a prefill. Returns the final hidden states, the cache (if asked)
    /// and, when `trace` is set, per-layer intermediates.
    fn run(
        &self,
        ids: Tensor<B, 2, Int>,
        mode: AttentionMode,
        cache_kind: Option<DecodeCache>,
        trace: bool,
    ) -> Result<RunOutput<B>, ModelError> {
        let s = ids.dims()[1];
        let segments = match mode.segment_rule() {
            Some(rule) => Some(segment_count(s, rule)?),
            None => None,
        };
        if segments.is_some() && self.config.hici.is_none() {
            return Err(ModelError::NoHici);
        }
        if cache_kind.is_some() && segments.is_some_and(|n| n != 1) {
            return Err(ModelError::Config(
                "a decode cache needs mode full or hici (Mode I); segmented modes have no \
                 defined decoding"
                    .into(),
            ));
        }
        let mut x = self.embed(ids);
        let rope = self.rope_tables(0, s, &x.device());
        let mut caches = Vec::new();
        let mut traces = Vec::new();
        for layer in &self.layers {
            let a = layer.input_layernorm.forward(x.clone());
            let out = match segments {
                None => layer.self_attn.forward_full(
                    a.clone(),
                    &rope,
                    cache_kind.is_some(),
                    self.kernel,
                ),
                Some(n) => {
                    layer
                        .self_attn
                        .forward_hici(a.clone(), n, &rope, cache_kind, self.kernel)?
                }
            };
            if trace {
                traces.push(LayerTrace {
                    attn_in: a,
                    attn_out: out.out.clone(),
                    local: out.local.clone(),
                    global: out.global.clone(),
                });
            }
            if let Some(c) = out.cache {
                caches.push(c);
            }
            x = layer.finish(x, out.out);
        }
        if self.kv_storage != KvStorage::Model {
            for c in &mut caches {
                c.store_as(self.kv_storage);
            }
        }
        let cache = cache_kind.map(|kind| KvCache {
            layers: caches,
            next_position: s,
            prefix_len: match (segments, kind) {
                (Some(_), DecodeCache::Slots | DecodeCache::ReferenceScrambled) => {
                    self.config.hici.as_ref().map_or(0, |h| h.prefix_len())
                }
                _ => 0,
            },
        });
        Ok((x, cache, traces))
    }

    /// Logits for a whole sequence without a cache. `ids: [b, S]` -> `[b, S, V]`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        mode: AttentionMode,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.check_ids(&ids)?;
        let (x, _, _) = self.run(ids, mode, None, false)?;
        Ok(self.head(x, Logits::All))
    }

    /// Like [`Self::forward`], also returning per-layer intermediates.
    pub fn forward_traced(
        &self,
        ids: Tensor<B, 2, Int>,
        mode: AttentionMode,
    ) -> Result<(Tensor<B, 3>, Vec<LayerTrace<B>>), ModelError> {
        self.check_ids(&ids)?;
        let (x, _, t) = self.run(ids, mode, None, true)?;
        Ok((self.head(x, Logits::All), t))
    }

    /// Prefill for generation: `ids: [b, P]` -> logits (`[b, P, V]` or `[b, 1, V]`) and the
    /// decode cache. `mode` must be [`AttentionMode::Full`] (token cache) or
    /// [`AttentionMode::Inference`] (cache per `decode_cache`).
    pub fn prefill(
        &self,
        ids: Tensor<B, 2, Int>,
        mode: AttentionMode,
        decode_cache: DecodeCache,
        logits: Logits,
    ) -> Result<(Tensor<B, 3>, KvCache<B>), ModelError> {
        self.check_ids(&ids)?;
        self.prefill_checked(ids, mode, decode_cache, logits)
    }

    /// [`Self::prefill`] from host token ids `[P]` (batch 1), checked on the host.
    pub fn prefill_tokens(
        &self,
        ids: &[i64],
        mode: AttentionMode,
        decode_cache: DecodeCache,
        logits: Logits,
    ) -> Result<(Tensor<B, 3>, KvCache<B>), ModelError> {
        let ids = self.token_tensor(ids)?;
        self.prefill_checked(ids, mode, decode_cache, logits)
    }

    fn prefill_checked(
        &self,
        ids: Tensor<B, 2, Int>,
        mode: AttentionMode,
        decode_cache: DecodeCache,
        logits: Logits,
    ) -> Result<(Tensor<B, 3>, KvCache<B>), ModelError> {
        let (x, cache, _) = self.run(ids, mode, Some(decode_cache), false)?;
        let cache = cache.ok_or_else(|| ModelError::Config("no cache produced".into()))?;
        Ok((self.head(x, logits), cache))
    }

    /// One decode step: `ids: [b, s_new]` (usually one token per sequence) at the cache's next
    /// position -> `[b, s_new, V]`. Attends over the whole cache; G and L stay frozen.
    pub fn decode(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.check_ids(&ids)?;
        let x = self.embed(ids);
        self.decode_checked(x, cache)
    }

    /// [`Self::decode`] from host token ids `[s_new]` (batch 1). The ids are checked on the
    /// host, so a step reads nothing back from the device before its logits (one device
    /// sync per generated token instead of two). Generation loops should use this.
    pub fn decode_tokens(
        &self,
        ids: &[i64],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.check_host_ids(ids)?;
        let x = self.embed_host_ids(ids, [1, ids.len()]);
        self.decode_checked(x, cache)
    }

    /// A decode step from the embedded inputs `x` `[b, s_new, H]`.
    fn decode_checked(
        &self,
        x: Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Config(format!(
                "cache has {} layers, model has {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let s = x.dims()[1];
        let pos = cache.next_position;
        let mut x = x;
        let rope = self.rope_tables(pos, s, &x.device());
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let a = layer.input_layernorm.forward(x.clone());
            let out = layer.self_attn.forward_decode(a, &rope, lc, self.kernel);
            x = layer.finish(x, out);
        }
        cache.next_position += s;
        Ok(self.head(x, Logits::All))
    }

    /// One decode step for several sequences at once (continuous batching): `ids[i]` is the
    /// next token of the sequence whose cache is `caches[i]`; caches may hold any number of
    /// entries (different prompts, different Mode I prefixes `[G ; L]`) and positions. Row `i`
    /// of the result (`[n, 1, V]` f32 logits) equals what [`Self::decode_tokens`] gives for
    /// `ids[i]` alone on `caches[i]`, up to float summation order in the shared projections.
    pub fn decode_batch(
        &self,
        ids: &[i64],
        caches: &mut [&mut KvCache<B>],
    ) -> Result<Tensor<B, 3>, ModelError> {
        let n = ids.len();
        if n == 0 || caches.len() != n {
            return Err(ModelError::Config(format!(
                "a batched decode step needs one cache per token: {n} token(s), {} cache(s)",
                caches.len()
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.layers.len() != self.layers.len()) {
            return Err(ModelError::Config(format!(
                "cache has {} layers, model has {}",
                c.layers.len(),
                self.layers.len()
            )));
        }
        self.check_host_ids(ids)?;
        let device = self.device();
        // the n sequences are the rows of one batch entry: `[1, n, H]` hidden states, so every
        // linear layer is one [n, H] x [H, out] product
        let mut x = self.embed_host_ids(ids, [1, n]);
        let positions: Vec<usize> = caches.iter().map(|c| c.next_position).collect();
        let (cos, sin) = self.rope_rows(&positions, &device);
        let (cos, sin) = (cos.unsqueeze_dim::<3>(0), sin.unsqueeze_dim::<3>(0));
        for (li, layer) in self.layers.iter().enumerate() {
            let a = layer.input_layernorm.forward(x.clone());
            let mut lcs: Vec<&mut crate::cache::LayerCache<B>> =
                caches.iter_mut().map(|c| &mut c.layers[li]).collect();
            let out = layer
                .self_attn
                .forward_decode_batch(a, &cos, &sin, &mut lcs, self.kernel);
            x = layer.finish(x, out);
        }
        for c in caches.iter_mut() {
            c.next_position += 1;
        }
        let v = self.vocab_size();
        Ok(self.head(x, Logits::All).reshape([n, 1, v]))
    }
}
