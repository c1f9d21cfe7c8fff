//! The engine thread: loads the model, then runs queued jobs (admitted FIFO) in a continuous
//! batch of up to `max_batch` sequences, streaming each job's text back over its own channel.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ServerConfig;
use hici_engine::{
    load_engine, BatchJob, CancelToken, EngineInfo, GenerateOutput, LoadSpec, Scheduler, Sink,
};
use hici_runtime::sampler::SamplingConfig;
use hici_runtime::template::ChatFormat;
use hici_runtime::tokenizer::HiciTokenizer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;

/// What a job sends back, in order: text pieces, then exactly one `Done` or `Failed` (none if
/// the job was cancelled before it started).
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Box<GenerateOutput>),
    Failed(String),
}

/// One generation request for the engine.
pub struct Job {
    /// Prompt ids (BOS included).
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop sequences (generation ends once the text contains one).
    pub stop: Vec<String>,
    pub cancel: CancelToken,
    pub events: mpsc::UnboundedSender<Event>,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// The loaded model's facts the request handlers need.
pub struct Ready {
    pub tokenizer: Arc<HiciTokenizer>,
    pub chat: Arc<ChatFormat>,
    pub info: EngineInfo,
    /// The context limit requests are checked against.
    pub ctx: usize,
}

/// Handle to the engine thread.
pub struct Worker {
    tx: mpsc::Sender<Job>,
    ready: Arc<OnceLock<Ready>>,
    queued: Arc<AtomicUsize>,
    metrics: Metrics,
    max_queue: usize,
}

impl Worker {
    /// Starts the engine thread loading `spec`. The receiver gets one message if loading fails.
    pub fn start(
        spec: LoadSpec,
        cfg: ServerConfig,
        metrics: Metrics,
    ) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::channel::<Job>(cfg.max_queue);
        let (fail_tx, fail_rx) = mpsc::unbounded_channel();
        let ready = Arc::new(OnceLock::new());
        let queued = Arc::new(AtomicUsize::new(0));
        let w = Self {
            tx,
            ready: ready.clone(),
            queued: queued.clone(),
            metrics: metrics.clone(),
            max_queue: cfg.max_queue,
        };
        let spawned = std::thread::Builder::new()
            .name("hici-engine".into())
            .spawn(move || {
                // on the CPU backend the engine runs on a thread of its compute pool
                let cpu = spec.device == hici_engine::device::DeviceChoice::Ndarray;
                let run = move || engine_thread(spec, cfg, rx, ready, queued, metrics, fail_tx);
                if cpu {
                    hici_engine::device::on_compute_pool(run)
                } else {
                    run()
                }
            });
        if let Err(e) = spawned {
            // the receiver is returned below, so this message reaches `serve`
            let (tx2, rx2) = mpsc::unbounded_channel();
            let _ = tx2.send(format!("starting the engine thread: {e}"));
            return (w, rx2);
        }
        (w, fail_rx)
    }

    pub fn ready(&self) -> Option<&Ready> {
        self.ready.get()
    }

    /// Requests waiting for the engine (not counting the one running).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues a job, or refuses it: 429 when the queue is full, 503 when the engine stopped.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth(self.queued());
                Ok(())
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ApiError::queue_full(self.max_queue),
                    mpsc::error::TrySendError::Closed(_) => {
                        ApiError::unavailable("the engine has stopped")
                    }
                })
            }
        }
    }
}

fn engine_thread(
    spec: LoadSpec,
    cfg: ServerConfig,
    mut rx: mpsc::Receiver<Job>,
    ready: Arc<OnceLock<Ready>>,
    queued: Arc<AtomicUsize>,
    metrics: Metrics,
    fail: mpsc::UnboundedSender<String>,
) {
    let t0 = Instant::now();
    let engine = match load_engine(&spec) {
        Ok(e) => e,
        Err(e) => {
            let _ = fail.send(format!("loading the model: {e:#}"));
            return;
        }
    };
    let info = engine.info().clone();
    let Some(tokenizer) = engine.tokenizer() else {
        let _ = fail.send(
            "the model has no tokenizer (the server needs one: give a tokenizer.json)".into(),
        );
        return;
    };
    let ctx = match cfg.ctx {
        None => info.max_context,
        Some(c) if c == 0 || c > info.max_context => {
            let _ = fail.send(format!(
                "the context limit {c} must be between 1 and the model's context of {} tokens",
                info.max_context
            ));
            return;
        }
        Some(c) => c,
    };
    tracing::info!(
        "model loaded in {:.1} s on {} (context {ctx} tokens)",
        t0.elapsed().as_secs_f64(),
        info.device
    );
    let chat = engine.chat();
    let base = engine.options(0, SamplingConfig::default());
    let tok = tokenizer.clone();
    let _ = ready.set(Ready {
        tokenizer,
        chat,
        info,
        ctx,
    });
    let mut engine = engine;
    let mut sched = Scheduler::new(engine.as_mut(), Some(&tok), cfg.max_batch);
    let admit = |sched: &mut Scheduler<'_, '_>, job: Job| {
        let left = queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics.queue_depth(left);
        if job.cancel.is_cancelled() || job.events.is_closed() {
            return;
        }
        let mut opts = base.clone();
        opts.max_new_tokens = job.max_new_tokens;
        opts.sampling = job.sampling;
        opts.stop = job.stop;
        opts.max_context = ctx;
        let sink = JobSink {
            events: job.events,
            metrics: metrics.clone(),
            arrived: job.arrived,
            waited: job.arrived.elapsed().as_secs_f64(),
            last: None,
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sched.admit(BatchJob {
                prompt: job.prompt,
                opts,
                cancel: job.cancel,
                sink: Box::new(sink),
            })
        }));
        if run.is_err() {
            tracing::error!("the engine panicked while admitting a request; it keeps serving");
        }
    };
    loop {
        if sched.is_empty() {
            match rx.blocking_recv() {
                Some(job) => admit(&mut sched, job),
                None => return,
            }
        }
        while sched.has_room() {
            match rx.try_recv() {
                Ok(job) => admit(&mut sched, job),
                Err(_) => break,
            }
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step()));
        if run.is_err() {
            tracing::error!("the engine panicked in a decode step; it keeps serving");
        }
    }
}

/// Reports one request's progress to its HTTP handler and to the metrics.
struct JobSink {
    events: mpsc::UnboundedSender<Event>,
    metrics: Metrics,
    arrived: Instant,
    /// Seconds it waited in the queue.
    waited: f64,
    last: Option<Instant>,
}

impl Sink for JobSink {
    fn text(&mut self, piece: &str) -> bool {
        let now = Instant::now();
        match self.last {
            None => self
                .metrics
                .time_to_first_token(self.arrived.elapsed().as_secs_f64()),
            Some(t) => self.metrics.inter_token_latency((now - t).as_secs_f64()),
        }
        self.last = Some(now);
        self.events.send(Event::Text(piece.to_string())).is_ok()
    }

    fn done(&mut self, result: Result<GenerateOutput, String>) {
        match result {
            Ok(out) => {
                self.metrics.tokens(out.prompt_tokens, out.generated_tokens);
                tracing::info!(
                    "request done: {} prompt + {} generated tokens, stop {:?}, queued {:.3} s, \
                     first token after {:.3} s, decode {:.1} tok/s",
                    out.prompt_tokens,
                    out.generated_tokens,
                    out.stop_reason,
                    self.waited,
                    self.waited + out.timings.time_to_first_token_s,
                    out.timings.decode_tokens_per_s
                );
                let _ = self.events.send(Event::Done(Box::new(out)));
            }
            Err(msg) => {
                let _ = self.events.send(Event::Failed(msg));
            }
        }
    }
}
