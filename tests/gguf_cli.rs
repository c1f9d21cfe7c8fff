//! `hici` on GGUF files: a GGUF written from the tiny fixture behaves like the fixture's base
//! directory; SmolLM2 (when fetched) answers, streams, scores and inspects; bad files and
//! flags give one-line errors; generation never runs past the context.

mod common;

use common::{assert_clean_error, generated, hici, ids_arg, json_of};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The fixture's base weights (a plain Llama) as a GGUF file.
fn tiny_gguf() -> PathBuf {
    let path = scratch(&format!("tiny-{}.gguf", std::process::id()));
    if !path.is_file() {
        common::write_fixture_gguf(&path, None);
    }
    path
}

/// The CLI on a quantized GGUF (the fixture's matrices in Q4_1): `--weights native` (kept in
/// 8-bit blocks, the default) generates the ids of `--weights f32` (expanded on load).
#[test]
fn quantized_gguf_generates_like_its_f32_expansion() {
    let path = scratch(&format!("tiny-q4_1-{}.gguf", std::process::id()));
    common::write_fixture_gguf(&path, Some(hici::io::gguf::quants::GgmlType::Q4_1));
    let ids = ids_arg(&[1, 450, 496, 173, 17]);
    let run = |weights: &str| {
        let out = hici(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--weights",
            weights,
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        generated(&json_of(&out))
    };
    let native = run("native");
    assert_eq!(native.len(), 8);
    assert_eq!(native, run("f32"));
    let out = hici(&["generate", "--weights", "q3", "--prompt", "x"]);
    assert_clean_error(&out, "q3");
    std::fs::remove_file(&path).ok();
}

#[test]
fn gguf_of_the_fixture_generates_like_its_base_directory() {
    let g = tiny_gguf();
    let base = common::fixture().join("base");
    let ids = ids_arg(&[1, 450, 496, 173, 17]);
    let run = |src: &[&str]| {
        let mut args = vec!["generate"];
        args.extend(src);
        args.extend([
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        generated(&json_of(&hici(&args)))
    };
    let from_gguf = run(&["--model", g.to_str().unwrap()]);
    let from_dir = run(&["--base", base.to_str().unwrap()]);
    assert_eq!(from_gguf.len(), 8);
    assert_eq!(from_gguf, from_dir);
    // a plain Llama has no HiCI modules: HiCI modes are refused, full is the default
    let out = hici(&[
        "generate",
        "--model",
        g.to_str().unwrap(),
        "--mode",
        "hici",
        "--prompt-ids",
        "1,2",
    ]);
    assert_clean_error(&out, "needs HiCI modules");
    // inspect reports the GGUF header
    let v = json_of(&hici(&[
        "inspect",
        "--model",
        g.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["hici"], false);
    assert!(v["dtypes_by_group"]["attention"]["F32"].as_u64().unwrap() > 0);
    assert_eq!(v["logits_checksum"]["mode"], "Full");
}

#[test]
fn bad_gguf_files_give_one_line_errors() {
    let good = std::fs::read(tiny_gguf()).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "magic.gguf",
            b"GGML\x03\x00\x00\x00".to_vec(),
            "not a GGUF file",
        ),
        (
            "truncated.gguf",
            good[..good.len() / 3].to_vec(),
            "past the end of the file",
        ),
        (
            "header.gguf",
            good[..40].to_vec(),
            "metadata count 11 is impossible",
        ),
        ("empty.gguf", vec![], "truncated file"),
    ];
    for (name, bytes, needle) in cases {
        let p = scratch(name);
        std::fs::write(&p, bytes).unwrap();
        let out = hici(&[
            "generate",
            "--model",
            p.to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]);
        assert_clean_error(&out, needle);
        assert_clean_error(&out, name);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty(), "partial output for {name}");
    }
    let out = hici(&[
        "generate",
        "--model",
        "/nonexistent/x.gguf",
        "--prompt-ids",
        "1",
    ]);
    assert_clean_error(&out, "no such file");
}

#[test]
fn generation_stops_at_the_context() {
    // the embedded model's context is 256 tokens (max_position_embeddings x RoPE factor)
    let v = json_of(&hici(&[
        "generate",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "999999",
        "--ignore-eos",
        "--mode",
        "full",
        "--json",
    ]));
    assert_eq!(v["stop_reason"], "context");
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() + v["generated_tokens"].as_u64().unwrap(),
        256
    );
    let out = hici(&["generate", "--prompt-ids", "1,2", "--max-context", "100000"]);
    assert_clean_error(&out, "more than the model's context");
    let long = ids_arg(&vec![5; 300]);
    let out = hici(&["generate", "--prompt-ids", &long, "--mode", "full"]);
    assert_clean_error(&out, "more than the context of 256");
}

fn smollm2() -> Option<String> {
    common::real_model("smollm2").map(|p| p.to_str().unwrap().to_string())
}

fn reference() -> serde_json::Value {
    let p = common::fixture().join("../smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn smollm2_chat_answers_paris_and_prompt_paths_agree() {
    let Some(m) = smollm2() else { return };
    let v = json_of(&hici(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--json",
    ]));
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["stop_reason"], "eos");
    let r = reference();
    let want: Vec<i64> = r["chat"]["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    // the reference's ids end with <|im_end|>, which stops generation and is not emitted
    assert_eq!(generated(&v), want[..want.len() - 1]);
    // a system prompt through the model's template
    let out = hici(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "--system",
        "You are a terse geography tutor.",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    // --prompt and --prompt-ids give the same ids
    let story = &r["story"];
    let ids: Vec<i64> = story["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let a = json_of(&hici(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        story["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--json",
    ]));
    let b = json_of(&hici(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        &ids_arg(&ids),
        "--max-new-tokens",
        "12",
        "--json",
    ]));
    assert_eq!(a["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
    assert_eq!(generated(&a), generated(&b));
    let greedy: Vec<i64> = story["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    assert_eq!(generated(&a), greedy[..12]);
}

#[test]
fn smollm2_perplexity_and_inspect() {
    let Some(m) = smollm2() else { return };
    let r = reference();
    let text = scratch("passage.txt");
    std::fs::write(&text, r["nll"]["text"].as_str().unwrap()).unwrap();
    let v = json_of(&hici(&[
        "perplexity",
        "--model",
        &m,
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "300",
        "--json",
    ]));
    // one window of 300 tokens: 299 predictions, the reference's first 299 per-token NLLs
    assert_eq!(v["predictions"], 299);
    let per: Vec<f64> = r["nll"]["token_nll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want = per[..299].iter().sum::<f64>() / 299.0;
    let got = v["mean_nll"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-4,
        "perplexity NLL {got} vs reference {want}"
    );

    let v = json_of(&hici(&["inspect", "--model", &m, "--json"]));
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["context_length"], 8192);
    assert_eq!(v["tied_embeddings"], true);
    assert_eq!(v["tokenizer"]["model"], "gpt2");
    assert_eq!(v["tokenizer"]["pre"], "smollm");
    assert_eq!(v["dtypes_by_group"]["embedding"]["Q8_0"], 1);
    assert_eq!(v["dtypes_by_group"]["attention"]["Q4_1"], 120);
    assert_eq!(v["chat_format"], "the model's chat template");
    assert!(v["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

/// SmolLM2 as users hold it, kept quantized on the CPU: the shipped Q4_1 file and its Q8_0
/// re-quantization (as `llama-quantize --allow-requantize` makes it) generate the greedy ids
/// of their own f32 expansion (`--weights f32`, the dequantized reference), with peak RSS
/// under the targets of the quantized-weights issue (300 / 340 MiB, the whole process) and
/// under half of the expansion's.
#[test]
fn smollm2_quantized_files_keep_ids_in_little_memory() {
    let Some(q4_1) = common::real_model("smollm2") else {
        return;
    };
    let q8_0 = scratch(&format!("smollm2-q8_0-{}.gguf", std::process::id()));
    common::requantize_gguf(&q4_1, &q8_0, hici::io::gguf::quants::GgmlType::Q8_0);
    for (path, target_mib) in [(&q4_1, 300u64), (&q8_0, 340)] {
        let p = path.to_str().unwrap();
        let args = |weights: &'static str| {
            [
                "generate",
                "--model",
                p,
                "--weights",
                weights,
                "--prompt",
                "The capital of France is",
                "--max-new-tokens",
                "32",
                "--greedy",
                "--json",
            ]
        };
        let Some((native_rss, native)) = common::hici_peak_rss(&args("native")) else {
            // no GNU time: the ids only
            let ids = generated(&json_of(&hici(&args("native"))));
            assert_eq!(ids, generated(&json_of(&hici(&args("f32")))), "{p}");
            continue;
        };
        let (f32_rss, f32_out) = common::hici_peak_rss(&args("f32")).unwrap();
        let ids = generated(&json_of(&native));
        assert!(!ids.is_empty());
        assert_eq!(ids, generated(&json_of(&f32_out)), "{p}: native vs f32 ids");
        eprintln!(
            "{p}: peak RSS native {} MiB, f32 {} MiB",
            native_rss >> 20,
            f32_rss >> 20
        );
        assert!(
            native_rss < target_mib << 20,
            "{p}: peak RSS {} MiB, target {target_mib} MiB",
            native_rss >> 20
        );
        assert!(native_rss * 2 < f32_rss, "{p}: {native_rss} vs {f32_rss}");
    }
    std::fs::remove_file(&q8_0).ok();
}
