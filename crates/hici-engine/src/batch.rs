//! Continuous batching: many generations decoded together, one forward pass per step.
//!
//! New requests are admitted (prefilled) between decode steps; every step feeds each active
//! sequence's last token through [`Engine::decode_batch`] at once; a sequence that finishes or
//! is cancelled leaves the batch and frees its cache immediately. Each sequence samples with
//! its own sampler from its own logits, so it produces what it would alone.

use crate::engine::Engine;
use hici_runtime::cancel::CancelToken;
use hici_runtime::generate::{GenerateOptions, GenerateOutput, Sequence};
use hici_runtime::tokenizer::HiciTokenizer;

/// Where a batched generation reports to.
pub trait Sink {
    /// A piece of streamed text; `false` means nobody listens any more (the sequence is then
    /// cancelled).
    fn text(&mut self, piece: &str) -> bool;
    /// The end: the result, or why it failed. Called exactly once.
    fn done(&mut self, result: Result<GenerateOutput, String>);
}

/// One request for the scheduler.
pub struct BatchJob {
    /// Prompt ids (BOS included).
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub cancel: CancelToken,
    pub sink: Box<dyn Sink>,
}

struct Active<'t> {
    id: u64,
    seq: Sequence<'t>,
    next: u32,
    cancel: CancelToken,
    sink: Box<dyn Sink>,
}

/// Runs up to `max_batch` generations together on one engine.
pub struct Scheduler<'e, 't> {
    engine: &'e mut dyn Engine,
    tokenizer: Option<&'t HiciTokenizer>,
    active: Vec<Active<'t>>,
    max_batch: usize,
    next_id: u64,
}

fn streamer<'a>(sink: &'a mut dyn Sink, cancel: &'a CancelToken) -> impl FnMut(&str) + 'a {
    move |piece: &str| {
        if !sink.text(piece) {
            cancel.cancel();
        }
    }
}

impl<'e, 't> Scheduler<'e, 't> {
    /// `max_batch >= 1` sequences at most decode together.
    pub fn new(
        engine: &'e mut dyn Engine,
        tokenizer: Option<&'t HiciTokenizer>,
        max_batch: usize,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            active: Vec::new(),
            max_batch: max_batch.max(1),
            next_id: 1,
        }
    }

    /// Sequences decoding now.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether another sequence may join.
    pub fn has_room(&self) -> bool {
        self.active.len() < self.max_batch
    }

    /// Prefills `job` and adds it to the batch (or finishes it at once: an error, a stop on the
    /// first token, a cancelled job).
    pub fn admit(&mut self, mut job: BatchJob) {
        if job.cancel.is_cancelled() {
            job.sink.done(Err("cancelled before it started".into()));
            return;
        }
        let mut seq = match Sequence::new(&job.prompt, &job.opts, self.tokenizer) {
            Ok(s) => s,
            Err(e) => return job.sink.done(Err(e.to_string())),
        };
        let id = self.next_id;
        self.next_id += 1;
        let row = match self
            .engine
            .prefill(id, &job.prompt, &job.opts, seq.reserve_hint())
        {
            Ok(r) => r,
            Err(e) => {
                self.engine.release(id);
                return job.sink.done(Err(e.to_string()));
            }
        };
        seq.prefilled();
        let step = seq.advance(&row, &mut streamer(job.sink.as_mut(), &job.cancel));
        match step {
            Ok(Some(next)) => self.active.push(Active {
                id,
                seq,
                next,
                cancel: job.cancel,
                sink: job.sink,
            }),
            Ok(None) => {
                self.engine.release(id);
                finish(seq, job.sink.as_mut(), &job.cancel);
            }
            Err(e) => {
                self.engine.release(id);
                job.sink.done(Err(e.to_string()));
            }
        }
    }

    /// One decode step for every active sequence. Cancelled sequences leave first (stop
    /// reason `interrupted`), finished ones after the step; both free their caches.
    pub fn step(&mut self) {
        let mut keep = Vec::with_capacity(self.active.len());
        for mut a in std::mem::take(&mut self.active) {
            if a.cancel.is_cancelled() {
                a.seq.interrupt();
                self.engine.release(a.id);
                finish(a.seq, a.sink.as_mut(), &a.cancel);
            } else {
                keep.push(a);
            }
        }
        if keep.is_empty() {
            return;
        }
        let items: Vec<(u64, u32)> = keep.iter().map(|a| (a.id, a.next)).collect();
        let rows = match self.engine.decode_batch(&items) {
            Ok(r) => r,
            Err(e) => {
                for mut a in keep {
                    self.engine.release(a.id);
                    a.sink.done(Err(e.to_string()));
                }
                return;
            }
        };
        for (mut a, row) in keep.into_iter().zip(rows) {
            let step = a
                .seq
                .advance(&row, &mut streamer(a.sink.as_mut(), &a.cancel));
            match step {
                Ok(Some(next)) => {
                    a.next = next;
                    self.active.push(a);
                }
                Ok(None) => {
                    self.engine.release(a.id);
                    finish(a.seq, a.sink.as_mut(), &a.cancel);
                }
                Err(e) => {
                    self.engine.release(a.id);
                    a.sink.done(Err(e.to_string()));
                }
            }
        }
    }

    /// Cancels and finishes every active sequence.
    pub fn cancel_all(&mut self) {
        for a in &self.active {
            a.cancel.cancel();
        }
        self.step();
    }
}

fn finish(seq: Sequence<'_>, sink: &mut dyn Sink, cancel: &CancelToken) {
    let out = seq.finish(&mut streamer(sink, cancel));
    sink.done(out.map_err(|e| e.to_string()));
}
