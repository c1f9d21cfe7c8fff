//! Continuous batching: many generations decoded together, one forward pass per step.
//!
//! New requests are admitted (prefilled) between decode steps; a long full-attention prompt is
//! prefilled in chunks, one chunk per step, so the streams already decoding are not stalled for
//! its whole prefill (a HiCI Mode I prompt is one segment by definition and is prefilled at
//! once). Every step feeds each active sequence's last token through [`Engine::decode_batch`]
//! at once; a sequence that finishes or is cancelled leaves the batch and frees its cache
//! immediately. Each sequence samples with its own sampler from its own logits, so it produces
//! what it would alone.

use crate::engine::{Engine, StepItem};
use hici_model::AttentionMode;
use hici_runtime::cancel::CancelToken;
use hici_runtime::generate::{GenerateOptions, GenerateOutput, Sequence};
use hici_runtime::tokenizer::HiciTokenizer;
use std::collections::VecDeque;

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

/// A sequence whose prompt is still being prefilled chunk by chunk.
struct Prefilling<'t> {
    id: u64,
    seq: Sequence<'t>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    done: usize,
    cancel: CancelToken,
    sink: Box<dyn Sink>,
}

/// Prompt tokens prefilled per step by default.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Runs up to `max_batch` generations together on one engine.
pub struct Scheduler<'e, 't> {
    engine: &'e mut dyn Engine,
    tokenizer: Option<&'t HiciTokenizer>,
    active: Vec<Active<'t>>,
    prefilling: VecDeque<Prefilling<'t>>,
    max_batch: usize,
    prefill_chunk: usize,
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
            prefilling: VecDeque::new(),
            max_batch: max_batch.max(1),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            next_id: 1,
        }
    }

    /// Prompt tokens of a full-attention prompt prefilled per step (at least 1).
    pub fn with_prefill_chunk(mut self, chunk: usize) -> Self {
        self.prefill_chunk = chunk.max(1);
        self
    }

    /// Sequences admitted and not finished (decoding or still prefilling).
    pub fn len(&self) -> usize {
        self.active.len() + self.prefilling.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether another sequence may join.
    pub fn has_room(&self) -> bool {
        self.len() < self.max_batch
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
        let chunked = job.opts.mode == AttentionMode::Full && job.prompt.len() > self.prefill_chunk;
        if chunked {
            let first = &job.prompt[..self.prefill_chunk];
            let rest = job.prompt.len() - first.len();
            // the chunk's logits are not used: nothing is read back
            if let Err(e) =
                self.engine
                    .prefill(id, first, &job.opts, seq.reserve_hint() + rest, None)
            {
                self.engine.release(id);
                return job.sink.done(Err(e.to_string()));
            }
            self.prefilling.push_back(Prefilling {
                id,
                seq,
                done: self.prefill_chunk,
                prompt: job.prompt,
                cancel: job.cancel,
                sink: job.sink,
            });
            return;
        }
        let reserve = seq.reserve_hint();
        let next = match self
            .engine
            .prefill(id, &job.prompt, &job.opts, reserve, Some(&mut seq))
        {
            Ok(r) => r.expect("a choice for the sequence"),
            Err(e) => {
                self.engine.release(id);
                return job.sink.done(Err(e.to_string()));
            }
        };
        seq.prefilled();
        self.start(id, seq, next, job.cancel, job.sink);
    }

    /// The first token after a finished prefill: the sequence joins the batch, or ends.
    fn start(
        &mut self,
        id: u64,
        mut seq: Sequence<'t>,
        next: u32,
        cancel: CancelToken,
        mut sink: Box<dyn Sink>,
    ) {
        let step = seq.advance_picked(next, &mut streamer(sink.as_mut(), &cancel));
        match step {
            Ok(Some(next)) => self.active.push(Active {
                id,
                seq,
                next,
                cancel,
                sink,
            }),
            Ok(None) => {
                self.engine.release(id);
                finish(seq, sink.as_mut(), &cancel);
            }
            Err(e) => {
                self.engine.release(id);
                sink.done(Err(e.to_string()));
            }
        }
    }

    /// Prefills the next chunk of the oldest chunked prompt; when it is complete the sequence
    /// samples its first token and joins the batch.
    fn prefill_step(&mut self) {
        let Some(mut p) = self.prefilling.pop_front() else {
            return;
        };
        if p.cancel.is_cancelled() {
            p.seq.interrupt();
            self.engine.release(p.id);
            return finish(p.seq, p.sink.as_mut(), &p.cancel);
        }
        let end = (p.done + self.prefill_chunk).min(p.prompt.len());
        // only the last chunk's logits are used
        let last = end == p.prompt.len();
        let seq = if last { Some(&mut p.seq) } else { None };
        let next = match self.engine.extend(p.id, &p.prompt[p.done..end], seq) {
            Ok(r) => r,
            Err(e) => {
                self.engine.release(p.id);
                return p.sink.done(Err(e.to_string()));
            }
        };
        p.done = end;
        let Some(next) = next else {
            self.prefilling.push_front(p);
            return;
        };
        p.seq.prefilled();
        self.start(p.id, p.seq, next, p.cancel, p.sink);
    }

    /// One step: the next chunk of a chunked prefill (if any), then one decode step for every
    /// active sequence. Cancelled sequences leave first (stop reason `interrupted`), finished
    /// ones after the step; both free their caches.
    pub fn step(&mut self) {
        self.prefill_step();
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
        let mut items: Vec<StepItem> = keep
            .iter_mut()
            .map(|a| StepItem {
                id: a.id,
                token: a.next,
                seq: &mut a.seq,
            })
            .collect();
        let rows = self.engine.decode_batch(&mut items);
        drop(items);
        let rows = match rows {
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
                .advance_picked(row, &mut streamer(a.sink.as_mut(), &a.cancel));
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

    /// Cancels and finishes every admitted sequence.
    pub fn cancel_all(&mut self) {
        for a in &self.active {
            a.cancel.cancel();
        }
        for p in &self.prefilling {
            p.cancel.cancel();
        }
        while !self.is_empty() {
            self.step();
        }
    }
}

fn finish(seq: Sequence<'_>, sink: &mut dyn Sink, cancel: &CancelToken) {
    let out = seq.finish(&mut streamer(sink, cancel));
    sink.done(out.map_err(|e| e.to_string()));
}
