//! The choice of the next token: penalties, then greedy argmax, or a draw among the kept
//! tokens (temperature, top-k, top-p).
//!
//! The draw is Gumbel-max: the argmax over the kept tokens of `l_i / T + g_i`, with `g_i`
//! standard Gumbel noise, picks token `i` with probability `softmax(l / T)` restricted to the
//! kept tokens. Unlike an inverse-CDF draw it needs no sorted order and no prefix sums, so the
//! same rule runs in two places with the same arithmetic:
//! - on the host, from a logits row ([`Sampler::sample`]);
//! - on the device, from the logits tensor, reading back only the chosen id
//!   ([`Sampler::sample_on_device`]; what decoding uses on every backend).
//!
//! Both take the noise from the sampler's seeded stream, so one seed picks the same ids on every
//! device, up to float rounding where two candidates' scores (or a top-p boundary) are within
//! a few ulps of each other.
//!
//! The rules, in order:
//! 1. presence and frequency penalties (OpenAI): `l_i - (presence + frequency · count_i)` for
//!    each token generated so far (the prompt does not count);
//! 2. the repeat penalty (CTRL, as llama.cpp and transformers apply it): once per distinct
//!    token of the prompt and the generation, `l_i · (1/p)` if `l_i > 0`, else `l_i · p`;
//! 3. greedy: the argmax (first index on ties);
//! 4. top-k: the tokens whose logit is at least the k-th largest (ties with it kept, as
//!    transformers' `TopKLogitsWarper` does);
//! 5. top-p: of the top-k tokens (all tokens without top-k), sorted by logit, the shortest
//!    prefix whose probability (normalised over those tokens) reaches `p`, again with ties of
//!    the last one kept;
//! 6. the Gumbel-max draw among the kept tokens at temperature `T`.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};

/// Bisection steps of the device form's cuts (top-k, top-p): from the logits' range (a few
/// tens of units for real, finite logits) to below 1e-8, less than the gap between two distinct
/// f32 logits of magnitude above ~0.1, so the cut lands on the same logit the host's sort finds.
const BISECTION_STEPS: usize = 32;

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// `0` or `greedy` means argmax.
    pub temperature: f32,
    pub greedy: bool,
    /// Keep the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p` (1.0 = off).
    pub top_p: f32,
    /// CTRL-style penalty on tokens already seen, prompt included (1.0 = off).
    pub repeat_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token already
    /// generated (0 = off; the prompt does not count).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was
    /// generated (0 = off).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            greedy: true,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// Stateful sampler (owns the seeded stream the draws' noise comes from).
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

/// The penalties of one step, as lists over distinct tokens.
struct Penalties {
    /// `(token, added to its logit)`: presence and frequency.
    adds: Vec<(u32, f32)>,
    /// Distinct tokens of the history, for the repeat penalty (empty when it is off).
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    fn is_greedy(&self) -> bool {
        self.cfg.greedy || self.cfg.temperature <= 0.0
    }

    /// Whether the next id is the plain argmax of the logits (greedy, no penalty).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy()
            && self.cfg.repeat_penalty == 1.0
            && self.cfg.presence_penalty == 0.0
            && self.cfg.frequency_penalty == 0.0
    }

    /// The top-k in effect for a vocabulary of `vocab` tokens (`None`: off, or keeping all).
    fn top_k(&self, vocab: usize) -> Option<usize> {
        (self.cfg.top_k > 0 && self.cfg.top_k < vocab).then_some(self.cfg.top_k)
    }

    fn uses_top_p(&self) -> bool {
        self.cfg.top_p < 1.0
    }

    fn penalties(&self, history: &[u32], generated: usize) -> Penalties {
        let c = &self.cfg;
        let mut adds = Vec::new();
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            let mut counts = BTreeMap::<u32, u32>::new();
            for &id in &history[history.len().saturating_sub(generated)..] {
                *counts.entry(id).or_default() += 1;
            }
            adds = counts
                .into_iter()
                .map(|(id, n)| (id, -(c.presence_penalty + c.frequency_penalty * n as f32)))
                .collect();
        }
        let seen = if c.repeat_penalty != 1.0 {
            let s: BTreeSet<u32> = history.iter().copied().collect();
            s.into_iter().collect()
        } else {
            Vec::new()
        };
        Penalties { adds, seen }
    }

    /// One step's Gumbel noise `[V]`, from the next value of the seeded stream.
    fn noise(&mut self, vocab: usize) -> Vec<f32> {
        gumbel_noise(self.rng.next_u64(), vocab)
    }

    /// Picks the next id from one logits row `[V]`; `history` (prompt and generated ids) gets
    /// the repeat penalty, its last `generated` ids the presence and frequency penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], generated: usize) -> u32 {
        let mut l = logits.to_vec();
        let pen = self.penalties(history, generated);
        for &(id, add) in &pen.adds {
            if let Some(x) = l.get_mut(id as usize) {
                *x += add;
            }
        }
        let p = self.cfg.repeat_penalty;
        let inv_p = 1.0 / p;
        for &id in &pen.seen {
            if let Some(x) = l.get_mut(id as usize) {
                *x = if *x > 0.0 { *x * inv_p } else { *x * p };
            }
        }
        if self.is_greedy() {
            return argmax(&l);
        }
        let cut = self.cut(&l);
        let g = self.noise(l.len());
        let inv_t = 1.0 / self.cfg.temperature;
        let mut best = (f32::NEG_INFINITY, 0u32);
        let mut first = true;
        for (i, (&x, &gi)) in l.iter().zip(&g).enumerate() {
            if cut.is_some_and(|c| x < c) {
                continue;
            }
            let score = x * inv_t + gi;
            if first || score > best.0 {
                best = (score, i as u32);
                first = false;
            }
        }
        best.1
    }

    /// The smallest logit kept by top-k / top-p (`None`: all kept).
    fn cut(&self, l: &[f32]) -> Option<f32> {
        let k = self.top_k(l.len());
        if k.is_none() && !self.uses_top_p() {
            return None;
        }
        let desc = |a: &f32, b: &f32| b.total_cmp(a);
        let mut vals = l.to_vec();
        if let Some(k) = k {
            let (_, kth, _) = vals.select_nth_unstable_by(k - 1, desc);
            let kth = *kth;
            if !self.uses_top_p() {
                return Some(kth);
            }
            // the top-k tokens, ties with the k-th included
            vals = l.iter().copied().filter(|&x| x >= kth).collect();
        }
        if self.cfg.top_p <= 0.0 {
            return vals.iter().copied().max_by(f32::total_cmp);
        }
        vals.sort_unstable_by(desc);
        // the first position where the running probability (over `vals`) reaches top_p
        let inv_t = 1.0 / self.cfg.temperature;
        let e: Vec<f64> = vals
            .iter()
            .map(|&x| (((x - vals[0]) * inv_t) as f64).exp())
            .collect();
        let target = self.cfg.top_p as f64 * e.iter().sum::<f64>();
        let mut acc = 0f64;
        let at = e
            .iter()
            .take_while(|&&x| {
                acc += x;
                acc < target
            })
            .count();
        Some(vals[at.min(vals.len() - 1)])
    }

    /// [`Self::sample`] on the device: `logits` `[V]` never leaves it; the result is the chosen
    /// id as a `[1]` int tensor (read it back, or gather several streams' ids into one read).
    /// The host uploads only the penalties' token lists and, when drawing, the step's noise.
    /// The top-k cut comes from a bisection on the count of tokens at or above a threshold, the
    /// top-p cut from a bisection on the probability mass at or above it: no sort, no read-back.
    pub fn sample_on_device<B: Backend>(
        &mut self,
        logits: Tensor<B, 1>,
        history: &[u32],
        generated: usize,
    ) -> Tensor<B, 1, Int> {
        let device = logits.device();
        let [v] = logits.dims();
        let ints = |ids: Vec<i64>| {
            let n = ids.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device)
        };
        let in_range = |id: &u32| (*id as usize) < v;
        let mut l = logits;
        let pen = self.penalties(history, generated);
        let adds: Vec<_> = pen.adds.iter().filter(|(id, _)| in_range(id)).collect();
        if !adds.is_empty() {
            let n = adds.len();
            let idx = ints(adds.iter().map(|(id, _)| *id as i64).collect());
            let vals = Tensor::<B, 1>::from_data(
                TensorData::new(adds.iter().map(|(_, a)| *a).collect::<Vec<f32>>(), [n]),
                &device,
            );
            l = l.select_assign(0, idx, vals, IndexingUpdateOp::Add);
        }
        let seen: Vec<i64> = pen
            .seen
            .iter()
            .filter(|id| in_range(id))
            .map(|&id| id as i64)
            .collect();
        if !seen.is_empty() {
            let n = seen.len();
            let p = self.cfg.repeat_penalty;
            let ones = Tensor::<B, 1>::ones([n], &device);
            let mask = Tensor::<B, 1>::zeros([v], &device)
                .select_assign(0, ints(seen), ones, IndexingUpdateOp::Add)
                .greater_elem(0.5);
            let positive = l.clone().greater_elem(0.0);
            let x = l.clone();
            l = l
                .mask_where(
                    mask.clone().bool_and(positive.clone()),
                    x.clone().mul_scalar(1.0 / p),
                )
                .mask_where(mask.bool_and(positive.bool_not()), x.mul_scalar(p));
        }
        if self.is_greedy() {
            return l.argmax(0);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        // the smallest kept logit, [1]
        // the smallest kept logit, [1]: for top-k the largest logit with at least k tokens at
        // or above it. (Not burn's `topk`: in 0.21 on wgpu/lavapipe it returned 40 values of a
        // 49152-token row that were not its 40 largest.)
        let mut cut: Option<Tensor<B, 1>> = self.top_k(v).map(|k| {
            let ones = Tensor::<B, 1>::ones([v], &device);
            let k = Tensor::<B, 1>::from_data(TensorData::new(vec![k as f32], [1]), &device);
            bisect(&l, &ones, k, None)
        });
        if self.uses_top_p() {
            cut = Some(if self.cfg.top_p <= 0.0 {
                l.clone().max()
            } else {
                let top = l.clone().max().expand([v]);
                let e = l.clone().sub(top).mul_scalar(inv_t).exp(); // [V], at most 1
                                                                    // probabilities over the top-k tokens (all without top-k)
                let e = match &cut {
                    Some(c) => e.mask_fill(l.clone().lower(c.clone().expand([v])), 0.0),
                    None => e,
                };
                let target = e.clone().sum().mul_scalar(self.cfg.top_p); // [1]
                bisect(&l, &e, target, cut)
            });
        }
        let mut score = l.clone().mul_scalar(inv_t);
        if let Some(c) = cut {
            score = score.mask_fill(l.lower(c.expand([v])), f32::NEG_INFINITY);
        }
        let g = self.noise(v);
        let g = Tensor::<B, 1>::from_data(TensorData::new(g, [v]), &device);
        score.add(g).argmax(0)
    }
}

/// The largest logit `c` of `l` (`[V]`) whose weight at or above it, `Σ w_i over l_i >= c`,
/// reaches `target` (`[1]`; `w >= 0`), by bisection on the device; `low`, when given, is a
/// logit known to qualify. Invariant: `lo` qualifies, `hi` does not; after
/// [`BISECTION_STEPS`] halvings no logit lies between them but `c`, and the smallest logit at
/// or above `lo`, `c` itself, is returned as a `[1]` tensor.
fn bisect<B: Backend>(
    l: &Tensor<B, 1>,
    w: &Tensor<B, 1>,
    target: Tensor<B, 1>,
    low: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let [v] = l.dims();
    let mut lo = low.unwrap_or_else(|| l.clone().min());
    let mut hi = l.clone().max().add_scalar(1.0);
    for _ in 0..BISECTION_STEPS {
        let mid = lo.clone().add(hi.clone()).mul_scalar(0.5);
        let mass = w
            .clone()
            .mask_fill(l.clone().lower(mid.clone().expand([v])), 0.0)
            .sum();
        let ok = mass.greater_equal(target.clone());
        lo = lo.mask_where(ok.clone(), mid.clone());
        hi = hi.mask_where(ok.bool_not(), mid);
    }
    let kept = l.clone().greater_equal(lo.expand([v]));
    l.clone().mask_fill(kept.bool_not(), f32::INFINITY).min()
}

/// `vocab` standard Gumbel values `-ln(-ln u)`, `u` uniform in (0, 1), from `seed` (a
/// SplitMix64 stream: fast, and the same on every platform).
pub fn gumbel_noise(seed: u64, vocab: usize) -> Vec<f32> {
    let mut state = seed;
    (0..vocab)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits, centred in their cell: never 0 or 1
            let u = ((z >> 40) as f32 + 0.5) * (1.0 / (1u64 << 24) as f32);
            -(-u.ln()).ln()
        })
        .collect()
}

/// Index of the largest value (first one on ties, like torch.argmax).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let cfg = SamplingConfig {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..SamplingConfig::default()
        };
        // token 0 leads by 2.0; generated twice it loses 0.5 + 2 * 1.0 = 2.5 and token 1 wins
        let row = [3.0, 1.0, 0.0];
        assert_eq!(Sampler::new(cfg.clone()).sample(&row, &[0, 0], 2), 1);
        // once: loses 1.5, still ahead
        assert_eq!(Sampler::new(cfg.clone()).sample(&row, &[0, 0], 1), 0);
        // in the prompt only: no penalty
        assert_eq!(Sampler::new(cfg).sample(&row, &[0, 0, 0], 0), 0);
        assert_eq!(
            Sampler::new(SamplingConfig::default()).sample(&row, &[0], 1),
            0
        );
    }

    /// The repeat penalty applies once per distinct token, however often it occurs.
    #[test]
    fn repeat_penalty_applies_once_per_token() {
        let cfg = SamplingConfig {
            repeat_penalty: 2.0,
            ..SamplingConfig::default()
        };
        // token 0: 3.0 -> 1.5 once (0.75 if it were applied per occurrence), still above 1.0
        let row = [3.0, 1.0, -1.0];
        assert_eq!(Sampler::new(cfg.clone()).sample(&row, &[0, 0, 0], 0), 0);
        // a negative logit is multiplied: token 1 at -0.4 -> -0.8 falls below token 2's -0.5
        let row = [-3.0, -0.4, -0.5];
        assert_eq!(Sampler::new(cfg).sample(&row, &[1, 1], 0), 2);
    }

    /// The top-k / top-p cut against a plain reading of the rules (sort, cut, ties kept).
    #[test]
    fn cut_follows_the_rules() {
        let l = [0.0f32, 3.0, 1.0, 3.0, 2.0, -1.0];
        let with = |top_k, top_p| {
            Sampler::new(SamplingConfig {
                greedy: false,
                top_k,
                top_p,
                ..SamplingConfig::default()
            })
            .cut(&l)
        };
        assert_eq!(with(0, 1.0), None);
        assert_eq!(with(6, 1.0), None, "k = V keeps all");
        assert_eq!(with(1, 1.0), Some(3.0), "ties with the first kept");
        assert_eq!(with(3, 1.0), Some(2.0));
        // softmax of [3, 3, 2, 1, 0, -1]: 0.389 0.389 0.143 0.053 0.019 0.007; running sums
        // 0.389 0.778 0.921 0.974 0.993 1
        assert_eq!(with(0, 0.3), Some(3.0));
        assert_eq!(with(0, 0.8), Some(2.0));
        assert_eq!(with(0, 0.99), Some(0.0));
        // over the top 3 only: 0.4223 0.4223 0.1554
        assert_eq!(with(3, 0.85), Some(2.0));
        assert_eq!(with(3, 0.8), Some(3.0));
    }

    fn configs() -> Vec<SamplingConfig> {
        let base = SamplingConfig {
            greedy: false,
            temperature: 0.8,
            seed: 7,
            ..SamplingConfig::default()
        };
        vec![
            SamplingConfig {
                greedy: true,
                repeat_penalty: 1.3,
                presence_penalty: 0.4,
                frequency_penalty: 0.2,
                ..base.clone()
            },
            base.clone(),
            SamplingConfig {
                top_k: 5,
                ..base.clone()
            },
            SamplingConfig {
                top_k: 40,
                top_p: 0.9,
                temperature: 1.3,
                ..base.clone()
            },
            SamplingConfig {
                top_k: 3,
                top_p: 0.5,
                repeat_penalty: 1.5,
                presence_penalty: 0.3,
                frequency_penalty: 0.6,
                ..base
            },
        ]
    }

    /// The device form picks what the host form picks, step after step (same seeds, same
    /// penalties), on random logits.
    #[test]
    fn device_and_host_pick_the_same_ids() {
        let device = Default::default();
        let v = 300;
        let mut rng = StdRng::seed_from_u64(11);
        for cfg in configs() {
            let mut host = Sampler::new(cfg.clone());
            let mut dev = Sampler::new(cfg.clone());
            let mut history = vec![3u32, 17, 17, 250];
            // `generated`: the ids sampled so far, the tail of `history`
            for generated in 0..40 {
                let row: Vec<f32> = (0..v)
                    .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 24) as f32 * 8.0 - 4.0)
                    .collect();
                let want = host.sample(&row, &history, generated);
                let t = Tensor::<B, 1>::from_data(TensorData::new(row, [v]), &device);
                let got = dev
                    .sample_on_device(t, &history, generated)
                    .into_data()
                    .iter::<i64>()
                    .next()
                    .unwrap();
                assert_eq!(got as u32, want, "{cfg:?}, step {generated}");
                history.push(want);
            }
        }
    }

    /// The draw follows `softmax(l / T)` over the kept tokens: frequencies over many draws
    /// within 4.5 standard errors of the probabilities, and no dropped token ever drawn.
    #[test]
    fn draws_follow_the_tempered_distribution() {
        let l = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
        let n = 40_000;
        for (top_k, top_p, t) in [
            (0, 1.0, 1.0f32),
            (0, 1.0, 0.5),
            (3, 1.0, 1.5),
            (0, 0.8, 1.0),
        ] {
            let mut s = Sampler::new(SamplingConfig {
                greedy: false,
                temperature: t,
                top_k,
                top_p,
                seed: 5,
                ..SamplingConfig::default()
            });
            let kept = match (top_k, top_p < 1.0) {
                (3, _) => 3,
                // softmax(l) = 0.561 0.206 0.125 0.076 0.028 0.004: 0.8 is reached at the third
                (_, true) => 3,
                _ => l.len(),
            };
            let e: Vec<f64> = l[..kept].iter().map(|&x| ((x / t) as f64).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut counts = vec![0usize; l.len()];
            for _ in 0..n {
                counts[s.sample(&l, &[], 0) as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let p = if i < kept { e[i] / z } else { 0.0 };
                let se = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
                let f = c as f64 / n as f64;
                assert!(
                    (f - p).abs() <= 4.5 * se,
                    "top_k {top_k} top_p {top_p} T {t}: token {i} drawn {f:.4}, p {p:.4}"
                );
            }
        }
    }
}
