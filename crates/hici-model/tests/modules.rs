//! Unit tests of the model's pieces against hand-checkable cases.

use burn::prelude::*;
use hici_model::attention::{
    attend, attend_flash_with, attend_naive, attend_tiled, flash_plan, AttentionKernel, FlashCall,
    Tiles, FLASH_MASK_ELEMS,
};
use hici_model::hici::broadcast::{segment_count, sft_segment_len, SegmentRule};
use hici_model::hici::global::softplus_f32;
use hici_model::hici::GlobalIntegrator;
use hici_model::rope::apply_rope;
use hici_model::*;

type B = burn::backend::NdArray<f32>;

fn dev() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn t<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), &dev())
}

/// Deterministic pseudo-random values in [-1, 1).
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn sft_segment_rule_matches_spec_examples() {
    assert_eq!(sft_segment_len(16384), 16384);
    assert_eq!(sft_segment_len(8192), 8192);
    assert_eq!(sft_segment_len(3000), 1500);
    assert_eq!(sft_segment_len(4095), 1365);
    assert_eq!(sft_segment_len(4097), 241);
    assert_eq!(sft_segment_len(37), 37); // prime
    assert_eq!(sft_segment_len(19), 19); // < 20
    assert_eq!(segment_count(4097, SegmentRule::Sft).unwrap(), 17);
    assert_eq!(segment_count(256, SegmentRule::Equal(4)).unwrap(), 4);
    assert_eq!(
        segment_count(250, SegmentRule::Equal(4)).unwrap_err(),
        ModelError::SegmentsDoNotDivide {
            len: 250,
            segments: 4
        }
    );
    assert!(segment_count(0, SegmentRule::Whole).is_err());
    assert!(segment_count(8, SegmentRule::Equal(0)).is_err());
}

#[test]
fn mask_rule_is_bottom_right_with_visible_prefix() {
    // q = 0 makes every allowed key equally likely; v_j = j. Row i must average keys
    // 0 ..= i + (k_len - q_len): mean = (i + off) / 2.
    for (q_len, k_len) in [(5, 5), (5, 17), (1, 9), (600, 612)] {
        let off = k_len - q_len;
        let q = Tensor::<B, 4>::zeros([1, 1, q_len, 4], &dev());
        let k = Tensor::<B, 4>::zeros([1, 1, k_len, 4], &dev());
        let idx: Vec<f32> = (0..k_len).flat_map(|j| [j as f32; 4]).collect();
        let v = t(idx, [1, 1, k_len, 4]);
        let out = to_vec_f32(attend(q, k, v, AttentionKernel::Exact));
        for i in 0..q_len {
            let want = (i + off) as f32 / 2.0;
            assert!(
                (out[i * 4] - want).abs() < 1e-3 * want.max(1.0),
                "row {i}: {} vs {want}",
                out[i * 4]
            );
        }
    }
}

/// Random `q: [b, nh, q_len, d]`, `k`/`v`: `[b, nkv, k_len, d]` drawn from `seed..seed + 3`.
fn random_qkv(
    (b, nh, nkv, d): (usize, usize, usize, usize),
    q_len: usize,
    k_len: usize,
    seed: u64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    (
        t(rnd(b * nh * q_len * d, seed), [b, nh, q_len, d]),
        t(rnd(b * nkv * k_len * d, seed + 1), [b, nkv, k_len, d]),
        t(rnd(b * nkv * k_len * d, seed + 2), [b, nkv, k_len, d]),
    )
}

/// Max |a - b| of two outputs of the same shape.
fn max_abs_diff(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
    let (a, b) = (to_vec_f32(a), to_vec_f32(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Max |tiled - naive| for random inputs ([`random_qkv`]).
fn tiled_vs_naive(
    shape: (usize, usize, usize, usize),
    q_len: usize,
    k_len: usize,
    tiles: Tiles,
    seed: u64,
) -> f32 {
    let (q, k, v) = random_qkv(shape, q_len, k_len, seed);
    let a = attend_tiled(q.clone(), k.clone(), v.clone(), tiles);
    max_abs_diff(a, attend_naive(q, k, v))
}

#[test]
fn blocked_attention_equals_naive_attention_with_gqa() {
    for (q_len, k_len) in [(37, 49), (600, 612), (700, 700), (1, 300)] {
        let diff = tiled_vs_naive((1, 4, 2, 8), q_len, k_len, Tiles::default(), 1);
        assert!(diff < 1e-5, "q {q_len} k {k_len}: {diff}");
    }
}

/// The exact kernel's online softmax over key chunks (engaged when a query block sees more
/// than `tiles.key` keys) equals the naive attention: small tiles so that chunk and block
/// boundaries fall on and off the causal diagonal, with and without a visible prefix, GQA,
/// a single query row (decode), and chunk sizes of 1 and of the whole key range.
#[test]
fn online_softmax_over_key_chunks_equals_naive_attention() {
    for (q_len, k_len, query, key) in [
        (37, 49, 8, 5),
        (40, 40, 7, 7),
        (40, 40, 16, 3),
        (33, 45, 5, 1),
        (1, 300, 4, 64),
        (64, 76, 64, 13),
        (50, 62, 9, 62),
    ] {
        let diff = tiled_vs_naive((2, 4, 2, 8), q_len, k_len, Tiles { query, key }, 4);
        assert!(
            diff < 1e-5,
            "q {q_len} k {k_len} tiles {query}x{key}: {diff}"
        );
    }
}

/// The flash plan per layer: one call per forward for multi-head attention (the HiCI 7B:
/// 32 query and 32 KV heads) at every length, where the exact kernel makes one per 256-row
/// query block (64 at 16K); one per query group with GQA (SmolLM2: 9 over 3); one unmasked
/// call per decode step; masked chunks only for a short chunk after a long cache. Every
/// causal call is square, which is what makes `is_causal` mean the same on every kernel.
#[test]
fn flash_plan_makes_one_square_causal_call_per_query_group() {
    let m = FLASH_MASK_ELEMS;
    // Mode I prefill of 16K tokens after the 12-slot prefix [G ; L], 7B shapes
    assert_eq!(
        flash_plan(16384, 16396, 1, 32, 32, m),
        vec![FlashCall::Causal { group: 0, pad: 12 }]
    );
    // four segments of 4096 batched as b*N = 4 sequences
    assert_eq!(flash_plan(4096, 4108, 4, 32, 32, m).len(), 1);
    // Mode F (no prefix): square already
    assert_eq!(
        flash_plan(512, 512, 1, 32, 32, m),
        vec![FlashCall::Causal { group: 0, pad: 0 }]
    );
    // GQA 9 over 3: one call per query group
    assert_eq!(
        flash_plan(600, 612, 1, 9, 3, m),
        (0..3)
            .map(|group| FlashCall::Causal { group, pad: 12 })
            .collect::<Vec<_>>()
    );
    // decode: one call, no mask, whatever the cache length
    for k_len in [1, 13, 16396] {
        assert_eq!(
            flash_plan(1, k_len, 1, 32, 32, m),
            vec![FlashCall::Unmasked]
        );
    }
    // 8 new tokens after a cache of 4000: masked, one call while the mask fits
    assert_eq!(
        flash_plan(8, 4008, 1, 32, 32, m),
        vec![FlashCall::Masked { q0: 0, rows: 8 }]
    );
    // ... and query chunks covering every row once when it does not
    let plan = flash_plan(300, 16000, 1, 32, 32, m);
    assert_eq!(plan.len(), 300usize.div_ceil(m / (32 * 16000)));
    let mut next = 0;
    for c in &plan {
        let FlashCall::Masked { q0, rows } = *c else {
            panic!("{c:?}")
        };
        assert_eq!(q0, next);
        assert!(32 * rows * 16000 <= m);
        next += rows;
    }
    assert_eq!(next, 300);
}

/// Runs the flash form on ndarray (burn's exact fallback kernel underneath) and checks every
/// call it makes: no scale, no softcap; `is_causal` only on square calls without mask; masks
/// full-shape; as many calls as the plan says.
fn flash_vs_naive(
    (b, nh, nkv, d): (usize, usize, usize, usize),
    q_len: usize,
    k_len: usize,
    mask_elems: usize,
    seed: u64,
) -> (f32, usize) {
    let (q, k, v) = random_qkv((b, nh, nkv, d), q_len, k_len, seed);
    let mut calls = 0;
    let got = attend_flash_with(
        q.clone(),
        k.clone(),
        v.clone(),
        mask_elems,
        |q, k, v, mask, opts| {
            calls += 1;
            assert_eq!((opts.scale, opts.softcap), (None, None));
            let [qb, qh, qr, _] = q.dims();
            let kr = k.dims()[2];
            assert_eq!((qb, qh), (b, nkv), "one call per KV head group");
            if opts.is_causal {
                assert!(mask.is_none());
                assert_eq!(qr, kr, "causal calls are square");
            }
            if let Some(m) = &mask {
                assert_eq!(m.dims(), [qb, qh, qr, kr], "full-shape mask");
            }
            burn::tensor::module::attention(q, k, v, mask, None, opts)
        },
    );
    let plan = flash_plan(q_len, k_len, b, nh, nkv, mask_elems);
    assert_eq!(calls, plan.len(), "{plan:?}");
    let diff = max_abs_diff(got, attend_naive(q, k, v));
    (diff, calls)
}

#[test]
fn flash_form_equals_naive_attention() {
    for ((b, nh, nkv), q_len, k_len, budget, calls) in [
        ((2, 4, 4), 20, 32, FLASH_MASK_ELEMS, 1), // padded causal, MHA
        ((2, 4, 2), 20, 32, FLASH_MASK_ELEMS, 2), // padded causal, 2 query groups
        ((1, 6, 2), 37, 37, FLASH_MASK_ELEMS, 3), // square without pad
        ((1, 4, 2), 1, 50, FLASH_MASK_ELEMS, 1),  // decode
        ((2, 4, 2), 5, 40, FLASH_MASK_ELEMS, 1),  // short chunk after a long cache
        ((2, 4, 2), 9, 40, 2 * 4 * 40 * 2, 5),    // ... in masked chunks of 2 rows
    ] {
        let (diff, n) = flash_vs_naive((b, nh, nkv, 8), q_len, k_len, budget, 11);
        assert_eq!(n, calls, "q {q_len} k {k_len}");
        assert!(diff < 1e-5, "q {q_len} k {k_len}: {diff}");
    }
}

#[test]
fn rope_is_rotate_half_with_linear_interpolation() {
    let rope = Rope::new(4, 10000.0, 4.0);
    assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
    assert_eq!(rope.angle(5, 0), 1.25);
    let (cos, sin) = rope.tables::<B>(5, 1, &dev());
    let x = t(vec![1.0, 0.0, 0.0, 0.0], [1, 1, 1, 4]);
    let y = to_vec_f32(apply_rope(x, &cos.unsqueeze_dim(0), &sin.unsqueeze_dim(0)));
    // rotate_half([1,0,0,0]) = [0,0,1,0]: pairs (j, j + hd/2)
    let want = [1.25f32.cos(), 0.0, 1.25f32.sin(), 0.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?}");
    }
    // the 7B setting keeps f32 angle arithmetic: angle = f32(f32(p/s) * inv_freq)
    let r7 = Rope::new(128, 10000.0, 4.0);
    let p = 16383usize;
    assert_eq!(r7.angle(p, 1), (p as f32 / 4.0) * r7.inv_freq[1]);
}

#[test]
fn gi_statistics_order_population_std_and_normalised_mean() {
    let local = t(vec![1.0, 2.0, 3.0, 6.0], [1, 2, 2]);
    let s = to_vec_f32(GlobalIntegrator::<B>::statistics(local));
    let n = (20.0f32).sqrt();
    let want = [2.0, 4.0, 3.0, 6.0, 1.0, 2.0, 1.0, 2.0, 2.0 / n, 4.0 / n];
    for (a, b) in s.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{s:?}");
    }
    // std is clamped at 1e-6 and the norm floor keeps a zero mean finite
    let zeros = t(vec![0.0; 6], [1, 3, 2]);
    let s = to_vec_f32(GlobalIntegrator::<B>::statistics(zeros));
    assert_eq!(&s[6..8], &[1e-6, 1e-6]);
    assert!(s.iter().all(|x| x.is_finite()));
}

#[test]
fn softplus_follows_torch_threshold() {
    assert!((softplus_f32(0.75) - 1.1369).abs() < 1e-4);
    assert_eq!(softplus_f32(30.0), 30.0);
}

fn tiny_hici() -> HiciConfig {
    HiciConfig {
        local_slots: 3,
        global_slots: 2,
        lc_heads: 2,
        gi_heads: 2,
        bottleneck_dim: 8,
        compress_dim: 8,
        shared_compress_dim: 4,
    }
}

fn gi_weights(h: usize, c: &HiciConfig) -> WeightMap {
    let (sd, cd, k) = (c.shared_compress_dim, c.compress_dim, c.global_slots);
    let p = "gi";
    let mut w = WeightMap::new();
    let mut put = |name: &str, shape: Vec<usize>, seed: u64| {
        let n = shape.iter().product();
        w.insert(
            format!("{p}.{name}"),
            HostTensor::new(shape, rnd(n, seed)).unwrap(),
        );
    };
    put("shared_compressor.0.weight", vec![sd, h], 1);
    put("shared_compressor.1.weight", vec![sd], 2);
    put("shared_compressor.1.bias", vec![sd], 3);
    put("stat_expand.0.weight", vec![cd, sd], 4);
    put("stat_expand.1.weight", vec![cd], 5);
    put("stat_expand.1.bias", vec![cd], 6);
    put("global_queries", vec![k, cd], 7);
    for (i, n) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().enumerate() {
        put(&format!("{n}.weight"), vec![cd, cd], 10 + i as u64);
    }
    put("expand.weight", vec![h, cd], 20);
    put("expand_scale_param", vec![], 21);
    w
}

#[test]
fn gi_forward_causal_last_segment_equals_forward() {
    let (h, c) = (6, tiny_hici());
    let mut w = gi_weights(h, &c);
    let gi =
        GlobalIntegrator::<B>::load(&mut w, "gi", h, &c, None, LoraMode::Merged, &dev()).unwrap();
    assert!(w.is_empty());
    let (n, m) = (3, c.local_slots);
    let local = t(rnd(n * m * h, 99), [1, n, m, h]);
    let causal = to_vec_f32(gi.forward_causal(local.clone()));
    let full = to_vec_f32(gi.forward(local.clone().reshape([1, n * m, h])));
    let per = c.global_slots * h;
    let last = &causal[(n - 1) * per..];
    let d = last
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "last causal G vs forward: {d}");
    // segment 0 alone equals forward on segment 0
    let first = to_vec_f32(gi.forward(local.narrow(1, 0, 1).reshape([1, m, h])));
    let d = causal[..per]
        .iter()
        .zip(&first)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "first causal G vs forward: {d}");
}

#[test]
fn missing_and_misshaped_weights_are_named() {
    let (h, c) = (6, tiny_hici());
    let mut w = gi_weights(h, &c);
    w.remove("gi.global_queries");
    let err = GlobalIntegrator::<B>::load(&mut w, "gi", h, &c, None, LoraMode::Merged, &dev())
        .unwrap_err();
    assert_eq!(
        err,
        ModelError::MissingWeight {
            name: "gi.global_queries".into()
        }
    );
    let mut w = gi_weights(h, &c);
    w.insert(
        "gi.expand.weight".into(),
        HostTensor::new(vec![h, 3], vec![0.0; h * 3]).unwrap(),
    );
    let err = GlobalIntegrator::<B>::load(&mut w, "gi", h, &c, None, LoraMode::Merged, &dev())
        .unwrap_err();
    assert!(
        matches!(err, ModelError::ShapeMismatch { ref name, .. } if name == "gi.expand.weight"),
        "{err}"
    );
}

#[test]
fn bad_hici_config_is_a_typed_error() {
    let mut c = tiny_hici();
    c.bottleneck_dim = 10;
    c.lc_heads = 4;
    let err = c.validate().unwrap_err();
    assert!(matches!(err, ModelError::Config(_)));
    assert!(err.to_string().contains("bottleneck dim 10"), "{err}");
}

#[test]
fn rope_factor_precedence() {
    let mut cfg = LlamaConfig::from_json(
        r#"{"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":512,"max_position_embeddings":4096}"#,
    )
    .unwrap();
    assert_eq!(resolve_rope_factor(None, &cfg, Some(16384)), 4.0);
    assert_eq!(resolve_rope_factor(None, &cfg, Some(10000)), 3.0);
    assert_eq!(resolve_rope_factor(None, &cfg, None), 1.0);
    cfg.rope_scaling = Some(RopeScaling {
        kind: "linear".into(),
        factor: 2.0,
    });
    assert_eq!(resolve_rope_factor(None, &cfg, Some(16384)), 2.0);
    assert_eq!(resolve_rope_factor(Some(8.0), &cfg, Some(16384)), 8.0);
}

/// The in-place, growing KV cache holds exactly what concatenating every append would, with
/// or without a reservation, across growth steps and multi-token appends.
#[test]
fn layer_cache_appends_equal_concatenation() {
    let (b, h, d) = (1, 2, 4);
    let piece = |n: usize, seed: u64| t(rnd(b * h * n * d, seed), [b, h, n, d]);
    let sizes = [5usize, 1, 1, 70, 1, 3, 64, 1];
    for reserve in [None, Some(10), Some(200)] {
        let mut cache = LayerCache::new(piece(5, 1), piece(5, 2));
        let mut want_k = vec![piece(5, 1)];
        let mut want_v = vec![piece(5, 2)];
        if let Some(r) = reserve {
            cache.reserve(r);
            assert!(cache.capacity() >= 5 + r);
        }
        for (i, &n) in sizes.iter().enumerate().skip(1) {
            let cap_before = cache.capacity();
            let (k, v) = (piece(n, 10 + i as u64), piece(n, 100 + i as u64));
            cache.append(k.clone(), v.clone());
            want_k.push(k);
            want_v.push(v);
            let len = cache.len();
            assert_eq!(len, want_k.iter().map(|x| x.dims()[2]).sum::<usize>());
            assert!(cache.capacity() >= len);
            if len <= cap_before {
                assert_eq!(cache.capacity(), cap_before, "grew while it had room");
            }
            let wk = Tensor::cat(want_k.clone(), 2);
            let wv = Tensor::cat(want_v.clone(), 2);
            assert_eq!(cache.keys().dims(), [b, h, len, d]);
            cache.keys().into_data().assert_eq(&wk.into_data(), true);
            cache.values().into_data().assert_eq(&wv.into_data(), true);
        }
    }
}

/// A q8 layer cache (`KvStorage::Q8`) returns every appended value within half its block's
/// quantization step (`max|block| / 254` over 32 values, checked against the f32 values
/// appended), across growth and multi-token appends, at `(1 + 4 / 32) / 4` of the f32 bytes;
/// re-storing as the model's dtype keeps those values.
#[test]
fn q8_layer_cache_holds_entries_within_half_a_step() {
    let (b, h, d) = (1, 2, 64);
    let piece = |n: usize, seed: u64| t(rnd(b * h * n * d, seed), [b, h, n, d]);
    let mut cache = LayerCache::new(piece(5, 1), piece(5, 2));
    let f32_bytes = cache.nbytes();
    cache.store_as(KvStorage::Q8);
    let ratio = cache.nbytes() as f64 / f32_bytes as f64;
    assert!((ratio - (1.0 + 4.0 / 32.0) / 4.0).abs() < 1e-9, "{ratio}");
    let (mut want_k, mut want_v) = (vec![piece(5, 1)], vec![piece(5, 2)]);
    for (i, n) in [1usize, 70, 1, 3].into_iter().enumerate() {
        let (k, v) = (piece(n, 10 + i as u64), piece(n, 100 + i as u64));
        // an all-zero entry stays zero
        let k = if i == 0 { k.zeros_like() } else { k };
        cache.append(k.clone(), v.clone());
        want_k.push(k);
        want_v.push(v);
    }
    let check = |got: Tensor<B, 4>, want: Tensor<B, 4>| {
        assert_eq!(got.dtype(), want.dtype());
        let (g, w) = (to_vec_f32(got), to_vec_f32(want));
        assert_eq!(g.len(), w.len());
        for (row_g, row_w) in g.chunks(32).zip(w.chunks(32)) {
            let step = row_w.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
            for (x, y) in row_g.iter().zip(row_w) {
                assert!(
                    (x - y).abs() <= step * 0.5 * (1.0 + 1e-5),
                    "{x} vs {y} (step {step})"
                );
            }
        }
    };
    check(cache.keys(), Tensor::cat(want_k.clone(), 2));
    check(cache.values(), Tensor::cat(want_v.clone(), 2));
    let q8_keys = to_vec_f32(cache.keys());
    cache.store_as(KvStorage::Model);
    assert_eq!(to_vec_f32(cache.keys()), q8_keys);
}
