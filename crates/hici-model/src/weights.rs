//! The hand-off between checkpoint readers and the model: named host tensors in f32, and
//! block-quantized ones ([`BlockQuant`]) for the linear weights of quantized files.
//!
//! Names follow the Hugging Face / PEFT layout without the `base_model.model.` prefix, e.g.
//! `model.layers.0.self_attn.q_proj.weight`, `model.layers.0.self_attn.q_proj.lora_A.weight`,
//! `model.layers.0.self_attn.local_constructor.memory_slots`.

use crate::error::ModelError;
pub use crate::lora::QuantProduct;
use std::collections::BTreeMap;

/// A dense f32 tensor on the host, row-major, PyTorch layout (`Linear` weights are `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(ModelError::Input(format!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Where the model builder takes its weights from.
pub trait WeightSource {
    /// Removes and returns the tensor `name`, or `None` if the source does not have it.
    fn take(&mut self, name: &str) -> Option<HostTensor>;

    /// Removes and returns `name` as a block-quantized tensor, when the source holds it so;
    /// `None` otherwise (then [`WeightSource::take`] gives it in f32). Layers that can run on
    /// quantized weights ask here first.
    fn take_quantized(&mut self, _name: &str) -> Option<BlockQuant> {
        None
    }

    /// How the model is to multiply the quantized tensors this source hands out (the loader
    /// knows the device they go to).
    fn quant_product(&self) -> QuantProduct {
        QuantProduct::Backend
    }
}

/// The simplest source: a name -> tensor map. Whatever remains after building is unused.
pub type WeightMap = BTreeMap<String, HostTensor>;

impl WeightSource for WeightMap {
    fn take(&mut self, name: &str) -> Option<HostTensor> {
        self.remove(name)
    }
}

/// Takes a required tensor and checks its shape.
pub fn take_shaped(
    src: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
) -> Result<HostTensor, ModelError> {
    let t = src.take(name).ok_or_else(|| ModelError::MissingWeight {
        name: name.to_string(),
    })?;
    check_shape(name, &t, shape)?;
    Ok(t)
}

/// Checks `t.shape == shape`, naming the tensor in the error.
pub fn check_shape(name: &str, t: &HostTensor, shape: &[usize]) -> Result<(), ModelError> {
    if t.shape != shape {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: t.shape.clone(),
        });
    }
    Ok(())
}

/// Values per quantization block (GGUF's Q8_0/Q4_0/Q4_1 block; burn's `block([32])`).
pub const QUANT_BLOCK: usize = 32;

/// A `[rows, cols]` weight (PyTorch layout: `Linear` weights are `[out, in]`) in blocks of
/// [`QUANT_BLOCK`] values along each row: value `(r, c) = values[r·cols + c] · scales[b] (+
/// offsets[b])` with block `b = (r·cols + c) / 32`.
///
/// This is how quantized GGUF tensors reach the model without being expanded to f32: Q8_0,
/// Q4_0 and Q5_0 as 8-bit values with one scale per block, Q4_1, Q5_1, Q4_K and Q5_K with a
/// per-block offset as well (all exact), other formats re-quantized (see the GGUF reader).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuant {
    pub rows: usize,
    pub cols: usize,
    /// `[rows · cols]`, row-major.
    pub values: Vec<i8>,
    /// `[rows · cols / 32]`.
    pub scales: Vec<f32>,
    /// `[rows · cols / 32]` when the format has a per-block offset (minimum).
    pub offsets: Option<Vec<f32>>,
}

impl BlockQuant {
    /// Checks the sizes: `cols` a multiple of 32, `values`, `scales` and `offsets` complete.
    pub fn check(&self, name: &str) -> Result<(), ModelError> {
        let n = self.rows * self.cols;
        let blocks = n / QUANT_BLOCK;
        let bad = !self.cols.is_multiple_of(QUANT_BLOCK)
            || self.values.len() != n
            || self.scales.len() != blocks
            || self.offsets.as_ref().is_some_and(|o| o.len() != blocks);
        if bad {
            return Err(ModelError::Input(format!(
                "quantized tensor `{name}` [{}, {}]: {} values, {} scales, {} offsets \
                 (rows of a multiple of {QUANT_BLOCK} values, one scale per block)",
                self.rows,
                self.cols,
                self.values.len(),
                self.scales.len(),
                self.offsets.as_ref().map_or(0, Vec::len)
            )));
        }
        Ok(())
    }

    /// The shape, `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (c, bpr) = (self.cols, self.cols / QUANT_BLOCK);
        let vals = &self.values[r * c..(r + 1) * c];
        for b in 0..bpr {
            let i = r * bpr + b;
            let (s, o) = (self.scales[i], self.offsets.as_ref().map_or(0.0, |o| o[i]));
            for j in b * QUANT_BLOCK..(b + 1) * QUANT_BLOCK {
                out[j] = vals[j] as f32 * s + o;
            }
        }
    }

    /// The whole tensor in f32 (the dequantized reference).
    pub fn dequantize(&self) -> HostTensor {
        let mut data = vec![0f32; self.rows * self.cols];
        for (r, row) in data.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        HostTensor {
            shape: vec![self.rows, self.cols],
            data,
        }
    }

    /// Bytes held (values, scales, offsets).
    pub fn nbytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len() + 4 * self.offsets.as_ref().map_or(0, Vec::len)
    }
}

/// Takes `name` when the source holds it quantized, checking its blocks and `shape`
/// (`Ok(None)` when it is not quantized there).
pub fn take_quantized_shaped(
    src: &mut dyn WeightSource,
    name: &str,
    shape: [usize; 2],
) -> Result<Option<BlockQuant>, ModelError> {
    let Some(q) = src.take_quantized(name) else {
        return Ok(None);
    };
    q.check(name)?;
    if q.shape() != shape {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: q.shape().to_vec(),
        });
    }
    Ok(Some(q))
}

/// Quantized tensors by name.
pub type QuantMap = BTreeMap<String, BlockQuant>;

/// Dense and block-quantized tensors by name: a checkpoint whose linear weights stay quantized.
#[derive(Debug, Clone, Default)]
pub struct MixedWeights {
    pub dense: WeightMap,
    pub quantized: QuantMap,
    /// How the model multiplies `quantized` (see [`QuantProduct`]).
    pub product: QuantProduct,
}

impl MixedWeights {
    /// No tensor left.
    pub fn is_empty(&self) -> bool {
        self.dense.is_empty() && self.quantized.is_empty()
    }

    /// Names left (dense first), e.g. for an "unused tensors" error.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.dense.keys().chain(self.quantized.keys())
    }

    /// Number of tensors left.
    pub fn len(&self) -> usize {
        self.dense.len() + self.quantized.len()
    }
}

impl WeightSource for MixedWeights {
    fn take(&mut self, name: &str) -> Option<HostTensor> {
        self.dense
            .remove(name)
            .or_else(|| self.quantized.remove(name).map(|q| q.dequantize()))
    }

    fn take_quantized(&mut self, name: &str) -> Option<BlockQuant> {
        self.quantized.remove(name)
    }

    fn quant_product(&self) -> QuantProduct {
        self.product
    }
}
