//! `hici serve`: the OpenAI-compatible HTTP server.

use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use hici_server::{serve, ServerConfig};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Endpoints: POST /v1/chat/completions, POST /v1/completions (both with \
\"stream\": true for server-sent events), GET /v1/models, GET /health (503 while loading), GET \
/metrics (Prometheus). Point an OpenAI client at http://HOST:PORT/v1. Requests are admitted in \
arrival order and decoded together, up to --max-batch at a time; Ctrl-C or SIGTERM stops accepting, lets running requests finish within \
--grace seconds, and exits 0."
)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: open).
    #[arg(long, env = "HICI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait for the engine; more get 429 (Retry-After).
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Sequences decoded together at most (continuous batching; 1: one at a time).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// KV-cache memory (MiB) queued and running requests may reserve together; a request that
    /// does not fit now gets 429, one that never fits 400 (default on the CPU: half the memory
    /// available at start; on a GPU: no limit).
    #[arg(long, value_name = "MIB")]
    pub kv_budget_mib: Option<f64>,
    /// Context limit for prompt + generated tokens (default and maximum: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// The model id clients send as `model` (default: the model file or directory name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Largest request body in bytes (more gets 413).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Seconds in-flight requests may run after Ctrl-C / SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
}

/// The id a model is served as: the file stem of `--model`, the adapter or base directory
/// name, or `hici-embedded-tiny`.
fn default_model_id(m: &ModelArgs) -> String {
    let name = |p: &std::path::Path, stem: bool| {
        let n = if stem { p.file_stem() } else { p.file_name() };
        n.map(|s| s.to_string_lossy().into_owned())
    };
    m.model
        .as_deref()
        .and_then(|p| name(p, true))
        .or_else(|| m.adapter.as_deref().and_then(|p| name(p, false)))
        .or_else(|| m.base.as_deref().and_then(|p| name(p, false)))
        .unwrap_or_else(|| "hici-embedded-tiny".into())
}

pub fn run(m: &ModelArgs, a: &ServeArgs) -> Result<()> {
    if a.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if let Some(b) = a.kv_budget_mib {
        if !(b.is_finite() && b > 0.0) {
            bail!("--kv-budget-mib must be a positive number of MiB, got {b}");
        }
    }
    if a.ctx == Some(0) {
        bail!("--ctx must be at least 1");
    }
    if !(a.grace.is_finite() && a.grace >= 0.0) {
        bail!("--grace must be a number of seconds >= 0, got {}", a.grace);
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key (or HICI_API_KEY) is empty");
    }
    let mut spec = m.spec();
    spec.progress = false;
    crate::backend::check_available(spec.device)?;
    let addr = SocketAddr::new(a.host, a.port);
    if a.api_key.is_none() && !a.host.is_loopback() {
        tracing::warn!(
            "serving on {addr} without an API key: anyone who can reach it can use it (set \
             --api-key or HICI_API_KEY)"
        );
        eprintln!(
            "warning: no --api-key and {} is not a loopback address",
            a.host
        );
    }
    let mut cfg = ServerConfig::new(a.model_id.clone().unwrap_or_else(|| default_model_id(m)));
    cfg.addr = addr;
    cfg.api_key = a.api_key.clone();
    cfg.max_queue = a.max_queue;
    cfg.max_batch = a.max_batch;
    cfg.kv_budget_bytes = match a.kv_budget_mib {
        Some(mib) => Some((mib * 1048576.0) as u64),
        None if m.device == crate::backend::DeviceChoice::Ndarray => mem_available().map(|b| b / 2),
        None => None,
    };
    cfg.ctx = a.ctx;
    cfg.max_body_bytes = a.max_body;
    cfg.grace = Duration::from_secs_f64(a.grace);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        serve(cfg, spec, shutdown_signal(), |addr| {
            eprintln!("hici serve: listening on http://{addr}/v1 (loading the model)");
        })
        .await
    })?;
    eprintln!("hici serve: stopped");
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resolves on the first Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("hici serve: shutting down");
}
