//! Random-weight models for benchmarks and long-context tests (no download, no file I/O).
//!
//! [`SyntheticWeights`] is a [`WeightSource`] that generates each tensor under its Hugging Face /
//! PEFT name when the model builder asks for it, so host memory holds one tensor at a time.

use crate::config::ModelConfig;
use crate::layout::{model_tensors, TensorKind};
use crate::weights::{HostTensor, WeightSource};
use std::collections::BTreeMap;

/// How a synthetic tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Ones,
    Zeros,
    /// Uniform with this standard deviation (zero mean).
    Std(f32),
}

/// Random weights under the Hugging Face / PEFT names, generated when the model builder takes
/// them. Generating on demand keeps host memory at one tensor at a time (a 7B model is ~27 GB
/// of f32); the values depend only on the seed and the tensor name.
pub struct SyntheticWeights {
    specs: BTreeMap<String, (Vec<usize>, Init)>,
    seed: u64,
}

impl SyntheticWeights {
    /// Every tensor [`crate::HiciLlama::from_weights`] takes for `cfg` (no LoRA; plain
    /// weights): [`crate::layout::model_tensors`], filled by kind (linear weights with std
    /// `1/sqrt(in)`, which keeps activations near unit variance; norm gains 1, biases 0).
    pub fn new(cfg: &ModelConfig, seed: u64) -> Self {
        let specs = model_tensors(cfg, None)
            .into_iter()
            .map(|t| {
                let init = match t.kind {
                    TensorKind::Embedding | TensorKind::Slots => Init::Std(1.0),
                    TensorKind::Linear { fan_in } => Init::Std(1.0 / (fan_in as f32).sqrt()),
                    TensorKind::NormGain => Init::Ones,
                    // 0-dim in PyTorch; softplus(0) = 0.69 gate
                    TensorKind::NormBias | TensorKind::Scalar | TensorKind::Lora => Init::Zeros,
                };
                (t.name, (t.shape, init))
            })
            .collect();
        Self { specs, seed }
    }

    /// Names not taken yet.
    pub fn remaining(&self) -> Vec<&str> {
        self.specs.keys().map(String::as_str).collect()
    }
}

impl WeightSource for SyntheticWeights {
    fn take(&mut self, name: &str) -> Option<HostTensor> {
        let (shape, init) = self.specs.remove(name)?;
        let n: usize = shape.iter().product();
        let data = match init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Std(std) => random_uniform(n, std, self.seed ^ fnv1a(name)),
        };
        Some(HostTensor { shape, data })
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Xorshift64 stream (seeded through splitmix64); `next_f32` is uniform in [0, 1).
pub struct XorShift(u64);

impl XorShift {
    /// A stream for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self(splitmix64(seed).max(1))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

/// `n` values uniform in `[-a, a]`, `a = sqrt(3) std`, filled in parallel chunks of 1 Mi values
/// (each chunk has its own stream, so the result does not depend on the thread count).
fn random_uniform(n: usize, std: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let a = 3f32.sqrt() * std;
    let mut v = vec![0f32; n];
    let n_chunks = n.div_ceil(CHUNK).max(1);
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n_chunks);
    let per = n_chunks.div_ceil(threads);
    let fill = |first_chunk: usize, part: &mut [f32]| {
        for (j, c) in part.chunks_mut(CHUNK).enumerate() {
            let mut rng = XorShift::new(seed ^ ((first_chunk + j) as u64).wrapping_mul(0x9e37));
            for x in c {
                *x = (2.0 * rng.next_f32() - 1.0) * a;
            }
        }
    };
    if threads <= 1 {
        fill(0, &mut v);
    } else {
        std::thread::scope(|s| {
            for (t, part) in v.chunks_mut(per * CHUNK).enumerate() {
                let fill = &fill;
                s.spawn(move || fill(t * per, part));
            }
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HiciConfig, LlamaConfig, LoraMode};
    use crate::HiciLlama;

    type B = burn::backend::NdArray<f32>;

    /// The model builder takes exactly the tensors of [`crate::layout::model_tensors`], with
    /// and without HiCI modules, tied or not, with GQA.
    #[test]
    fn the_model_takes_exactly_the_layout_tensors() {
        for (hici, tied) in [(true, false), (false, true), (false, false)] {
            let llama = LlamaConfig::from_json(&format!(
                r#"{{"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
                    "max_position_embeddings": 64, "tie_word_embeddings": {tied}}}"#
            ))
            .unwrap();
            let cfg = ModelConfig {
                llama,
                hici: hici.then_some(HiciConfig {
                    local_slots: 2,
                    global_slots: 2,
                    lc_heads: 2,
                    gi_heads: 2,
                    bottleneck_dim: 8,
                    compress_dim: 8,
                    shared_compress_dim: 4,
                }),
                rope_factor: 1.0,
            };
            let mut src = SyntheticWeights::new(&cfg, 1);
            let n = crate::layout::model_tensors(&cfg, None).len();
            assert_eq!(src.remaining().len(), n);
            HiciLlama::<B>::from_weights(
                &cfg,
                None,
                LoraMode::Merged,
                &mut src,
                &Default::default(),
            )
            .unwrap();
            assert!(
                src.remaining().is_empty(),
                "not taken: {:?}",
                src.remaining()
            );
        }
    }
}
