//! Times the tiled attention (query blocks, online softmax over key chunks beyond
//! `KEY_BLOCK` keys) against the naive full-score attention at 1K, 2K and 4K tokens on CPU
//! (ndarray), side by side in one run, with query blocks alone as a third column, and prints
//! the ratios (below 1: tiled is faster).
//!
//! `cargo run --release --example attention_blocking`

use burn::prelude::*;
use hici::model::attention::{attend, attend_naive, attend_tiled, AttentionKernel, Tiles};
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
        "{:>6} {:>10} {:>16} {:>10} {:>12} {:>12}",
        "tokens", "tiled ms", "query-blocks ms", "naive ms", "tiled/naive", "tiled/qblk"
    );
    for n in [1024usize, 2048, 4096] {
        let k_len = n + 12; // HiCI prefix [G ; L]
        let q = Tensor::<B, 4>::random([b, h, n, d], burn::tensor::Distribution::Default, &dev);
        let k = Tensor::<B, 4>::random([b, h, k_len, d], burn::tensor::Distribution::Default, &dev);
        let v = Tensor::<B, 4>::random([b, h, k_len, d], burn::tensor::Distribution::Default, &dev);
        let blocked = time(
            || attend(q.clone(), k.clone(), v.clone(), AttentionKernel::Exact),
            5,
        );
        // query blocks only: every block scores all the keys it may see at once
        let qblk = time(
            || {
                let tiles = Tiles {
                    key: usize::MAX,
                    ..Tiles::default()
                };
                attend_tiled(q.clone(), k.clone(), v.clone(), tiles)
            },
            5,
        );
        let naive = time(|| attend_naive(q.clone(), k.clone(), v.clone()), 3);
        println!(
            "{n:>6} {:>10.1} {:>16.1} {:>10.1} {:>12.2} {:>12.2}",
            blocked * 1e3,
            qblk * 1e3,
            naive * 1e3,
            blocked / naive,
            blocked / qblk
        );
    }
}
