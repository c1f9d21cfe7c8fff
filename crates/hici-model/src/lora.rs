//! A bias-free linear layer with an optional LoRA path (PEFT 0.5 semantics, spec §2.2).

use crate::config::{LoraConfig, LoraMode};
use crate::error::ModelError;
use crate::tensor_util::{to_param, transpose_host};
use crate::weights::{check_shape, take_shaped, WeightSource};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::linear;

/// `y = x W^T (+ scale * (x A^T) B^T)`.
///
/// Weights are kept in burn's `[in, out]` layout so the forward needs no transpose.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[in, out]` (the PyTorch `[out, in]` weight transposed; LoRA already merged in
    /// [`LoraMode::Merged`]).
    pub weight: Param<Tensor<B, 2>>,
    /// `[in, r]` = `lora_A^T` (runtime LoRA only).
    pub lora_a: Option<Param<Tensor<B, 2>>>,
    /// `[r, out]` = `lora_B^T` (runtime LoRA only).
    pub lora_b: Option<Param<Tensor<B, 2>>>,
    /// `alpha / r`.
    pub scale: f32,
}

impl<B: Backend> LoraLinear<B> {
    /// Loads `{prefix}.weight` `[out, in]` and, when present, `{prefix}.lora_A.weight` `[r, in]`
    /// and `{prefix}.lora_B.weight` `[out, r]`.
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        lora: Option<LoraConfig>,
        mode: LoraMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let w = take_shaped(src, &format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let weight = to_param::<B, 2>(transpose_host(&w), device);
        let a_name = format!("{prefix}.lora_A.weight");
        let b_name = format!("{prefix}.lora_B.weight");
        let (a, b) = (src.take(&a_name), src.take(&b_name));
        let (a, b) = match (a, b) {
            (None, None) => {
                return Ok(Self {
                    weight,
                    lora_a: None,
                    lora_b: None,
                    scale: 0.0,
                })
            }
            (Some(_), None) => return Err(ModelError::MissingWeight { name: b_name }),
            (None, Some(_)) => return Err(ModelError::MissingWeight { name: a_name }),
            (Some(a), Some(b)) => (a, b),
        };
        let cfg = lora.ok_or_else(|| {
            ModelError::Config(format!(
                "found LoRA weights `{a_name}` but no LoRA configuration (r, alpha)"
            ))
        })?;
        check_shape(&a_name, &a, &[cfg.r, in_dim])?;
        check_shape(&b_name, &b, &[out_dim, cfg.r])?;
        let scale = cfg.scale() as f32;
        let a_t = to_param::<B, 2>(transpose_host(&a), device); // [in, r]
        let b_t = to_param::<B, 2>(transpose_host(&b), device); // [r, out]
        Ok(match mode {
            LoraMode::Merged => {
                // W'^T = W^T + scale * (B A)^T = W^T + scale * A^T B^T
                let delta = a_t.val().matmul(b_t.val()).mul_scalar(scale);
                Self {
                    weight: Param::from_tensor(weight.val().add(delta)),
                    lora_a: None,
                    lora_b: None,
                    scale: 0.0,
                }
            }
            LoraMode::Unmerged => Self {
                weight,
                lora_a: Some(a_t),
                lora_b: Some(b_t),
                scale,
            },
        })
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                let low = linear(linear(x.clone(), a.val(), None), b.val(), None);
                linear(x, self.weight.val(), None).add(low.mul_scalar(self.scale))
            }
            _ => linear(x, self.weight.val(), None),
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[1]
    }
}

/// A plain bias-free linear layer, `[in, out]` weight.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `name` `[out, in]` (PyTorch layout) and stores it transposed.
    pub fn load(
        src: &mut dyn WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let w = take_shaped(src, name, &[out_dim, in_dim])?;
        Ok(Self {
            weight: to_param::<B, 2>(transpose_host(&w), device),
        })
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(x, self.weight.val(), None)
    }
}
