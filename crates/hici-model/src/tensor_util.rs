//! Small helpers turning host tensors into burn parameters.

use crate::weights::HostTensor;
use burn::module::Param;
use burn::prelude::*;

/// `[rows, cols]` row-major -> `[cols, rows]` row-major, on the host.
pub(crate) fn transpose_host(t: &HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    // cache-blocked: both the reads and the writes stay within a few pages per tile
    const TILE: usize = 64;
    let mut out = vec![0.0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for r in r0..r1 {
                let src = &t.data[r * cols + c0..r * cols + c1];
                for (i, v) in src.iter().enumerate() {
                    out[(c0 + i) * rows + r] = *v;
                }
            }
        }
    }
    HostTensor {
        shape: vec![cols, rows],
        data: out,
    }
}

/// Uploads a host tensor as a `D`-dimensional tensor.
pub(crate) fn to_tensor<B: Backend, const D: usize>(
    t: HostTensor,
    device: &B::Device,
) -> Tensor<B, D> {
    debug_assert_eq!(t.shape.len(), D);
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

/// Uploads a host tensor as a parameter.
pub(crate) fn to_param<B: Backend, const D: usize>(
    t: HostTensor,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(to_tensor(t, device))
}

/// `x` in f32 (a no-op when it already is): where half-precision runs accumulate in f32.
pub(crate) fn as_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    as_dtype(x, burn::tensor::DType::F32)
}

/// `x` cast to `dtype` (a no-op when it already is).
pub(crate) fn as_dtype<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Reads a tensor back to the host as f32 values (tests and tools).
pub fn to_vec_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data after convert")
}
