//! Prometheus metrics, recorded into a recorder owned by the server (no global recorder).

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use std::sync::Arc;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The server's metrics: requests by endpoint and status, prompt and generated tokens, queue
/// depth, time to first token and inter-token latency histograms.
#[derive(Clone)]
pub struct Metrics(Arc<PrometheusRecorder>);

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("non-empty buckets")
            .build_recorder();
        let m = Self(Arc::new(recorder));
        // present from the start, so scrapers see zeros rather than nothing
        m.queue_depth(0);
        m.with(|| {
            counter!("hici_prompt_tokens_total").absolute(0);
            counter!("hici_generated_tokens_total").absolute(0);
        });
        m
    }

    fn with(&self, f: impl FnOnce()) {
        with_local_recorder(self.0.as_ref(), f)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.0.handle().render()
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        let (e, s) = (endpoint.to_string(), status.to_string());
        self.with(|| counter!("hici_requests_total", "endpoint" => e, "status" => s).increment(1));
    }

    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.with(|| {
            counter!("hici_prompt_tokens_total").increment(prompt as u64);
            counter!("hici_generated_tokens_total").increment(generated as u64);
        });
    }

    pub fn queue_depth(&self, n: usize) {
        self.with(|| gauge!("hici_queue_depth").set(n as f64));
    }

    /// Time from the request's arrival to its first generated token.
    pub fn time_to_first_token(&self, s: f64) {
        self.with(|| histogram!("hici_time_to_first_token_seconds").record(s));
    }

    pub fn inter_token_latency(&self, s: f64) {
        self.with(|| histogram!("hici_inter_token_latency_seconds").record(s));
    }
}
