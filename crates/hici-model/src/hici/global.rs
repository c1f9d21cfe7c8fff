//! Stage 2, global integration (spec §3.2–3.3, `GlobalIntegratorShared`): five statistics of
//! all local slots -> shared compressor -> attention of `K` global queries over the statistics
//! -> gated expansion -> `K` global slots `G`.

use crate::config::{HiciConfig, LoraConfig, LoraMode};
use crate::error::ModelError;
use crate::lora::{Linear, LoraLinear};
use crate::tensor_util::{as_dtype, as_f32, to_param, to_tensor};
use crate::weights::{take_shaped, WeightSource};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::softmax;

/// PyTorch `nn.LayerNorm` over the last dim (biased variance, eps inside the sqrt, affine).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// `[d]`.
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: usize,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: to_param(take_shaped(src, &format!("{prefix}.weight"), &[d])?, device),
            bias: to_param(take_shaped(src, &format!("{prefix}.bias"), &[d])?, device),
            eps: 1e-5,
        })
    }

    /// `x: [n, r, d] -> [n, r, d]`.
    /// Computed in f32 whatever the working precision.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (d, dtype) = (x.dims()[2], x.dtype());
        let x = as_f32(x);
        let mean = x.clone().mean_dim(2);
        let centered = x.sub(mean);
        let var = centered.clone().powi_scalar(2).mean_dim(2);
        let normed = centered.div(var.add_scalar(self.eps).sqrt());
        let w = as_f32(self.weight.val()).reshape([1, 1, d]);
        let b = as_f32(self.bias.val()).reshape([1, 1, d]);
        as_dtype(normed.mul(w).add(b), dtype)
    }
}

/// `global_integrator`: all local slots of a sequence -> `K` global slots.
#[derive(Module, Debug)]
pub struct GlobalIntegrator<B: Backend> {
    /// `shared_compressor.0`: `H -> Sd`, no bias.
    pub compress: Linear<B>,
    /// `shared_compressor.1`: LayerNorm(Sd).
    pub compress_norm: LayerNorm<B>,
    /// `stat_expand.0` (`Sd -> Cd`), only when `Sd < Cd`.
    pub stat_expand: Option<Linear<B>>,
    /// `stat_expand.1`: LayerNorm(Cd), only when `Sd < Cd`.
    pub stat_expand_norm: Option<LayerNorm<B>>,
    /// `global_queries`: `[K, Cd]`.
    pub global_queries: Param<Tensor<B, 2>>,
    /// `Cd -> Cd` (LoRA'd).
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    /// `expand`: `Cd -> H`, not LoRA'd.
    pub expand: Linear<B>,
    /// `expand_scale_param` (0-dim in PyTorch, `[1]` here).
    pub expand_scale_param: Param<Tensor<B, 1>>,
    /// `hg`.
    pub heads: usize,
}

/// PyTorch `F.softplus` (beta 1, threshold 20) on a scalar, in f32.
pub fn softplus_f32(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl<B: Backend> GlobalIntegrator<B> {
    /// Loads every `{prefix}.*` tensor of spec §2.3.
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        hidden: usize,
        cfg: &HiciConfig,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let (sd, cd, k) = (cfg.shared_compress_dim, cfg.compress_dim, cfg.global_slots);
        let p = |n: &str| format!("{prefix}.{n}");
        let compress = Linear::load(src, &p("shared_compressor.0.weight"), hidden, sd, device)?;
        let compress_norm = LayerNorm::load(src, &p("shared_compressor.1"), sd, device)?;
        let (stat_expand, stat_expand_norm) = if cfg.has_stat_expand() {
            (
                Some(Linear::load(
                    src,
                    &p("stat_expand.0.weight"),
                    sd,
                    cd,
                    device,
                )?),
                Some(LayerNorm::load(src, &p("stat_expand.1"), cd, device)?),
            )
        } else {
            (None, None)
        };
        let gq = take_shaped(src, &p("global_queries"), &[k, cd])?;
        let lin = |src: &mut dyn WeightSource, n: &str| {
            LoraLinear::load(src, &p(n), cd, cd, lora, mode, device)
        };
        let q_proj = lin(src, "q_proj")?;
        let k_proj = lin(src, "k_proj")?;
        let v_proj = lin(src, "v_proj")?;
        let o_proj = lin(src, "o_proj")?;
        let expand = Linear::load(src, &p("expand.weight"), cd, hidden, device)?;
        let esp_name = p("expand_scale_param");
        let esp = src
            .take(&esp_name)
            .ok_or_else(|| ModelError::MissingWeight {
                name: esp_name.clone(),
            })?;
        if esp.numel() != 1 || esp.shape.len() > 1 {
            return Err(ModelError::ShapeMismatch {
                name: esp_name,
                expected: vec![],
                found: esp.shape,
            });
        }
        let esp = crate::weights::HostTensor {
            shape: vec![1],
            data: esp.data,
        };
        Ok(Self {
            compress,
            compress_norm,
            stat_expand,
            stat_expand_norm,
            global_queries: to_param(gq, device),
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            expand,
            expand_scale_param: Param::from_tensor(to_tensor(esp, device)),
            heads: cfg.gi_heads,
        })
    }

    /// Global integration over all segments of each sequence (the "none" causal mode).
    ///
    /// `local: [b, N*M, H]` (every local slot vector of a sequence) -> `G: [b, K, H]`.
    pub fn forward(&self, local: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = local.dtype();
        self.integrate(as_dtype(Self::statistics(local), dtype))
    }

    /// Causal variant (spec §3.3): one `G_i` per segment from cumulative statistics of
    /// segments `0..=i`.
    ///
    /// `local: [b, N, M, H]` -> `[b, N, K, H]`.
    pub fn forward_causal(&self, local: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, n, m, h] = local.dims();
        let dtype = local.dtype();
        let local = as_f32(local);
        let mut stats = Vec::with_capacity(n);
        for i in 0..n {
            let seen = local
                .clone()
                .narrow(1, 0, i + 1)
                .reshape([b, (i + 1) * m, h]);
            let mean = seen.clone().mean_dim(1);
            let mx = seen.clone().max_dim(1);
            let mn = seen.clone().min_dim(1);
            // one-pass formula, clamp on the variance at 1e-12
            let ex2 = seen.powi_scalar(2).mean_dim(1);
            let var = ex2.sub(mean.clone().powi_scalar(2)).clamp_min(1e-12);
            let std = var.sqrt();
            stats.push(Self::stack_stats(mean, mx, mn, std).unsqueeze_dim::<4>(1));
            // [b,1,5,H]
        }
        let stats = as_dtype(Tensor::cat(stats, 1).reshape([b * n, 5, h]), dtype);
        let k = self.global_queries.dims()[0];
        self.integrate(stats).reshape([b, n, k, h])
    }

    /// The five statistics of `local: [b, R, H]` over its `R` rows -> `[b, 5, H]`:
    /// mean, max, min, population std (clamped at 1e-6), L2-normalised mean. Always f32.
    pub fn statistics(local: Tensor<B, 3>) -> Tensor<B, 3> {
        let local = as_f32(local);
        let mean = local.clone().mean_dim(1); // [b,1,H]
        let mx = local.clone().max_dim(1);
        let mn = local.clone().min_dim(1);
        // population std, clamped at 1e-6 (clamp on the std)
        let std = local.var_bias(1).sqrt().clamp_min(1e-6);
        Self::stack_stats(mean, mx, mn, std)
    }

    /// `[mean, max, min, std, mean/||mean||]` (ORDER MATTERS), each `[b,1,H]` -> `[b,5,H]`.
    fn stack_stats(
        mean: Tensor<B, 3>,
        mx: Tensor<B, 3>,
        mn: Tensor<B, 3>,
        std: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        // F.normalize: eps is a floor on the norm
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(2)
            .sqrt()
            .clamp_min(1e-6);
        let nmean = mean.clone().div(norm);
        Tensor::cat(vec![mean, mx, mn, std, nmean], 1)
    }

    /// Compressor, query attention over the 5 statistics and gated expansion.
    ///
    /// `stats: [n, 5, H]` -> `[n, K, H]`.
    fn integrate(&self, stats: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = stats.dims()[0];
        let mut c = self.compress_norm.forward(self.compress.forward(stats));
        if let (Some(lin), Some(norm)) = (&self.stat_expand, &self.stat_expand_norm) {
            c = norm.forward(lin.forward(c));
        }
        let q = self.q_proj.forward(self.global_queries.val()); // [K, Cd]
        let [k, cd] = q.dims();
        let hg = self.heads;
        let dg = cd / hg;
        let q = q
            .reshape([1, k, hg, dg])
            .swap_dims(1, 2)
            .expand([n, hg, k, dg]);
        let kg = self
            .k_proj
            .forward(c.clone())
            .reshape([n, 5, hg, dg])
            .swap_dims(1, 2);
        let vg = self
            .v_proj
            .forward(c)
            .reshape([n, 5, hg, dg])
            .swap_dims(1, 2);
        let scores = q
            .matmul(kg.swap_dims(2, 3))
            .mul_scalar(1.0 / (dg as f64).sqrt());
        let dtype = scores.dtype();
        let a = as_dtype(softmax(as_f32(scores), 3), dtype); // [n, hg, K, 5]
        let o = a.matmul(vg).swap_dims(1, 2).reshape([n, k, cd]);
        let o = self.o_proj.forward(o);
        let gate = self.expand_scale_param.val().clone().exp().log1p(); // softplus
        let gate = self.gate_value(gate);
        self.expand.forward(o).mul(gate)
    }

    /// softplus with PyTorch's threshold (x > 20 -> x), as a `[1,1,1]` tensor.
    fn gate_value(&self, softplus_naive: Tensor<B, 1>) -> Tensor<B, 3> {
        let raw = self.expand_scale_param.val();
        let over = raw.clone().greater_elem(20.0);
        softplus_naive.mask_where(over, raw).reshape([1, 1, 1])
    }
}
