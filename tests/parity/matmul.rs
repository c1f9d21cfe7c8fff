//! The ndarray backend's few-row product path (vendor/burn-ndarray `matvec`, taken for
//! `[.., m, k] x [.., k, n]` with m <= 16 and a right operand with contiguous rows or columns,
//! batched or not) against an f64 reference, next to shapes that keep the general path (more
//! rows, broadcast batches). Tolerance 1e-4 relative to the sum of |terms|: f32 rounding over
//! k <= 1536 terms.

use super::B;
use burn::prelude::*;
use hici::model::synthetic::XorShift;

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// Checks `x · w` (x: `[m, k]`, w: `[k, n]`) against f64.
fn check(x: Tensor<B, 2>, w: Tensor<B, 2>, what: &str) {
    let [m, k] = x.dims();
    let n = w.dims()[1];
    let want = host_product(&x, &w);
    let got = x.matmul(w).to_data().to_vec::<f32>().unwrap();
    assert_eq!(got.len(), m * n, "{what}");
    for (i, (g, (s, a))) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - s).abs();
        assert!(
            err <= 1e-4 * a.max(1.0),
            "{what}: m={m} k={k} n={n} #{i}: {g} vs {s}"
        );
    }
}

#[test]
fn few_row_products_match_f64_reference() {
    let dev = Default::default();
    for (m, k, n) in [
        (1, 4, 64),
        (1, 7, 65),
        (1, 576, 1536),
        (1, 9, 72),
        (1, 203, 4100),
        (2, 129, 4099),
        (3, 64, 200),
        (8, 131, 1000),
        (9, 64, 128),
        (16, 33, 96),
        (17, 40, 100),
    ] {
        let x = Tensor::<B, 1>::from_floats(values(m * k, 1).as_slice(), &dev).reshape([m, k]);
        let w = Tensor::<B, 1>::from_floats(values(k * n, 2).as_slice(), &dev).reshape([k, n]);
        check(x.clone(), w.clone(), "contiguous");
        // a column window of a wider weight: row stride > n
        let wide = Tensor::<B, 1>::from_floats(values(k * (n + 5), 3).as_slice(), &dev)
            .reshape([k, n + 5]);
        check(x.clone(), wide.narrow(1, 2, n), "column window");
        // a transposed weight (contiguous columns): the dot-product kernel
        let wt = Tensor::<B, 1>::from_floats(values(k * n, 4).as_slice(), &dev).reshape([n, k]);
        check(x.clone(), wt.transpose(), "transposed");
        // a strided left operand: rows of a wider activation
        let xw = Tensor::<B, 1>::from_floats(values(m * (k + 3), 5).as_slice(), &dev)
            .reshape([m, k + 3])
            .narrow(1, 1, k);
        check(xw, w, "strided rows");
    }
}

/// Single large products, which the vendored matmul cuts into output tiles over the rayon pool
/// (when it has at least two threads, as on every CI machine): column tiles when `n >= m`,
/// row tiles otherwise, with widths that are not multiples of the tile rounding.
#[test]
fn large_single_products_split_over_threads_match_f64_reference() {
    let dev = Default::default();
    for (m, k, n) in [(300, 256, 701), (1003, 64, 40), (64, 576, 1536)] {
        let x = Tensor::<B, 1>::from_floats(values(m * k, 11).as_slice(), &dev).reshape([m, k]);
        let w = Tensor::<B, 1>::from_floats(values(k * n, 12).as_slice(), &dev).reshape([k, n]);
        check(x.clone(), w.clone(), "split");
        let wt = Tensor::<B, 1>::from_floats(values(k * n, 13).as_slice(), &dev).reshape([n, k]);
        check(x, wt.transpose(), "split, transposed right operand");
    }
}

#[test]
fn few_row_products_in_rank_3_and_batched_shapes() {
    let dev = Default::default();
    let (m, k, n) = (2, 96, 160);
    let x = Tensor::<B, 1>::from_floats(values(m * k, 6).as_slice(), &dev).reshape([1, m, k]);
    let w = Tensor::<B, 1>::from_floats(values(k * n, 7).as_slice(), &dev).reshape([1, k, n]);
    let got = x.clone().matmul(w.clone()).reshape([m, n]);
    let want_x = x.reshape([m, k]);
    let want = want_x.clone().matmul(w.clone().reshape([k, n]));
    let d = (got.clone() - want).abs().max().into_scalar();
    assert!(d <= 1e-5, "rank 3 vs rank 2: {d}");
    check(want_x, w.clone().reshape([k, n]), "rank 3");
    // two batches (attention-like): the general path, both rows right
    let xb = Tensor::<B, 1>::from_floats(values(2 * m * k, 8).as_slice(), &dev).reshape([2, m, k]);
    let wb = Tensor::<B, 3>::cat(vec![w.clone(), w.clone() * 0.5], 0);
    let out = xb.clone().matmul(wb);
    for bi in 0..2 {
        let xi = xb.clone().narrow(0, bi, 1).reshape([m, k]);
        let wi = w.clone().reshape([k, n]) * if bi == 0 { 1.0 } else { 0.5 };
        let want = xi.matmul(wi);
        let d = (out.clone().narrow(0, bi, 1).reshape([m, n]) - want)
            .abs()
            .max()
            .into_scalar();
        assert!(d <= 1e-5, "batch {bi}: {d}");
    }
}

/// Checks `q · k` (rank 4, batched) against f64, entry by entry.
fn check4(q: Tensor<B, 4>, k: Tensor<B, 4>, what: &str) {
    let [b, h, m, kk] = q.dims();
    let n = k.dims()[3];
    let got = q.clone().matmul(k.clone());
    assert_eq!(got.dims(), [b, h, m, n], "{what}");
    for bi in 0..b {
        for hi in 0..h {
            let qs = q.clone().narrow(0, bi, 1).narrow(1, hi, 1).reshape([m, kk]);
            let ks = k.clone().narrow(0, bi, 1).narrow(1, hi, 1).reshape([kk, n]);
            let gs = got
                .clone()
                .narrow(0, bi, 1)
                .narrow(1, hi, 1)
                .reshape([m, n]);
            let want = host_product(&qs, &ks);
            let g = gs.to_data().to_vec::<f32>().unwrap();
            for (i, ((w, a), gv)) in want.iter().zip(g).enumerate() {
                let err = (gv as f64 - w).abs();
                assert!(
                    err <= 1e-4 * a.max(1.0),
                    "{what}: [{bi},{hi}] #{i}: {gv} vs {w}"
                );
            }
        }
    }
}

/// `(value, sum of |terms|)` of every entry of `x · w`, in f64.
fn host_product(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Vec<(f64, f64)> {
    let [m, k] = x.dims();
    let n = w.dims()[1];
    let xv = x.to_data().to_vec::<f32>().unwrap();
    let wv = w.to_data().to_vec::<f32>().unwrap();
    let mut out = Vec::with_capacity(m * n);
    for r in 0..m {
        for c in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for i in 0..k {
                let t = xv[r * k + i] as f64 * wv[i * n + c] as f64;
                s += t;
                a += t.abs();
            }
            out.push((s, a));
        }
    }
    out
}

#[test]
fn decode_attention_shaped_products_match_f64_reference() {
    // GQA-folded decode: [1, nkv, rep, d] queries against keys/values that are a narrowed
    // view of a larger cache buffer (capacity 40 > length 33)
    let dev = Default::default();
    let (nkv, rep, d, cap, len) = (3, 3, 64, 40, 33);
    let q = Tensor::<B, 1>::from_floats(values(nkv * rep * d, 9).as_slice(), &dev)
        .reshape([1, nkv, rep, d]);
    let kbuf = Tensor::<B, 1>::from_floats(values(nkv * cap * d, 10).as_slice(), &dev)
        .reshape([1, nkv, cap, d]);
    let vbuf = Tensor::<B, 1>::from_floats(values(nkv * cap * d, 11).as_slice(), &dev)
        .reshape([1, nkv, cap, d]);
    let keys = kbuf.narrow(2, 0, len);
    let vals = vbuf.narrow(2, 0, len);
    check4(q.clone(), keys.clone().swap_dims(2, 3), "scores q . k^T");
    let p = Tensor::<B, 1>::from_floats(values(nkv * rep * len, 12).as_slice(), &dev)
        .reshape([1, nkv, rep, len]);
    check4(p, vals, "p . v");
    // a broadcast batch (one key set for every head): the general path
    let one = keys.narrow(1, 0, 1).swap_dims(2, 3);
    let got = q.clone().matmul(one.clone());
    let want = q.matmul(one.expand([1, nkv, d, len]));
    let diff = (got - want).abs().max().into_scalar();
    assert!(diff <= 1e-5, "broadcast batch: {diff}");
}

/// Products with more than 16 left rows (prefill: projections and attention), which the
/// vendored matmul hands to the `gemm` crate: batched with more and with fewer batch entries
/// than threads, a broadcast batch axis, transposed, flipped (negative strides) and expanded
/// (zero stride) operands, and empty inner dimensions.
#[test]
fn many_row_products_in_batched_and_strided_layouts_match_f64_reference() {
    let dev = Default::default();
    let (b, h, m, d, n) = (2, 3, 40, 64, 37);
    let q = Tensor::<B, 1>::from_floats(values(b * h * m * d, 21).as_slice(), &dev)
        .reshape([b, h, m, d]);
    let kbuf = Tensor::<B, 1>::from_floats(values(b * h * n * d, 22).as_slice(), &dev)
        .reshape([b, h, n, d]);
    // scores q . k^T: six batch entries (one task each), keys as a transposed view
    check4(
        q.clone(),
        kbuf.clone().swap_dims(2, 3),
        "batched, transposed keys",
    );
    // one batch entry (split by gemm over the pool)
    check4(
        q.clone().narrow(0, 0, 1).narrow(1, 0, 1),
        kbuf.clone().narrow(0, 0, 1).narrow(1, 0, 1).swap_dims(2, 3),
        "one entry",
    );
    // flipped rows of the left operand and flipped columns of the right one
    check4(
        q.clone().flip([2]),
        kbuf.clone().swap_dims(2, 3).flip([3]),
        "flipped",
    );
    // a broadcast batch axis: one right operand for both batch entries
    let one = kbuf.clone().narrow(0, 0, 1).swap_dims(2, 3);
    let got = q.clone().matmul(one.clone());
    assert_eq!(got.dims(), [b, h, m, n]);
    check4(
        q.clone(),
        one.expand([b, h, d, n]),
        "broadcast batch (expanded reference)",
    );
    for bi in 0..b {
        for hi in 0..h {
            let g = got
                .clone()
                .narrow(0, bi, 1)
                .narrow(1, hi, 1)
                .reshape([m, n]);
            let want = q.clone().narrow(0, bi, 1).narrow(1, hi, 1).reshape([m, d]);
            let w = kbuf
                .clone()
                .narrow(0, 0, 1)
                .narrow(1, hi, 1)
                .reshape([n, d]);
            let want = host_product(&want, &w.transpose());
            for (i, (gv, (s, a))) in g
                .to_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .zip(want)
                .enumerate()
            {
                assert!(
                    (*gv as f64 - s).abs() <= 1e-4 * a.max(1.0),
                    "broadcast batch [{bi},{hi}] #{i}: {gv} vs {s}"
                );
            }
        }
    }
    // a zero-stride column: every output column is the same product
    let x = Tensor::<B, 1>::from_floats(values(50 * 33, 23).as_slice(), &dev).reshape([50, 33]);
    let col = Tensor::<B, 1>::from_floats(values(33, 24).as_slice(), &dev).reshape([33, 1]);
    check(x.clone(), col.expand([33, 20]), "expanded column");
    // an empty inner dimension gives zeros
    let e = Tensor::<B, 2>::zeros([50, 0], &dev).matmul(Tensor::<B, 2>::zeros([0, 20], &dev));
    assert_eq!(e.dims(), [50, 20]);
    assert_eq!(e.abs().sum().into_scalar(), 0.0);
}
