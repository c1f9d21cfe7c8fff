//! `hici generate`.

use crate::args::ModelArgs;
use crate::load::load;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::{Args, ValueEnum};
use hici_engine::CancelToken;
use hici_runtime::generate::{generate, truncate_middle, GenerateOptions, GenerateOutput};
use hici_runtime::sampler::SamplingConfig;
use std::io::Write;
use std::path::PathBuf;

/// `--truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Truncate {
    /// A prompt longer than the context is an error.
    None,
    /// Keep the first and last halves (LongBench).
    Middle,
}

/// Sampling flags shared by generate, chat and passkey.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sampling temperature (enables sampling).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalty (>1) on tokens already in the prompt or output.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// RNG seed (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Also stop when the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                bail!("--temperature must be >= 0, got {t}");
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            bail!("--repeat-penalty must be > 0, got {}", self.repeat_penalty);
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be > 0");
        }
        Ok(())
    }

    /// The ids that end generation: the tokenizer's EOS/end-of-turn (else the config's EOS),
    /// none with --ignore-eos.
    pub fn stop_ids(
        &self,
        tok: Option<&hici_runtime::tokenizer::HiciTokenizer>,
        config_eos: Option<u32>,
    ) -> Vec<u32> {
        if self.ignore_eos {
            return Vec::new();
        }
        match tok {
            Some(t) if !t.stop_ids.is_empty() => t.stop_ids.clone(),
            _ => config_eos.into_iter().collect(),
        }
    }

    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature.unwrap_or(1.0),
            greedy: self.temperature.is_none(),
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingConfig::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Prompt text.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, value_name = "FILE", group = "input")]
    pub prompt_file: Option<PathBuf>,
    /// Prompt as comma-separated token ids (BOS not added).
    #[arg(long, value_name = "IDS", group = "input", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<i64>>,
    /// Wrap the prompt in the model's chat template (its own Jinja template when it has one,
    /// else the Llama-2 `[INST]` format HiCI's SFT checkpoint was trained with).
    #[arg(long)]
    pub chat: bool,
    /// System prompt for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Context limit for prompt + generated tokens (default and maximum: the model's context).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// What to do with a prompt longer than the context.
    #[arg(long, value_enum, default_value = "none")]
    pub truncate: Truncate,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &GenerateArgs,
    dev: &B::Device,
    cancel: &CancelToken,
) -> Result<()> {
    a.sampling.validate()?;
    if a.prompt.is_none() && a.prompt_file.is_none() && a.prompt_ids.is_none() {
        bail!("give a prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids 1,2,3");
    }
    let loaded = load::<B>(&m.spec(), dev)?;
    let tok = loaded.tokenizer.as_deref();
    let mut ids: Vec<u32> = if let Some(list) = &a.prompt_ids {
        if a.chat {
            bail!("--chat needs a text prompt, not --prompt-ids");
        }
        let v = loaded.model.vocab_size() as i64;
        list.iter()
            .map(|&x| {
                if x < 0 || x >= v {
                    bail!("token id {x} in --prompt-ids is out of range (vocabulary {v})")
                } else {
                    Ok(x as u32)
                }
            })
            .collect::<Result<_>>()?
    } else {
        let text = match (&a.prompt, &a.prompt_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading --prompt-file {}", f.display()))?,
            _ => unreachable!("checked above"),
        };
        if text.is_empty() {
            bail!("the prompt is empty");
        }
        let tok =
            tok.context("this model has no tokenizer.json; pass --tokenizer or --prompt-ids")?;
        if a.chat {
            loaded
                .chat
                .conversation_ids(tok, a.system.as_deref(), &[(text, None)])?
        } else {
            tok.encode_prompt(&text)?
        }
    };
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let max_context = match a.max_context {
        None => loaded.max_context,
        Some(0) => bail!("--max-context must be > 0"),
        Some(c) if c > loaded.max_context => bail!(
            "--max-context {c} is more than the model's context of {} tokens",
            loaded.max_context
        ),
        Some(c) => c,
    };
    if ids.len() > max_context {
        match a.truncate {
            Truncate::None => bail!(
                "the prompt has {} tokens, more than the context of {max_context} \
                 (use --truncate middle)",
                ids.len()
            ),
            Truncate::Middle => {
                // leave room to generate: up to half the context
                let room = a.sampling.max_new_tokens.min(max_context / 2);
                let keep = max_context - room;
                eprintln!(
                    "note: prompt of {} tokens truncated to {keep} (middle removed)",
                    ids.len()
                );
                ids = truncate_middle(&ids, keep);
            }
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.sampling(),
        stop_ids: a
            .sampling
            .stop_ids(tok, loaded.model.config().llama.eos_token_id),
        stop: a.sampling.stop.clone(),
        mode: loaded.mode,
        decode_cache: m.decode_cache(),
        max_context,
    };
    let json = m.json;
    let mut out = std::io::stdout();
    let mut on_text = |s: &str| {
        if !json {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
    };
    let res = generate(&loaded.model, &ids, &opts, tok, &mut on_text, &|| {
        cancel.is_cancelled()
    })?;
    report(&res, json)?;
    Ok(())
}

/// Prints the timings (stderr) or the JSON document (stdout).
pub fn report(res: &GenerateOutput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(res)?);
    } else {
        println!();
        if res.text.is_empty() && !res.generated_ids.is_empty() {
            println!("{:?}", res.generated_ids);
        }
        let t = &res.timings;
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {:?}] prefill {:.1} tok/s, decode {:.1} tok/s, \
             time to first token {:.3} s",
            res.prompt_tokens,
            res.generated_tokens,
            res.stop_reason,
            t.prefill_tokens_per_s,
            t.decode_tokens_per_s,
            t.time_to_first_token_s
        );
    }
    Ok(())
}
