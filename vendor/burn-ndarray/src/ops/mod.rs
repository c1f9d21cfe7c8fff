mod activation;
mod base;
mod bool_tensor;
mod int_tensor;
mod module;
mod qtensor;
#[cfg(feature = "simd")]
mod simd;
mod tensor;
mod transaction;

pub(crate) mod adaptive_avgpool;
pub(crate) mod avgpool;
pub(crate) mod conv;
pub(crate) mod deform_conv;
pub(crate) mod grid_sample;
pub(crate) mod interpolate;
pub(crate) mod macros;
pub(crate) mod matmul;
// HiCI patch: f32 products on gemm and a fused attention (see vendor/README.md)
#[cfg(all(feature = "std", feature = "multi-threads"))]
pub(crate) mod attention_f32;
#[cfg(all(feature = "std", feature = "multi-threads"))]
pub(crate) mod gemm_f32;
// HiCI patch: few-row f32 products without packing (see the module doc).
#[cfg(feature = "std")]
pub(crate) mod matvec;
pub(crate) mod qmatvec;
// HiCI patch: large element-wise maps over the rayon pool (see the module doc).
pub(crate) mod par_map;
pub(crate) mod maxpool;
pub(crate) mod padding;
pub(crate) mod quantization;

pub(crate) use base::*;
