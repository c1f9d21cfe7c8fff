//! A 16K-token prefill on CPU with a memory bound: attention must never allocate `n x n`.
//!
//! The model is small (hidden 64, 4 heads, 2 layers) so the weights are negligible; a naive
//! attention would need one `[heads, 16384, 16396]` f32 score tensor per layer = 4.3 GB. The
//! tiled attention's largest score tensor is `[heads, 256, 2048]` = 8 MiB (query blocks of 256
//! rows, online softmax over key chunks of 2048). Peak RSS of this test process (it is its own
//! test binary, one test) must stay under 256 MiB: measured 172 MiB on a 2-core x86-64 machine;
//! query blocks alone (scores `[heads, 256, 16396]`) measured 329 MiB.

use ::hici::model::synthetic::SyntheticWeights;
use ::hici::model::{
    to_vec_f32, AttentionMode, DecodeCache, HiciConfig, HiciLlama, LlamaConfig, Logits, LoraMode,
    ModelConfig,
};
use burn::prelude::*;

type B = burn::backend::NdArray<f32>;

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn prefill_16k_tokens_without_n_squared_memory() {
    let llama = LlamaConfig::from_json(
        r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":256,"max_position_embeddings":4096}"#,
    )
    .unwrap();
    let cfg = ModelConfig {
        llama,
        hici: Some(HiciConfig {
            local_slots: 8,
            global_slots: 4,
            lc_heads: 4,
            gi_heads: 4,
            bottleneck_dim: 32,
            compress_dim: 32,
            shared_compress_dim: 16,
        }),
        rope_factor: 4.0,
    };
    let dev = Default::default();
    let mut src = SyntheticWeights::new(&cfg, 7);
    let model = HiciLlama::<B>::from_weights(&cfg, None, LoraMode::Merged, &mut src, &dev).unwrap();
    let n = 16384usize;
    let ids: Vec<i64> = (0..n).map(|i| ((i * 7919) % 256) as i64).collect();
    let t = || Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &dev);

    let before = peak_rss_bytes();
    let (logits, cache) = model
        .prefill(
            t(),
            AttentionMode::Inference,
            DecodeCache::Slots,
            Logits::Last,
        )
        .unwrap();
    assert_eq!(cache.len(), n + 12);
    assert!(to_vec_f32(logits).iter().all(|x| x.is_finite()));
    let full = to_vec_f32(model.forward(t(), AttentionMode::Full).unwrap());
    assert_eq!(full.len(), n * 256);
    assert!(full.iter().all(|x| x.is_finite()));
    let seg = model
        .forward(t(), AttentionMode::Segmented { segments: 4 })
        .unwrap();
    assert_eq!(seg.dims(), [1, n, 256]);

    if let (Some(b), Some(peak)) = (before, peak_rss_bytes()) {
        eprintln!(
            "[memory] 16K prefill (modes I, F, T): peak RSS {:.1} MiB (before {:.1} MiB)",
            peak as f64 / 1048576.0,
            b as f64 / 1048576.0
        );
        assert!(
            peak < 256 << 20,
            "peak RSS {peak} bytes >= 256 MiB: an n x n (or block x n) score tensor?"
        );
    }
}
