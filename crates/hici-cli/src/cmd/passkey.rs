//! `hici passkey`.

use super::generate::SamplingArgs;
use crate::args::ModelArgs;
use crate::load::load;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::Args;
use hici_engine::CancelToken;
use hici_runtime::generate::{generate, GenerateOptions};
use hici_runtime::passkey::{build_case, score, test_points, PasskeyResult};

#[derive(Debug, Clone, Args)]
#[command(
    long_about = "Passkey retrieval with the reference protocol: filler text, a key \
sentence at a random depth, the question, and exactly as many generated tokens as the answer \
has. NumPy's legacy RNG is reproduced, so trial j uses the reference's seed j.\n\nDecoding is \
greedy by default; the reference sampled (temperature 0.6, top-p 0.9 from the base model's \
generation_config.json), so its numbers are not exactly reproducible."
)]
pub struct PasskeyArgs {
    /// Test points (approximate prompt lengths in tokens), comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["max_tokens", "interval"])]
    pub lengths: Option<Vec<usize>>,
    /// Largest test point (with --interval): points interval, 2*interval, ...
    #[arg(long, requires = "interval")]
    pub max_tokens: Option<usize>,
    /// Spacing of test points.
    #[arg(long, requires = "max_tokens")]
    pub interval: Option<usize>,
    /// Trials per point (seeds 0..trials).
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &PasskeyArgs,
    dev: &B::Device,
    cancel: &CancelToken,
) -> Result<()> {
    let points = match (&a.lengths, a.max_tokens, a.interval) {
        (Some(l), _, _) => l.clone(),
        (None, Some(mx), Some(iv)) => {
            if iv == 0 {
                bail!("--interval must be > 0");
            }
            test_points(mx, iv)
        }
        _ => bail!("give --lengths L1,L2,... or --max-tokens N --interval I"),
    };
    if points.is_empty() || a.trials == 0 {
        bail!("nothing to run: no test points or --trials 0");
    }
    let loaded = load::<B>(&m.spec(), dev)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("passkey needs a tokenizer.json (pass --tokenizer)")?;
    let mut results = Vec::new();
    for &target in &points {
        let mut lens = Vec::new();
        let mut correct = 0;
        for trial in 0..a.trials {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let case = build_case(target, trial)?;
            let prompt = tok.encode_prompt(&case.prompt)?;
            let answer = tok.encode(&case.answer, false)?;
            if prompt.len() > loaded.max_context {
                tracing::warn!(
                    "passkey prompt of {} tokens exceeds the model's context of {}",
                    prompt.len(),
                    loaded.max_context
                );
            }
            let opts = GenerateOptions {
                max_new_tokens: answer.len(),
                sampling: a.sampling.sampling(),
                stop_ids: tok.stop_ids.clone(),
                stop: vec![],
                mode: loaded.mode,
                decode_cache: m.decode_cache(),
                max_context: prompt.len() + answer.len(),
            };
            let out = generate(&loaded.model, &prompt, &opts, None, &mut |_| {}, &|| {
                cancel.is_cancelled()
            })?;
            let ok = score(&answer, &out.generated_ids);
            correct += ok as usize;
            lens.push(prompt.len());
            if !m.json {
                eprintln!(
                    "  target {target:>6}  trial {trial:>2}  prompt {:>6} tokens  key {:>5}  {}",
                    prompt.len(),
                    case.pass_key,
                    if ok { "correct" } else { "wrong" }
                );
            }
        }
        results.push(PasskeyResult::from_trials(target, &lens, correct));
    }
    if m.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        println!("{:>8} {:>14} {:>9}", "target", "prompt tokens", "accuracy");
        for r in &results {
            println!(
                "{:>8} {:>14} {:>8.1}%",
                r.target_tokens,
                r.mean_prompt_tokens,
                r.accuracy * 100.0
            );
        }
    }
    Ok(())
}
