//! Loading a model for a command: directories or the embedded default, with progress.

use crate::args::{DtypeArg, ModelArgs};
use crate::embedded;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use hici_io::{load_checkpoint, LoadOptions};
use hici_model::HiciLlama;
use hici_runtime::tokenizer::HiciTokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

/// A model ready to run.
pub struct Loaded<B: Backend> {
    pub model: HiciLlama<B>,
    pub tokenizer: Option<HiciTokenizer>,
    /// Longest prompt + generation the RoPE setting was made for.
    pub max_context: usize,
    pub embedded: bool,
}

fn spinner(msg: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Loads the model named by `args` (or the embedded one) onto `device`.
pub fn load<B: Backend>(args: &ModelArgs, device: &B::Device) -> Result<Loaded<B>> {
    if args.dtype != DtypeArg::F32 {
        let name = clap::ValueEnum::to_possible_value(&args.dtype)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        bail!(
            "--dtype {name} is not supported yet: this build runs f32 only (half precision on GPU \
             backends is planned)"
        );
    }
    let (base, adapter, embedded) = match &args.base {
        Some(b) => (b.clone(), args.adapter.clone(), false),
        None => {
            let (b, a) = embedded::materialise()?;
            eprintln!(
                "note: no --base given; using the embedded tiny test model (random weights, \
                 output is meaningless)"
            );
            (b, Some(a), true)
        }
    };
    let heads = args.hici_heads.unwrap_or(if embedded {
        embedded::EMBEDDED_HICI_HEADS
    } else {
        8
    });
    let opts = LoadOptions {
        hici_heads: heads,
        gi_heads: None,
        rope_factor: args.rope_scale,
        context_size: args.context_size,
    };
    let pb = spinner("loading checkpoint", false);
    let ck = load_checkpoint(&base, adapter.as_deref(), &opts)
        .with_context(|| format!("loading {}", base.display()))?;
    for note in &ck.report.notes {
        tracing::info!("{note}");
    }
    pb.set_message("building model");
    let mut weights = ck.weights;
    let model =
        HiciLlama::<B>::from_weights(&ck.config, ck.lora, args.lora_mode(), &mut weights, device)
            .context("building the model")?;
    if !weights.is_empty() {
        let names: Vec<_> = weights.keys().take(5).cloned().collect();
        bail!(
            "{} tensor(s) in the checkpoint are not used by the model, e.g. {}",
            weights.len(),
            names.join(", ")
        );
    }
    pb.finish_and_clear();
    let tok_path: Option<PathBuf> = args.tokenizer.clone().or_else(|| {
        let mut cands = Vec::new();
        if let Some(a) = &adapter {
            cands.push(a.join("tokenizer.json"));
        }
        cands.push(base.join("tokenizer.json"));
        cands.into_iter().find(|p| p.is_file())
    });
    let tokenizer = match tok_path {
        Some(p) => Some(HiciTokenizer::from_file(&p)?),
        None => None,
    };
    let l = &ck.config.llama;
    let max_context = (l.max_position_embeddings as f64 * ck.config.rope_factor).round() as usize;
    Ok(Loaded {
        model,
        tokenizer,
        max_context,
        embedded,
    })
}
