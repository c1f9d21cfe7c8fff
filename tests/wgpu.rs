//! Parity on the wgpu backend (software Vulkan, lavapipe, in CI).
//!
//! Tolerance 1e-3 abs on f32 logits: wgpu kernels accumulate in a different order than
//! ndarray (measured values are printed), and the tiny fixture's logits reach ~±10.
//! Set `HICI_SKIP_WGPU=1` to skip on a machine without any Vulkan driver.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::wgpu::WgpuDevice;
use burn::prelude::*;
use common::*;
use hici::model::{to_vec_f32, AttentionMode, DecodeCache, HiciLlama, Logits, LoraMode};

type W = burn::backend::Wgpu<f32, i32>;
const TOL: f32 = 1e-3;

/// Greedy decoding of `steps` tokens after a Mode I prefill: (ids, every step's logits).
fn greedy<B: burn::tensor::backend::Backend>(
    model: &HiciLlama<B>,
    ids: &[i64],
    steps: usize,
) -> (Vec<i64>, Vec<f32>) {
    let (logits, mut cache) = model
        .prefill_tokens(
            ids,
            AttentionMode::Inference,
            DecodeCache::Slots,
            Logits::Last,
        )
        .expect("prefill");
    let mut rows = to_vec_f32(logits);
    let v = rows.len();
    let mut out = Vec::new();
    for step in 0..steps {
        let best = hici::runtime::sampler::argmax(&rows[rows.len() - v..]) as i64;
        out.push(best);
        if step + 1 == steps {
            break;
        }
        let l = model.decode_tokens(&[best], &mut cache).expect("decode");
        rows.extend(to_vec_f32(l));
    }
    (out, rows)
}

/// The fixture's checks on `model` within `tol`: Mode I prefill of both prompts, Mode F (when
/// `full`), Mode T with 4 segments and 16 greedy steps (ids and every step's logits).
fn check_against_reference(model: &HiciLlama<W>, label: &str, full: bool, tol: f32) {
    let dev = WgpuDevice::DefaultDevice;
    let want = expected("prefill_logits.safetensors");
    for p in ["prompt1", "prompt2"] {
        let ids = input_ids(&format!("{p}_ids"));
        let got = to_vec_f32(
            model
                .forward(ids_tensor_on::<W>(&ids, &dev), AttentionMode::Inference)
                .unwrap(),
        );
        assert_close(
            &format!("{label} Mode I prefill {p}"),
            &got,
            &want[p].f32,
            tol,
        );
    }
    let ids = input_ids("long_ids");
    let mut modes = vec![(
        AttentionMode::Segmented { segments: 4 },
        "Mode T",
        "segmented_logits.safetensors",
    )];
    if full {
        modes.push((AttentionMode::Full, "Mode F", "full_logits.safetensors"));
    }
    for (mode, name, file) in modes {
        let got = to_vec_f32(model.forward(ids_tensor_on::<W>(&ids, &dev), mode).unwrap());
        assert_close(
            &format!("{label} {name} logits"),
            &got,
            &expected(file)["logits"].f32,
            tol,
        );
    }
    let want = expected("greedy_decode_unscrambled_cache_NONREFERENCE.safetensors");
    let (gen, logits) = greedy(model, &input_ids("prompt1_ids"), 16);
    assert_eq!(gen, want["prompt1_generated_ids"].i64);
    assert_close(
        &format!("{label} greedy decode prompt1, 16 steps"),
        &logits,
        &want["prompt1_step_logits"].f32,
        tol,
    );
}

#[test]
fn wgpu_parity_with_reference() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        eprintln!("HICI_SKIP_WGPU set: skipping the wgpu parity test");
        return;
    }
    let dev = WgpuDevice::DefaultDevice;
    let model = load_model_on::<W>(LoraMode::Merged, &dev);
    check_against_reference(&model, "wgpu", true, TOL);

    // runtime LoRA path on the GPU backend too
    let unmerged = load_model_on::<W>(LoraMode::Unmerged, &dev);
    let ids = input_ids("prompt2_ids");
    let got = to_vec_f32(
        unmerged
            .forward(ids_tensor_on::<W>(&ids, &dev), AttentionMode::Inference)
            .unwrap(),
    );
    assert_close(
        "wgpu Mode I prefill prompt2 (unmerged LoRA)",
        &got,
        &expected("prefill_logits.safetensors")["prompt2"].f32,
        TOL,
    );
}

/// The model with `--attention flash`'s form of attention (one square `is_causal` call per
/// layer and segment batch, Q padded by the 12-slot prefix; unmasked decode) on wgpu against
/// the reference: Mode I prefill, Mode T (4 segments batched) and 16 greedy steps, within the
/// flash tolerance of `hici parity` (1e-2; on lavapipe autotune runs burn's exact fallback
/// under these calls, so the measured error is that of the exact path). Mode F (square, no
/// pad) is left out to save lavapipe time; the plan and ndarray tests cover that case.
#[test]
fn wgpu_flash_form_parity_with_reference() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let model = load_model_on::<W>(LoraMode::Merged, &WgpuDevice::DefaultDevice)
        .with_attention_kernel(hici::model::AttentionKernel::Flash);
    check_against_reference(&model, "wgpu flash", false, 1e-2);
}

/// f16 weights and activations on wgpu (prefill), compared with the f32 reference logits. RMSNorm,
/// LayerNorm, softmax, attention (exact kernel) and the GI statistics run in f32; the
/// projections and MLP in f16. The tolerance (0.15 abs on logits of magnitude ~10, i.e. ~1%)
/// is set from the measured error of the tiny random-weight fixture, whose un-normalised
/// random weights are harsher on half precision than a trained model.
#[test]
fn wgpu_f16_close_to_f32_and_bf16_refused() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let dev = WgpuDevice::DefaultDevice;
    let model = load_model_on::<W>(LoraMode::Merged, &dev);
    assert!(
        model.with_dtype(burn::tensor::DType::BF16).is_err(),
        "wgpu has no bf16"
    );
    let model = load_model_on::<W>(LoraMode::Merged, &dev)
        .with_dtype(burn::tensor::DType::F16)
        .expect("lavapipe supports f16");
    let want = expected("prefill_logits.safetensors");
    for p in ["prompt1", "prompt2"] {
        let ids = input_ids(&format!("{p}_ids"));
        let got = to_vec_f32(
            model
                .forward(ids_tensor_on::<W>(&ids, &dev), AttentionMode::Inference)
                .unwrap(),
        );
        assert_close(
            &format!("wgpu f16 Mode I prefill {p}"),
            &got,
            &want[p].f32,
            0.15,
        );
    }
    // Decoding in f16 on the fused backend is covered through the CLI below.
}

/// `hici parity --device wgpu --dtype f16 --fusion on`: every check of the fixture, greedy
/// decoding included, on burn's fused backend within the f16 tolerances (max 0.15, RMS 0.02;
/// measured max 7.9e-2, RMS 7.7e-3), then f16 generation with the default `--fusion auto`
/// (fused too) on `--device wgpu:vulkan:0`. Fails without the vendored burn-cubecl-fusion fix (burn#5292): burn 0.21.0
/// panics in its device thread on the first fused f16 decode step (`resolve_arg` index out of
/// bounds in a fused reduce, then "Ordering is bigger than operations").
#[test]
fn cli_f16_on_wgpu_decodes_within_tolerance_with_fusion() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let v = json_of(&hici(&[
        "parity",
        "--fixture",
        fx,
        "--device",
        "wgpu",
        "--dtype",
        "f16",
        "--fusion",
        "on",
        "--json",
    ]));
    eprintln!("{v}");
    assert_eq!(v["dtype"], "F16");
    assert_eq!(v["fusion"], true);
    assert_eq!(v["failed"], 0);
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 10, "{v}");
    assert!(checks
        .iter()
        .any(|c| c["check"].as_str().unwrap().starts_with("greedy 16 steps")));

    let want = expected("greedy_decode_unscrambled_cache_NONREFERENCE.safetensors");
    let ids = ids_arg(&input_ids("prompt1_ids"));
    // the graphics API and adapter named explicitly: lavapipe is Vulkan adapter 0 here
    let out = json_of(&hici(&[
        "generate",
        "--device",
        "wgpu:vulkan:0",
        "--dtype",
        "f16",
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        "16",
        "--json",
    ]));
    assert_eq!(generated(&out), want["prompt1_generated_ids"].i64);

    assert_clean_error(
        &hici(&[
            "parity",
            "--fixture",
            fx,
            "--device",
            "wgpu",
            "--dtype",
            "bf16",
        ]),
        "bf16",
    );
}

/// Without a usable adapter (`VK_ICD_FILENAMES` pointing nowhere hides every Vulkan driver),
/// `--device wgpu` is a one-line error naming what was found, exit 1, no panic from burn's
/// device thread.
#[test]
fn wgpu_without_an_adapter_is_a_clean_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hici"))
        .args(["generate", "--device", "wgpu", "--prompt-ids", "1,2,3"])
        .args(["--max-new-tokens", "2"])
        .env("VK_ICD_FILENAMES", "/nonexistent")
        .env("VK_DRIVER_FILES", "/nonexistent")
        .output()
        .unwrap();
    assert_clean_error(&out, "no wgpu device");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("found"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `--device wgpu:API:N` out of range, or an API without adapters: one-line errors naming
/// what exists, before burn touches a device.
#[test]
fn wgpu_adapter_choice_errors_name_what_exists() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let out = hici(&[
        "generate",
        "--device",
        "wgpu:vulkan:7",
        "--prompt-ids",
        "1,2",
    ]);
    assert_clean_error(&out, "no wgpu device 7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adapter(s) of that API"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    let out = hici(&["generate", "--device", "wgpu:dx12", "--prompt-ids", "1,2"]);
    assert_clean_error(&out, "needs a Dx12 adapter");
    assert_clean_error(
        &hici(&["generate", "--device", "wgpu:vulkn", "--prompt-ids", "1,2"]),
        "vulkn",
    );
    let v = json_of(&hici(&["devices", "--json"]));
    assert!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["select"] == "--device wgpu:vulkan:0"),
        "{v}"
    );
}

/// Continuous batching on wgpu: a batched decode of sequences of different lengths matches
/// each sequence's batch-1 decode (both on wgpu) within the wgpu tolerance.
#[test]
fn wgpu_batched_decode_equals_batch_one() {
    if std::env::var("HICI_SKIP_WGPU").is_ok() {
        return;
    }
    let dev = WgpuDevice::DefaultDevice;
    let model = load_model_on::<W>(LoraMode::Merged, &dev);
    let prompts: Vec<Vec<i64>> = [4usize, 23, 50]
        .iter()
        .map(|&n| (0..n as i64).map(|i| (i * 31 + 7) % 500 + 3).collect())
        .collect();
    let (worst, same) = batched_vs_single(
        &model,
        &prompts,
        AttentionMode::Inference,
        DecodeCache::Slots,
        4,
    );
    eprintln!("wgpu batched vs batch-1: max |dlogit| {worst:.2e}");
    assert!(worst < TOL, "{worst}");
    assert!(same, "greedy ids differ");
}

/// burn's plain wgpu backend, on which a kernel strategy can be forced.
type Cube = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// The flash form of attention ([`attend_flash_with`], as `--attention flash` runs it) with
/// burn's flash kernel forced (`FlashUnit`: f16 tiles, top-left causal diagonal) instead of
/// autotune's pick (the fallback on lavapipe), against the exact naive attention. Padding the
/// queries to a square makes the flash kernel's top-left `is_causal` equal the bottom-right
/// rule; without it the same kernel misses by O(1) (measured 3.3-4.2), so this fails if the
/// padding is wrong. Cases: a segment after its 12-slot prefix (GQA: two query-group calls;
/// MHA: one), decode (one call, no mask). The masked form (a short chunk after a long cache)
/// is checked on ndarray only (`flash_form_equals_naive_attention`). Tolerance 5e-3: the
/// kernel's f16 tiles (measured ~1e-3 on unit-scale inputs).
#[test]
fn wgpu_flash_kernel_on_the_flash_form_matches_exact_attention() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    use burn::tensor::TensorPrimitive;
    use burn_cubecl::kernel::attention::{attention, AttentionStrategy};
    use hici::model::attention::{attend_flash_with, attend_naive, FLASH_MASK_ELEMS};
    let dev = WgpuDevice::DefaultDevice;
    let rnd = |n: usize, seed: u64| {
        let mut r = hici::model::synthetic::XorShift::new(seed);
        (0..n)
            .map(|_| r.next_f32() * 2.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    let d = 64;
    let flash_unit = |q: Tensor<Cube, 4>,
                      k: Tensor<Cube, 4>,
                      v: Tensor<Cube, 4>,
                      mask: Option<Tensor<Cube, 4, Bool>>,
                      opts| {
        let out = attention(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            mask.map(|m| m.into_primitive()),
            None,
            opts,
            AttentionStrategy::FlashUnit,
        )
        .expect("burn's FlashUnit kernel runs on this adapter");
        Tensor::<Cube, 4>::from_primitive(TensorPrimitive::Float(out))
    };
    // (few shapes: lavapipe compiles the flash kernel anew for each, about a minute apiece)
    for (nh, nkv, q_len, k_len) in [(4, 2, 20, 32), (2, 2, 20, 32), (4, 2, 1, 40)] {
        let t = |h: usize, len: usize, seed: u64| {
            Tensor::<Cube, 4>::from_data(
                TensorData::new(rnd(h * len * d, seed), [1, h, len, d]),
                &dev,
            )
        };
        let (q, k, v) = (t(nh, q_len, 1), t(nkv, k_len, 2), t(nkv, k_len, 3));
        let mut calls = 0;
        let flash = attend_flash_with(
            q.clone(),
            k.clone(),
            v.clone(),
            FLASH_MASK_ELEMS,
            |q, k, v, mask, opts| {
                calls += 1;
                flash_unit(q, k, v, mask, opts)
            },
        );
        let want = to_vec_f32(attend_naive(q.clone(), k.clone(), v.clone()));
        let diff = max_abs_diff(&to_vec_f32(flash), &want);
        if q_len > 1 && nh == nkv && k_len > q_len {
            // the same kernel with `is_causal` on the unpadded, non-square call: top-left
            let opts = burn::tensor::ops::AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let raw = max_abs_diff(&to_vec_f32(flash_unit(q, k, v, None, opts)), &want);
            eprintln!("  unpadded is_causal: max |diff| {raw:.2e}");
            assert!(
                raw > 0.1,
                "the kernel's causal diagonal is not top-left here: {raw}"
            );
        }
        eprintln!("flash kernel, {nh}/{nkv} heads, q {q_len} k {k_len}: {calls} call(s), max |diff| {diff:.2e}");
        assert!(diff < 5e-3, "q {q_len} k {k_len}: {diff}");
    }
}

/// Quantized weights on wgpu as the engine holds them there (`QuantProduct::Dequantize`:
/// packed 8/4-bit row chunks, dequantized chunk by chunk by burn's kernel, then the float
/// matmul): against an f64 product of the dequantized values, 4-bit cases included (packed 8
/// per word). Tolerance 1e-5 relative to the sum of |terms|, as on ndarray (f32 products).
#[test]
fn wgpu_quantized_linear_matches_f64_reference() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let worst = check_quantized_linear::<W>(
        &WgpuDevice::DefaultDevice,
        1e-5,
        hici::model::lora::QuantProduct::Dequantize,
        true,
        false,
    );
    eprintln!("wgpu quantized linear: worst relative error {worst:.2e}");
}

/// The CLI on wgpu with quantized files kept quantized: the tiny fixture as a Q4_1 (4-bit,
/// offsets) and a Q8_0 GGUF, and the HiCI fixture imported as Q4_0, generate the ids of the
/// same file expanded on load (`--weights f32`); SmolLM2 (when fetched) its reference's greedy
/// ids from the shipped Q4_1 file, in under 0.3x the device memory of its f32 expansion, and
/// the CPU's ids from its Q8_0 re-quantization.
#[test]
fn cli_quantized_gguf_on_wgpu_keeps_ids() {
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wgpu-quantized");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = ids_arg(&[1, 450, 496, 173, 17]);
    let generate = |model: &str, weights: &str, prompt: &str, n: &str| {
        generated(&json_of(&hici(&[
            "generate",
            "--device",
            "wgpu",
            "--model",
            model,
            "--weights",
            weights,
            "--prompt-ids",
            prompt,
            "--max-new-tokens",
            n,
            "--ignore-eos",
            "--json",
        ])))
    };
    for ty in [
        hici::io::gguf::quants::GgmlType::Q4_1,
        hici::io::gguf::quants::GgmlType::Q8_0,
    ] {
        let path = dir.join(format!("tiny-{}-{}.gguf", ty.name(), std::process::id()));
        write_fixture_gguf(&path, Some(ty));
        let p = path.to_str().unwrap();
        let native = generate(p, "native", &ids, "8");
        assert_eq!(native.len(), 8);
        assert_eq!(native, generate(p, "f32", &ids, "8"), "{}", ty.name());
        std::fs::remove_file(&path).ok();
    }
    // the embedded HiCI fixture imported as Q4_0 (HiCI projections quantized too)
    let q4 = dir.join(format!("hici-q4_0-{}.safetensors", std::process::id()));
    let q4_s = q4.to_str().unwrap();
    let out = hici(&["import", "--out", q4_s, "--quantize", "q4_0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let native = generate(q4_s, "native", &ids, "8");
    assert_eq!(native.len(), 8);
    assert_eq!(native, generate(q4_s, "f32", &ids, "8"), "HiCI Q4_0 import");
    std::fs::remove_file(&q4).ok();
    let Some(m) = real_model("smollm2") else {
        return;
    };
    let m = m.to_str().unwrap();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("../smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    let as_ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let prompt = as_ids(&r["story"]["prompt_ids"]);
    let greedy = as_ids(&r["story"]["greedy_ids"]);
    let got = generate(m, "native", &ids_arg(&prompt), "12");
    assert_eq!(got, greedy[..12]);
    // re-quantized to Q8_0 (8-bit packing on the device): the ids of the same file on the CPU
    // (kept quantized there as well, and checked against its f32 expansion in gguf_cli.rs)
    let q8 = dir.join(format!("smollm2-q8_0-{}.gguf", std::process::id()));
    common::requantize_gguf(
        std::path::Path::new(m),
        &q8,
        hici::io::gguf::quants::GgmlType::Q8_0,
    );
    let q8_s = q8.to_str().unwrap();
    let cpu = generated(&json_of(&hici(&[
        "generate",
        "--device",
        "ndarray",
        "--model",
        q8_s,
        "--prompt-ids",
        &ids_arg(&prompt),
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ])));
    assert_eq!(cpu.len(), 12);
    assert_eq!(generate(q8_s, "native", &ids_arg(&prompt), "12"), cpu);
    std::fs::remove_file(&q8).ok();
    // device memory (burn's wgpu pools after a short run) kept quantized vs expanded
    let device_bytes = |weights: &str| {
        let v = json_of(&hici(&[
            "bench",
            "--device",
            "wgpu",
            "--model",
            m,
            "--weights",
            weights,
            "--prompt-len",
            "8",
            "--gen-len",
            "2",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
        ]));
        v["results"][0]["memory"]["device_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no device bytes: {v}"))
    };
    let (native, f32) = (device_bytes("native"), device_bytes("f32"));
    eprintln!(
        "wgpu SmolLM2 Q4_1 device memory: native {} MiB, f32 {} MiB",
        native >> 20,
        f32 >> 20
    );
    // Q4_1 packed: 4 bits + an f32 scale and offset per 32 values (0.75 B/value) vs 4 B/value
    assert!(native * 10 < f32 * 3, "native {native} vs f32 {f32}");
}

/// The sampler's device form on wgpu (what GPU decoding runs: penalties, temperature, top-k,
/// top-p within top-k, the Gumbel-max draw, one id read back) picks the ids of its host form
/// from the same seed, step after step, on random logits over a SmolLM2-sized vocabulary.
#[test]
fn wgpu_device_sampler_picks_the_host_ids() {
    use hici::runtime::sampler::{Sampler, SamplingConfig};
    if std::env::var_os("HICI_SKIP_WGPU").is_some() {
        return;
    }
    let dev = WgpuDevice::DefaultDevice;
    let v = 49_152;
    let mut rng = hici::model::synthetic::XorShift::new(3);
    let base = SamplingConfig {
        greedy: false,
        temperature: 0.7,
        seed: 9,
        ..SamplingConfig::default()
    };
    for cfg in [
        base.clone(),
        SamplingConfig {
            top_k: 40,
            top_p: 0.9,
            repeat_penalty: 1.3,
            presence_penalty: 0.2,
            frequency_penalty: 0.4,
            ..base.clone()
        },
        SamplingConfig {
            greedy: true,
            repeat_penalty: 1.5,
            ..base
        },
    ] {
        let (mut host, mut device) = (Sampler::new(cfg.clone()), Sampler::new(cfg.clone()));
        let mut history: Vec<u32> = vec![1, 500, 500, 49_000];
        for step in 0..8 {
            // logits in [-6, 6], a few tokens well ahead (a peaked distribution, as real ones)
            let mut row: Vec<f32> = (0..v).map(|_| rng.next_f32() * 12.0 - 6.0).collect();
            for j in 0..5 {
                row[(step * 977 + j * 131) % v] += 4.0 + j as f32;
            }
            let want = host.sample(&row, &history, history.len() - 4);
            let t = Tensor::<W, 1>::from_data(TensorData::new(row, [v]), &dev);
            let got = device
                .sample_on_device(t, &history, history.len() - 4)
                .into_data()
                .iter::<i64>()
                .next()
                .unwrap();
            assert_eq!(got as u32, want, "{cfg:?}: step {step}");
            history.push(want);
        }
    }
}
