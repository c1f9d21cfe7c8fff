//! HiCI patch: burn's `attention` op for f32 in one pass per block of query rows.
//!
//! burn's fallback (`attention_fallback`) writes the whole score matrix `[b, h, sq, sk]` and
//! walks it seven more times (scale, mask, max, subtract, exp, sum, divide), each pass its own
//! allocation and mostly on one thread. Here every task takes `ROWS` query rows of one head,
//! scores them against `KEYS` keys at a time on `gemm` into a buffer that stays in cache,
//! and folds each chunk into the output with an online softmax (running max and sum per
//! row). Keys no row of the block may see (causal, or hidden by the mask at the end of every
//! row) are neither scored nor read. The result is softmax(scale · QKᵀ, masked) · V in f32,
//! as the fallback computes it, up to summation order; a row that sees no key gives zeros
//! (the fallback's NaN-safe behaviour).

use core::f32;

use ndarray::{ArrayView4, Ix4, s};

use super::gemm_f32::SendPtr;
use crate::SharedArray;

/// Query rows per task.
const ROWS: usize = 64;
/// Keys scored at once (the score buffer is `ROWS x KEYS` f32, 256 KiB).
const KEYS: usize = 1024;

/// Query rows below which the caller keeps burn's fallback (decode: a few rows per head,
/// too few tasks to share out).
pub(crate) const MIN_QUERY_ROWS: usize = 16;

/// `softmax(scale · q kᵀ + mask) v` where `mask` (true: hidden) and, with `is_causal`, keys
/// `j > i + sk - sq` are hidden from query row `i` (burn's convention: the diagonal anchored
/// bottom-right).
///
/// `q: [b, h, sq, d]`, `k: [b', h', sk, d]`, `v: [b', h', sk, dv]`, `mask: [b', h', sq, sk]`
/// (a primed axis may be 1: broadcast) -> `[b, h, sq, dv]`.
pub(crate) fn attention(
    q: SharedArray<f32>,
    k: SharedArray<f32>,
    v: SharedArray<f32>,
    mask: Option<SharedArray<bool>>,
    scale: f32,
    is_causal: bool,
) -> SharedArray<f32> {
    let q = q.view().into_dimensionality::<Ix4>().expect("attention: rank-4 query");
    let k = k.view().into_dimensionality::<Ix4>().expect("attention: rank-4 key");
    let v = v.view().into_dimensionality::<Ix4>().expect("attention: rank-4 value");
    let mask = mask
        .as_ref()
        .map(|m| m.view().into_dimensionality::<Ix4>().expect("attention: rank-4 mask"));
    let (b, h, sq, d) = q.dim();
    let (sk, dv) = (k.dim().2, v.dim().3);
    let fits = |a: &[usize], what: &str| {
        assert!(
            (a[0] == b || a[0] == 1) && (a[1] == h || a[1] == 1),
            "attention: {what} batch/head axes {:?} against the query's [{b}, {h}]",
            &a[..2]
        );
    };
    fits(k.shape(), "key");
    fits(v.shape(), "value");
    assert_eq!(k.dim().3, d, "attention: key width");
    assert_eq!(v.dim().2, sk, "attention: value length");
    if let Some(m) = &mask {
        fits(m.shape(), "mask");
        assert_eq!((m.dim().2, m.dim().3), (sq, sk), "attention: mask shape");
    }
    let mut out = ndarray::Array4::<f32>::zeros((b, h, sq, dv));
    if b * h * sq * dv == 0 {
        return out.into_shared().into_dyn();
    }
    let blocks = sq.div_ceil(ROWS);
    let base = SendPtr(out.as_mut_ptr());
    let job = Job {
        q,
        k,
        v,
        mask,
        scale,
        offset: is_causal.then_some(sk as i64 - sq as i64),
    };
    use rayon::prelude::*;
    (0..b * h * blocks).into_par_iter().for_each_init(
        || vec![0f32; ROWS * KEYS],
        |scores, t| {
            let (bi, hi, blk) = (t / (h * blocks), (t / blocks) % h, t % blocks);
            let r0 = blk * ROWS;
            let rows = ROWS.min(sq - r0);
            // SAFETY: rows r0..r0 + rows of head (bi, hi) belong to this task alone.
            let dst = unsafe { base.get().add(((bi * h + hi) * sq + r0) * dv) };
            job.block(bi, hi, r0, rows, dst, scores);
        },
    );
    out.into_shared().into_dyn()
}

/// The operands of one call.
struct Job<'a> {
    q: ArrayView4<'a, f32>,
    k: ArrayView4<'a, f32>,
    v: ArrayView4<'a, f32>,
    mask: Option<ArrayView4<'a, bool>>,
    scale: f32,
    /// `Some(sk - sq)` when causal: row `i` sees keys `j <= i + offset`.
    offset: Option<i64>,
}

/// Index on an axis that may be broadcast (length 1).
fn at(len: usize, i: usize) -> usize {
    if len == 1 { 0 } else { i }
}

impl Job<'_> {
    /// Rows `r0 .. r0 + rows` of head `(bi, hi)` into `dst` (row-major `[rows, dv]`).
    fn block(&self, bi: usize, hi: usize, r0: usize, rows: usize, dst: *mut f32, scores: &mut [f32]) {
        let (sk, d, dv) = (self.k.dim().2, self.q.dim().3, self.v.dim().3);
        let kk = self.k.slice(s![at(self.k.dim().0, bi), at(self.k.dim().1, hi), .., ..]);
        let vv = self.v.slice(s![at(self.v.dim().0, bi), at(self.v.dim().1, hi), .., ..]);
        let qq = self.q.slice(s![bi, hi, r0..r0 + rows, ..]);
        let mask = self.mask.as_ref().map(|m| {
            m.slice(s![at(m.dim().0, bi), at(m.dim().1, hi), r0..r0 + rows, ..])
        });
        let mask_rows: Vec<std::borrow::Cow<[bool]>> = match &mask {
            Some(m) => m
                .outer_iter()
                .map(|row| match row.to_slice() {
                    Some(s) => std::borrow::Cow::Borrowed(s),
                    None => std::borrow::Cow::Owned(row.to_vec()),
                })
                .collect(),
            None => Vec::new(),
        };
        // keys each row may see at most: 0 .. limit[r]
        let limit: Vec<usize> = (0..rows)
            .map(|r| {
                let causal = match self.offset {
                    Some(off) => ((r0 + r) as i64 + off + 1).clamp(0, sk as i64) as usize,
                    None => sk,
                };
                match mask_rows.get(r) {
                    Some(m) => m[..causal].iter().rposition(|&hidden| !hidden).map_or(0, |j| j + 1),
                    None => causal,
                }
            })
            .collect();
        let kend = limit.iter().copied().max().unwrap_or(0);
        let mut run_max = vec![f32::NEG_INFINITY; rows];
        let mut run_sum = vec![0f32; rows];
        let (q_rs, q_cs) = (qq.strides()[0], qq.strides()[1]);
        let (k_rs, k_cs) = (kk.strides()[0], kk.strides()[1]);
        let (v_rs, v_cs) = (vv.strides()[0], vv.strides()[1]);
        let mut c0 = 0;
        while c0 < kend {
            let cw = KEYS.min(kend - c0);
            // SAFETY: the views describe `[rows, d]` queries and `[cw, d]` keys; `scores`
            // holds `ROWS x KEYS` values, rows `KEYS` apart.
            unsafe {
                gemm::gemm::<f32>(
                    rows,
                    cw,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    KEYS as isize,
                    false,
                    qq.as_ptr(),
                    q_cs,
                    q_rs,
                    kk.as_ptr().offset(c0 as isize * k_rs),
                    k_rs,
                    k_cs,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for r in 0..rows {
                let row = &mut scores[r * KEYS..r * KEYS + cw];
                let seen = limit[r].saturating_sub(c0).min(cw);
                if let Some(m) = mask_rows.get(r) {
                    for (s, &hidden) in row[..seen].iter_mut().zip(&m[c0..c0 + seen]) {
                        if hidden {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
                // keys past the row's limit weigh zero
                row[seen..].fill(0.0);
                let (row, _) = row.split_at_mut(seen);
                let chunk_max = row_max(row);
                if chunk_max == f32::NEG_INFINITY {
                    // nothing visible in this chunk: its weights are zero
                    row.fill(0.0);
                    continue;
                }
                let new_max = run_max[r].max(chunk_max);
                let sum = exp_shifted(row, new_max);
                if c0 > 0 {
                    // SAFETY: row r of the `[rows, dv]` output block.
                    let out_row = unsafe { core::slice::from_raw_parts_mut(dst.add(r * dv), dv) };
                    let rescale = (run_max[r] - new_max).exp();
                    run_sum[r] *= rescale;
                    if rescale != 1.0 {
                        out_row.iter_mut().for_each(|o| *o *= rescale);
                    }
                }
                run_max[r] = new_max;
                run_sum[r] += sum;
            }
            // SAFETY: `scores` rows are `KEYS` apart, values `[cw, dv]` from row c0 of the
            // view, `dst` the task's `[rows, dv]` block.
            unsafe {
                gemm::gemm::<f32>(
                    rows,
                    dv,
                    cw,
                    dst,
                    1,
                    dv as isize,
                    c0 > 0,
                    scores.as_ptr(),
                    1,
                    KEYS as isize,
                    vv.as_ptr().offset(c0 as isize * v_rs),
                    v_cs,
                    v_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            c0 += cw;
        }
        if kend == 0 {
            return; // no row sees a key: the block stays zero
        }
        for r in 0..rows {
            // SAFETY: row r of the output block.
            let out_row = unsafe { core::slice::from_raw_parts_mut(dst.add(r * dv), dv) };
            let inv = 1.0 / run_sum[r].max(f32::MIN_POSITIVE);
            out_row.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// The largest value of `row` (-inf when empty or all -inf).
fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        return unsafe { row_max_avx2(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_max_avx2(row: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let end = row.len() - row.len() % 8;
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < end {
        // SAFETY: j + 8 <= row.len().
        m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(row.as_ptr().add(j)) });
        j += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 lanes into 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    lanes
        .iter()
        .chain(&row[end..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `row[j] = exp(row[j] - max)` (-inf gives 0), returning the sum of the new values.
/// `max` is at least every value of `row` and finite.
fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { exp_shifted_avx2(row, max) };
    }
    let mut sum = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// [`exp_shifted`] eight values at a time: Cephes' `expf` (range reduction by ln 2 in two
/// parts, a degree-5 polynomial, the exponent added as integer bits), about 1 ulp from the
/// correctly rounded value on `[-87, 0]`; below -87 (including -inf, hidden keys) exactly 0
/// (the true value is under 2^-125 times the row's largest weight, 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
    use core::arch::x86_64::*;
    let end = row.len() - row.len() % 8;
    let vmax = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut j = 0;
    while j < end {
        // SAFETY: j + 8 <= row.len().
        let p = unsafe { row.as_mut_ptr().add(j) };
        let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(p) }, vmax);
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
        y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_and_ps(_mm256_mul_ps(y, pow2), keep);
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p, e) };
        acc = _mm256_add_ps(acc, e);
        j += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 lanes into 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    for s in &mut row[end..] {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}
