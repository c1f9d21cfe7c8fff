//! Routes, request validation and OpenAI response shapes.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::stop::StopFilter;
use crate::worker::{Event, Job, Ready, Worker};
use crate::ServerConfig;
use async_openai::types::chat::Choice;
use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestDeveloperMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessageContent,
    ChatCompletionRequestUserMessageContentPart, ChatCompletionResponseMessage,
    ChatCompletionStreamOptions, ChatCompletionStreamResponseDelta, CompletionFinishReason,
    CompletionUsage, CreateChatCompletionRequest, CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse, FinishReason, Prompt, Role, StopConfiguration,
};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use async_openai::types::models::{ListModelResponse, Model};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hici_engine::{CancelToken, GenerateOutput, StopReason};
use hici_runtime::sampler::SamplingConfig;
use hici_runtime::template::ChatMessage;
use hici_runtime::CancelOnDrop;
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

/// Shared by every handler.
pub struct AppState {
    cfg: ServerConfig,
    worker: Worker,
    metrics: Metrics,
    draining: AtomicBool,
    /// Cancel tokens of the requests queued or running, by request number.
    in_flight: Mutex<HashMap<u64, CancelToken>>,
    next_id: AtomicU64,
    /// Unix time the server started (`created` of the model).
    started: u32,
    kv: KvBudget,
}

/// KV-cache bytes reserved by queued and running requests, against an optional budget.
pub struct KvBudget {
    budget: Option<u64>,
    reserved: Mutex<u64>,
}

impl KvBudget {
    pub fn new(budget: Option<u64>) -> Self {
        Self {
            budget,
            reserved: Mutex::new(0),
        }
    }

    /// Reserves `need` bytes: 400 if it exceeds the whole budget, 429 if it does not fit now.
    pub fn reserve(&self, need: u64) -> Result<(), ApiError> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if need > budget {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "prompt + max_tokens need {:.1} MiB of KV cache, more than the server's \
                     whole budget of {:.1} MiB; ask for fewer tokens",
                    need as f64 / 1048576.0,
                    budget as f64 / 1048576.0
                ),
            ));
        }
        let mut r = self
            .reserved
            .lock()
            .map_err(|_| ApiError::internal("KV budget lock poisoned"))?;
        if *r + need > budget {
            return Err(ApiError::kv_budget_full(need, budget - *r));
        }
        *r += need;
        Ok(())
    }

    pub fn release(&self, need: u64) {
        if self.budget.is_some() {
            if let Ok(mut r) = self.reserved.lock() {
                *r = r.saturating_sub(need);
            }
        }
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        self.reserved.lock().map(|r| *r).unwrap_or(0)
    }
}

impl AppState {
    pub fn new(cfg: ServerConfig, worker: Worker, metrics: Metrics) -> Self {
        Self {
            worker,
            metrics,
            draining: AtomicBool::new(false),
            in_flight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: unix_now(),
            kv: KvBudget::new(cfg.kv_budget_bytes),
            cfg,
        }
    }

    /// Refuse new requests from now on (503).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Cancels every queued or running request; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let Ok(m) = self.in_flight.lock() else {
            return 0;
        };
        m.values().for_each(CancelToken::cancel);
        m.len()
    }
}

/// A registered request: its cancel token leaves the in-flight table, and is cancelled, when
/// this is dropped (the response finished, or the client went away).
struct Registration {
    state: Arc<AppState>,
    id: u64,
    token: CancelToken,
    /// KV-cache bytes reserved for it.
    kv_bytes: u64,
}

impl Registration {
    fn new(state: &Arc<AppState>) -> Self {
        let id = state.next_id.fetch_add(1, Ordering::SeqCst);
        let token = CancelToken::new();
        if let Ok(mut m) = state.in_flight.lock() {
            m.insert(id, token.clone());
        }
        Self {
            state: state.clone(),
            id,
            token,
            kv_bytes: 0,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.state.in_flight.lock() {
            m.remove(&self.id);
        }
        self.state.kv.release(self.kv_bytes);
        drop(CancelOnDrop(self.token.clone()));
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/models", get(list_models))
        .route("/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        // one span per request (`HICI_LOG=tower_http=debug` shows them)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        p
        @ ("/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
            p.to_string()
        }
        p if p.starts_with("/v1/models/") => "/v1/models/{id}".to_string(),
        _ => "other".to_string(),
    };
    let r = next.run(req).await;
    state.metrics.request(&endpoint, r.status().as_u16());
    r
}

async fn authorize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.cfg.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "shutting down"})),
        )
            .into_response();
    }
    match state.worker.ready() {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "loading"})),
        )
            .into_response(),
        Some(r) => Json(serde_json::json!({
            "status": "ok",
            "model": state.cfg.model_id,
            "context": r.ctx,
            "queued": state.worker.queued(),
            "in_flight": state.in_flight(),
            "kv_reserved_bytes": state.kv.reserved(),
            "kv_budget_bytes": state.cfg.kv_budget_bytes,
        }))
        .into_response(),
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn model_object(state: &AppState) -> Model {
    Model {
        id: state.cfg.model_id.clone(),
        object: "model".into(),
        created: state.started,
        owned_by: "hici".into(),
        shutdown_date: None,
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<ListModelResponse> {
    Json(ListModelResponse {
        object: "list".into(),
        data: vec![model_object(&state)],
    })
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Model>, ApiError> {
    if id != state.cfg.model_id {
        return Err(ApiError::model_not_found(&id, &state.cfg.model_id));
    }
    Ok(Json(model_object(&state)))
}

/// The extensions accepted next to OpenAI's fields.
#[derive(Debug, Default, Deserialize)]
struct Extensions {
    top_k: Option<usize>,
    repeat_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    req: CreateChatCompletionRequest,
    #[serde(flatten)]
    ext: Extensions,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    req: CreateCompletionRequest,
    #[serde(flatten)]
    ext: Extensions,
}

/// The generation fields both endpoints share, as sent.
struct Params {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<StopConfiguration>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u8>,
    stream: bool,
    stream_options: Option<ChatCompletionStreamOptions>,
    ext: Extensions,
}

/// A validated request, ready for the engine.
struct Prepared {
    prompt: Vec<u32>,
    max_new_tokens: usize,
    sampling: SamplingConfig,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("reading the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn check_range(param: &'static str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

/// Checks the shared fields and the context budget for `prompt`.
fn prepare(
    state: &AppState,
    ready: &Ready,
    p: Params,
    prompt: Vec<u32>,
) -> Result<Prepared, ApiError> {
    if p.model != state.cfg.model_id {
        return Err(ApiError::model_not_found(&p.model, &state.cfg.model_id));
    }
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only `n: 1` is supported, got {n}"),
            ));
        }
    }
    check_range("temperature", p.temperature, 0.0, 2.0)?;
    check_range("presence_penalty", p.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?;
    if let Some(t) = p.top_p {
        if !(t.is_finite() && t > 0.0 && t <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {t}"),
            ));
        }
    }
    if let Some(r) = p.ext.repeat_penalty {
        if !(r.is_finite() && r > 0.0) {
            return Err(ApiError::invalid(
                "repeat_penalty",
                format!("`repeat_penalty` must be > 0, got {r}"),
            ));
        }
    }
    let stop = match p.stop {
        None => Vec::new(),
        Some(StopConfiguration::String(s)) => vec![s],
        Some(StopConfiguration::StringArray(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            format!("at most 4 stop sequences, got {}", stop.len()),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(&bad) = prompt
        .iter()
        .find(|&&t| t as usize >= ready.info.vocab_size)
    {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {bad} is out of range (vocabulary {})",
                ready.info.vocab_size
            ),
        ));
    }
    let ctx = ready.ctx;
    let max_new_tokens = match p.max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ))
        }
        Some(m) => {
            if prompt.len() + m as usize > ctx {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "the prompt has {} tokens and max_tokens is {m}: {} tokens, more than \
                         the context of {ctx} tokens",
                        prompt.len(),
                        prompt.len() + m as usize
                    ),
                ));
            }
            m as usize
        }
        None => {
            if prompt.len() >= ctx {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "the prompt has {} tokens, which leaves no room to generate in the \
                         context of {ctx} tokens",
                        prompt.len()
                    ),
                ));
            }
            ctx - prompt.len()
        }
    };
    let sampling = SamplingConfig {
        temperature: p.temperature.unwrap_or(1.0),
        greedy: p.temperature == Some(0.0),
        top_k: p.ext.top_k.unwrap_or(0),
        top_p: p.top_p.unwrap_or(1.0),
        repeat_penalty: p.ext.repeat_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        seed: p.seed.map_or(0, |s| s as u64),
    };
    Ok(Prepared {
        prompt,
        max_new_tokens,
        sampling,
        stop,
        stream: p.stream,
        include_usage: p
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn ready_or_503(state: &AppState) -> Result<&Ready, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    state
        .worker
        .ready()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))
}

fn text_of_parts<'a>(parts: impl Iterator<Item = Option<&'a str>>) -> Result<String, ApiError> {
    let mut out = String::new();
    for p in parts {
        match p {
            Some(t) => out.push_str(t),
            None => {
                return Err(ApiError::invalid(
                    "messages",
                    "only text content is supported (no images, audio or files)",
                ))
            }
        }
    }
    Ok(out)
}

/// OpenAI messages as (role, text) for the chat template.
fn chat_messages(msgs: &[ChatCompletionRequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    msgs.iter()
        .map(|m| {
            Ok(match m {
                ChatCompletionRequestMessage::System(s) => ChatMessage::new(
                    "system",
                    &match &s.content {
                        ChatCompletionRequestSystemMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestSystemMessageContent::Array(a) => text_of_parts(
                            a.iter().map(|p| {
                                let async_openai::types::chat::ChatCompletionRequestSystemMessageContentPart::Text(t) = p;
                                Some(t.text.as_str())
                            }),
                        )?,
                    },
                ),
                ChatCompletionRequestMessage::Developer(s) => ChatMessage::new(
                    "system",
                    &match &s.content {
                        ChatCompletionRequestDeveloperMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestDeveloperMessageContent::Array(a) => text_of_parts(
                            a.iter().map(|p| {
                                let async_openai::types::chat::ChatCompletionRequestDeveloperMessageContentPart::Text(t) = p;
                                Some(t.text.as_str())
                            }),
                        )?,
                    },
                ),
                ChatCompletionRequestMessage::User(u) => ChatMessage::new(
                    "user",
                    &match &u.content {
                        ChatCompletionRequestUserMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestUserMessageContent::Array(a) => {
                            text_of_parts(a.iter().map(|p| match p {
                                ChatCompletionRequestUserMessageContentPart::Text(t) => {
                                    Some(t.text.as_str())
                                }
                                _ => None,
                            }))?
                        }
                    },
                ),
                ChatCompletionRequestMessage::Assistant(a) => ChatMessage::new(
                    "assistant",
                    &match &a.content {
                        None => String::new(),
                        Some(ChatCompletionRequestAssistantMessageContent::Text(t)) => t.clone(),
                        Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => {
                            text_of_parts(parts.iter().map(|p| match p {
                                ChatCompletionRequestAssistantMessageContentPart::Text(t) => {
                                    Some(t.text.as_str())
                                }
                                _ => None,
                            }))?
                        }
                    },
                ),
                ChatCompletionRequestMessage::Tool(t) => ChatMessage::new(
                    "tool",
                    &match &t.content {
                        ChatCompletionRequestToolMessageContent::Text(s) => s.clone(),
                        ChatCompletionRequestToolMessageContent::Array(a) => text_of_parts(
                            a.iter().map(|p| {
                                let async_openai::types::chat::ChatCompletionRequestToolMessageContentPart::Text(t) = p;
                                Some(t.text.as_str())
                            }),
                        )?,
                    },
                ),
                ChatCompletionRequestMessage::Function(_) => {
                    return Err(ApiError::invalid(
                        "messages",
                        "function messages are not supported",
                    ))
                }
            })
        })
        .collect()
}

#[allow(deprecated)] // `max_tokens` and `seed` are deprecated in OpenAI's schema, still sent
async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let ChatBody { req, ext } = parse_body(body, state.cfg.max_body_bytes)?;
    let ready = ready_or_503(&state)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    let messages = chat_messages(&req.messages)?;
    let (tok, chat) = (ready.tokenizer.clone(), ready.chat.clone());
    let prompt = tokio::task::spawn_blocking(move || chat.messages_ids(&tok, &messages))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let params = Params {
        model: req.model,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        stream: req.stream.unwrap_or(false),
        stream_options: req.stream_options,
        ext,
    };
    let prep = prepare(&state, ready, params, prompt)?;
    run(state, prep, Kind::Chat, arrived).await
}

#[allow(deprecated)]
async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let CompletionBody { req, ext } = parse_body(body, state.cfg.max_body_bytes)?;
    let ready = ready_or_503(&state)?;
    if req.logprobs.is_some() {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let prompt = match req.prompt {
        Prompt::String(s) => {
            let tok = ready.tokenizer.clone();
            tokio::task::spawn_blocking(move || tok.encode_prompt(&s))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        Prompt::IntegerArray(ids) => ids,
        Prompt::StringArray(v) if v.len() == 1 => {
            let tok = ready.tokenizer.clone();
            let s = v.into_iter().next().unwrap_or_default();
            tokio::task::spawn_blocking(move || tok.encode_prompt(&s))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        Prompt::ArrayOfIntegerArray(v) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "only one prompt per request is supported",
            ))
        }
    };
    let params = Params {
        model: req.model,
        max_tokens: req.max_tokens.or(Some(16)),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        stream: req.stream.unwrap_or(false),
        stream_options: req.stream_options,
        ext,
    };
    let prep = prepare(&state, ready, params, prompt)?;
    run(state, prep, Kind::Completion, arrived).await
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

fn finish_reason(stop: StopReason) -> FinishReason {
    match stop {
        StopReason::MaxTokens | StopReason::Context => FinishReason::Length,
        StopReason::Eos | StopReason::StopString | StopReason::Interrupted => FinishReason::Stop,
    }
}

fn completion_finish_reason(stop: StopReason) -> CompletionFinishReason {
    match finish_reason(stop) {
        FinishReason::Length => CompletionFinishReason::Length,
        _ => CompletionFinishReason::Stop,
    }
}

fn usage(out: &GenerateOutput) -> CompletionUsage {
    CompletionUsage {
        prompt_tokens: out.prompt_tokens as u32,
        completion_tokens: out.generated_tokens as u32,
        total_tokens: (out.prompt_tokens + out.generated_tokens) as u32,
        prompt_tokens_details: None,
        completion_tokens_details: None,
    }
}

/// Queues the job and answers: one JSON document, or a server-sent event stream.
async fn run(
    state: Arc<AppState>,
    prep: Prepared,
    kind: Kind,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let need = state.worker.ready().map_or(0, |r| {
        r.info.kv_bytes(prep.prompt.len(), prep.max_new_tokens)
    });
    state.kv.reserve(need)?;
    let mut reg = Registration::new(&state);
    reg.kv_bytes = need;
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.worker.submit(Job {
        prompt: prep.prompt,
        max_new_tokens: prep.max_new_tokens,
        sampling: prep.sampling,
        stop: prep.stop.clone(),
        cancel: reg.token.clone(),
        events: tx,
        arrived,
    })?;
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}-{}", state.started, reg.id),
        Kind::Completion => format!("cmpl-{}-{}", state.started, reg.id),
    };
    let model = state.cfg.model_id.clone();
    let created = unix_now();
    if !prep.stream {
        // `reg` lives in this future: a client that disconnects drops it, which cancels
        loop {
            match rx.recv().await {
                Some(Event::Text(_)) => {}
                Some(Event::Done(out)) => {
                    let text = StopFilter::truncate(&out.text, &prep.stop);
                    drop(reg);
                    return Ok(match kind {
                        Kind::Chat => {
                            #[allow(deprecated)]
                            let message = ChatCompletionResponseMessage {
                                content: Some(text),
                                role: Role::Assistant,
                                ..Default::default()
                            };
                            #[allow(deprecated)]
                            let resp = CreateChatCompletionResponse {
                                id,
                                object: "chat.completion".into(),
                                created,
                                model,
                                choices: vec![ChatChoice {
                                    index: 0,
                                    message,
                                    finish_reason: Some(finish_reason(out.stop_reason)),
                                    logprobs: None,
                                }],
                                usage: Some(usage(&out)),
                                ..Default::default()
                            };
                            Json(resp).into_response()
                        }
                        Kind::Completion => Json(CreateCompletionResponse {
                            id,
                            object: "text_completion".into(),
                            created,
                            model,
                            choices: vec![Choice {
                                text,
                                index: 0,
                                logprobs: None,
                                finish_reason: Some(completion_finish_reason(out.stop_reason)),
                            }],
                            usage: Some(usage(&out)),
                            system_fingerprint: None,
                        })
                        .into_response(),
                    });
                }
                Some(Event::Failed(msg)) => return Err(ApiError::internal(msg)),
                None => return Err(ApiError::unavailable("the request was cancelled")),
            }
        }
    }
    let chunks = Chunks {
        id,
        model,
        created,
        kind,
    };
    let stops = prep.stop;
    let include_usage = prep.include_usage;
    let (sse_tx, sse_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let mut filter = StopFilter::new(&stops);
        if let Kind::Chat = kind {
            if sse_tx.send(chunks.role()).await.is_err() {
                return;
            }
        }
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => {
                    let t = filter.push(&t);
                    if !t.is_empty() && sse_tx.send(chunks.text(t)).await.is_err() {
                        return;
                    }
                }
                Event::Done(out) => {
                    let rest = filter.finish();
                    if !rest.is_empty() && sse_tx.send(chunks.text(rest)).await.is_err() {
                        return;
                    }
                    let _ = sse_tx.send(chunks.finish(out.stop_reason)).await;
                    if include_usage {
                        let _ = sse_tx.send(chunks.usage(&out)).await;
                    }
                    let _ = sse_tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Event::Failed(msg) => {
                    let _ = sse_tx
                        .send(SseEvent::default().data(ApiError::internal(msg).body().to_string()))
                        .await;
                    return;
                }
            }
        }
    });
    // the stream owns `reg`: when the client disconnects, hyper drops the body and with it
    // the registration, which cancels the generation
    let stream = futures_util::stream::unfold((sse_rx, reg), |(mut rx, reg)| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, Infallible>(ev), (rx, reg)))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(state.cfg.keep_alive))
        .into_response())
}

/// Builds the stream's chunks.
struct Chunks {
    id: String,
    model: String,
    created: u32,
    kind: Kind,
}

impl Chunks {
    #[allow(deprecated)]
    fn chat(
        &self,
        delta: ChatCompletionStreamResponseDelta,
        finish: Option<FinishReason>,
    ) -> SseEvent {
        let c = CreateChatCompletionStreamResponse {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoiceStream {
                index: 0,
                delta,
                finish_reason: finish,
                logprobs: None,
            }],
            ..Default::default()
        };
        json_event(&c)
    }

    fn completion(&self, text: String, finish: Option<CompletionFinishReason>) -> SseEvent {
        json_event(&CreateCompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![Choice {
                text,
                index: 0,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
            system_fingerprint: None,
        })
    }

    #[allow(deprecated)]
    fn role(&self) -> SseEvent {
        self.chat(
            ChatCompletionStreamResponseDelta {
                role: Some(Role::Assistant),
                content: Some(String::new()),
                ..Default::default()
            },
            None,
        )
    }

    #[allow(deprecated)]
    fn text(&self, t: String) -> SseEvent {
        match self.kind {
            Kind::Chat => self.chat(
                ChatCompletionStreamResponseDelta {
                    content: Some(t),
                    ..Default::default()
                },
                None,
            ),
            Kind::Completion => self.completion(t, None),
        }
    }

    fn finish(&self, stop: StopReason) -> SseEvent {
        match self.kind {
            Kind::Chat => self.chat(Default::default(), Some(finish_reason(stop))),
            Kind::Completion => {
                self.completion(String::new(), Some(completion_finish_reason(stop)))
            }
        }
    }

    #[allow(deprecated)]
    fn usage(&self, out: &GenerateOutput) -> SseEvent {
        match self.kind {
            Kind::Chat => json_event(&CreateChatCompletionStreamResponse {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage(out)),
                ..Default::default()
            }),
            Kind::Completion => json_event(&CreateCompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage(out)),
                system_fingerprint: None,
            }),
        }
    }
}

fn json_event<T: serde::Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_else(|e| {
        ApiError::internal(format!("serializing a chunk: {e}"))
            .body()
            .to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_budget_refuses_what_does_not_fit() {
        let b = KvBudget::new(Some(100));
        assert!(b.reserve(60).is_ok());
        let e = b.reserve(50).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, Some("kv_cache_full")));
        assert_eq!(b.reserve(101).unwrap_err().status.as_u16(), 400);
        b.release(60);
        assert!(b.reserve(100).is_ok());
        assert_eq!(b.reserved(), 100);
        let open = KvBudget::new(None);
        assert!(open.reserve(u64::MAX).is_ok());
    }
}
