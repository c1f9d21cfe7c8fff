//! HiCI patch: f32 products on the `gemm` crate.
//!
//! matrixmultiply (burn-ndarray's product) has AVX2/FMA kernels only. `gemm` picks its kernel
//! at run time, AVX-512 where the CPU has it (feature `x86-v4`), and splits one product over
//! the rayon pool itself. On a 2-core AVX-512 host a prefill projection (`[512, 576] x
//! [576, 1536]`) runs at about 320 GFLOP/s there against about 200 for matrixmultiply on both
//! cores. Every product is computed in f32 with f32 accumulation, like matrixmultiply; only the
//! summation order differs.

use core::any::TypeId;

use ndarray::{Array3, ArrayView3, s};

/// `out[b] = lhs[l] · rhs[r]` for every output batch `b`, where `(l, r) = batch_of(b)`, when
/// `E` is f32; `None` otherwise (the caller takes the general path).
///
/// `lhs: [l_batches, m, k]`, `rhs: [r_batches, k, n]` (any strides) -> `[batches, m, n]`,
/// row-major.
pub(crate) fn try_products<E, F>(
    lhs: &ArrayView3<E>,
    rhs: &ArrayView3<E>,
    batches: usize,
    batch_of: F,
) -> Option<Array3<E>>
where
    E: 'static + Copy + num_traits::Zero + Send + Sync,
    F: Fn(usize) -> (usize, usize) + Sync,
{
    if TypeId::of::<E>() != TypeId::of::<f32>() {
        return None;
    }
    let (m, k, n) = (lhs.dim().1, lhs.dim().2, rhs.dim().2);
    let mut out = Array3::<E>::zeros((batches, m, n));
    if batches == 0 || m == 0 || n == 0 || k == 0 {
        return Some(out);
    }
    let threads = super::matvec::threads();
    let product = |b: usize, dst: *mut E, parallelism: gemm::Parallelism| {
        let (l, r) = batch_of(b);
        let (a, w) = (lhs.slice(s![l, .., ..]), rhs.slice(s![r, .., ..]));
        let ([a_rs, a_cs], [w_rs, w_cs]) = ([a.strides()[0], a.strides()[1]], [w.strides()[0], w.strides()[1]]);
        // SAFETY: E is f32 (checked above); the pointers and strides describe the views'
        // elements (gemm reads `[m, k]` and `[k, n]` through them) and `dst` is a row-major
        // `[m, n]` block that only this call writes.
        unsafe {
            gemm::gemm::<f32>(
                m,
                n,
                k,
                dst as *mut f32,
                1,
                n as isize,
                false,
                a.as_ptr() as *const f32,
                a_cs,
                a_rs,
                w.as_ptr() as *const f32,
                w_cs,
                w_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let block = m * n;
    let base = SendPtr(out.as_mut_ptr());
    if batches >= threads && batches > 1 {
        // one product per task (attention: one per batch entry and head)
        use rayon::prelude::*;
        (0..batches).into_par_iter().for_each(|b| {
            // SAFETY: block `b` of the output belongs to this task alone.
            let dst = unsafe { base.get().add(b * block) };
            product(b, dst, gemm::Parallelism::None)
        });
    } else {
        let parallelism = pool_parallelism();
        for b in 0..batches {
            // SAFETY: block `b` lies inside the `batches * m * n` output.
            let dst = unsafe { base.get().add(b * block) };
            product(b, dst, parallelism);
        }
    }
    Some(out)
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` (f32, any strides, in elements; `dst` row-major with
/// row stride `dst_rs`), split by gemm over the rayon pool.
///
/// # Safety
/// The pointers and strides must describe `[m, k]`, `[k, n]` and `[m, n]` blocks of live
/// f32 values, and nothing else may access `dst`'s block during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_into(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    [lhs_rs, lhs_cs]: [isize; 2],
    rhs: *const f32,
    [rhs_rs, rhs_cs]: [isize; 2],
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm::<f32>(
            m, n, k, dst, 1, dst_rs, false, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 0.0, 1.0,
            false, false, false, pool_parallelism(),
        )
    }
}

/// One product split by gemm over the caller's rayon pool (serial with one thread).
fn pool_parallelism() -> gemm::Parallelism {
    match super::matvec::threads() {
        threads @ 2.. => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// A raw output pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<E>(pub(crate) *mut E);

impl<E> SendPtr<E> {
    pub(crate) fn get(self) -> *mut E {
        self.0
    }
}

// SAFETY: the tasks that share it write disjoint blocks (see the callers).
unsafe impl<E> Send for SendPtr<E> {}
unsafe impl<E> Sync for SendPtr<E> {}
