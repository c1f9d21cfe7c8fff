//! Times the query-blocked attention against the naive full-score attention at 1K and 2K
//! tokens on CPU (ndarray), side by side in one run, and prints the ratio.
//!
//! `cargo run --release --example attention_blocking`

use burn::prelude::*;
use hici::model::attention::{attend, attend_naive, AttentionKernel};
use std::time::Instant;

type B = burn::backend::NdArray<f32>;

fn time<F: FnMut() -> Tensor<B, 4>>(mut f: F, iters: usize) -> f64 {
    let _ = f().into_data(); // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        let _ = f().into_data();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let dev = Default::default();
    let (b, h, d) = (1, 8, 64);
    println!(
        "{:>6} {:>12} {:>12} {:>8}",
        "tokens", "blocked ms", "naive ms", "ratio"
    );
    for n in [1024usize, 2048] {
        let k_len = n + 12; // HiCI prefix [G ; L]
        let q = Tensor::<B, 4>::random([b, h, n, d], burn::tensor::Distribution::Default, &dev);
        let k = Tensor::<B, 4>::random([b, h, k_len, d], burn::tensor::Distribution::Default, &dev);
        let v = Tensor::<B, 4>::random([b, h, k_len, d], burn::tensor::Distribution::Default, &dev);
        let blocked = time(
            || attend(q.clone(), k.clone(), v.clone(), AttentionKernel::Exact),
            3,
        );
        let naive = time(|| attend_naive(q.clone(), k.clone(), v.clone()), 3);
        println!(
            "{n:>6} {:>12.1} {:>12.1} {:>8.2}",
            blocked * 1e3,
            naive * 1e3,
            blocked / naive
        );
    }
}
