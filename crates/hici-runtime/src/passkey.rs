//! Passkey retrieval (spec §5.4, the reference's `passkey_retrieval.py`): prompt construction
//! with the reference's exact random draws, test points, scoring and per-point summaries.
//!
//! The reference draws the key and the split of the filler text with NumPy's legacy global
//! `RandomState` (`numpy.random.seed(j)` then two `randint` calls). [`LegacyRandomState`]
//! re-implements that generator bit for bit (MT19937 seeded by `init_genrand`, and NumPy's masked
//! rejection sampling for bounded integers), so no Python tables are needed at run time; the
//! tests check it against values produced by real NumPy (`testdata/make_passkey_table.py`).
//!
//! The generation loop itself lives in [`crate::generate`]; this module only builds the cases
//! and scores the generated ids.

use crate::error::RuntimeError;
use serde::Serialize;

/// One unit of the filler text (the landmark-attention benchmark sentence block).
pub const GARBAGE_UNIT: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// First line of every prompt.
pub const TASK_DESCRIPTION: &str = "There is an important info hidden inside a lot of irrelevant \
     text. Find it and memorize them. I will quiz you about the important information there.";

/// Last line of every prompt; the model continues it with the key.
pub const FINAL_QUESTION: &str = "What is the pass key? The pass key is";

/// Keys are drawn with `randint(1, 50000)`: `1..=49999`.
pub const PASS_KEY_LOW: i64 = 1;
/// Exclusive upper bound of the key draw.
pub const PASS_KEY_HIGH: i64 = 50000;

/// Number of trials per test point in the reference (`--num_tests` default).
pub const DEFAULT_NUM_TESTS: usize = 10;

/// Length of the MT19937 state in 32-bit words.
const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// NumPy's legacy `numpy.random.RandomState` (MT19937), restricted to what the passkey
/// protocol needs: integer seeding and `randint` with the default `int64` dtype.
///
/// Bit-exact with NumPy for every `(low, high)` in the `i64` range: the same seeding
/// (`mt19937_seed` = Matsumoto–Nishimura `init_genrand`), the same 32-bit/64-bit draws and the
/// same masked rejection loop (`random_bounded_uint64_fill` with `use_masked = true`).
#[derive(Clone)]
pub struct LegacyRandomState {
    key: [u32; MT_N],
    pos: usize,
}

impl std::fmt::Debug for LegacyRandomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyRandomState")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl LegacyRandomState {
    /// `numpy.random.seed(seed)` / `RandomState(seed)` for an integer seed (NumPy accepts
    /// `0..=2^32-1`, i.e. exactly the `u32` range).
    pub fn new(seed: u32) -> Self {
        let mut key = [0u32; MT_N];
        let mut s = seed;
        for (pos, k) in key.iter_mut().enumerate() {
            *k = s;
            s = 1_812_433_253u32
                .wrapping_mul(s ^ (s >> 30))
                .wrapping_add(pos as u32 + 1);
        }
        Self { key, pos: MT_N }
    }

    /// Regenerates the 624-word block (`mt19937_gen`).
    fn generate(&mut self) {
        let mag = |y: u32| if y & 1 == 1 { MATRIX_A } else { 0 };
        for i in 0..MT_N {
            let y = (self.key[i] & UPPER_MASK) | (self.key[(i + 1) % MT_N] & LOWER_MASK);
            self.key[i] = self.key[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag(y);
        }
        self.pos = 0;
    }

    /// Next raw 32-bit output (`genrand_int32`, tempered).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos >= MT_N {
            self.generate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Next 64-bit output as NumPy's legacy generator forms it: first draw in the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    /// `randint(low, high)` with the default `int64` dtype: a value in `low..high`
    /// (high exclusive). Errors when `low >= high`, as NumPy does.
    pub fn randint(&mut self, low: i64, high: i64) -> Result<i64, RuntimeError> {
        if low >= high {
            return Err(RuntimeError::Input(format!(
                "randint: low ({low}) must be smaller than high ({high})"
            )));
        }
        // NumPy works on the closed interval [low, high - 1] with unsigned arithmetic.
        let rng = (high - 1).wrapping_sub(low) as u64;
        let off = low as u64;
        let draw = if rng == 0 {
            0
        } else if rng <= 0xffff_ffff {
            if rng == 0xffff_ffff {
                u64::from(self.next_u32())
            } else {
                let mask = gen_mask(rng);
                loop {
                    let v = u64::from(self.next_u32()) & mask;
                    if v <= rng {
                        break v;
                    }
                }
            }
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let mask = gen_mask(rng);
            loop {
                let v = self.next_u64() & mask;
                if v <= rng {
                    break v;
                }
            }
        };
        Ok(off.wrapping_add(draw) as i64)
    }
}

/// Smallest all-ones bit mask `>= max` (NumPy's `gen_mask`).
fn gen_mask(max: u64) -> u64 {
    let mut m = max;
    m |= m >> 1;
    m |= m >> 2;
    m |= m >> 4;
    m |= m >> 8;
    m |= m >> 16;
    m |= m >> 32;
    m
}

/// Filler characters for a target prompt length in tokens:
/// `int(((3.75 * target) // 1024) * 1024)`, computed exactly in integers
/// (`3.75 * target = 15 * target / 4`).
pub fn n_garbage(target_tokens: usize) -> usize {
    (target_tokens.saturating_mul(15) / 4096).saturating_mul(1024)
}

/// Test points `interval, 2*interval, ..., floor(max_tokens / interval) * interval` (the
/// reference's `k = 1..=max_tokens // interval`). Empty when `interval` is 0 or larger than
/// `max_tokens`.
pub fn test_points(max_tokens: usize, interval: usize) -> Vec<usize> {
    if interval == 0 {
        return Vec::new();
    }
    (1..=max_tokens / interval).map(|k| k * interval).collect()
}

/// The leading `n` characters of `GARBAGE_UNIT` repeated forever with single spaces
/// (the reference's `" ".join([garbage] * 5000)[:n]`; the text is ASCII, so characters are
/// bytes).
pub fn garbage_prefix(n: usize) -> String {
    let period = GARBAGE_UNIT.len() + 1;
    let mut s = String::with_capacity(n + period);
    while s.len() < n {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(GARBAGE_UNIT);
    }
    s.truncate(n);
    s
}

/// One passkey prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PasskeyCase {
    /// Test point (rough prompt length in tokens).
    pub target_tokens: usize,
    /// Trial index `j`, also the NumPy seed.
    pub trial: usize,
    /// Filler characters around the key line (prefix + suffix).
    pub n_garbage: usize,
    /// Filler characters before the key line; `n_garbage - prefix_chars` follow it.
    pub prefix_chars: usize,
    /// The key, `1..=49999`.
    pub pass_key: u32,
    /// The full prompt text (tokenize it with BOS).
    pub prompt: String,
    /// The expected answer: the key in decimal (tokenize it without BOS).
    pub answer: String,
}

/// Builds trial `trial` of test point `target_tokens` exactly as the reference does:
/// `numpy.random.seed(trial)`, `prefix_chars = randint(0, n_garbage)`,
/// `pass_key = randint(1, 50000)`, and the five newline-joined lines
/// `[task, filler[..prefix], key line, filler[..suffix], question]`.
///
/// Errors (instead of NumPy's `ValueError`) when the target is below 274 tokens, where
/// `n_garbage` is 0, or when the trial does not fit NumPy's `u32` seed range.
///
/// Unlike the reference, which builds a fixed 5000-unit filler (449 999 characters) and asserts
/// it is long enough, the filler here grows as needed, so targets above ~119 900 tokens work;
/// for smaller targets the text is identical.
pub fn build_case(target_tokens: usize, trial: usize) -> Result<PasskeyCase, RuntimeError> {
    let n_garbage = n_garbage(target_tokens);
    if n_garbage == 0 {
        return Err(RuntimeError::Input(format!(
            "passkey target {target_tokens} tokens is too small: it gives no filler text \
             (need at least 274 tokens)"
        )));
    }
    let seed = u32::try_from(trial).map_err(|_| {
        RuntimeError::Input(format!(
            "passkey trial {trial} is out of NumPy's seed range 0..=4294967295"
        ))
    })?;
    let high = i64::try_from(n_garbage).map_err(|_| {
        RuntimeError::Input(format!(
            "passkey target {target_tokens} tokens is too large"
        ))
    })?;
    let mut rng = LegacyRandomState::new(seed);
    // Both draws are within their bounds, so the casts below are lossless.
    let prefix_chars = rng.randint(0, high)? as usize;
    let pass_key = rng.randint(PASS_KEY_LOW, PASS_KEY_HIGH)? as u32;
    let suffix_chars = n_garbage - prefix_chars;

    let filler = garbage_prefix(prefix_chars.max(suffix_chars));
    let info = format!("The pass key is {pass_key}. Remember it. {pass_key} is the pass key.");
    let prompt = [
        TASK_DESCRIPTION,
        &filler[..prefix_chars],
        &info,
        &filler[..suffix_chars],
        FINAL_QUESTION,
    ]
    .join("\n");
    Ok(PasskeyCase {
        target_tokens,
        trial,
        n_garbage,
        prefix_chars,
        pass_key,
        prompt,
        answer: pass_key.to_string(),
    })
}

/// Whether a generation retrieved the key: `generated` (the new tokens only, as many as the
/// answer has) must equal `answer_ids` (the key tokenized without BOS) element by element.
/// A shorter or longer generation, or an empty answer, is not correct.
pub fn score(answer_ids: &[u32], generated: &[u32]) -> bool {
    !answer_ids.is_empty() && answer_ids == generated
}

/// Summary of one test point, as the reference prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PasskeyResult {
    /// Test point (rough prompt length in tokens).
    pub target_tokens: usize,
    /// Mean tokenized prompt length (with BOS), integer division as the reference
    /// (`total_tokens // num_tests`); 0 when there were no trials.
    pub mean_prompt_tokens: usize,
    /// `correct / trials` (0 when there were no trials).
    pub accuracy: f64,
    /// Number of trials run.
    pub trials: usize,
    /// Number of trials whose key was retrieved.
    pub correct: usize,
}

impl PasskeyResult {
    /// Summarizes one test point from the prompt lengths (tokens incl. BOS) of its trials and
    /// the number of correct trials.
    pub fn from_trials(target_tokens: usize, prompt_tokens: &[usize], correct: usize) -> Self {
        let trials = prompt_tokens.len();
        let total: usize = prompt_tokens.iter().sum();
        let mean_prompt_tokens = total.checked_div(trials).unwrap_or(0);
        let accuracy = if trials == 0 {
            0.0
        } else {
            correct as f64 / trials as f64
        };
        Self {
            target_tokens,
            mean_prompt_tokens,
            accuracy,
            trials,
            correct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // First outputs of init_genrand(5489) from the MT19937 reference implementation.
        let mut r = LegacyRandomState::new(5489);
        assert_eq!(r.next_u32(), 3_499_211_612);
        assert_eq!(r.next_u32(), 581_869_302);
    }

    #[test]
    fn garbage_is_periodic() {
        let g = garbage_prefix(3 * (GARBAGE_UNIT.len() + 1));
        assert!(g.starts_with(GARBAGE_UNIT));
        assert_eq!(&g[GARBAGE_UNIT.len()..GARBAGE_UNIT.len() + 2], " T");
        assert_eq!(garbage_prefix(0), "");
        assert_eq!(garbage_prefix(3), "The");
    }
}
