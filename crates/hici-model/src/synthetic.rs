//! Random-weight models for benchmarks and long-context tests (no download, no file I/O).
//!
//! [`SyntheticWeights`] is a [`WeightSource`] that generates each tensor under its Hugging Face /
//! PEFT name when the model builder asks for it, so host memory holds one tensor at a time.

use crate::config::ModelConfig;
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
    /// Every tensor [`crate::HiciLlama::from_weights`] takes for `cfg` (no LoRA; plain weights).
    pub fn new(cfg: &ModelConfig, seed: u64) -> Self {
        let l = &cfg.llama;
        let (h, i, v) = (l.hidden_size, l.intermediate_size, l.vocab_size);
        let hd = l.head_dim();
        let (nh, nkv) = (l.num_attention_heads, l.kv_heads());
        let mut specs = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, init: Init| {
            specs.insert(name, (shape, init));
        };
        // Linear [out, in], std 1/sqrt(in) keeps activations near unit variance.
        let lin = |out: usize, inp: usize| (vec![out, inp], Init::Std(1.0 / (inp as f32).sqrt()));
        put(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            Init::Std(1.0),
        );
        for li in 0..l.num_hidden_layers {
            let p = format!("model.layers.{li}");
            put(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
            );
            for (n, (o, inp)) in [
                ("q_proj", (nh * hd, h)),
                ("k_proj", (nkv * hd, h)),
                ("v_proj", (nkv * hd, h)),
                ("o_proj", (h, nh * hd)),
            ] {
                let (s, init) = lin(o, inp);
                put(format!("{p}.self_attn.{n}.weight"), s, init);
            }
            for (n, (o, inp)) in [
                ("gate_proj", (i, h)),
                ("up_proj", (i, h)),
                ("down_proj", (h, i)),
            ] {
                let (s, init) = lin(o, inp);
                put(format!("{p}.mlp.{n}.weight"), s, init);
            }
            if let Some(hc) = &cfg.hici {
                let lc = format!("{p}.self_attn.local_constructor");
                let bd = hc.bottleneck_dim;
                put(
                    format!("{lc}.memory_slots"),
                    vec![hc.local_slots, h],
                    Init::Std(1.0),
                );
                for (n, (o, inp)) in [
                    ("q_proj", (bd, h)),
                    ("k_proj", (bd, h)),
                    ("v_proj", (bd, h)),
                    ("o_proj", (h, bd)),
                ] {
                    let (s, init) = lin(o, inp);
                    put(format!("{lc}.{n}.weight"), s, init);
                }
                let gi = format!("{p}.self_attn.global_integrator");
                let (sd, cd) = (hc.shared_compress_dim, hc.compress_dim);
                let (s, init) = lin(sd, h);
                put(format!("{gi}.shared_compressor.0.weight"), s, init);
                put(
                    format!("{gi}.shared_compressor.1.weight"),
                    vec![sd],
                    Init::Ones,
                );
                put(
                    format!("{gi}.shared_compressor.1.bias"),
                    vec![sd],
                    Init::Zeros,
                );
                if hc.has_stat_expand() {
                    let (s, init) = lin(cd, sd);
                    put(format!("{gi}.stat_expand.0.weight"), s, init);
                    put(format!("{gi}.stat_expand.1.weight"), vec![cd], Init::Ones);
                    put(format!("{gi}.stat_expand.1.bias"), vec![cd], Init::Zeros);
                }
                put(
                    format!("{gi}.global_queries"),
                    vec![hc.global_slots, cd],
                    Init::Std(1.0),
                );
                for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                    let (s, init) = lin(cd, cd);
                    put(format!("{gi}.{n}.weight"), s, init);
                }
                let (s, init) = lin(h, cd);
                put(format!("{gi}.expand.weight"), s, init);
                // 0-dim in PyTorch; softplus(0) = 0.69 gate
                put(format!("{gi}.expand_scale_param"), vec![], Init::Zeros);
            }
        }
        put("model.norm.weight".into(), vec![h], Init::Ones);
        if !l.tie_word_embeddings {
            let (s, init) = lin(v, h);
            put("lm_head.weight".into(), s, init);
        }
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
