//! `hici parity`: checks the model on the current device against a fixture's expected outputs
//! (the reference implementation's logits). This is how a GPU is checked where no Rust
//! toolchain exists: ship the binary and the fixture directory, run this command.

use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::Args;
use hici_io::{load_checkpoint, LoadOptions};
use hici_model::{to_vec_f32, AttentionMode, DecodeCache, HiciLlama, Logits, LoraMode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct ParityArgs {
    /// Fixture directory (base/, adapter/, expected/), e.g. tests/fixtures/tiny-hici-a.
    #[arg(long, value_name = "DIR")]
    pub fixture: PathBuf,
    /// Largest accepted max-abs difference on logits (default: 1e-4 on ndarray, 1e-3 on GPU
    /// backends, whose kernels reorder f32 sums).
    #[arg(long)]
    pub tolerance: Option<f32>,
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
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

fn greedy<B: Backend>(
    model: &HiciLlama<B>,
    dev: &B::Device,
    prompt: &[i64],
    kind: DecodeCache,
    steps: usize,
) -> Result<(Vec<i64>, Vec<f32>)> {
    let (l, mut cache) = model.prefill(
        ids::<B>(prompt, dev),
        AttentionMode::Inference,
        kind,
        Logits::Last,
    )?;
    let mut rows = to_vec_f32(l);
    let v = rows.len();
    let mut out = Vec::new();
    for step in 0..steps {
        let next = hici_runtime::sampler::argmax(&rows[rows.len() - v..]) as i64;
        out.push(next);
        if step + 1 < steps {
            rows.extend(to_vec_f32(model.decode_tokens(&[next], &mut cache)?));
        }
    }
    Ok((out, rows))
}

pub fn run<B: Backend>(m: &ModelArgs, a: &ParityArgs, dev: &B::Device) -> Result<()> {
    let fx = &a.fixture;
    let tol = a.tolerance.unwrap_or(match m.device {
        crate::backend::DeviceChoice::Ndarray => 1e-4,
        _ => 1e-3,
    });
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
    };
    let ck = load_checkpoint(&fx.join("base"), Some(&fx.join("adapter")), &opts)?;
    let mut checks: Vec<Value> = Vec::new();
    let mut failed = 0;
    let mut record = |name: &str, diff: f32| {
        let ok = diff <= tol;
        failed += (!ok) as usize;
        checks.push(json!({"check": name, "max_abs_diff": diff, "ok": ok}));
        if !m.json {
            eprintln!(
                "{:<52} {:>10.3e} {}",
                name,
                diff,
                if ok { "ok" } else { "FAIL" }
            );
        }
    };
    for lora in [LoraMode::Merged, LoraMode::Unmerged] {
        let mut w = ck.weights.clone();
        let model = HiciLlama::<B>::from_weights(&ck.config, ck.lora, lora, &mut w, dev)?;
        let tag = format!("{lora:?}").to_lowercase();
        let prefill = expected(fx, "prefill_logits.safetensors")?;
        for p in ["prompt1", "prompt2"] {
            let input = id_list(&inputs[format!("{p}_ids")])?;
            let got = to_vec_f32(model.forward(ids::<B>(&input, dev), AttentionMode::Inference)?);
            record(
                &format!("mode I prefill {p} ({tag} LoRA)"),
                max_abs_diff(&got, &prefill[p]),
            );
        }
        if lora == LoraMode::Unmerged {
            continue;
        }
        let long = id_list(&inputs["long_ids"])?;
        let got = to_vec_f32(model.forward(ids::<B>(&long, dev), AttentionMode::Full)?);
        record(
            "mode F logits (long)",
            max_abs_diff(&got, &expected(fx, "full_logits.safetensors")?["logits"]),
        );
        let got = to_vec_f32(model.forward(
            ids::<B>(&long, dev),
            AttentionMode::Segmented { segments: 4 },
        )?);
        record(
            "mode T logits, 4 segments (long)",
            max_abs_diff(
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
                let (gen, logits) = greedy(&model, dev, &input, kind, 16)?;
                let want_ids = id_list(&summary[key][i]["generated_ids"])?;
                let name = format!("greedy 16 steps {p} ({kind:?} cache)");
                if gen != want_ids {
                    record(&format!("{name}: ids differ"), f32::INFINITY);
                }
                record(
                    &name,
                    max_abs_diff(&logits, &want[&format!("{p}_step_logits")]),
                );
            }
        }
    }
    let doc = json!({"device": m.device.to_string(), "tolerance": tol, "checks": checks, "failed": failed});
    if m.json {
        println!("{doc}");
    }
    if failed > 0 {
        bail!("{failed} parity check(s) above tolerance {tol:e}");
    }
    if !m.json {
        eprintln!("all parity checks within {tol:e}");
    }
    Ok(())
}
