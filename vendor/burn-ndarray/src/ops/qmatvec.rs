//! HiCI patch: `x · Wᵀ` for a weight kept in 8-bit blocks, without dequantizing the weight.
//!
//! The weight is a QFloat tensor `[n, k]` (row-major i8 values, one f32 scale per block of 32
//! values along `k`: the layout of GGUF's Q8_0 rows) that the caller transposed to `[k, n]`
//! (a view, strides `[1, k]`). burn's default `q_matmul` dequantizes the whole weight to f32 on
//! every call (4x its memory, once per token during decode), and this backend's dequantize
//! reads a transposed view in the wrong order. Here:
//!
//! - few left rows (decode, m <= [`MAX_ROWS`]): every output is a dot product of one weight row
//!   with each left row, block by block (`scale_b * Σ q_j x_j`), the weight rows split over
//!   threads; the weight is read once, at one byte per value;
//! - more rows (prefill): tiles of [`TILE_ROWS`] weight rows are dequantized into a scratch
//!   buffer and multiplied with the general f32 kernel, so at most one tile is ever in f32.

use alloc::vec;
use alloc::vec::Vec;

use burn_backend::quantization::QParams;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder, s};

/// Left operands with at most this many rows take the dot-product kernel.
pub(crate) const MAX_ROWS: usize = 16;

/// Values per block (one scale each).
pub(crate) const BLOCK: usize = 32;

/// Weight rows dequantized at a time on the many-rows path.
const TILE_ROWS: usize = 256;

/// Bytes ahead of the block being multiplied that the AVX2 kernel asks the cache to fetch
/// (the next rows of the weight follow in memory). Measured on a 141 MB weight streamed from
/// memory by one thread, interleaved: 4.6-5.2 GB/s without, 6.0-7.3 with 2048 bytes (1024 did
/// not help).
const PREFETCH: usize = 2048;

/// Weights (n * k) below which one thread does the product.
const SERIAL: usize = 1 << 16;

/// `y[m, n] = x[m, k] · Wᵀ` with `W[j, i] = q[j * k + i] * scales[j * k / 32 + i / 32]`.
///
/// `x`: row-major `[m, k]`; `q`: row-major `[n, k]`; `scales`: `[n * k / 32]`; `k % 32 == 0`.
/// Returns row-major `[m, n]`.
pub(crate) fn q8_matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    q: &[i8],
    scales: &[QParams<f32>],
    n: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(q.len(), n * k);
    debug_assert_eq!(k % BLOCK, 0);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    if m <= MAX_ROWS {
        dots(x, m, k, q, scales, n)
    } else {
        tiled(x, m, k, q, scales, n)
    }
}

/// The few-rows path: the weight rows split over threads, about two tasks per thread.
fn dots(x: &[f32], m: usize, k: usize, q: &[i8], scales: &[QParams<f32>], n: usize) -> Vec<f32> {
    let threads = if n * k < SERIAL { 1 } else { threads() };
    let per = n.div_ceil(2 * threads).max(16);
    let tasks = n.div_ceil(per);
    let run = |t: usize| -> Vec<f32> {
        let j0 = t * per;
        let jn = per.min(n - j0);
        let mut acc = vec![0f32; m * jn];
        dot_rows(x, m, k, q, scales, j0, jn, &mut acc);
        acc
    };
    let parts = if tasks == 1 {
        vec![run(0)]
    } else {
        par_map(tasks, run)
    };
    let mut y = vec![0f32; m * n];
    for (t, acc) in parts.iter().enumerate() {
        let j0 = t * per;
        let jn = per.min(n - j0);
        for r in 0..m {
            y[r * n + j0..r * n + j0 + jn].copy_from_slice(&acc[r * jn..(r + 1) * jn]);
        }
    }
    y
}

/// Weight rows `j0 .. j0 + jn`: `acc[r, j - j0] = Σ_b scale[j, b] Σ_{i in b} q[j, i] x[r, i]`.
#[allow(clippy::too_many_arguments)]
fn dot_rows(
    x: &[f32],
    m: usize,
    k: usize,
    q: &[i8],
    scales: &[QParams<f32>],
    j0: usize,
    jn: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features are present.
            unsafe { dot_rows_avx2(x, m, k, q, scales, j0, jn, acc) };
            return;
        }
    }
    dot_rows_generic(x, m, k, q, scales, j0, jn, acc);
}

/// AVX2/FMA form of [`dot_rows_generic`] with register accumulators: each block of a weight
/// row is expanded once to f32 (`q · scale`, the values a dequantized weight holds: sign
/// extension, conversion, one multiply per eight values) and multiplied into four eight-lane
/// accumulators per left row, for two left rows at a time (then one), so that no partial sum
/// goes through memory and no accumulator waits on the previous block's multiply-add.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows_avx2(
    x: &[f32],
    m: usize,
    k: usize,
    q: &[i8],
    scales: &[QParams<f32>],
    j0: usize,
    jn: usize,
    acc: &mut [f32],
) {
    let kb = k / BLOCK;
    for j in 0..jn {
        let row = &q[(j0 + j) * k..(j0 + j + 1) * k];
        let sc = &scales[(j0 + j) * kb..(j0 + j + 1) * kb];
        let mut r = 0;
        while r + 2 <= m {
            // SAFETY: the features are enabled for this function; the slices hold whole blocks.
            let [a, b] = unsafe { dot_tile_avx2::<2>(x, k, r, row, sc) };
            acc[r * jn + j] = a;
            acc[(r + 1) * jn + j] = b;
            r += 2;
        }
        if r < m {
            // SAFETY: as above.
            let [a] = unsafe { dot_tile_avx2::<1>(x, k, r, row, sc) };
            acc[r * jn + j] = a;
        }
    }
}

/// `Σ_i row[i] · scale[i / 32] · x[r0 + t, i]` for the `R` left rows `r0 .. r0 + R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_tile_avx2<const R: usize>(
    x: &[f32],
    k: usize,
    r0: usize,
    row: &[i8],
    sc: &[QParams<f32>],
) -> [f32; R] {
    use core::arch::x86_64::*;
    debug_assert!(x.len() >= (r0 + R) * k && row.len() == k && sc.len() * BLOCK == k);
    let mut lanes = [[_mm256_setzero_ps(); 4]; R];
    let qp = row.as_ptr();
    for (b, s) in sc.iter().enumerate() {
        let base = b * BLOCK;
        // SAFETY: `base + 32 <= k`: every load below stays inside `row` and the left rows.
        unsafe {
            let s = _mm256_set1_ps(s.scales);
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(base + PREFETCH) as *const i8);
            }
            let mut w = [_mm256_setzero_ps(); 4];
            for (c, wc) in w.iter_mut().enumerate() {
                let q8 = _mm_loadl_epi64(qp.add(base + 8 * c) as *const __m128i);
                *wc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s);
            }
            for (t, lane) in lanes.iter_mut().enumerate() {
                let xp = x.as_ptr().add((r0 + t) * k + base);
                for (c, l) in lane.iter_mut().enumerate() {
                    *l = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(xp.add(8 * c)), *l);
                }
            }
        }
    }
    let mut out = [0f32; R];
    for (o, lane) in out.iter_mut().zip(lanes.iter()) {
        let v = _mm256_add_ps(
            _mm256_add_ps(lane[0], lane[1]),
            _mm256_add_ps(lane[2], lane[3]),
        );
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        *o = _mm_cvtss_f32(h);
    }
    out
}

/// Per weight row: each block is expanded once (`q · scale`, the very f32 values a
/// dequantized weight holds) into a 32-value buffer, then multiplied into every left row's
/// eight-lane accumulator; one horizontal sum per output at the end. Fixed-size arrays, so
/// the loops vectorise (i8 -> f32 conversion, multiply, multiply-add).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dot_rows_generic(
    x: &[f32],
    m: usize,
    k: usize,
    q: &[i8],
    scales: &[QParams<f32>],
    j0: usize,
    jn: usize,
    acc: &mut [f32],
) {
    let kb = k / BLOCK;
    let mut w = [0f32; BLOCK];
    let mut lanes = [[0f32; 8]; MAX_ROWS];
    for j in 0..jn {
        let row = &q[(j0 + j) * k..(j0 + j + 1) * k];
        let sc = &scales[(j0 + j) * kb..(j0 + j + 1) * kb];
        for l in lanes.iter_mut().take(m) {
            *l = [0.0; 8];
        }
        for (b, (qb, s)) in row.chunks_exact(BLOCK).zip(sc).enumerate() {
            let qb: &[i8; BLOCK] = qb.try_into().expect("a whole block");
            for i in 0..BLOCK {
                w[i] = qb[i] as f32 * s.scales;
            }
            for (r, lane) in lanes.iter_mut().take(m).enumerate() {
                let xb: &[f32; BLOCK] = x[r * k + b * BLOCK..r * k + (b + 1) * BLOCK]
                    .try_into()
                    .expect("a whole block");
                for c in 0..BLOCK / 8 {
                    for l in 0..8 {
                        lane[l] += w[c * 8 + l] * xb[c * 8 + l];
                    }
                }
            }
        }
        for (r, lane) in lanes.iter().take(m).enumerate() {
            acc[r * jn + j] = lane.iter().sum();
        }
    }
}

/// The many-rows path: tiles of weight rows dequantized to f32, each multiplied with the
/// general (packed, threaded) f32 kernel into its output columns.
fn tiled(x: &[f32], m: usize, k: usize, q: &[i8], scales: &[QParams<f32>], n: usize) -> Vec<f32> {
    let kb = k / BLOCK;
    let mut y = vec![0f32; m * n];
    let xv = ArrayView2::from_shape((m, k), x).expect("m * k values");
    let mut yv = ArrayViewMut2::from_shape((m, n), &mut y).expect("m * n values");
    let mut scratch = vec![0f32; TILE_ROWS.min(n) * k];
    let mut j0 = 0;
    while j0 < n {
        let jn = TILE_ROWS.min(n - j0);
        let tile = &mut scratch[..jn * k];
        for j in 0..jn {
            let row = &q[(j0 + j) * k..(j0 + j + 1) * k];
            let sc = &scales[(j0 + j) * kb..(j0 + j + 1) * kb];
            let out = &mut tile[j * k..(j + 1) * k];
            for (b, s) in sc.iter().enumerate() {
                for i in b * BLOCK..(b + 1) * BLOCK {
                    out[i] = row[i] as f32 * s.scales;
                }
            }
        }
        // HiCI patch: the tile product on gemm, split over the rayon pool
        #[cfg(all(feature = "std", feature = "multi-threads"))]
        if m * k * jn > 0 {
            // SAFETY: x is `[m, k]` row-major, the tile `[jn, k]` row-major read as `[k, jn]`
            // (row stride 1, column stride k), y's columns j0 .. j0 + jn with row stride n.
            unsafe {
                super::gemm_f32::product_into(
                    [m, jn, k],
                    yv.as_mut_ptr().add(j0),
                    n as isize,
                    x.as_ptr(),
                    [k as isize, 1],
                    tile.as_ptr(),
                    [1, k as isize],
                );
            }
            j0 += jn;
            continue;
        }
        // the tile as `[k, jn]` (a transposed view: element (i, j) at j * k + i)
        let wt = ArrayView2::from_shape((k, jn).strides((1, k)), &*tile).expect("tile view");
        ndarray::linalg::general_mat_mul(
            1.0,
            &xv,
            &wt,
            0.0,
            &mut yv.slice_mut(s![.., j0..j0 + jn]),
        );
        j0 += jn;
    }
    y
}

#[cfg(feature = "multi-threads")]
fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(not(feature = "multi-threads"))]
fn threads() -> usize {
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
