//! `hici chat`: a multi-turn loop on the model's chat template (Llama-2's `[INST]` for models
//! without one).

use super::generate::{report, SamplingArgs};
use crate::args::ModelArgs;
use crate::load::load;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use clap::Args;
use hici_engine::CancelToken;
use hici_runtime::generate::{generate, GenerateOptions};
use std::io::{BufRead, Write};

#[derive(Debug, Clone, Args)]
#[command(
    long_about = "Interactive chat. Each line on stdin is one user turn; the model's \
answer streams to stdout. `/reset` forgets the conversation, Ctrl-D (end of input) quits.\n\n\
The history is kept in the prompt: in Mode I (--mode hici) the whole conversation is prefilled \
again every turn, so G and L always summarise the full conversation."
)]
pub struct ChatArgs {
    /// System prompt (first turn).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &ChatArgs,
    dev: &B::Device,
    cancel: &CancelToken,
) -> Result<()> {
    a.sampling.validate()?;
    let loaded = load::<B>(&m.spec(), dev)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("chat needs a tokenizer.json (pass --tokenizer)")?;
    let mut turns: Vec<(String, Option<String>)> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || cancel.is_cancelled() {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() == "/reset" {
            turns.clear();
            eprintln!("(conversation reset)");
            continue;
        }
        turns.push((line, None));
        let ids = loaded
            .chat
            .conversation_ids(tok, a.system.as_deref(), &turns)?;
        if ids.len() > loaded.max_context {
            bail!(
                "the conversation has {} tokens, more than the context of {}; use /reset",
                ids.len(),
                loaded.max_context
            );
        }
        let opts = GenerateOptions {
            max_new_tokens: a.sampling.max_new_tokens,
            sampling: a.sampling.sampling(),
            stop_ids: a
                .sampling
                .stop_ids(Some(tok), loaded.model.config().llama.eos_token_id),
            stop: a.sampling.stop.clone(),
            mode: loaded.mode,
            decode_cache: m.decode_cache(),
            max_context: loaded.max_context,
        };
        let json = m.json;
        let mut on_text = |s: &str| {
            if !json {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            }
        };
        let res = generate(&loaded.model, &ids, &opts, Some(tok), &mut on_text, &|| {
            cancel.is_cancelled()
        })?;
        report(&res, json)?;
        if let Some(last) = turns.last_mut() {
            last.1 = Some(res.text.clone());
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    Ok(())
}
