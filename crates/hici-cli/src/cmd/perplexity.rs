//! `hici perplexity`.

use crate::args::ModelArgs;
use crate::load::load;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::{Args, ValueEnum};
use hici_engine::CancelToken;
use hici_runtime::perplexity::{evaluate, read_token_file, PplOptions, TokenWidth};
use hici_runtime::RuntimeError;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// `--token-width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Width {
    #[value(name = "16")]
    W16,
    #[value(name = "32")]
    W32,
}

#[derive(Debug, Clone, Args)]
#[command(
    long_about = "Sliding-window perplexity exactly as the reference evaluation: windows \
start at 0, stride, 2*stride, ... while start < len - seq_len; each window is scored on its \
seq_len - 1 next-token predictions with no earlier context; PPL = exp(total NLL / total \
predictions). The paper's tables use --mode full."
)]
pub struct PerplexityArgs {
    /// Flat little-endian token stream (uint16 by default, the PG-19 .bin format).
    #[arg(long, value_name = "FILE", group = "input")]
    pub tokens: Option<PathBuf>,
    /// A text file, tokenized with the model's tokenizer (BOS added once at the start).
    #[arg(long, value_name = "FILE", group = "input")]
    pub text: Option<PathBuf>,
    /// Width of the ids in --tokens.
    #[arg(long, value_enum, default_value = "16")]
    pub token_width: Width,
    /// Window length.
    #[arg(long)]
    pub seq_len: usize,
    /// Distance between window starts.
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Evaluate at most this many windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &PerplexityArgs,
    dev: &B::Device,
    cancel: &CancelToken,
) -> Result<()> {
    let tokens = match (&a.tokens, &a.text) {
        (Some(p), _) => {
            let w = match a.token_width {
                Width::W16 => TokenWidth::U16,
                Width::W32 => TokenWidth::U32,
            };
            Some(read_token_file(p, w)?)
        }
        (None, Some(_)) => None,
        (None, None) => bail!("give --tokens FILE.bin or --text FILE"),
    };
    let loaded = load::<B>(&m.spec(), dev)?;
    let tokens = match tokens {
        Some(t) => t,
        None => {
            let p = a.text.as_ref().expect("checked above");
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --text {}", p.display()))?;
            let tok = loaded
                .tokenizer
                .as_ref()
                .context("--text needs a tokenizer.json (pass --tokenizer)")?;
            tok.encode_prompt(&text)?
        }
    };
    let opts = PplOptions {
        seq_len: a.seq_len,
        stride: a.stride,
        max_windows: a.max_windows,
        mode: loaded.mode,
    };
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows [{elapsed} < {eta}]")
            .expect("template"),
    );
    let mut on_window = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let res = evaluate(&loaded.model, dev, &tokens, &opts, &mut on_window, &|| {
        cancel.is_cancelled()
    });
    pb.finish_and_clear();
    let res = match res {
        Err(RuntimeError::Interrupted) => return Ok(()),
        r => r?,
    };
    if m.json {
        println!("{}", serde_json::to_string(&res)?);
    } else {
        println!(
            "windows {}  tokens scored {}  mean NLL {:.6}  PPL {:.4}",
            res.windows, res.predictions, res.mean_nll, res.ppl
        );
    }
    Ok(())
}
