//! The hand-off between checkpoint readers and the model: named host tensors in f32.
//!
//! Names follow the Hugging Face / PEFT layout without the `base_model.model.` prefix, e.g.
//! `model.layers.0.self_attn.q_proj.weight`, `model.layers.0.self_attn.q_proj.lora_A.weight`,
//! `model.layers.0.self_attn.local_constructor.memory_slots`.

use crate::error::ModelError;
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
