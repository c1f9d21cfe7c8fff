//! The `hici` command line: generate, chat, perplexity and passkey retrieval with HiCI
//! long-context models. The binary itself is the root package's `src/main.rs`.

pub mod args;
mod cmd;

pub use hici_engine::device as backend;
pub use hici_engine::{embedded, load};

use anyhow::Result;
use args::ModelArgs;
use clap::{Parser, Subcommand};
use hici_engine::{with_backend, CancelToken};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "hici",
    version,
    about = "HiCI long-context Llama-2 inference on burn",
    long_about = "HiCI long-context Llama-2 inference on burn.\n\nWithout --base the commands \
run on an embedded tiny test model (random weights), so everything works without a download. \
For the released checkpoint pass --base <Llama-2-7b-hf dir> --adapter <Llama-2-7b-HiCI-16k-SFT dir>."
)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd::generate::GenerateArgs),
    /// Interactive multi-turn chat on the Llama-2 template (reads stdin; /reset; Ctrl-D quits).
    Chat(cmd::chat::ChatArgs),
    /// Sliding-window perplexity of a token stream or text file (PG-19 protocol).
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Passkey retrieval accuracy at given prompt lengths (reference protocol).
    Passkey(cmd::passkey::PasskeyArgs),
    /// Validate a checkpoint: every expected tensor, unexpected/missing ones, parameter counts
    /// per group (vs the spec for 7B), RoPE factor, vocab resize, and a logits checksum.
    Inspect(cmd::inspect::InspectArgs),
    /// Convert --base/--adapter (or the embedded model) once into a single file for --model.
    Import(cmd::import::ImportArgs),
    /// Prefill/decode throughput, time to first token and peak memory (llama-bench style).
    Bench(cmd::bench::BenchArgs),
    /// Check the model on this device against a fixture's reference outputs
    /// (e.g. `hici parity --fixture tests/fixtures/tiny-hici-a --device cuda`).
    Parity(cmd::parity::ParityArgs),
    /// List the compiled-in backends and the devices found.
    Devices,
    /// OpenAI-compatible HTTP server (chat/completions, completions, models, health, metrics).
    Serve(cmd::serve::ServeArgs),
}

/// Parses the command line, runs the command and maps the outcome to an exit code
/// (0 ok, 1 error, 2 usage error, 130 interrupted).
pub fn main_entry() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HICI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hici_server=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cancel = CancelToken::new();
    // `hici serve` handles its own signals (graceful shutdown); every other command stops at
    // the first Ctrl-C / SIGTERM and exits at once on the second, removing partial files
    if !matches!(cli.command, Command::Serve(_)) {
        let (token, presses) = (cancel.clone(), Arc::new(AtomicUsize::new(0)));
        let _ = ctrlc::set_handler(move || {
            token.cancel();
            if presses.fetch_add(1, Ordering::SeqCst) >= 1 {
                token.remove_partial_files();
                eprintln!("\ninterrupted");
                std::process::exit(130);
            }
        });
    }
    let interrupted = || cancel.is_cancelled();
    match run(cli, &cancel) {
        Ok(()) if interrupted() => {
            eprintln!("interrupted");
            ExitCode::from(130)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if interrupted() {
                eprintln!("interrupted");
                return ExitCode::from(130);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, cancel: &CancelToken) -> Result<()> {
    let m = &cli.model;
    match &cli.command {
        Command::Devices => return cmd::devices::run(m),
        Command::Import(a) => return cmd::import::run(m, a, cancel),
        Command::Serve(a) => return cmd::serve::run(m, a),
        _ => {}
    }
    backend::check_available(m.device)?;
    let go = || {
        with_backend!(m.device, m.fused(), |B, dev| match &cli.command {
            Command::Generate(a) => cmd::generate::run::<B>(m, a, &dev, cancel),
            Command::Chat(a) => cmd::chat::run::<B>(m, a, &dev, cancel),
            Command::Perplexity(a) => cmd::perplexity::run::<B>(m, a, &dev, cancel),
            Command::Passkey(a) => cmd::passkey::run::<B>(m, a, &dev, cancel),
            Command::Inspect(a) => cmd::inspect::run::<B>(m, a, &dev, cancel),
            Command::Bench(a) => cmd::bench::run::<B>(m, a, &dev, cancel),
            Command::Parity(a) => cmd::parity::run::<B>(m, a, &dev, cancel),
            Command::Devices | Command::Import(_) | Command::Serve(_) => {
                unreachable!("handled above")
            }
        })
    };
    if m.device == backend::DeviceChoice::Ndarray {
        backend::on_compute_pool(go)
    } else {
        go()
    }
}
