//! The ndarray backend's element-wise maps (vendor/burn-ndarray `par_map`: arrays of at least
//! 2^15 values in standard layout are split over the rayon pool) and its one-pass sigmoid,
//! against f64 closed forms: large contiguous arrays (the split path), strided views and small
//! arrays (the serial path), and a tensor whose storage is shared with a clone (which must keep
//! its values). Tolerance 1e-6 relative (+1e-30 absolute): a few f32 ulps, well above libm's
//! rounding and far below any wrong formula.

use super::B;
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};
use hici::model::synthetic::XorShift;

/// Deterministic values in [-lim, lim).
fn values(len: usize, lim: f32, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..len)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * lim)
        .collect()
}

fn close(got: &[f32], want: impl Iterator<Item = f64>, what: &str) {
    let mut n = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= 1e-6 * w.abs() + 1e-30,
            "{what} #{i}: {g} vs {w} (err {err:e})"
        );
        n += 1;
    }
    assert_eq!(n, got.len(), "{what}: length");
}

/// Every map on `[rows, cols]` values in [-lim, lim) (positive ones for log/sqrt/powf),
/// contiguous and through a transposed (strided) view.
fn check_maps(rows: usize, cols: usize, seed: u64) {
    let dev = Default::default();
    let x = values(rows * cols, 30.0, seed);
    let pos: Vec<f32> = x.iter().map(|v| v.abs() + 1e-3).collect();
    let t = |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [rows, cols]), &dev);
    let host = |y: Tensor<B, 2>| y.into_data().to_vec::<f32>().unwrap();
    let what = |op: &str| format!("{op} [{rows}, {cols}]");
    let f64s = |v: &[f32]| v.iter().map(|a| *a as f64).collect::<Vec<_>>();
    let (xd, pd) = (f64s(&x), f64s(&pos));

    close(&host(t(&x).exp()), xd.iter().map(|a| a.exp()), &what("exp"));
    close(
        &host(t(&pos).log()),
        pd.iter().map(|a| a.ln()),
        &what("log"),
    );
    close(
        &host(t(&pos).log1p()),
        pd.iter().map(|a| a.ln_1p()),
        &what("log1p"),
    );
    close(
        &host(t(&pos).sqrt()),
        pd.iter().map(|a| a.sqrt()),
        &what("sqrt"),
    );
    close(
        &host(t(&pos).powf_scalar(1.5)),
        pd.iter().map(|a| a.powf(1.5)),
        &what("powf 1.5"),
    );
    let sig = |a: f64| 1.0 / (1.0 + (-a).exp());
    close(
        &host(sigmoid(t(&x))),
        xd.iter().map(|a| sig(*a)),
        &what("sigmoid"),
    );
    close(
        &host(silu(t(&x))),
        xd.iter().map(|a| a * sig(*a)),
        &what("silu"),
    );

    // strided: the transpose of the same values, mapped, read back in [cols, rows] order
    let tr: Vec<f64> = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| (r, c)))
        .map(|(r, c)| xd[r * cols + c])
        .collect();
    close(
        &host(t(&x).transpose().exp()),
        tr.iter().map(|a| a.exp()),
        &what("exp of a transpose"),
    );
    close(
        &host(sigmoid(t(&x).transpose())),
        tr.iter().map(|a| sig(*a)),
        &what("sigmoid of a transpose"),
    );
}

#[test]
fn element_wise_maps_match_f64_on_split_and_serial_paths() {
    check_maps(3, 70_001, 1); // 210,003 values: split over the pool
    check_maps(128, 256, 2); // exactly 2^15: the smallest split array
    check_maps(7, 33, 3); // serial
}

#[test]
fn a_map_of_shared_storage_leaves_the_other_tensor_alone() {
    let dev = Default::default();
    let x = values(1 << 17, 5.0, 4);
    let a = Tensor::<B, 1>::from_data(TensorData::new(x.clone(), [x.len()]), &dev);
    let kept = a.clone();
    let e = a.exp();
    assert_eq!(kept.into_data().to_vec::<f32>().unwrap(), x);
    close(
        &e.into_data().to_vec::<f32>().unwrap(),
        x.iter().map(|v| (*v as f64).exp()),
        "exp of shared storage",
    );
}
