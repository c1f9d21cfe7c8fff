//! One Llama-2 decoder layer with the HiCI plug-in in its self-attention.

use crate::attention::{attend, AttentionKernel};
use crate::cache::{DecodeCache, LayerCache};
use crate::config::{LoraConfig, LoraMode, ModelConfig};
use crate::error::ModelError;
use crate::hici::broadcast::slot_prefix;
use crate::hici::{GlobalIntegrator, LocalConstructor};
use crate::lora::{Linear, LoraLinear};
use crate::rope::{apply_rope, RopeTables};
use crate::tensor_util::{as_dtype, as_f32, to_param};
use crate::weights::{take_shaped, WeightSource};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;

/// Llama RMSNorm: `w * x / sqrt(mean(x^2) + eps)` over the last dim.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[H]`.
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        name: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: to_param(take_shaped(src, name, &[d])?, device),
            eps,
        })
    }

    /// `x: [b, s, H] -> [b, s, H]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // HF: w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(input dtype)
        let (d, dtype) = (x.dims()[2], x.dtype());
        let x = as_f32(x);
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(2)
            .add_scalar(self.eps)
            .sqrt();
        as_dtype(x.div(rms), dtype).mul(self.weight.val().reshape([1, 1, d]))
    }
}

/// SwiGLU MLP: `down(silu(gate x) * up x)`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `x: [b, s, H] -> [b, s, H]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g.mul(self.up_proj.forward(x)))
    }
}

/// The per-layer result of a prefill.
pub struct AttentionOutput<B: Backend> {
    /// `[b, S, H]` attention output after `o_proj`.
    pub out: Tensor<B, 3>,
    /// `[b, N, M, H]` local slots (HiCI modes only).
    pub local: Option<Tensor<B, 4>>,
    /// `[b, K, H]` global slots (HiCI modes only).
    pub global: Option<Tensor<B, 3>>,
    /// The decode cache this layer would keep (when requested).
    pub cache: Option<LayerCache<B>>,
}

/// Self-attention with LoRA'd projections and optional HiCI modules.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub local_constructor: Option<LocalConstructor<B>>,
    pub global_integrator: Option<GlobalIntegrator<B>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> SelfAttention<B> {
    fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        cfg: &ModelConfig,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let l = &cfg.llama;
        let (h, nh, nkv, hd) = (
            l.hidden_size,
            l.num_attention_heads,
            l.kv_heads(),
            l.head_dim(),
        );
        let lin = |src: &mut dyn WeightSource, n: &str, i: usize, o: usize| {
            LoraLinear::load(src, &format!("{prefix}.{n}"), i, o, lora, mode, device)
        };
        let q_proj = lin(src, "q_proj", h, nh * hd)?;
        let k_proj = lin(src, "k_proj", h, nkv * hd)?;
        let v_proj = lin(src, "v_proj", h, nkv * hd)?;
        let o_proj = lin(src, "o_proj", nh * hd, h)?;
        let (local_constructor, global_integrator) = match &cfg.hici {
            Some(hc) => (
                Some(LocalConstructor::load(
                    src,
                    &format!("{prefix}.local_constructor"),
                    h,
                    hc,
                    lora,
                    mode,
                    device,
                )?),
                Some(GlobalIntegrator::load(
                    src,
                    &format!("{prefix}.global_integrator"),
                    h,
                    hc,
                    lora,
                    mode,
                    device,
                )?),
            ),
            None => (None, None),
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            local_constructor,
            global_integrator,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x: [n, s, H] -> [n, heads, s, hd]`.
    fn split_heads(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [n, s, _] = x.dims();
        x.reshape([n, s, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// Full causal attention over `a: [b, S, H]` at the positions of `rope` (tables `[S, hd]`, Mode F).
    ///
    /// Returns the output and, if `keep_cache`, the token K/V as a cache.
    pub fn forward_full(
        &self,
        a: Tensor<B, 3>,
        rope: &RopeTables<B>,
        keep_cache: bool,
        kernel: AttentionKernel,
    ) -> AttentionOutput<B> {
        let [b, s, _] = a.dims();
        let (cos, sin) = (
            rope.cos.clone().unsqueeze_dim::<3>(0),
            rope.sin.clone().unsqueeze_dim::<3>(0),
        );
        let q = apply_rope(
            self.split_heads(self.q_proj.forward(a.clone()), self.n_heads),
            &cos,
            &sin,
        );
        let k = apply_rope(
            self.split_heads(self.k_proj.forward(a.clone()), self.n_kv_heads),
            &cos,
            &sin,
        );
        let v = self.split_heads(self.v_proj.forward(a), self.n_kv_heads);
        let o = attend(q, k.clone(), v.clone(), kernel);
        let out =
            self.o_proj.forward(
                o.swap_dims(1, 2)
                    .reshape([b, s, self.n_heads * self.head_dim]),
            );
        AttentionOutput {
            out,
            local: None,
            global: None,
            cache: keep_cache.then(|| LayerCache::new(k, v)),
        }
    }

    /// HiCI attention over `a: [b, S, H]` cut into `n_seg` equal segments (Modes T, T-SFT, I).
    ///
    /// Token positions are global (`rope.start + index in the sequence`; `rope` tables are `[S, hd]`), never reset per segment.
    /// With `cache = Some(kind)` (only meaningful for one segment) the layer's decode cache is
    /// returned as well.
    pub fn forward_hici(
        &self,
        a: Tensor<B, 3>,
        n_seg: usize,
        rope: &RopeTables<B>,
        cache: Option<DecodeCache>,
        kernel: AttentionKernel,
    ) -> Result<AttentionOutput<B>, ModelError> {
        let (lc, gi) = match (&self.local_constructor, &self.global_integrator) {
            (Some(lc), Some(gi)) => (lc, gi),
            _ => return Err(ModelError::NoHici),
        };
        let [b, s, h] = a.dims();
        if n_seg == 0 || s % n_seg != 0 {
            return Err(ModelError::SegmentsDoNotDivide {
                len: s,
                segments: n_seg,
            });
        }
        let t = s / n_seg;
        let bn = b * n_seg;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let seg = a.reshape([bn, t, h]);

        // 1. local construction, per segment
        let local = lc.forward(seg.clone()); // [bN, M, H]
        let m = local.dims()[1];
        // 2. global integration over all segments of each sequence
        let global = gi.forward(local.clone().reshape([b, n_seg * m, h])); // [b, K, H]
        let k_slots = global.dims()[1];
        // 3. top-down broadcast: prefix [G ; L_n] through the layer's own k/v projections
        let prefix = slot_prefix(global.clone(), local.clone()); // [bN, p, H]
        let pk = self.split_heads(self.k_proj.forward(prefix.clone()), nkv); // [bN, nkv, p, hd]
        let pv = self.split_heads(self.v_proj.forward(prefix), nkv);

        // token projections with RoPE at global positions
        let cos = rope.cos.clone().reshape([n_seg, t, hd]).repeat_dim(0, b); // [bN, T, hd]
        let sin = rope.sin.clone().reshape([n_seg, t, hd]).repeat_dim(0, b);
        let q = apply_rope(
            self.split_heads(self.q_proj.forward(seg.clone()), nh),
            &cos,
            &sin,
        );
        let tk = apply_rope(
            self.split_heads(self.k_proj.forward(seg.clone()), nkv),
            &cos,
            &sin,
        );
        let tv = self.split_heads(self.v_proj.forward(seg), nkv);

        let keys = Tensor::cat(vec![pk.clone(), tk.clone()], 2); // [bN, nkv, p+T, hd]
        let vals = Tensor::cat(vec![pv.clone(), tv.clone()], 2);
        let o = attend(q, keys, vals, kernel); // [bN, nh, T, hd]
        let out = self
            .o_proj
            .forward(o.swap_dims(1, 2).reshape([b, s, nh * hd]));

        let cache = cache.map(|kind| {
            let scramble = |x: Tensor<B, 4>| {
                // reference: [b, nkv, M, hd] read back as if it were [b, M, nkv, hd]
                let g = x.clone().narrow(2, 0, k_slots);
                let l = x.narrow(2, k_slots, m);
                let l = l.reshape([bn, m, nkv, hd]).swap_dims(1, 2);
                Tensor::cat(vec![g, l], 2)
            };
            match kind {
                DecodeCache::Tokens => LayerCache::new(tk, tv),
                DecodeCache::Slots => {
                    LayerCache::new(Tensor::cat(vec![pk, tk], 2), Tensor::cat(vec![pv, tv], 2))
                }
                DecodeCache::ReferenceScrambled => LayerCache::new(
                    Tensor::cat(vec![scramble(pk), tk], 2),
                    Tensor::cat(vec![scramble(pv), tv], 2),
                ),
            }
        });
        Ok(AttentionOutput {
            out,
            local: Some(local.reshape([b, n_seg, m, h])),
            global: Some(global),
            cache,
        })
    }

    /// One decode step: `x: [b, s_new, H]` at the positions of `rope` (tables `[s_new, hd]`), attending over the whole
    /// cache plus itself (causally among the new tokens). Appends to `cache`.
    pub fn forward_decode(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: &mut LayerCache<B>,
        kernel: AttentionKernel,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (cos, sin) = (
            rope.cos.clone().unsqueeze_dim::<3>(0),
            rope.sin.clone().unsqueeze_dim::<3>(0),
        );
        let q = apply_rope(
            self.split_heads(self.q_proj.forward(x.clone()), self.n_heads),
            &cos,
            &sin,
        );
        let k = apply_rope(
            self.split_heads(self.k_proj.forward(x.clone()), self.n_kv_heads),
            &cos,
            &sin,
        );
        let v = self.split_heads(self.v_proj.forward(x), self.n_kv_heads);
        cache.append(k, v);
        let o = attend(q, cache.keys(), cache.values(), kernel);
        self.o_proj.forward(
            o.swap_dims(1, 2)
                .reshape([b, s, self.n_heads * self.head_dim]),
        )
    }
}

impl<B: Backend> SelfAttention<B> {
    /// One decode step for `n` independent sequences laid out as rows: `x: [1, n, H]`, row `i`
    /// at the position of row `i` of the tables `cos`/`sin` (`[1, n, hd]`), attending over its
    /// own cache `caches[i]` (any length; keys past it are never seen) plus itself. The
    /// projections run once for all rows as one `[n, H]` GEMM (the weights are read and packed
    /// once per step); attention runs per sequence. Appends each row's K/V to its cache.
    /// Returns `[1, n, H]`.
    pub fn forward_decode_batch(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        caches: &mut [&mut LayerCache<B>],
        kernel: AttentionKernel,
    ) -> Tensor<B, 3> {
        let [one, n, _] = x.dims();
        debug_assert_eq!((one, caches.len()), (1, n));
        // [1, heads, n, hd]: the sequence axis of one batch row holds the n sequences
        let q = apply_rope(
            self.split_heads(self.q_proj.forward(x.clone()), self.n_heads),
            cos,
            sin,
        );
        let k = apply_rope(
            self.split_heads(self.k_proj.forward(x.clone()), self.n_kv_heads),
            cos,
            sin,
        );
        let v = self.split_heads(self.v_proj.forward(x), self.n_kv_heads);
        let outs: Vec<Tensor<B, 4>> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| {
                cache.append(k.clone().narrow(2, i, 1), v.clone().narrow(2, i, 1));
                attend(
                    q.clone().narrow(2, i, 1),
                    cache.keys(),
                    cache.values(),
                    kernel,
                )
            })
            .collect();
        let o = if outs.len() == 1 {
            outs.into_iter().next().expect("one row")
        } else {
            Tensor::cat(outs, 2)
        };
        self.o_proj.forward(
            o.swap_dims(1, 2)
                .reshape([1, n, self.n_heads * self.head_dim]),
        )
    }
}

/// Pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        i: usize,
        cfg: &ModelConfig,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let l = &cfg.llama;
        let p = format!("model.layers.{i}");
        let (h, inter, eps) = (l.hidden_size, l.intermediate_size, l.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(
                src,
                &format!("{p}.input_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            self_attn: SelfAttention::load(
                src,
                &format!("{p}.self_attn"),
                cfg,
                lora,
                mode,
                device,
            )?,
            post_attention_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            mlp: Mlp {
                gate_proj: Linear::load(
                    src,
                    &format!("{p}.mlp.gate_proj.weight"),
                    h,
                    inter,
                    device,
                )?,
                up_proj: Linear::load(src, &format!("{p}.mlp.up_proj.weight"), h, inter, device)?,
                down_proj: Linear::load(
                    src,
                    &format!("{p}.mlp.down_proj.weight"),
                    inter,
                    h,
                    device,
                )?,
            },
        })
    }

    /// Residual + MLP half of the layer: `x + attn_out`, then `+ mlp(norm(.))`.
    pub fn finish(&self, x: Tensor<B, 3>, attn_out: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.add(attn_out);
        let m = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x.add(m)
    }
}
