//! `hici import` → `--model FILE`: the converted file gives the same logits and greedy ids as
//! loading the directories, and a failed import leaves no file.

use hici::io::gguf::quants::GgmlType;
use hici::io::{
    load_checkpoint, load_converted, load_converted_with, plan_checkpoint, write_converted,
    Checkpoint, ConvertOptions, LoadOptions, StoreDtype,
};
use hici::model::weights::MixedWeights;
use hici::model::{to_vec_f32, AttentionMode, DecodeCache, HiciLlama, Logits, LoraMode};
use hici::runtime::sampler::argmax;
mod common;

use common::{assert_clean_error, fixture, hici, json_of as ok_json};
use std::path::{Path, PathBuf};

type B = burn::backend::NdArray<f32>;

fn opts() -> LoadOptions {
    LoadOptions {
        hici_heads: 4,
        ..LoadOptions::default()
    }
}

/// A scratch directory under cargo's per-target tmp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("import-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        Self(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prompt_ids(key: &str) -> Vec<i64> {
    let text = std::fs::read_to_string(fixture().join("expected/inputs.json")).expect("inputs");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v[key]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

fn logits(ck: Checkpoint, mode: LoraMode, ids: &[i64], attn: AttentionMode) -> Vec<f32> {
    let dev = Default::default();
    let mut w = ck.weights;
    let model = HiciLlama::<B>::from_weights(&ck.config, ck.lora, mode, &mut w, &dev)
        .expect("model builds");
    assert!(w.is_empty(), "unused: {:?}", w.keys().collect::<Vec<_>>());
    let t = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids.to_vec(), [1, ids.len()]),
        &dev,
    );
    to_vec_f32(model.forward(t, attn).expect("forward"))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn direct() -> Checkpoint {
    load_checkpoint(
        &fixture().join("base"),
        Some(&fixture().join("adapter")),
        &opts(),
    )
    .expect("fixture loads")
}

fn convert(out: &Path, dtype: StoreDtype, merge_lora: bool) -> Checkpoint {
    let plan = plan_checkpoint(
        &fixture().join("base"),
        Some(&fixture().join("adapter")),
        &opts(),
    )
    .expect("plan");
    let o = ConvertOptions {
        dtype,
        merge_lora,
        tokenizer_json: None,
        quantize: None,
    };
    write_converted(&plan, out, &o, &mut ()).expect("write");
    load_converted(out).expect("load converted")
}

/// Logits through the model: f32 files equal the directories (unmerged: bitwise; LoRA merged
/// at import vs merged by the model at load: ≤ 1e-6, bitwise on this CPU backend); bf16
/// storage error is reported.
#[test]
fn converted_logits_match_directories() {
    let dir = Scratch::new("logits");
    let ids = prompt_ids("prompt1_ids");
    let modes = [
        ("hici", AttentionMode::Inference),
        ("full", AttentionMode::Full),
    ];
    for (name, attn) in modes {
        let want_unmerged = logits(direct(), LoraMode::Unmerged, &ids, attn);
        let want_merged = logits(direct(), LoraMode::Merged, &ids, attn);

        let f32_file = dir.path().join("f32.safetensors");
        let got = logits(
            convert(&f32_file, StoreDtype::F32, false),
            LoraMode::Unmerged,
            &ids,
            attn,
        );
        assert_eq!(
            got, want_unmerged,
            "{name}: f32 unmerged file, unmerged run"
        );
        let got = logits(
            convert(&f32_file, StoreDtype::F32, false),
            LoraMode::Merged,
            &ids,
            attn,
        );
        assert_eq!(got, want_merged, "{name}: f32 unmerged file, merged run");

        let merged_file = dir.path().join("f32-merged.safetensors");
        let got = logits(
            convert(&merged_file, StoreDtype::F32, true),
            LoraMode::Merged,
            &ids,
            attn,
        );
        let d = max_abs(&got, &want_merged);
        eprintln!("[import] {name}: f32 --merge-lora vs directories (merged): max abs {d:.3e}");
        // Bitwise on the CPU backend (same FMA rounding as its matmul); 1e-6 elsewhere.
        assert!(d <= 1e-6, "{name}: f32 merged file differs by {d}");

        for merge in [false, true] {
            let bf16_file = dir.path().join(format!("bf16-{merge}.safetensors"));
            let got = logits(
                convert(&bf16_file, StoreDtype::BF16, merge),
                LoraMode::Merged,
                &ids,
                attn,
            );
            let d = max_abs(&got, &want_merged);
            let scale = want_merged.iter().fold(0f32, |m, v| m.max(v.abs()));
            eprintln!(
                "[import] {name}: bf16 (merge_lora={merge}) vs f32 directories: max abs {d:.3e} \
                 (max |logit| {scale:.2})"
            );
            assert!(
                d <= 0.05 * scale.max(1.0),
                "{name}: bf16 error {d} too large"
            );
        }
    }
    assert_eq!(
        dir.listing(),
        vec![
            "bf16-false.safetensors",
            "bf16-true.safetensors",
            "f32-merged.safetensors",
            "f32.safetensors"
        ]
    );
}

fn greedy(model: &[&str], ids: &str) -> Vec<i64> {
    let mut args = model.to_vec();
    args.extend([
        "generate",
        "--prompt-ids",
        ids,
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    ok_json(&hici(&args))["generated_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

/// A text prompt runs on `model` (the tokenizer is embedded in the file).
fn text_prompt_works(model: &str) {
    let t = ok_json(&hici(&[
        "--model",
        model,
        "generate",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "2",
        "--json",
    ]));
    assert!(t["prompt_tokens"].as_u64().expect("count") > 0);
}

/// The CLI round trip on the embedded model: same greedy ids and inspect checksum.
#[test]
fn cli_import_then_model_generates_the_same() {
    let dir = Scratch::new("cli");
    let ids: Vec<String> = prompt_ids("prompt2_ids")
        .iter()
        .map(|x| x.to_string())
        .collect();
    let ids = ids.join(",");
    let want = greedy(&[], &ids);
    let base = fixture().join("base");
    let adapter = fixture().join("adapter");
    let (base, adapter) = (
        base.to_str().expect("utf8"),
        adapter.to_str().expect("utf8"),
    );
    for (file, extra) in [
        ("f32.safetensors", vec![]),
        ("merged.safetensors", vec!["--merge-lora"]),
        ("bf16.safetensors", vec!["--dtype", "bf16"]),
    ] {
        let out = dir.path().join(file);
        let out_s = out.to_str().expect("utf8");
        let mut args = vec!["import", "--out", out_s, "--json"];
        args.extend(extra.iter().copied());
        let v = ok_json(&hici(&args));
        assert_eq!(v["format"], "hici-converted");
        assert_eq!(v["bytes"], std::fs::metadata(&out).expect("written").len());
        let got = greedy(&["--model", out_s], &ids);
        eprintln!("[import] {file}: greedy {got:?} (directories {want:?})");
        if extra.is_empty() || extra == ["--merge-lora"] {
            assert_eq!(got, want, "{file}");
        }
        text_prompt_works(out_s);
    }
    // Importing the directories explicitly gives the same file as the embedded default.
    let explicit = dir.path().join("explicit.safetensors");
    ok_json(&hici(&[
        "--base",
        base,
        "--adapter",
        adapter,
        "--hici-heads",
        "4",
        "import",
        "--out",
        explicit.to_str().expect("utf8"),
        "--json",
    ]));
    let a = load_converted(&explicit).expect("load");
    let b = load_converted(&dir.path().join("f32.safetensors")).expect("load");
    assert_eq!((a.config, a.lora, a.weights), (b.config, b.lora, b.weights));
    // inspect: same checksum from the file and the directories; valid reports.
    let a = ok_json(&hici(&["inspect", "--json"]));
    let f32_file = dir.path().join("f32.safetensors");
    let b = ok_json(&hici(&[
        "--model",
        f32_file.to_str().expect("utf8"),
        "inspect",
        "--json",
    ]));
    assert_eq!(a["valid"], true);
    assert_eq!(b["valid"], true);
    assert_eq!(
        a["model"]["logits_checksum"], b["model"]["logits_checksum"],
        "checksums"
    );
    assert_eq!(a["counts_found"]["hici"], b["counts_found"]["hici"]);
}

#[test]
fn failed_imports_leave_no_file() {
    let dir = Scratch::new("fail");
    let out = dir.path().join("m.safetensors");
    let out_s = out.to_str().expect("utf8");
    let base = fixture().join("base");
    let base_s = base.to_str().expect("utf8");

    // An adapter whose r disagrees with its tensors.
    let bad_adapter = dir.path().join("bad-adapter");
    std::fs::create_dir_all(&bad_adapter).expect("mkdir");
    for f in ["adapter_model.bin", "trainable_params.bin"] {
        std::fs::copy(fixture().join("adapter").join(f), bad_adapter.join(f)).expect("copy");
    }
    let cfg =
        std::fs::read_to_string(fixture().join("adapter/adapter_config.json")).expect("config");
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    cfg["r"] = 4.into();
    std::fs::write(bad_adapter.join("adapter_config.json"), cfg.to_string()).expect("write");
    let out_run = hici(&[
        "--base",
        base_s,
        "--adapter",
        bad_adapter.to_str().expect("utf8"),
        "--hici-heads",
        "4",
        "import",
        "--out",
        out_s,
    ]);
    assert_clean_error(&out_run, "r = 4");
    assert_eq!(dir.listing(), vec!["bad-adapter"]);

    // A missing output directory; the output is a directory.
    let nowhere = dir.path().join("missing/m.safetensors");
    assert_clean_error(
        &hici(&["import", "--out", nowhere.to_str().expect("utf8")]),
        "temporary file",
    );
    assert_clean_error(
        &hici(&["import", "--out", dir.path().to_str().expect("utf8")]),
        "is a directory",
    );
    // A read-only output directory (root ignores permissions: checked only if it applies).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir_all(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let probe = ro.join("probe");
        let enforced = std::fs::write(&probe, b"x").is_err();
        let _ = std::fs::remove_file(&probe);
        if enforced {
            let target = ro.join("m.safetensors");
            assert_clean_error(
                &hici(&["import", "--out", target.to_str().expect("utf8")]),
                "temporary file",
            );
            assert!(std::fs::read_dir(&ro).expect("ls").next().is_none());
        } else {
            eprintln!("[import] running as root: read-only directory case skipped");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::remove_dir(&ro).expect("rmdir");
    }
    assert_eq!(dir.listing(), vec!["bad-adapter"]);

    // --model with directories, or with a file that is not a converted model.
    let out_run = hici(&["--model", out_s, "--base", base_s, "inspect"]);
    assert_eq!(out_run.status.code(), Some(2), "usage error");
    let shard = base.join("model-00001-of-00003.safetensors");
    assert_clean_error(
        &hici(&["--model", shard.to_str().expect("utf8"), "inspect"]),
        "not a converted HiCI model",
    );
    assert_clean_error(
        &hici(&["--model", out_s, "generate", "--prompt-ids", "1,2"]),
        "no such file",
    );
}

/// The model of a checkpoint whose quantized tensors (if any) stay quantized.
fn mixed_model(ck: Checkpoint) -> HiciLlama<B> {
    let mut w = MixedWeights {
        dense: ck.weights,
        quantized: ck.quantized,
        ..Default::default()
    };
    let m = HiciLlama::<B>::from_weights(
        &ck.config,
        ck.lora,
        LoraMode::Merged,
        &mut w,
        &Default::default(),
    )
    .expect("model builds");
    assert!(
        w.is_empty(),
        "unused: {:?}",
        w.names().take(3).collect::<Vec<_>>()
    );
    m
}

fn ids_tensor(ids: &[i64]) -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

/// `n` greedy ids after `prompt` (HiCI inference mode: segments, then decode on the cache).
fn model_greedy(model: &HiciLlama<B>, prompt: &[i64], n: usize) -> Vec<i64> {
    let (l, mut cache) = model
        .prefill_tokens(
            prompt,
            AttentionMode::Inference,
            DecodeCache::Tokens,
            Logits::Last,
        )
        .expect("prefill");
    let mut ids = vec![argmax(&to_vec_f32(l)) as i64];
    while ids.len() < n {
        let row = model
            .decode_tokens(&ids[ids.len() - 1..], &mut cache)
            .expect("decode");
        ids.push(argmax(&to_vec_f32(row)) as i64);
    }
    ids
}

/// The merged f32 model with every weight that `ty` quantizes perturbed by uniform noise of
/// half a quantization step (`max|w| / 127` per block of 32 for Q8_0, `/ 8` for Q4_0): the size
/// of rounding error, without any block format, as an independent scale for the logit error a
/// correct quantization must give.
fn noise_reference(merged: &Checkpoint, ty: GgmlType) -> HiciLlama<B> {
    let levels = if ty == GgmlType::Q8_0 { 127.0 } else { 8.0 };
    let mut ck = merged.clone();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for (k, t) in ck.weights.iter_mut() {
        if !hici::io::quantizable(k, &t.shape, ty) {
            continue;
        }
        for block in t.data.chunks_mut(32) {
            let step = block.iter().fold(0f32, |a, v| a.max(v.abs())) / levels;
            for v in block.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                *v += u as f32 * step;
            }
        }
    }
    mixed_model(ck)
}

/// `--quantize`: the file loads with its linear weights kept quantized (HiCI projections
/// included) and gives the logits and greedy ids of its own f32 expansion (1e-4: only the
/// summation order differs). Against the unquantized model the logits move by the rounding
/// error: at most 2x what uniform noise of half a step in the same weights gives (a wrong block
/// layout or scale is far outside that). This random tiny model is sensitive (Q8_0 moves its
/// logits by ~7% of their range, as the noise does), so ids are not compared with it.
#[test]
fn quantized_import_generates_like_its_dequantized_reference() {
    let dir = Scratch::new("quant");
    let plan = plan_checkpoint(
        &fixture().join("base"),
        Some(&fixture().join("adapter")),
        &opts(),
    )
    .expect("plan");
    let merged_path = dir.path().join("f32.safetensors");
    let merge = ConvertOptions {
        merge_lora: true,
        ..ConvertOptions::default()
    };
    write_converted(&plan, &merged_path, &merge, &mut ()).expect("write");
    let merged = load_converted(&merged_path).expect("load");
    let ids = prompt_ids("prompt1_ids");
    let run = |m: &HiciLlama<B>| {
        to_vec_f32(
            m.forward(ids_tensor(&ids), AttentionMode::Inference)
                .expect("forward"),
        )
    };
    let want = run(&mixed_model(merged.clone()));
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
        let path = dir.path().join(format!("{}.safetensors", ty.name()));
        let o = ConvertOptions {
            quantize: Some(ty),
            ..merge.clone()
        };
        write_converted(&plan, &path, &o, &mut ()).expect("write");
        let q = mixed_model(load_converted_with(&path, true).expect("load"));
        let f = mixed_model(load_converted(&path).expect("load"));
        assert!(q.is_quantized() && !f.is_quantized());
        let (lq, lf) = (run(&q), run(&f));
        let d = max_abs(&lq, &lf);
        let e = max_abs(&lq, &want);
        let noise = max_abs(&run(&noise_reference(&merged, ty)), &want);
        eprintln!(
            "[import] {}: kept vs its f32 expansion {d:.2e}; vs the unquantized model {e:.3e} \
             (half-step noise {noise:.3e})",
            ty.name()
        );
        assert!(d <= 1e-4, "{}: kept quantized vs expanded: {d}", ty.name());
        assert!(
            e <= 2.0 * noise,
            "{}: quantization error {e}, noise {noise}",
            ty.name()
        );
        assert_eq!(
            model_greedy(&q, &ids, 12),
            model_greedy(&f, &ids, 12),
            "{} greedy ids",
            ty.name()
        );
    }
}

/// `hici import --quantize q8_0` through the CLI: a file at most 0.4x the f32 import that
/// generates the ids of its f32 expansion (`--weights f32`), inspects as valid, and bad values
/// of the flag are refused.
#[test]
fn cli_quantized_import_generates() {
    let dir = Scratch::new("cli-quant");
    let ids: Vec<String> = prompt_ids("prompt2_ids")
        .iter()
        .map(|x| x.to_string())
        .collect();
    let ids = ids.join(",");
    let f32_file = dir.path().join("f32.safetensors");
    let q8 = dir.path().join("q8.safetensors");
    let (f32_s, q8_s) = (f32_file.to_str().expect("utf8"), q8.to_str().expect("utf8"));
    let f = ok_json(&hici(&["import", "--out", f32_s, "--merge-lora", "--json"]));
    let v = ok_json(&hici(&[
        "import",
        "--out",
        q8_s,
        "--quantize",
        "q8_0",
        "--json",
    ]));
    assert_eq!(v["format_version"], 2);
    assert_eq!(v["quantization"]["format"], "Q8_0");
    assert_eq!(v["lora_merged"], true, "--quantize merges LoRA");
    let ratio = v["bytes"].as_f64().expect("bytes") / f["bytes"].as_f64().expect("bytes");
    eprintln!("[import] CLI q8_0: {ratio:.3}x the f32 import");
    assert!(ratio <= 0.4, "{ratio}");
    let native = greedy(&["--model", q8_s], &ids);
    let expanded = greedy(&["--model", q8_s, "--weights", "f32"], &ids);
    assert_eq!(native, expanded);
    assert_eq!(native.len(), 12);
    text_prompt_works(q8_s);
    let inspect = ok_json(&hici(&["--model", q8_s, "inspect", "--json"]));
    assert_eq!(inspect["valid"], true, "{inspect}");
    let bad = dir.path().join("bad.safetensors");
    assert_clean_error(
        &hici(&[
            "import",
            "--out",
            bad.to_str().expect("utf8"),
            "--quantize",
            "q5_k",
        ]),
        "q5_k",
    );
    assert!(!bad.exists());
}
