//! Weights that stay quantized (8-bit blocks of 32, `hici_model::lora::QuantWeight`) on the
//! ndarray backend: the block kernels of vendor/burn-ndarray (`qmatvec`) against an f64
//! product of the dequantized values, and whole models from quantized GGUF files against the
//! same files expanded to f32 (`--weights f32`, the dequantized reference).
//!
//! Tolerances: kernel 1e-5 relative to the sum of |terms| (f32 rounding; the kernel multiplies
//! the very values the dequantized weight holds, only the summation order differs); logits
//! of the tiny model 1e-4 absolute (|logit| ~ 1, the parity tolerance of f32 CPU); greedy ids
//! equal.

use super::common::{self, B};
use hici::io::gguf::quants::GgmlType;
use hici::io::{load_gguf, LoadOptions};
use hici::model::lora::QuantProduct;
use hici::model::weights::MixedWeights;
use hici::model::{to_vec_f32, AttentionMode, DecodeCache, HiciLlama, Logits, LoraMode};
use hici::runtime::sampler::argmax;
use std::path::{Path, PathBuf};

#[test]
fn quantized_linear_matches_f64_reference() {
    let dev = Default::default();
    let worst = common::check_quantized_linear::<B>(&dev, 1e-5, QuantProduct::Backend, false, true);
    eprintln!("quantized linear: worst relative error {worst:.2e}");
    // the product of the GPU backends, here with 8-bit values only (ndarray reads no Q4S)
    let worst =
        common::check_quantized_linear::<B>(&dev, 1e-5, QuantProduct::Dequantize, false, false);
    eprintln!("dequantized row chunks: worst relative error {worst:.2e}");
}

/// The fixture's base weights as a GGUF file with its matrices in `ty`.
fn quantized_gguf(ty: GgmlType) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quantized");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{}-{}.gguf", ty.name(), std::process::id()));
    common::write_fixture_gguf(&path, Some(ty));
    path
}

/// Builds the model of a GGUF file, its matrices kept quantized or expanded to f32.
pub fn gguf_model(path: &Path, keep_quantized: bool) -> HiciLlama<B> {
    let opts = LoadOptions {
        keep_quantized,
        ..LoadOptions::default()
    };
    let ck = load_gguf(path, &opts).unwrap().checkpoint;
    assert_eq!(ck.quantized.is_empty(), !keep_quantized);
    let mut w = MixedWeights {
        dense: ck.weights,
        quantized: ck.quantized,
        product: QuantProduct::Backend,
    };
    let m = HiciLlama::<B>::from_weights(
        &ck.config,
        None,
        LoraMode::Merged,
        &mut w,
        &Default::default(),
    )
    .unwrap();
    assert!(
        w.is_empty(),
        "unused: {:?}",
        w.names().take(3).collect::<Vec<_>>()
    );
    assert_eq!(m.is_quantized(), keep_quantized);
    m
}

/// `n` greedy ids after `prompt`, prefill then one decode step per id.
pub fn greedy_ids(model: &HiciLlama<B>, prompt: &[i64], n: usize) -> Vec<i64> {
    let (l, mut cache) = model
        .prefill_tokens(
            prompt,
            AttentionMode::Full,
            DecodeCache::Tokens,
            Logits::Last,
        )
        .unwrap();
    let mut ids = vec![argmax(&to_vec_f32(l)) as i64];
    while ids.len() < n {
        let row = to_vec_f32(
            model
                .decode_tokens(&ids[ids.len() - 1..], &mut cache)
                .unwrap(),
        );
        ids.push(argmax(&row) as i64);
    }
    ids
}

#[test]
fn quantized_gguf_models_match_their_dequantized_reference() {
    let prompt: Vec<i64> = (0..40).map(|i| (i * 37 + 5) % 256).collect();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let path = quantized_gguf(ty);
        let (q, f) = (gguf_model(&path, true), gguf_model(&path, false));
        let lq = to_vec_f32(
            q.forward(common::ids_tensor(&prompt), AttentionMode::Full)
                .unwrap(),
        );
        let lf = to_vec_f32(
            f.forward(common::ids_tensor(&prompt), AttentionMode::Full)
                .unwrap(),
        );
        let d = common::max_abs_diff(&lq, &lf);
        eprintln!("{}: prefill logits max |diff| {d:.2e}", ty.name());
        assert!(d < 1e-4, "{}: logits differ by {d}", ty.name());
        assert_eq!(
            greedy_ids(&q, &prompt, 12),
            greedy_ids(&f, &prompt, 12),
            "{} greedy ids",
            ty.name()
        );
        std::fs::remove_file(&path).ok();
    }
}
