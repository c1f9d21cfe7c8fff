//! Stage 1, local construction (spec §3.1, `LocalConstructorMulti`): `M` learnable slots attend
//! to the tokens of one segment through a multi-head bottleneck cross-attention.

use crate::config::{HiciConfig, LoraConfig, LoraMode};
use crate::error::ModelError;
use crate::lora::LoraLinear;
use crate::tensor_util::{as_dtype, as_f32, to_param};
use crate::weights::{take_shaped, WeightSource};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::softmax;

/// `local_constructor`: segment tokens -> `M` local slot vectors `L_i`.
#[derive(Module, Debug)]
pub struct LocalConstructor<B: Backend> {
    /// `memory_slots`: `[M, H]`.
    pub memory_slots: Param<Tensor<B, 2>>,
    /// `H -> Bd` (LoRA'd).
    pub q_proj: LoraLinear<B>,
    /// `H -> Bd` (LoRA'd).
    pub k_proj: LoraLinear<B>,
    /// `H -> Bd` (LoRA'd).
    pub v_proj: LoraLinear<B>,
    /// `Bd -> H` (LoRA'd).
    pub o_proj: LoraLinear<B>,
    /// `hc`.
    pub heads: usize,
}

impl<B: Backend> LocalConstructor<B> {
    /// Loads `{prefix}.memory_slots` and `{prefix}.{q,k,v,o}_proj` (+ LoRA).
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        hidden: usize,
        cfg: &HiciConfig,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let bd = cfg.bottleneck_dim;
        let slots = take_shaped(
            src,
            &format!("{prefix}.memory_slots"),
            &[cfg.local_slots, hidden],
        )?;
        let lin = |src: &mut dyn WeightSource, n: &str, i: usize, o: usize| {
            LoraLinear::load(src, &format!("{prefix}.{n}"), i, o, lora, mode, device)
        };
        Ok(Self {
            memory_slots: to_param(slots, device),
            q_proj: lin(src, "q_proj", hidden, bd)?,
            k_proj: lin(src, "k_proj", hidden, bd)?,
            v_proj: lin(src, "v_proj", hidden, bd)?,
            o_proj: lin(src, "o_proj", bd, hidden)?,
            heads: cfg.lc_heads,
        })
    }

    /// Local construction for `n` segments at once.
    ///
    /// `x: [n, T, H]` (post-`input_layernorm` activations of each segment) -> `[n, M, H]`.
    /// Slots are batch independent; no mask, no RoPE (all tokens of a segment are real).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, t, _] = x.dims();
        let slots = self.memory_slots.val();
        let [m, _] = slots.dims();
        let qs = self.q_proj.forward(slots); // [M, Bd]
        let bd = qs.dims()[1];
        let hc = self.heads;
        let dh = bd / hc;
        let q = qs
            .reshape([1, m, hc, dh])
            .swap_dims(1, 2)
            .expand([n, hc, m, dh]);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([n, t, hc, dh])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([n, t, hc, dh])
            .swap_dims(1, 2);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (dh as f64).sqrt()); // [n, hc, M, T]
        let dtype = scores.dtype();
        let o = as_dtype(softmax(as_f32(scores), 3), dtype).matmul(v); // [n, hc, M, dh]
        let o = o.swap_dims(1, 2).reshape([n, m, bd]);
        self.o_proj.forward(o)
    }
}
