//! `hici inspect`: a validation report of the checkpoint (directories, `--model` file or the
//! embedded model), then a logits checksum on a fixed prompt.

use crate::args::ModelArgs;
use crate::load::{load, model_source, ModelSource};
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::Args;
use hici_engine::CancelToken;
use hici_io::validate::{validate_converted, validate_dirs, KeyStatus, Validation};
use hici_io::ParamCounts;
use hici_model::to_vec_f32;

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// List every expected tensor (name, shape, dtype, file), not only the problems.
    #[arg(long)]
    pub keys: bool,
    /// Validate the headers only: do not build the model or compute the logits checksum.
    #[arg(long)]
    pub no_load: bool,
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shape(s: &[usize]) -> String {
    format!("{s:?}")
}

/// Logits of the fixed prompt `BOS, 100..107` (ids taken modulo the vocabulary).
fn checksum<B: Backend>(
    m: &ModelArgs,
    model: &hici_model::HiciLlama<B>,
    dev: &B::Device,
) -> Result<serde_json::Value> {
    let v = model.vocab_size() as i64;
    let ids: Vec<i64> = std::iter::once(1)
        .chain((100..108).map(|x| x % v))
        .collect();
    let n = ids.len();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), dev);
    let mode = m.resolve_mode(model.config().hici.is_some())?;
    let logits = to_vec_f32(model.forward(t, mode)?);
    let sum: f64 = logits.iter().map(|&x| x as f64).sum();
    let abs: f64 = logits.iter().map(|&x| (x as f64).abs()).sum();
    let vocab = v as usize;
    let last = &logits[logits.len() - vocab..];
    let argmax = last
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0;
    Ok(serde_json::json!({
        "prompt_ids": "1,100..107",
        "mode": format!("{mode:?}"),
        "sum": sum,
        "abs_sum": abs,
        "last_argmax": argmax,
        "last_first4": &last[..last.len().min(4)],
    }))
}

/// The one-line logits checksum of a `checksum` document.
fn print_checksum(c: &serde_json::Value) {
    println!(
        "logits checksum (prompt {}, mode {}): sum {:.6}, abs sum {:.6}, argmax(last) {}",
        c["prompt_ids"].as_str().unwrap_or(""),
        c["mode"].as_str().unwrap_or(""),
        c["sum"].as_f64().unwrap_or(f64::NAN),
        c["abs_sum"].as_f64().unwrap_or(f64::NAN),
        c["last_argmax"]
    );
}

/// `inspect` of a GGUF file: what its header says (architecture, dtypes by group, tokenizer,
/// chat template, context), then a load and the logits checksum.
fn run_gguf<B: Backend>(
    m: &ModelArgs,
    path: &std::path::Path,
    a: &InspectArgs,
    dev: &B::Device,
) -> Result<()> {
    let file =
        hici_io::GgufFile::open(path).with_context(|| format!("inspecting {}", path.display()))?;
    let summary = file
        .summary()
        .with_context(|| format!("inspecting {}", path.display()))?;
    let vocab = file.vocab()?;
    let template = vocab.as_ref().and_then(|v| v.chat_template.clone());
    let mut doc = serde_json::json!({
        "source": path.display().to_string(),
        "format": format!("GGUF v{}", summary.version),
        "architecture": summary.architecture,
        "name": summary.name,
        "file_type": summary.file_type,
        "tensors": summary.n_tensors,
        "parameters": summary.n_params,
        "dtypes_by_group": summary.types,
        "tokenizer": vocab.as_ref().map(|v| serde_json::json!({
            "model": v.model, "pre": v.pre, "tokens": v.tokens.len(), "merges": v.merges.len(),
            "bos": v.bos, "eos": v.eos, "eot": v.eot, "add_bos": v.add_bos,
        })),
        "chat_template": template,
        "context_length": summary.context_length,
        "tied_embeddings": summary.tied_embeddings,
        "hici": false,
    });
    let config = file.llama_config()?;
    doc["config"] = serde_json::to_value(&config)?;
    drop(file);
    let mut load_error = None;
    if !a.no_load {
        let t0 = std::time::Instant::now();
        match load::<B>(&m.spec(), dev) {
            Ok(loaded) => {
                doc["load_seconds"] = t0.elapsed().as_secs_f64().into();
                doc["logits_checksum"] = checksum(m, &loaded.model, dev)?;
                doc["max_context"] = loaded.max_context.into();
                doc["chat_format"] = loaded.chat.name().into();
                doc["notes"] = serde_json::to_value(&loaded.report.notes)?;
            }
            Err(e) => load_error = Some(format!("{e:#}")),
        }
    }
    doc["load_error"] = load_error.clone().into();
    if m.json {
        println!("{doc}");
    } else {
        println!("GGUF model ({})", path.display());
        println!(
            "  format: GGUF v{}, {} tensors, {:.1} M parameters",
            summary.version,
            summary.n_tensors,
            summary.n_params as f64 / 1e6
        );
        println!(
            "  architecture: {}{}{}",
            summary.architecture,
            summary
                .name
                .as_ref()
                .map_or(String::new(), |n| format!(" ({n})")),
            summary
                .file_type
                .as_ref()
                .map_or(String::new(), |t| format!(", {t}"))
        );
        println!(
            "  shape: {} layers, hidden {}, {} heads / {} KV heads, FFN {}, vocab {}, rope base {}",
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
            config.intermediate_size,
            config.vocab_size,
            config.rope_theta
        );
        println!(
            "  context: {} tokens; embeddings {}",
            summary.context_length,
            if summary.tied_embeddings {
                "tied (no output.weight)"
            } else {
                "untied"
            }
        );
        println!("  HiCI: none (plain Llama: --mode full)");
        for (group, types) in &summary.types {
            let t: Vec<String> = types.iter().map(|(ty, n)| format!("{n} x {ty}")).collect();
            println!("  {group:<13} {}", t.join(", "));
        }
        match &vocab {
            Some(v) => println!(
                "  tokenizer: {}{} with {} tokens, {} merges, bos {:?} eos {:?}, add_bos {}",
                v.model,
                v.pre
                    .as_ref()
                    .map_or(String::new(), |p| format!(" (pre `{p}`)")),
                v.tokens.len(),
                v.merges.len(),
                v.bos,
                v.eos,
                v.add_bos
            ),
            None => println!("  tokenizer: none in the file"),
        }
        match &template {
            Some(t) => println!(
                "  chat template: the model's own ({} bytes of Jinja)",
                t.len()
            ),
            None => println!("  chat template: none (Llama-2 [INST] format is used)"),
        }
        if let Some(c) = doc.get("logits_checksum") {
            print_checksum(c);
            println!(
                "model loaded in {:.2} s",
                doc["load_seconds"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "result: {}",
            if load_error.is_none() {
                "OK"
            } else {
                "loading failed"
            }
        );
    }
    if let Some(e) = load_error {
        bail!("{e}");
    }
    Ok(())
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &InspectArgs,
    dev: &B::Device,
    _cancel: &CancelToken,
) -> Result<()> {
    let validation = match model_source(&m.spec())? {
        ModelSource::Gguf(p) => return run_gguf::<B>(m, &p, a, dev),
        ModelSource::Dirs {
            base,
            adapter,
            opts,
            ..
        } => validate_dirs(&base, adapter.as_deref(), &opts)
            .with_context(|| format!("inspecting {}", base.display()))?,
        ModelSource::Converted(p) => {
            validate_converted(&p).with_context(|| format!("inspecting {}", p.display()))?
        }
    };
    let valid = validation.is_ok();
    let mut loaded_doc = serde_json::Value::Null;
    let mut load_error = None;
    if valid && !a.no_load {
        let t0 = std::time::Instant::now();
        match load::<B>(&m.spec(), dev) {
            Ok(loaded) => {
                let load_seconds = t0.elapsed().as_secs_f64();
                let sum = checksum(m, &loaded.model, dev)?;
                loaded_doc = serde_json::json!({
                    "config": loaded.model.config(),
                    "embedded": loaded.embedded,
                    "max_context": loaded.max_context,
                    "notes": loaded.report.notes,
                    "logits_checksum": sum,
                    "load_seconds": load_seconds,
                });
            }
            Err(e) => load_error = Some(format!("{e:#}")),
        }
    }
    if m.json {
        let mut doc = serde_json::to_value(&validation)?;
        if !a.keys {
            // Only the keys that are not OK.
            let bad: Vec<_> = validation
                .keys
                .iter()
                .filter(|k| k.status != KeyStatus::Ok)
                .collect();
            doc["keys"] = serde_json::to_value(bad)?;
        }
        doc["valid"] = valid.into();
        doc["model"] = loaded_doc.clone();
        doc["load_error"] = load_error.clone().into();
        println!("{doc}");
    } else {
        print_report(&validation, a.keys);
        if let Some(obj) = loaded_doc.as_object() {
            print_checksum(&obj["logits_checksum"]);
            println!("max context for the RoPE setting: {}", obj["max_context"]);
            println!(
                "model loaded in {:.2} s",
                obj["load_seconds"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "result: {}",
            match (valid, &load_error) {
                (true, None) => "OK",
                (true, Some(_)) => "tensors OK, but loading failed",
                (false, _) => "INVALID",
            }
        );
    }
    if !valid {
        let n =
            validation.bad_keys().count() + validation.unexpected.len() + validation.problems.len();
        bail!("the checkpoint is not valid: {n} problem(s) (see the report above)");
    }
    if let Some(e) = load_error {
        bail!("{e}");
    }
    Ok(())
}

fn print_report(v: &Validation, all_keys: bool) {
    println!("HiCI checkpoint validation ({})", v.source);
    for f in &v.files {
        println!("  file: {}", f.display());
    }
    match &v.hici {
        Some(h) => println!(
            "  HiCI: M={} K={} Bd={} Cd={} Sd={} heads hc={} hg={}",
            h.local_slots,
            h.global_slots,
            h.bottleneck_dim,
            h.compress_dim,
            h.shared_compress_dim,
            h.lc_heads,
            h.gi_heads
        ),
        None => println!("  HiCI: none (plain Llama)"),
    }
    match (&v.lora, v.lora_merged) {
        (Some(l), true) => println!(
            "  LoRA: r={} alpha={} merged into the weights",
            l.r, l.alpha
        ),
        (Some(l), false) => println!("  LoRA: r={} alpha={} (scale {})", l.r, l.alpha, l.scale()),
        (None, _) => println!("  LoRA: none"),
    }
    println!(
        "  RoPE: linear factor {} ({})",
        v.rope_factor, v.rope_source
    );
    println!("  vocab: {}", v.vocab.note);
    println!();
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>6}  {:<14} {:>16}    {:>16}",
        "group", "expected", "ok", "missing", "absent", "wrong", "dtypes", "params", "from config"
    );
    for g in &v.groups {
        let dtypes: Vec<String> = g.dtypes.iter().map(|(d, n)| format!("{d}:{n}")).collect();
        let mark = if g.params_found == g.params_expected {
            "="
        } else {
            "!="
        };
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} {:>6}  {:<14} {:>16} {mark:>2} {:>16}",
            g.group.name(),
            g.expected_tensors,
            g.ok,
            g.missing_required,
            g.missing_optional,
            g.wrong,
            dtypes.join(" "),
            thousands(g.params_found),
            thousands(g.params_expected),
        );
    }
    if let Some(s) = &v.spec_7b {
        let item = |name: &str, ok: bool, found: usize, spec: usize| {
            if ok {
                format!("{name} {} ok", thousands(spec))
            } else {
                format!("{name} {} (spec {})", thousands(found), thousands(spec))
            }
        };
        let mut parts = vec![
            item("base", s.base, s.found.base, s.spec.base),
            item("LoRA", s.lora, s.found.lora, s.spec.lora),
            item("HiCI", s.hici, s.found.hici, s.spec.hici),
        ];
        if let Some(o) = s.overrides {
            parts.push(item("overrides", o, s.found.overrides, s.spec.overrides));
        }
        println!(
            "Llama-2-7B spec (§1.1, §2.2, §2.3): {} -> {}",
            parts.join(", "),
            if s.matches {
                "matches spec"
            } else {
                "DOES NOT match spec"
            }
        );
    } else {
        let ParamCounts {
            base,
            lora,
            hici,
            overrides,
        } = v.counts_found;
        println!(
            "parameters: base {}, LoRA {}, HiCI {}, overrides {} (not the 7B configuration: \
             compared with the spec §8 formula only)",
            thousands(base),
            thousands(lora),
            thousands(hici),
            thousands(overrides)
        );
    }
    if !v.ignored.is_empty() {
        println!(
            "ignored: {} non-parameter buffer(s) (rotary_emb.inv_freq)",
            v.ignored.len()
        );
    }
    for p in &v.problems {
        println!("problem: {p}");
    }
    let bad: Vec<_> = v.bad_keys().collect();
    if bad.is_empty() {
        println!("missing or mis-shaped tensors: none");
    } else {
        println!("missing or mis-shaped tensors ({}):", bad.len());
        for k in bad {
            println!(
                "  {:<11} {} expected {} found {}{}",
                match k.status {
                    KeyStatus::Missing => "MISSING",
                    KeyStatus::WrongShape => "WRONG SHAPE",
                    KeyStatus::WrongDtype => "WRONG DTYPE",
                    KeyStatus::Ok => "ok",
                },
                k.name,
                shape(&k.expected_shape),
                k.found_shape
                    .as_deref()
                    .map(shape)
                    .unwrap_or_else(|| "-".into()),
                k.file
                    .as_ref()
                    .map(|f| format!(" in {}", f.display()))
                    .unwrap_or_default()
            );
        }
    }
    let absent: Vec<_> = v.absent_optional().collect();
    if !absent.is_empty() {
        println!("absent optional tensors ({}):", absent.len());
        for k in absent.iter().take(if all_keys { usize::MAX } else { 8 }) {
            println!("  {} {}", k.name, shape(&k.expected_shape));
        }
        if !all_keys && absent.len() > 8 {
            println!("  ... ({} more; --keys lists all)", absent.len() - 8);
        }
    }
    if v.unexpected.is_empty() {
        println!("unexpected tensors: none");
    } else {
        println!("unexpected tensors ({}):", v.unexpected.len());
        for u in &v.unexpected {
            println!(
                "  {} {} {} in {}: {}",
                u.name,
                shape(&u.shape),
                u.dtype,
                u.file.display(),
                u.reason
            );
        }
    }
    if all_keys {
        println!("expected tensors ({}):", v.keys.len());
        for k in &v.keys {
            println!(
                "  {:<9} {:<8} {} {} {}",
                k.group.name(),
                format!("{:?}", k.status).to_lowercase(),
                k.name,
                k.found_shape
                    .as_deref()
                    .map(shape)
                    .unwrap_or_else(|| shape(&k.expected_shape)),
                k.dtype.as_deref().unwrap_or("-")
            );
        }
    }
}
