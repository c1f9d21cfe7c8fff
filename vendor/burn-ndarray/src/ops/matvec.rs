//! HiCI patch: f32 products with few left rows (decode: `[m, k] x [k, n]`, m small) without
//! packing the right operand.
//!
//! `general_mat_mul` (matrixmultiply) copies the whole right operand into its packed layout on
//! every call. For a decode step (one row per sequence) that copy is as large as the product
//! itself, so the weight is read twice and written once per token. Here each weight row is
//! streamed once, straight from its storage: the work is split into a grid of output-column
//! blocks and weight-row ranges (one task each), and every task walks its weight rows eight (one
//! left row) or four at a time, adding `x[r, i] * w[i, ..]` into its `m x width` partial
//! output, which stays in cache.

use core::any::TypeId;

use ndarray::{Array2, ArrayView2};

/// Left operands with at most this many rows take this path.
pub(crate) const MAX_ROWS: usize = 16;

/// Narrowest right operand taken (below, scheduling costs more than packing).
const MIN_BLOCK: usize = 64;

/// `lhs · rhs` for f32 when `lhs` has at most [`MAX_ROWS`] rows and `rhs` has contiguous
/// rows (column stride 1: a weight, or attention's values) or contiguous columns (row stride
/// 1: a transposed view, attention's keys), as a row-major `[m, n]` array. `None` when the
/// operands are not eligible (the caller takes the general path).
///
/// `lhs: [m, k]` (any strides), `rhs: [k, n]` -> `[m, n]`.
pub(crate) fn try_small_m<E: 'static + Copy>(
    lhs: &ArrayView2<E>,
    rhs: &ArrayView2<E>,
) -> Option<Array2<E>> {
    let mut y = Vec::new();
    small_m_into(lhs, rhs, &mut y)?;
    let (m, n) = (lhs.dim().0, rhs.dim().1);
    Some(Array2::from_shape_vec((m, n), y).expect("m * n values"))
}

/// Which kernel can take `rhs`, if any.
fn layout<E>(m: usize, rhs: &ArrayView2<E>) -> Option<Layout> {
    let (k, n) = rhs.dim();
    if m == 0 || m > MAX_ROWS || k < 4 {
        return None;
    }
    let [rs, cs] = [rhs.strides()[0], rhs.strides()[1]];
    if cs == 1 && rs >= n as isize && n >= MIN_BLOCK {
        Some(Layout::Rows(rs as usize))
    } else if rs == 1 && cs >= k as isize && n >= 16 {
        Some(Layout::Columns(cs as usize))
    } else {
        None
    }
}

#[derive(Clone, Copy)]
enum Layout {
    /// `rhs[i, j]` at `i * stride + j`.
    Rows(usize),
    /// `rhs[i, j]` at `j * stride + i`.
    Columns(usize),
}

/// Appends `lhs · rhs` (row-major `[m, n]`) to `out`; `None` (nothing appended) when not
/// eligible.
fn small_m_into<E: 'static + Copy>(
    lhs: &ArrayView2<E>,
    rhs: &ArrayView2<E>,
    out: &mut Vec<E>,
) -> Option<()> {
    if TypeId::of::<E>() != TypeId::of::<f32>() {
        return None;
    }
    let (m, k) = lhs.dim();
    let (k2, n) = rhs.dim();
    if k != k2 {
        return None;
    }
    let layout = layout(m, rhs)?;
    // SAFETY: E is f32 (checked above), so the views and the vector can be reinterpreted.
    let (lhs, rhs, out) = unsafe {
        (
            &*(lhs as *const ArrayView2<E> as *const ArrayView2<f32>),
            &*(rhs as *const ArrayView2<E> as *const ArrayView2<f32>),
            &mut *(out as *mut Vec<E> as *mut Vec<f32>),
        )
    };
    // the left rows, contiguous: [m, k]
    let x: Vec<f32> = lhs.iter().copied().collect();
    let start = out.len();
    out.resize(start + m * n, 0.0);
    let y = &mut out[start..];
    match layout {
        Layout::Rows(row_stride) => {
            let w = Weights {
                ptr: rhs.as_ptr(),
                row_stride,
                k,
            };
            products(&x, m, w, n, y);
        }
        Layout::Columns(col_stride) => {
            let w = Weights {
                ptr: rhs.as_ptr(),
                row_stride: col_stride,
                k: n,
            };
            dots(&x, m, k, w, y);
        }
    }
    Some(())
}

/// A batch of few-row products, `lhs: [nb, m, k]`, `rhs: [nb, k, n]` -> `[nb, m, n]` (row-major),
/// each through [`try_small_m`]'s kernels; `None` when the operands are not eligible.
pub(crate) fn try_small_m_batched<E: 'static + Copy>(
    lhs: &ndarray::ArrayView3<E>,
    rhs: &ndarray::ArrayView3<E>,
) -> Option<ndarray::Array3<E>> {
    use ndarray::{Axis, s};
    let (nb, m, _) = lhs.dim();
    let n = rhs.dim().2;
    if nb == 0 || rhs.dim().0 != nb || TypeId::of::<E>() != TypeId::of::<f32>() {
        return None;
    }
    // the same strides for every batch entry: checking the first decides for all
    layout(m, &rhs.index_axis(Axis(0), 0))?;
    let mut y = Vec::with_capacity(nb * m * n);
    for b in 0..nb {
        small_m_into(&lhs.slice(s![b, .., ..]), &rhs.slice(s![b, .., ..]), &mut y)?;
    }
    Some(ndarray::Array3::from_shape_vec((nb, m, n), y).expect("nb * m * n values"))
}

/// `y[m, n] = x[m, k] · w^T` where `w` holds `n` rows of `k` floats (`w.k` = n rows here,
/// `row_stride` apart): one dot product per output, the rows of `w` split over threads.
fn dots(x: &[f32], m: usize, k: usize, w: Weights, y: &mut [f32]) {
    let n = w.k;
    let threads = if k * n < SERIAL { 1 } else { threads() };
    let per = n.div_ceil(2 * threads).max(16);
    let tasks = n.div_ceil(per);
    let run = move |t: usize| -> Vec<f32> {
        let j0 = t * per;
        let jn = per.min(n - j0);
        let mut acc = vec![0f32; m * jn];
        dot_block(x, m, k, w, j0, jn, &mut acc);
        acc
    };
    let parts = if tasks == 1 {
        vec![run(0)]
    } else {
        par_map(tasks, run)
    };
    for (t, acc) in parts.iter().enumerate() {
        let j0 = t * per;
        let jn = per.min(n - j0);
        for r in 0..m {
            y[r * n + j0..r * n + j0 + jn].copy_from_slice(&acc[r * jn..(r + 1) * jn]);
        }
    }
}

/// Outputs `j0 .. j0 + jn` of every row: `acc[r, j - j0] = x[r, ..] · w[j, ..]`.
fn dot_block(x: &[f32], m: usize, k: usize, w: Weights, j0: usize, jn: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features are present.
            unsafe { dot_block_avx2(x, m, k, w, j0, jn, acc) };
            return;
        }
    }
    dot_block_generic(x, m, k, w, j0, jn, acc);
}

/// [`dot_block_generic`] with AVX2/FMA intrinsics: each `w` row is loaded once per eight
/// values and used for every left row; two accumulators per dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights,
    j0: usize,
    jn: usize,
    acc: &mut [f32],
) {
    use core::arch::x86_64::*;
    let vec_end = k - k % 16;
    for j in 0..jn {
        // SAFETY: j0 + j < n rows of k floats; x holds m rows of k floats.
        unsafe {
            let row = w.row(j0 + j, 0, k);
            let rp = row.as_ptr();
            for r in 0..m {
                let xp = x.as_ptr().add(r * k);
                let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c < vec_end {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(rp.add(c)), _mm256_loadu_ps(xp.add(c)), a);
                    b = _mm256_fmadd_ps(
                        _mm256_loadu_ps(rp.add(c + 8)),
                        _mm256_loadu_ps(xp.add(c + 8)),
                        b,
                    );
                    c += 16;
                }
                let v = _mm256_add_ps(a, b);
                let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
                let mut sum = _mm_cvtss_f32(h);
                for c in vec_end..k {
                    sum += *rp.add(c) * *xp.add(c);
                }
                acc[r * jn + j] = sum;
            }
        }
    }
}

/// Dot products with eight partial sums (so the loop vectorises), then the tail.
#[inline(always)]
fn dot_block_generic(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights,
    j0: usize,
    jn: usize,
    acc: &mut [f32],
) {
    for j in 0..jn {
        // SAFETY: j0 + j < n rows of k floats.
        let row = unsafe { w.row(j0 + j, 0, k) };
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut part = [0f32; 8];
            let (wc, xc) = (row.chunks_exact(8), xr.chunks_exact(8));
            let (wt, xt) = (wc.remainder(), xc.remainder());
            for (a, b) in wc.zip(xc) {
                for l in 0..8 {
                    part[l] += a[l] * b[l];
                }
            }
            let mut sum: f32 = part.iter().sum();
            for (a, b) in wt.iter().zip(xt) {
                sum += a * b;
            }
            acc[r * jn + j] = sum;
        }
    }
}

/// The right operand: `k` rows of at least `n` floats, `row_stride` apart.
#[derive(Clone, Copy)]
struct Weights {
    ptr: *const f32,
    row_stride: usize,
    k: usize,
}

// SAFETY: only read, while the borrowed array lives (for the duration of `products`).
unsafe impl Send for Weights {}
unsafe impl Sync for Weights {}

impl Weights {
    /// Columns `c0 .. c0 + width` of row `i`.
    ///
    /// # Safety
    /// `i < k` and `c0 + width <= n`.
    #[inline(always)]
    unsafe fn row(&self, i: usize, c0: usize, width: usize) -> &[f32] {
        unsafe { core::slice::from_raw_parts(self.ptr.add(i * self.row_stride + c0), width) }
    }
}

/// Output values (rows x block width) of one task at most, so its partial output stays in
/// L2: 4096 columns for up to 4 rows, fewer for more rows.
const MAX_BLOCK_VALUES: usize = 4 * 4096;

/// Weights (k * n) below which one thread does the product.
const SERIAL: usize = 1 << 16;

/// Fewest weight rows one task walks.
const MIN_ROWS: usize = 64;

/// `y[m, n] = x[m, k] · w[k, n]` (y zeroed on entry), in parallel over a grid of column blocks
/// (at most [`MAX_BLOCK_VALUES`] / max(m, 4) wide) and weight-row ranges. Each task streams
/// its rows of its column block, so with one block a task reads one contiguous stretch of the
/// weight; the partial sums of the row ranges are added at the end.
fn products(x: &[f32], m: usize, w: Weights, n: usize, y: &mut [f32]) {
    // below SERIAL weights, handing work to another thread costs more than it saves
    let threads = if w.k * n < SERIAL { 1 } else { threads() };
    let max_block = MAX_BLOCK_VALUES / m.max(4);
    let col_blocks = n.div_ceil(max_block);
    let width = n.div_ceil(col_blocks).next_multiple_of(16).min(n);
    let col_blocks = n.div_ceil(width);
    // about two tasks per thread
    let row_splits = (2 * threads)
        .div_ceil(col_blocks)
        .min(w.k.div_ceil(MIN_ROWS))
        .max(1);
    let rows = w.k.div_ceil(row_splits).next_multiple_of(8);
    let row_splits = w.k.div_ceil(rows);
    let tasks = col_blocks * row_splits;
    let run = move |t: usize| -> Vec<f32> {
        let (b, s) = (t / row_splits, t % row_splits);
        let c0 = b * width;
        let wb = width.min(n - c0);
        let r0 = s * rows;
        let rn = rows.min(w.k - r0);
        // the task's partial output block, contiguous: [m, wb]
        let mut acc = vec![0f32; m * wb];
        block(x, m, w, r0, rn, c0, wb, &mut acc);
        acc
    };
    let partials = if tasks == 1 {
        vec![run(0)]
    } else {
        par_map(tasks, run)
    };
    for (t, acc) in partials.iter().enumerate() {
        let b = t / row_splits;
        let c0 = b * width;
        let wb = width.min(n - c0);
        for r in 0..m {
            let dst = &mut y[r * n + c0..r * n + c0 + wb];
            for (d, v) in dst.iter_mut().zip(&acc[r * wb..(r + 1) * wb]) {
                *d += *v;
            }
        }
    }
}

/// Threads of the rayon pool the caller runs in (1 without `multi-threads`).
#[cfg(feature = "multi-threads")]
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(not(feature = "multi-threads"))]
pub(crate) fn threads() -> usize {
    1
}

/// `run(0..tasks)` in parallel (rayon), the results in task order.
#[cfg(feature = "multi-threads")]
fn par_map(tasks: usize, run: impl Fn(usize) -> Vec<f32> + Send + Sync) -> Vec<Vec<f32>> {
    use rayon::prelude::*;
    (0..tasks).into_par_iter().map(run).collect()
}

#[cfg(not(feature = "multi-threads"))]
fn par_map(tasks: usize, run: impl Fn(usize) -> Vec<f32>) -> Vec<Vec<f32>> {
    (0..tasks).map(run).collect()
}

/// One task: `acc[m, wb] = x[m, r0 .. r0 + rn] · w[r0 .. r0 + rn, c0 .. c0 + wb]`.
#[allow(clippy::too_many_arguments)]
fn block(
    x: &[f32],
    m: usize,
    w: Weights,
    r0: usize,
    rn: usize,
    c0: usize,
    wb: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features are present.
            unsafe { block_avx2(x, m, w, r0, rn, c0, wb, acc) };
            return;
        }
    }
    block_generic(x, m, w, r0, rn, c0, wb, acc);
}

/// [`block_generic`] with AVX2/FMA intrinsics: eight weight rows per pass for one left row
/// (the partial output is loaded and stored once per eight rows, every weight value feeds one
/// FMA), four rows per pass for more left rows (the four weight vectors are loaded once and
/// used for every left row). Same sums as [`block_generic`] up to rounding (FMA, order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2(
    x: &[f32],
    m: usize,
    w: Weights,
    r0: usize,
    rn: usize,
    c0: usize,
    wb: usize,
    acc: &mut [f32],
) {
    use core::arch::x86_64::*;
    let k = w.k;
    let end = r0 + rn;
    let vec_end = wb - wb % 8;
    let mut i = r0;
    if m == 1 {
        let ap = acc.as_mut_ptr();
        while i + 8 <= end {
            // SAFETY: rows i .. i + 8 < k; columns c0 .. c0 + wb <= n; acc holds wb values.
            unsafe {
                let wp: [*const f32; 8] =
                    core::array::from_fn(|q| w.ptr.add((i + q) * w.row_stride + c0));
                let xs: [__m256; 8] = core::array::from_fn(|q| _mm256_set1_ps(x[i + q]));
                let mut j = 0;
                while j < vec_end {
                    let mut v = _mm256_loadu_ps(ap.add(j));
                    let mut u = _mm256_mul_ps(xs[4], _mm256_loadu_ps(wp[4].add(j)));
                    v = _mm256_fmadd_ps(xs[0], _mm256_loadu_ps(wp[0].add(j)), v);
                    u = _mm256_fmadd_ps(xs[5], _mm256_loadu_ps(wp[5].add(j)), u);
                    v = _mm256_fmadd_ps(xs[1], _mm256_loadu_ps(wp[1].add(j)), v);
                    u = _mm256_fmadd_ps(xs[6], _mm256_loadu_ps(wp[6].add(j)), u);
                    v = _mm256_fmadd_ps(xs[2], _mm256_loadu_ps(wp[2].add(j)), v);
                    u = _mm256_fmadd_ps(xs[7], _mm256_loadu_ps(wp[7].add(j)), u);
                    v = _mm256_fmadd_ps(xs[3], _mm256_loadu_ps(wp[3].add(j)), v);
                    _mm256_storeu_ps(ap.add(j), _mm256_add_ps(v, u));
                    j += 8;
                }
                for j in vec_end..wb {
                    let mut t = 0f32;
                    for (q, p) in wp.iter().enumerate() {
                        t += x[i + q] * *p.add(j);
                    }
                    *ap.add(j) += t;
                }
            }
            i += 8;
        }
    } else {
        while i + 4 <= end {
            // SAFETY: as above, for rows i .. i + 4 and acc of m * wb values.
            unsafe {
                let wp: [*const f32; 4] =
                    core::array::from_fn(|q| w.ptr.add((i + q) * w.row_stride + c0));
                let mut j = 0;
                while j < vec_end {
                    let wv: [__m256; 4] = core::array::from_fn(|q| _mm256_loadu_ps(wp[q].add(j)));
                    for r in 0..m {
                        let xr = x.as_ptr().add(r * k + i);
                        let yp = acc.as_mut_ptr().add(r * wb + j);
                        let mut v = _mm256_loadu_ps(yp);
                        v = _mm256_fmadd_ps(_mm256_set1_ps(*xr), wv[0], v);
                        v = _mm256_fmadd_ps(_mm256_set1_ps(*xr.add(1)), wv[1], v);
                        v = _mm256_fmadd_ps(_mm256_set1_ps(*xr.add(2)), wv[2], v);
                        v = _mm256_fmadd_ps(_mm256_set1_ps(*xr.add(3)), wv[3], v);
                        _mm256_storeu_ps(yp, v);
                    }
                    j += 8;
                }
                for j in vec_end..wb {
                    for r in 0..m {
                        let mut t = 0f32;
                        for (q, p) in wp.iter().enumerate() {
                            t += x[r * k + i + q] * *p.add(j);
                        }
                        acc[r * wb + j] += t;
                    }
                }
            }
            i += 4;
        }
    }
    // the last rows (fewer than a pass)
    if i < end {
        block_generic(x, m, w, i, end - i, c0, wb, acc);
    }
}

/// The kernel: four weight rows at a time, each output element updated once per four rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_generic(
    x: &[f32],
    m: usize,
    w: Weights,
    r0: usize,
    rn: usize,
    c0: usize,
    wb: usize,
    acc: &mut [f32],
) {
    let k = w.k;
    let end = r0 + rn;
    let mut i = r0;
    while i + 4 <= end {
        // SAFETY: i + 3 < k and c0 + wb <= n.
        let (w0, w1, w2, w3) = unsafe {
            (
                w.row(i, c0, wb),
                w.row(i + 1, c0, wb),
                w.row(i + 2, c0, wb),
                w.row(i + 3, c0, wb),
            )
        };
        for r in 0..m {
            let xr = &x[r * k + i..r * k + i + 4];
            let (a, b, c, d) = (xr[0], xr[1], xr[2], xr[3]);
            let y = &mut acc[r * wb..(r + 1) * wb];
            for j in 0..wb {
                y[j] += a * w0[j] + b * w1[j] + c * w2[j] + d * w3[j];
            }
        }
        i += 4;
    }
    while i < end {
        // SAFETY: i < k and c0 + wb <= n.
        let w0 = unsafe { w.row(i, c0, wb) };
        for r in 0..m {
            let a = x[r * k + i];
            let y = &mut acc[r * wb..(r + 1) * wb];
            for j in 0..wb {
                y[j] += a * w0[j];
            }
        }
        i += 1;
    }
}
