//! burn's `attention` op on the ndarray backend (f32 with at least 16 query rows: the vendored
//! one-pass kernel, `vendor/burn-ndarray/src/ops/attention_f32.rs`) against an f64 reference
//! computed on the host: explicit masks (causal, with holes, rows that see nothing), burn's
//! `is_causal` (diagonal anchored bottom-right), more keys than one chunk (1024), row counts
//! that are not multiples of the 64-row task, broadcast key/value/mask axes and strided
//! (transposed) operands. Tolerance 1e-5 absolute: outputs are convex combinations of values in
//! [-1, 1), rounded in f32 over at most ~2000 keys.

use super::B;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use hici::model::synthetic::XorShift;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

fn tensor(shape: [usize; 4], seed: u64) -> Tensor<B, 4> {
    let n = shape.iter().product();
    Tensor::<B, 1>::from_floats(values(n, seed).as_slice(), &Default::default()).reshape(shape)
}

/// The reference: `[b, h, sq, dv]` in f64, row-major, from the host values of the operands
/// (broadcast axes of length 1); `hidden(bi, hi, i, j)` hides key j from row i.
fn reference(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    scale: f64,
    hidden: impl Fn(usize, usize, usize, usize) -> bool,
) -> Vec<f64> {
    let [b, h, sq, d] = q.dims();
    let [kb, kh, sk, _] = k.dims();
    let dv = v.dims()[3];
    let (qv, kv, vv) = [q, k, v]
        .map(|t| t.to_data().to_vec::<f32>().unwrap())
        .into();
    let mut out = vec![0f64; b * h * sq * dv];
    for bi in 0..b {
        for hi in 0..h {
            let (kbi, khi) = (if kb == 1 { 0 } else { bi }, if kh == 1 { 0 } else { hi });
            let kbase = (kbi * kh + khi) * sk;
            for i in 0..sq {
                let qrow = &qv[((bi * h + hi) * sq + i) * d..][..d];
                let s: Vec<Option<f64>> = (0..sk)
                    .map(|j| {
                        (!hidden(bi, hi, i, j)).then(|| {
                            let krow = &kv[(kbase + j) * d..][..d];
                            scale
                                * qrow
                                    .iter()
                                    .zip(krow)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                    })
                    .collect();
                let m = s
                    .iter()
                    .flatten()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // sees nothing: zeros
                }
                let p: Vec<f64> = s.iter().map(|x| x.map_or(0.0, |x| (x - m).exp())).collect();
                let z: f64 = p.iter().sum();
                let o = &mut out[((bi * h + hi) * sq + i) * dv..][..dv];
                for (j, pj) in p.iter().enumerate() {
                    let vrow = &vv[(kbase + j) * dv..][..dv];
                    for (oc, vc) in o.iter_mut().zip(vrow) {
                        *oc += pj / z * *vc as f64;
                    }
                }
            }
        }
    }
    out
}

fn check(got: Tensor<B, 4>, want: Vec<f64>, what: &str) {
    let got = got.to_data().to_vec::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5, "{what} #{i}: {g} vs {w}");
    }
}

/// burn's attention op on clones of the operands.
fn call(
    [q, k, v]: [&Tensor<B, 4>; 3],
    mask: Option<Tensor<B, 4, Bool>>,
    scale: Option<f64>,
    is_causal: bool,
) -> Tensor<B, 4> {
    let opts = AttentionModuleOptions {
        scale,
        softcap: None,
        is_causal,
    };
    attention(q.clone(), k.clone(), v.clone(), mask, None, opts)
}

#[test]
fn one_pass_attention_matches_f64_reference() {
    let dev = Default::default();
    // prefill-like: square, causal through an explicit mask; 100 rows (64 + 36)
    let (b, h, sq, d) = (2, 3, 100, 16);
    let (q, k, v) = (
        tensor([b, h, sq, d], 1),
        tensor([b, h, sq, d], 2),
        tensor([b, h, sq, d], 3),
    );
    let mask = Tensor::<B, 2, Bool>::tril_mask([sq, sq], 0, &dev)
        .reshape([1, 1, sq, sq])
        .expand([b, h, sq, sq]);
    let want = reference(&q, &k, &v, 0.25, |_, _, i, j| j > i);
    let got = call([&q, &k, &v], Some(mask), Some(0.25), false);
    check(got, want.clone(), "explicit causal mask");
    // the same through is_causal, default scale 1/sqrt(16)
    let got = call([&q, &k, &v], None, None, true);
    check(got, want, "is_causal");

    // a prefix: 40 rows against 1500 keys (two chunks), causal anchored bottom-right;
    // keys as a transposed view, one key/value head for all heads (broadcast)
    let (sq, sk) = (40, 1500);
    let q = tensor([1, 2, sq, d], 4);
    let k = tensor([1, 1, d, sk], 5).swap_dims(2, 3);
    let v = tensor([1, 1, sk, 8], 6);
    let off = sk - sq;
    let want = reference(&q, &k, &v, 0.25, |_, _, i, j| j > i + off);
    let got = call([&q, &k, &v], None, None, true);
    check(got, want, "long prefix, is_causal, broadcast heads");

    // a mask with holes, rows that see nothing, keys hidden at the start of a chunk
    let hidden = |bi: usize, hi: usize, i: usize, j: usize| {
        i % 7 == 3 || (j + i + bi + hi).is_multiple_of(5) || (1024..1100).contains(&j)
    };
    let mut bits = Vec::with_capacity(2 * sq * sk);
    for hi in 0..2 {
        for i in 0..sq {
            for j in 0..sk {
                bits.push(hidden(0, hi, i, j));
            }
        }
    }
    let mask = Tensor::<B, 1, Bool>::from_bool(TensorData::new(bits, [2 * sq * sk]), &dev)
        .reshape([1, 2, sq, sk]);
    let want = reference(&q, &k, &v, 0.1, hidden);
    let got = call([&q, &k, &v], Some(mask), Some(0.1), false);
    check(got, want, "mask with holes and empty rows");

    // large scores (scale 20: shifts from 0 down past -87, where the kernel's exp gives 0)
    let (q, k, v) = (
        tensor([1, 2, 70, d], 10),
        tensor([1, 2, 300, d], 11),
        tensor([1, 2, 300, d], 12),
    );
    let want = reference(&q, &k, &v, 20.0, |_, _, _, _| false);
    let got = call([&q, &k, &v], None, Some(20.0), false);
    check(got, want, "large scores");

    // more queries than keys under is_causal: the first rows see nothing
    let (q, k, v) = (
        tensor([1, 1, 30, d], 7),
        tensor([1, 1, 20, d], 8),
        tensor([1, 1, 20, d], 9),
    );
    let want = reference(&q, &k, &v, 0.25, |_, _, i, j| (j as i64) > i as i64 - 10);
    let got = call([&q, &k, &v], None, None, true);
    check(got, want, "sq > sk");
}
