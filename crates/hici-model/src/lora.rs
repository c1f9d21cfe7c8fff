//! A bias-free linear layer with an optional LoRA path (PEFT 0.5 semantics, spec §2.2).

use crate::config::{LoraConfig, LoraMode};
use crate::error::ModelError;
use crate::tensor_util::{to_param, transpose_host};
use crate::weights::{
    check_shape, take_quantized_shaped, take_shaped, BlockQuant, HostTensor, WeightSource,
    QUANT_BLOCK,
};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::linear;
use burn::tensor::quantization::{QuantLevel, QuantParam, QuantScheme, QuantValue};

/// `y = x W^T (+ scale * (x A^T) B^T)`.
///
/// Float weights are kept in burn's `[in, out]` layout so the forward needs no transpose;
/// quantized ones as stored (see [`LinearWeight`]).
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `W` (LoRA already merged in [`LoraMode::Merged`]).
    pub weight: LinearWeight<B>,
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
        let weight = LinearWeight::load(src, &format!("{prefix}.weight"), in_dim, out_dim, device)?;
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
                let LinearWeight::Dense(w) = weight else {
                    return Err(ModelError::Config(format!(
                        "`{prefix}.weight` is quantized: LoRA cannot be merged into it \
                         (merge before quantizing, or keep LoRA unmerged)"
                    )));
                };
                // W'^T = W^T + scale * (B A)^T = W^T + scale * A^T B^T
                let delta = a_t.val().matmul(b_t.val()).mul_scalar(scale);
                Self {
                    weight: LinearWeight::Dense(Param::from_tensor(w.val().add(delta))),
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
                self.weight.forward(x).add(low.mul_scalar(self.scale))
            }
            _ => self.weight.forward(x),
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.out_dim()
    }
}

/// A plain bias-free linear layer.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: LinearWeight<B>,
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
        Ok(Self {
            weight: LinearWeight::load(src, name, in_dim, out_dim, device)?,
        })
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.weight.forward(x)
    }
}

/// The weight of a linear layer: float, or kept in 8-bit blocks.
#[derive(Module, Debug)]
pub enum LinearWeight<B: Backend> {
    /// `[in, out]` (the PyTorch `[out, in]` weight transposed).
    Dense(Param<Tensor<B, 2>>),
    /// A block-quantized weight, see [`QuantWeight`].
    Quantized(QuantWeight<B>),
}

/// A weight in 8-bit blocks of 32 along `in`, as the file stored it (GGUF rows).
///
/// `y = x · (Q ⊙ S)ᵀ (+ blocksum(x) · O)`: burn's quantized matmul for the first term (the
/// weight is never expanded to float: packed values and scales go to the matmul kernel on
/// CubeCL, a block-wise kernel on ndarray), a small float product for the per-block offsets.
#[derive(Module, Debug)]
pub struct QuantWeight<B: Backend> {
    /// `[out, in]` QFloat: 8-bit values, one f32 scale per 32 values of a row.
    pub values: Param<Tensor<B, 2>>,
    /// `[in / 32, out]`: the per-block offsets (formats with a minimum: Q4_1, Q5_1, K-quants).
    pub offsets: Option<Param<Tensor<B, 2>>>,
}

impl<B: Backend> LinearWeight<B> {
    /// Loads `name` (PyTorch `[out, in]`): kept quantized when the source holds it so, else
    /// f32 and transposed to `[in, out]`.
    pub fn load(
        src: &mut dyn WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if let Some(q) = take_quantized_shaped(src, name, [out_dim, in_dim])? {
            return Ok(Self::Quantized(QuantWeight::from_blocks(&q, device)));
        }
        let w = take_shaped(src, name, &[out_dim, in_dim])?;
        Ok(Self::Dense(to_param::<B, 2>(transpose_host(&w), device)))
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Dense(w) => linear(x, w.val(), None),
            Self::Quantized(q) => q.forward(x),
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims()[1],
            Self::Quantized(q) => q.values.dims()[0],
        }
    }

    /// Whether the weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }
}

impl<B: Backend> QuantWeight<B> {
    /// Uploads `q` (`[out, in]`, blocks of 32 along `in`).
    pub fn from_blocks(q: &BlockQuant, device: &B::Device) -> Self {
        // room for the scales burn appends (plus alignment), so that appending them does not
        // reallocate: a grown buffer would keep up to twice the values' memory
        let mut values = Vec::with_capacity(q.values.len() + 4 * q.scales.len() + 64);
        values.extend_from_slice(&q.values);
        let values = Tensor::from_data(
            TensorData::quantized(values, q.shape(), quant_scheme(), &q.scales),
            device,
        );
        let offsets = q.offsets.as_ref().map(|o| {
            // [out, in/32] -> [in/32, out]
            let t = HostTensor {
                shape: vec![q.rows, q.cols / QUANT_BLOCK],
                data: o.clone(),
            };
            to_param::<B, 2>(transpose_host(&t), device)
        });
        Self {
            values: Param::from_tensor(values),
            offsets,
        }
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let k = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let n = self.values.dims()[0];
        let x2 = x.reshape([rows, k]);
        let mut y = x2.clone().matmul(self.values.val().transpose());
        if let Some(o) = &self.offsets {
            let kb = k / QUANT_BLOCK;
            let sums = x2
                .reshape([rows, kb, QUANT_BLOCK])
                .sum_dim(2)
                .reshape([rows, kb]);
            y = y.add(sums.matmul(o.val()));
        }
        let mut out = dims;
        out[D - 1] = n;
        y.reshape(out)
    }
}

/// The scheme of quantized weights: 8-bit symmetric values, blocks of 32, f32 scales (exact
/// for every GGUF block format read here; f16 scales would round the K-quants' products).
pub fn quant_scheme() -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::block([QUANT_BLOCK as u8]))
        .with_param(QuantParam::F32)
}
