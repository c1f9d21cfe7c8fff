//! Next-token selection: greedy, or temperature / top-k / top-p sampling with a repeat penalty,
//! deterministic for a given seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// Stateful sampler (owns the RNG).
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// Whether the next id is the plain argmax of the logits (greedy, no penalty): then it can
    /// be taken on the device, reading back one id instead of the logits row.
    pub fn is_plain_argmax(&self) -> bool {
        (self.cfg.greedy || self.cfg.temperature <= 0.0)
            && self.cfg.repeat_penalty == 1.0
            && self.cfg.presence_penalty == 0.0
            && self.cfg.frequency_penalty == 0.0
    }

    /// Picks the next id from one logits row `[V]`; `history` (prompt and generated ids) gets
    /// the repeat penalty, its last `generated` ids the presence and frequency penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], generated: usize) -> u32 {
        let mut l = logits.to_vec();
        if self.cfg.presence_penalty != 0.0 || self.cfg.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &id in &history[history.len().saturating_sub(generated)..] {
                *counts.entry(id).or_default() += 1;
            }
            for (id, c) in counts {
                if let Some(x) = l.get_mut(id as usize) {
                    *x -= self.cfg.presence_penalty + self.cfg.frequency_penalty * c as f32;
                }
            }
        }
        if self.cfg.repeat_penalty != 1.0 {
            let p = self.cfg.repeat_penalty;
            for &id in history {
                if let Some(x) = l.get_mut(id as usize) {
                    *x = if *x > 0.0 { *x / p } else { *x * p };
                }
            }
        }
        if self.cfg.greedy || self.cfg.temperature <= 0.0 {
            return argmax(&l);
        }
        let t = self.cfg.temperature;
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k.max(1));
        }
        let m = l[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - m) / t) as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return idx[i] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
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
}
