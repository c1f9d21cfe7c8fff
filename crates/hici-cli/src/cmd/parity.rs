//! `hici parity`: checks the model on the current device against a fixture's expected outputs
//! (the reference implementation's logits). This is how a GPU is checked where no Rust
//! toolchain exists: ship the binary and the fixture directory, run this command.

use crate::args::{AttentionArg, DtypeArg, ModelArgs};
use crate::backend::DeviceChoice;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::Args;
use hici_engine::CancelToken;
use hici_io::{load_checkpoint, LoadOptions};
use hici_model::{
    to_vec_f32, AttentionKernel, AttentionMode, DecodeCache, HiciLlama, Logits, LoraMode,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct ParityArgs {
    /// Fixture directory (base/, adapter/, expected/), e.g. tests/fixtures/tiny-hici-a.
    #[arg(long, value_name = "DIR")]
    pub fixture: PathBuf,
    /// Largest accepted max-abs difference on logits. Default by precision: f32 1e-4 on
    /// ndarray (either kernel) and 1e-3 on GPU backends (their kernels reorder f32 sums), 1e-2
    /// with `--attention flash` on a GPU (f16 tiles); f16 0.15; bf16 2.0. `--attention auto` means `exact`
    /// here.
    #[arg(long)]
    pub tolerance: Option<f32>,
    /// Largest accepted root-mean-square difference on logits (default: f32 a tenth of
    /// --tolerance; f16 0.02; bf16 0.15). Catches errors spread over many logits that a loose
    /// half-precision max-abs bound would let through.
    #[arg(long)]
    pub rms_tolerance: Option<f32>,
}

/// The default logit tolerances (max abs, RMS) for this precision and attention kernel.
///
/// The tiny fixture's logits reach about ±9 (RMS 1.9). Half precision's rounding (2^-11
/// relative for f16, 2^-8 for bf16, weights included) moves them by what `bench/precision.py`
/// measures with PyTorch on the same fixture, norms/attention/statistics/logits in f32 as here:
/// f16 max 0.063, RMS 0.0067; bf16 max 1.01, RMS 0.071 (half of the bf16 max comes from
/// rounding the weights alone). The bounds leave 2-3x headroom (docs/precision.md).
fn default_tolerance(m: &ModelArgs, kernel: AttentionKernel) -> (f32, f32) {
    let max = match (m.dtype, kernel, m.device) {
        (DtypeArg::Bf16, _, _) => 2.0,
        (DtypeArg::F16, _, _) => 0.15,
        // the CPU backend's attention op is f32 throughout, whichever form calls it
        (DtypeArg::F32, _, DeviceChoice::Ndarray) => 1e-4,
        (DtypeArg::F32, AttentionKernel::Flash, _) => 1e-2,
        (DtypeArg::F32, AttentionKernel::Exact, _) => 1e-3,
    };
    let rms = match m.dtype {
        DtypeArg::Bf16 => 0.15,
        DtypeArg::F16 => 0.02,
        DtypeArg::F32 => max / 10.0,
    };
    (max, rms)
}

/// The f32 tensors of `expected/<file>` (integer tensors are skipped).
fn expected(dir: &Path, file: &str) -> Result<BTreeMap<String, Vec<f32>>> {
    let p = dir.join("expected").join(file);
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", p.display()))?;
    Ok(st
        .tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, data)
        })
        .collect())
}

/// (max abs, RMS) of `a - b`; infinite when the lengths differ.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    if a.len() != b.len() || a.is_empty() {
        return (f32::INFINITY, f32::INFINITY);
    }
    let (mut max, mut sq) = (0f32, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        max = max.max(d);
        sq += (d as f64) * (d as f64);
    }
    (max, (sq / a.len() as f64).sqrt() as f32)
}

fn ids<B: Backend>(v: &[i64], dev: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), dev)
}

fn id_list(v: &Value) -> Result<Vec<i64>> {
    v.as_array()
        .context("expected a list of ids")?
        .iter()
        .map(|x| x.as_i64().context("expected an integer id"))
        .collect()
}

/// Teacher-forced decoding along the reference's greedy ids: a Mode I prefill of `prompt`, then
/// one decode step per reference id but the last. Returns this model's argmax at every step and
/// all step logits (`[steps, vocab]` flattened), aligned row for row with the reference's
/// whatever precision this runs in.
fn forced_decode<B: Backend>(
    model: &HiciLlama<B>,
    prompt: &[i64],
    kind: DecodeCache,
    reference_ids: &[i64],
) -> Result<(Vec<i64>, Vec<f32>)> {
    let (l, mut cache) =
        model.prefill_tokens(prompt, AttentionMode::Inference, kind, Logits::Last)?;
    let mut rows = to_vec_f32(l);
    let v = rows.len();
    let mut out = Vec::new();
    for (step, &next) in reference_ids.iter().enumerate() {
        out.push(hici_runtime::sampler::argmax(&rows[rows.len() - v..]) as i64);
        if step + 1 < reference_ids.len() {
            rows.extend(to_vec_f32(model.decode_tokens(&[next], &mut cache)?));
        }
    }
    Ok((out, rows))
}

/// Steps where `got` picks another id than the reference although the reference's own margin
/// between its best and that id is larger than `2 * tol` (logits within `tol` cannot flip such a
/// choice, so these are real errors). Returns (mismatching steps, of which unexplained).
fn argmax_mismatches(got: &[i64], want: &[i64], want_logits: &[f32], tol: f32) -> (usize, usize) {
    let v = want_logits.len() / want.len().max(1);
    let mut bad = 0;
    let mut unexplained = 0;
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        bad += 1;
        let row = &want_logits[s * v..(s + 1) * v];
        let margin = row[*w as usize] - row.get(*g as usize).copied().unwrap_or(f32::NEG_INFINITY);
        if margin > 2.0 * tol {
            unexplained += 1;
        }
    }
    (bad, unexplained)
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &ParityArgs,
    dev: &B::Device,
    _cancel: &CancelToken,
) -> Result<()> {
    let fx = &a.fixture;
    // `auto` means `exact` here (parity is about the reference); `flash` as on any command
    let kernel = match m.attention {
        AttentionArg::Flash => m.attention_kernel(),
        AttentionArg::Auto | AttentionArg::Exact => AttentionKernel::Exact,
    };
    let (default_max, default_rms) = default_tolerance(m, kernel);
    let tol = a.tolerance.unwrap_or(default_max);
    let rms_tol = a
        .rms_tolerance
        .unwrap_or(if a.tolerance.is_some() && m.dtype == DtypeArg::F32 {
            tol / 10.0
        } else {
            default_rms
        });
    let dtype = m.dtype.dtype();
    let read_json = |name: &str| -> Result<Value> {
        let p = fx.join("expected").join(name);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let inputs = read_json("inputs.json")?;
    let manifest = read_json("manifest.json")?;
    let summary = read_json("summary.json")?;
    let heads = m
        .hici_heads
        .or_else(|| {
            manifest["hici_config"]["num_heads"]
                .as_u64()
                .map(|x| x as usize)
        })
        .unwrap_or(8);
    let opts = LoadOptions {
        hici_heads: heads,
        gi_heads: manifest["hici_config"]["global_integrator_num_heads"]
            .as_u64()
            .map(|x| x as usize),
        rope_factor: m.rope_scale,
        context_size: m.context_size,
        keep_quantized: true,
    };
    let ck = load_checkpoint(&fx.join("base"), Some(&fx.join("adapter")), &opts)?;
    let mut checks: Vec<Value> = Vec::new();
    let mut failed = 0;
    let mut record = |name: &str, (max, rms): (f32, f32)| {
        let ok = max <= tol && rms <= rms_tol;
        failed += (!ok) as usize;
        checks.push(json!({"check": name, "max_abs_diff": max, "rms_diff": rms, "ok": ok}));
        if !m.json {
            eprintln!(
                "{:<52} {:>10.3e} {:>10.3e} {}",
                name,
                max,
                rms,
                if ok { "ok" } else { "FAIL" }
            );
        }
    };
    if !B::supports_dtype(dev, dtype) {
        bail!(
            "--dtype {} is not supported on --device {} (no {dtype:?} tensors there; half \
             precision runs on wgpu (f16) and cuda (f16, bf16))",
            m.dtype.name(),
            m.device
        );
    }
    if !m.json {
        eprintln!(
            "{:<52} {:>10} {:>10}",
            format!("check ({dtype:?}, {kernel:?} attention)"),
            "max |diff|",
            "rms"
        );
    }
    for lora in [LoraMode::Merged, LoraMode::Unmerged] {
        let mut w = ck.weights.clone();
        let model = crate::load::prepare(
            HiciLlama::<B>::from_weights(&ck.config, ck.lora, lora, &mut w, dev)?,
            &m.spec(),
            kernel,
        )?;
        let tag = format!("{lora:?}").to_lowercase();
        let prefill = expected(fx, "prefill_logits.safetensors")?;
        for p in ["prompt1", "prompt2"] {
            let input = id_list(&inputs[format!("{p}_ids")])?;
            let got = to_vec_f32(model.forward(ids::<B>(&input, dev), AttentionMode::Inference)?);
            record(
                &format!("mode I prefill {p} ({tag} LoRA)"),
                diff(&got, &prefill[p]),
            );
        }
        if lora == LoraMode::Unmerged {
            continue;
        }
        let long = id_list(&inputs["long_ids"])?;
        let got = to_vec_f32(model.forward(ids::<B>(&long, dev), AttentionMode::Full)?);
        record(
            "mode F logits (long)",
            diff(&got, &expected(fx, "full_logits.safetensors")?["logits"]),
        );
        let got = to_vec_f32(model.forward(
            ids::<B>(&long, dev),
            AttentionMode::Segmented { segments: 4 },
        )?);
        record(
            "mode T logits, 4 segments (long)",
            diff(
                &got,
                &expected(fx, "segmented_logits.safetensors")?["logits"],
            ),
        );
        for (kind, file, key) in [
            (
                DecodeCache::Slots,
                "greedy_decode_unscrambled_cache_NONREFERENCE.safetensors",
                "greedy_unscrambled_cache_NONREFERENCE",
            ),
            (
                DecodeCache::ReferenceScrambled,
                "greedy_decode.safetensors",
                "greedy",
            ),
        ] {
            let want = expected(fx, file)?;
            for (i, p) in ["prompt1", "prompt2"].iter().enumerate() {
                let input = id_list(&inputs[format!("{p}_ids")])?;
                let want_ids = id_list(&summary[key][i]["generated_ids"])?;
                let want_logits = &want[&format!("{p}_step_logits")];
                let (gen, logits) = forced_decode(&model, &input, kind, &want_ids)?;
                let name = format!("greedy 16 steps {p} ({kind:?} cache)");
                let (differ, unexplained) = argmax_mismatches(&gen, &want_ids, want_logits, tol);
                if differ > 0 {
                    // a near-tie in the reference flipped by rounding is not an error
                    let d = if unexplained > 0 { f32::INFINITY } else { 0.0 };
                    record(
                        &format!("{name}: {differ} argmax differ ({unexplained} beyond 2*tol)"),
                        (d, 0.0),
                    );
                }
                record(&name, diff(&logits, want_logits));
            }
        }
    }
    let doc = json!({
        "device": m.device.to_string(),
        "dtype": format!("{dtype:?}"),
        "attention_kernel": format!("{kernel:?}"),
        "fusion": m.device != DeviceChoice::Ndarray && m.fused(),
        "tolerance": tol,
        "rms_tolerance": rms_tol,
        "checks": checks,
        "failed": failed,
    });
    if m.json {
        println!("{doc}");
    }
    if failed > 0 {
        bail!("{failed} parity check(s) above tolerance (max {tol:e}, rms {rms_tol:e})");
    }
    if !m.json {
        eprintln!("all parity checks within max {tol:e}, rms {rms_tol:e}");
    }
    Ok(())
}
