//! The continuous-batching scheduler on the embedded model: sequences admitted together (one
//! prefilled in chunks while the others decode) produce exactly what each produces alone, and
//! a cancelled one leaves the batch and frees its cache.

use hici_engine::{load_engine, BatchJob, CancelToken, LoadSpec, ModeChoice, Scheduler, Sink};
use hici_runtime::sampler::SamplingConfig;
use std::sync::{Arc, Mutex};

type Results = Arc<Mutex<Vec<(usize, Result<Vec<u32>, String>)>>>;

struct Collect {
    index: usize,
    out: Results,
    /// Report "nobody listens" after this many pieces (a client that goes away).
    hang_up_after: Option<usize>,
    pieces: usize,
}

impl Sink for Collect {
    fn text(&mut self, _piece: &str) -> bool {
        self.pieces += 1;
        self.hang_up_after.is_none_or(|n| self.pieces < n)
    }
    fn done(&mut self, result: Result<hici_engine::GenerateOutput, String>) {
        let r = result.map(|o| o.generated_ids);
        self.out.lock().unwrap().push((self.index, r));
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    let mut p = vec![1];
    p.extend((1..n as u32).map(|i| (i * 37 + salt) % 500 + 3));
    p
}

fn run(mode: ModeChoice) {
    run_with(mode, SamplingConfig::default());
}

fn run_with(mode: ModeChoice, sampling: SamplingConfig) {
    let spec = LoadSpec {
        mode: Some(mode),
        progress: false,
        ..LoadSpec::default()
    };
    let mut engine = load_engine(&spec).expect("embedded model");
    let prompts = [prompt(5, 1), prompt(70, 2), prompt(23, 3), prompt(130, 4)];
    let opts = |n: usize| {
        let mut o = engine.options(n, sampling.clone());
        o.stop_ids.clear();
        o
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            engine
                .generate(p, &opts(12), &mut |_| {}, &CancelToken::new())
                .unwrap()
                .generated_ids
        })
        .collect();
    let jobs_opts: Vec<_> = (0..prompts.len()).map(|_| opts(12)).collect();
    let out: Results = Arc::default();
    {
        let mut sched = Scheduler::new(engine.as_mut(), None, 8).with_prefill_chunk(32);
        for (i, p) in prompts.iter().enumerate() {
            sched.admit(BatchJob {
                prompt: p.clone(),
                opts: jobs_opts[i].clone(),
                cancel: CancelToken::new(),
                sink: Box::new(Collect {
                    index: i,
                    out: out.clone(),
                    hang_up_after: None,
                    pieces: 0,
                }),
            });
            // the next ones arrive while the first decode
            sched.step();
        }
        while !sched.is_empty() {
            sched.step();
        }
    }
    let mut got = out.lock().unwrap().clone();
    got.sort_by_key(|(i, _)| *i);
    assert_eq!(got.len(), prompts.len());
    for (i, r) in got {
        assert_eq!(
            r.as_ref().unwrap(),
            &alone[i],
            "{mode:?}, {sampling:?}: sequence {i}"
        );
    }
    assert_eq!(engine.cached(), 0, "caches left behind");
}

#[test]
fn batched_sequences_equal_their_answers_alone_full_with_chunked_prefill() {
    run(ModeChoice::Full);
}

#[test]
fn batched_sequences_equal_their_answers_alone_hici_mode_i() {
    run(ModeChoice::Hici);
}

/// Sampled sequences too: each stream's sampler (its seed, penalties and history) picks in
/// the batch what it picks alone, whether it runs on the device (temperature, top-k,
/// penalties) or on the host (top-p without top-k).
#[test]
fn batched_sampled_sequences_equal_their_answers_alone() {
    let base = SamplingConfig {
        greedy: false,
        temperature: 0.9,
        seed: 42,
        ..SamplingConfig::default()
    };
    for sampling in [
        base.clone(),
        SamplingConfig {
            top_k: 8,
            top_p: 0.9,
            repeat_penalty: 1.2,
            frequency_penalty: 0.3,
            ..base.clone()
        },
        SamplingConfig {
            top_p: 0.9,
            ..base.clone()
        },
        SamplingConfig {
            greedy: true,
            presence_penalty: 0.5,
            ..base
        },
    ] {
        run_with(ModeChoice::Full, sampling);
    }
}

#[test]
fn a_cancelled_sequence_leaves_and_frees_its_cache() {
    let spec = LoadSpec {
        mode: Some(ModeChoice::Full),
        progress: false,
        ..LoadSpec::default()
    };
    let mut engine = load_engine(&spec).expect("embedded model");
    let mut o = engine.options(40, SamplingConfig::default());
    o.stop_ids.clear();
    let out: Results = Arc::default();
    let cancel = CancelToken::new();
    {
        let mut sched = Scheduler::new(engine.as_mut(), None, 4);
        sched.admit(BatchJob {
            prompt: prompt(10, 5),
            opts: o.clone(),
            cancel: cancel.clone(),
            sink: Box::new(Collect {
                index: 0,
                out: out.clone(),
                hang_up_after: None,
                pieces: 0,
            }),
        });
        sched.admit(BatchJob {
            prompt: prompt(10, 6),
            opts: o.clone(),
            cancel: CancelToken::new(),
            sink: Box::new(Collect {
                index: 1,
                out: out.clone(),
                hang_up_after: None,
                pieces: 0,
            }),
        });
        sched.step();
        cancel.cancel();
        sched.step();
        assert_eq!(
            sched.len(),
            1,
            "the cancelled sequence is still in the batch"
        );
        while !sched.is_empty() {
            sched.step();
        }
    }
    let got = out.lock().unwrap().clone();
    let first = got.iter().find(|(i, _)| *i == 0).unwrap();
    assert!(first.1.as_ref().unwrap().len() < 40);
    let second = got.iter().find(|(i, _)| *i == 1).unwrap();
    assert_eq!(second.1.as_ref().unwrap().len(), 40);
    assert_eq!(engine.cached(), 0);
}
