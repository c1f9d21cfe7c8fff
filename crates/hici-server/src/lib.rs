//! An OpenAI-compatible HTTP server over the hici engine.
//!
//! `POST /v1/chat/completions` (messages rendered with the model's chat template) and
//! `POST /v1/completions`, plain and streamed (server-sent events); `GET /v1/models`;
//! `GET /health` (503 while the model loads, 200 when ready); `GET /metrics` (Prometheus text).
//! Errors use OpenAI's JSON shape. One engine thread owns the model, admits queued requests
//! first-in first-out between decode steps and decodes up to `max_batch` of them together
//! (continuous batching); a request whose client goes away is cancelled and its cache freed. [`serve`] returns when `shutdown` resolves and in-flight
//! requests have finished (or were cancelled after the grace period).

mod api;
mod error;
mod metrics;
mod stop;
mod worker;

pub use error::ApiError;
pub use stop::StopFilter;

use anyhow::{Context, Result};
use hici_engine::LoadSpec;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Server settings (no command-line words: the CLI fills this in).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (port 0 picks a free port; the bound address goes to `on_listening`).
    pub addr: SocketAddr,
    /// Bearer key every `/v1/*` request must carry; `None` leaves the API open.
    pub api_key: Option<String>,
    /// Requests waiting for the engine at most; more get 429.
    pub max_queue: usize,
    /// Sequences decoded together at most (continuous batching; 1 = one at a time).
    pub max_batch: usize,
    /// KV-cache bytes all queued and running requests may reserve together (each reserves
    /// what its prompt + `max_tokens` can fill); a request that does not fit now gets 429, one
    /// that can never fit 400. `None`: no limit.
    pub kv_budget_bytes: Option<u64>,
    /// Context limit for prompt + generation (at most the model's; `None`: the model's).
    pub ctx: Option<usize>,
    /// The model id clients name (`model` field) and `/v1/models` lists.
    pub model_id: String,
    /// Largest request body accepted (bytes); more gets 413.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after shutdown begins before they are cancelled.
    pub grace: Duration,
    /// Interval of SSE keep-alive comments while a stream waits (long prefills).
    pub keep_alive: Duration,
}

impl ServerConfig {
    /// Defaults for a model id: loopback, port 8080, open, queue 64, batch 8, the model's context,
    /// 8 MiB bodies, 30 s grace, 10 s keep-alive.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            max_queue: 64,
            max_batch: 8,
            kv_budget_bytes: None,
            ctx: None,
            model_id: model_id.into(),
            max_body_bytes: 8 << 20,
            grace: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
        }
    }
}

/// Binds `config.addr`, starts loading `spec` on the engine thread and serves until `shutdown`
/// resolves; then stops accepting, lets in-flight requests finish for `config.grace`, cancels
/// the rest and returns. `on_listening` gets the bound address once the socket is open.
///
/// Errors: the address cannot be bound, or the model fails to load (the server stops).
pub async fn serve(
    config: ServerConfig,
    spec: LoadSpec,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    if config.max_queue == 0 {
        anyhow::bail!("the queue limit must be at least 1");
    }
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let local = listener.local_addr()?;
    let metrics = metrics::Metrics::new();
    let (worker, mut load_failed) = worker::Worker::start(spec, config.clone(), metrics.clone());
    let state = Arc::new(api::AppState::new(config.clone(), worker, metrics));
    let app = api::router(state.clone());
    on_listening(local);
    tracing::info!("listening on http://{local} (model `{}`)", config.model_id);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = {
        let state = state.clone();
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            state.begin_drain();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(drain);
    let grace = config.grace;
    let watcher = {
        let state = state.clone();
        async move {
            tokio::select! {
                _ = shutdown => {
                    tracing::info!(
                        "shutting down: no new requests; waiting up to {:.0} s for {} in flight",
                        grace.as_secs_f64(),
                        state.in_flight()
                    );
                    let _ = stop_tx.send(true);
                    tokio::time::sleep(grace).await;
                    let n = state.cancel_all();
                    if n > 0 {
                        tracing::warn!("grace period over: cancelled {n} request(s)");
                    }
                    std::future::pending::<Result<()>>().await
                }
                msg = load_failed.recv() => {
                    let _ = stop_tx.send(true);
                    state.cancel_all();
                    Err(anyhow::anyhow!(msg.unwrap_or_else(|| "the engine thread stopped".into())))
                }
            }
        }
    };
    tokio::select! {
        r = server => r.context("serving HTTP")?,
        r = watcher => return r,
    }
    state.cancel_all();
    Ok(())
}
