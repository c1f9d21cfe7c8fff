use crate::{
    NdArray, NdArrayTensor, SharedArray,
    element::{ExpElement, FloatNdArrayElement, IntNdArrayElement, QuantElement},
    execute_with_float_dtype, execute_with_numeric_dtype,
    ops::NdArrayMathOps,
};
use burn_backend::{ElementConversion, TensorMetadata, ops::ActivationOps, tensor::FloatTensor};

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> ActivationOps<Self>
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn relu(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        execute_with_numeric_dtype!(tensor, |array| NdArrayMathOps::clamp_min(array, 0.elem()))
    }

    /// HiCI patch: `1 / (1 + exp(-x))` in one pass (large arrays over the rayon pool). burn's
    /// default is six passes (`exp(-log(1 + exp(-x)))` with a negation between each), which
    /// made SwiGLU's gate the largest element-wise cost of a prefill. Same limits in f32/f64:
    /// `exp(-x)` overflowing to infinity gives 0, underflowing to 0 gives 1.
    fn sigmoid(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        execute_with_float_dtype!(tensor, FloatElem, |array: SharedArray<FloatElem>| {
            let one: FloatElem = 1.elem();
            super::par_map::map_into(array, move |a: FloatElem| one / (one + (-a).exp_elem()))
        })
    }
}
