//! A bias-free linear layer with an optional LoRA path (PEFT 0.5 semantics, spec §2.2).

use crate::config::{LoraConfig, LoraMode};
use crate::error::ModelError;
use crate::tensor_util::{as_dtype, to_param, transpose_host};
use crate::weights::{
    check_shape, take_quantized_shaped, take_shaped, BlockQuant, HostTensor, WeightSource,
    QUANT_BLOCK,
};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::linear;
use burn::tensor::quantization::{QuantLevel, QuantParam, QuantScheme, QuantStore, QuantValue};
use burn::tensor::DType;

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

/// How a block-quantized weight is multiplied: the loader chooses per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantProduct {
    /// burn's quantized matmul (`x · Wqᵀ` with a QFloat right operand), the weight one tensor
    /// of 8-bit values. Exact on ndarray, whose block kernels (vendor/burn-ndarray) never
    /// expand the weight.
    #[default]
    Backend,
    /// burn's dequantize kernel on one row chunk of at most [`DEQUANT_CHUNK`] values at a
    /// time, then the float matmul; each chunk's float copy is dropped before the next. The
    /// weight stays packed (4-bit formats 8 values per u32, the rest 4 per u32) and memory
    /// holds one float chunk on top. For backends whose quantized matmul is not verified:
    /// burn 0.21's CubeCL one returns wrong products for these weights (wgpu, CUDA).
    Dequantize,
}

/// Most values of a weight dequantized at once under [`QuantProduct::Dequantize`] (16 MiB
/// of f32).
pub const DEQUANT_CHUNK: usize = 1 << 22;

/// A weight in blocks of 32 along `in`, as the file stored it (GGUF rows).
///
/// `y = x · (Q ⊙ S)ᵀ (+ blocksum(x) · O)`: the first term as [`QuantProduct`] says, a small
/// float product for the per-block offsets.
#[derive(Module, Debug)]
pub struct QuantWeight<B: Backend> {
    /// Row chunks of the `[out, in]` weight, each a QFloat `[rows_i, in]` (8- or 4-bit
    /// symmetric values, one f32 scale per 32 values of a row); one chunk under
    /// [`QuantProduct::Backend`].
    pub values: Vec<Param<Tensor<B, 2>>>,
    /// `[in / 32, out]`: the per-block offsets (formats with a minimum: Q4_1, Q5_1, K-quants;
    /// also 4-bit values re-centred for packing).
    pub offsets: Option<Param<Tensor<B, 2>>>,
    #[module(skip)]
    pub product: QuantProduct,
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
            return Ok(Self::Quantized(QuantWeight::from_blocks(
                &q,
                src.quant_product(),
                device,
            )));
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
            Self::Quantized(q) => q.out_dim(),
        }
    }

    /// Whether the weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }
}

impl<B: Backend> QuantWeight<B> {
    /// Uploads `q` (`[out, in]`, blocks of 32 along `in`) for `product`.
    pub fn from_blocks(q: &BlockQuant, product: QuantProduct, device: &B::Device) -> Self {
        Self::from_blocks_chunked(q, product, DEQUANT_CHUNK, device)
    }

    /// [`QuantWeight::from_blocks`] with row chunks of at most `chunk` values (at least one
    /// row) under [`QuantProduct::Dequantize`].
    pub fn from_blocks_chunked(
        q: &BlockQuant,
        product: QuantProduct,
        chunk: usize,
        device: &B::Device,
    ) -> Self {
        let (values, offsets) = match product {
            QuantProduct::Backend => (vec![upload_q8(q, device)], q.offsets.clone()),
            QuantProduct::Dequantize => upload_packed(q, chunk, device),
        };
        let offsets = offsets.map(|o| {
            // [out, in/32] -> [in/32, out]
            let t = HostTensor {
                shape: vec![q.rows, q.cols / QUANT_BLOCK],
                data: o,
            };
            to_param::<B, 2>(transpose_host(&t), device)
        });
        Self {
            values,
            offsets,
            product,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.values.iter().map(|c| c.dims()[0]).sum()
    }

    /// `x: [..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let k = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let n = self.out_dim();
        let x2 = x.reshape([rows, k]);
        let mut y = match self.product {
            QuantProduct::Backend => x2.clone().matmul(self.values[0].val().transpose()),
            QuantProduct::Dequantize => {
                let dtype = x2.dtype();
                let mut parts: Vec<_> = self
                    .values
                    .iter()
                    .map(|c| {
                        let w = as_dtype(c.val().dequantize(), dtype); // [rows_i, in]
                        x2.clone().matmul(w.transpose())
                    })
                    .collect();
                if parts.len() == 1 {
                    parts.pop().expect("one chunk")
                } else {
                    Tensor::cat(parts, 1)
                }
            }
        };
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

/// `q` as one QFloat tensor of 8-bit values ([`quant_scheme`]).
fn upload_q8<B: Backend>(q: &BlockQuant, device: &B::Device) -> Param<Tensor<B, 2>> {
    // room for the scales burn appends (plus alignment), so that appending them does not
    // reallocate: a grown buffer would keep up to twice the values' memory
    let mut values = Vec::with_capacity(q.values.len() + 4 * q.scales.len() + 64);
    values.extend_from_slice(&q.values);
    Param::from_tensor(Tensor::from_data(
        TensorData::quantized(values, q.shape(), quant_scheme(), &q.scales),
        device,
    ))
}

/// `q` in row chunks of at most `chunk` values, packed in u32 words (value `j` of a
/// word in bits `b·j..b·(j+1)`, two's complement, as burn's CubeCL kernels read them): 4-bit
/// when the values span at most 16 levels (re-centred into `[-8, 7]`, the shift folded into
/// the offsets), else 8-bit. Returns the chunks and the offsets (`[out, in/32]`).
fn upload_packed<B: Backend>(
    q: &BlockQuant,
    chunk: usize,
    device: &B::Device,
) -> (Vec<Param<Tensor<B, 2>>>, Option<Vec<f32>>) {
    let lo = q.values.iter().copied().min().unwrap_or(0) as i32;
    let hi = q.values.iter().copied().max().unwrap_or(0) as i32;
    let four = hi - lo <= 15;
    // v·s + o = (v - shift)·s + (o + shift·s)
    let shift = if !four || (lo >= -8 && hi <= 7) {
        0
    } else {
        lo + 8
    };
    let offsets = if shift == 0 {
        q.offsets.clone()
    } else {
        let base = q
            .offsets
            .clone()
            .unwrap_or_else(|| vec![0.0; q.scales.len()]);
        Some(
            base.iter()
                .zip(&q.scales)
                .map(|(o, s)| o + shift as f32 * s)
                .collect(),
        )
    };
    let scheme = quant_scheme()
        .with_value(if four {
            QuantValue::Q4S
        } else {
            QuantValue::Q8S
        })
        .with_store(QuantStore::PackedU32(0));
    let (cols, bpr) = (q.cols, q.cols / QUANT_BLOCK);
    let chunk_rows = (chunk / cols.max(1)).clamp(1, q.rows.max(1));
    let mut chunks = Vec::with_capacity(q.rows.div_ceil(chunk_rows));
    for r0 in (0..q.rows).step_by(chunk_rows) {
        let r1 = (r0 + chunk_rows).min(q.rows);
        let vals = &q.values[r0 * cols..r1 * cols];
        let scales = &q.scales[r0 * bpr..r1 * bpr];
        let mut bytes = Vec::with_capacity(vals.len() + 4 * scales.len());
        if four {
            for word in vals.chunks_exact(8) {
                let w = word.iter().enumerate().fold(0u32, |w, (j, &v)| {
                    w | (((v as i32 - shift) as u32 & 0xf) << (4 * j))
                });
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        } else {
            bytes.extend(vals.iter().map(|&v| v as u8));
        }
        for s in scales {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        let data = TensorData::from_bytes_vec(bytes, [r1 - r0, cols], DType::QFloat(scheme));
        chunks.push(Param::from_tensor(Tensor::from_data(data, device)));
    }
    (chunks, offsets)
}

/// The scheme of quantized weights: 8-bit symmetric values, blocks of 32, f32 scales (exact
/// for every GGUF block format read here; f16 scales would round the K-quants' products).
pub fn quant_scheme() -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::block([QUANT_BLOCK as u8]))
        .with_param(QuantParam::F32)
}
