//! End-to-end tests of the `hici` binary on the embedded tiny model.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn generate_greedy_prompt_ids_equals_fixture() {
    let want = expected("greedy_decode_unscrambled_cache_NONREFERENCE.safetensors");
    let reference = expected("greedy_decode.safetensors");
    for p in ["prompt1", "prompt2"] {
        let ids = ids_arg(&input_ids(&format!("{p}_ids")));
        let key = format!("{p}_generated_ids");
        let run = |extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--prompt-ids",
                &ids,
                "--max-new-tokens",
                "16",
                "--json",
            ];
            args.extend_from_slice(extra);
            json_of(&hici(&args))
        };
        let v = run(&[]);
        assert_eq!(generated(&v), want[&key].i64, "{p} (correct slot order)");
        assert_eq!(v["prompt_tokens"], ids.split(',').count());
        assert_eq!(v["stop_reason"], "max_tokens");
        assert!(v["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(
            generated(&run(&["--decode-cache", "reference"])),
            reference[&key].i64,
            "{p} (reference cache)"
        );
        // --kv-cache q8 decodes the same ids (tests/parity.rs bounds its logits)
        assert_eq!(
            generated(&run(&["--kv-cache", "q8"])),
            want[&key].i64,
            "{p} (q8 KV cache)"
        );
    }
    // ndarray has no f16 tensors: a one-line error, not a panic
    let out = hici(&["generate", "--prompt", "hi", "--kv-cache", "f16"]);
    assert_clean_error(&out, "f16 KV cache needs F16 tensors");
}

#[test]
fn generate_text_prompt_streams_and_is_deterministic_with_seed() {
    let args = [
        "generate",
        "--prompt",
        "an individual or Legal Entity",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let a = json_of(&hici(&args));
    let b = json_of(&hici(&args));
    assert_eq!(a["generated_ids"], b["generated_ids"]);
    assert_eq!(a["text"], b["text"]);
    // plain mode streams text to stdout and timings to stderr
    let out = hici(&[
        "generate",
        "--prompt",
        "an individual",
        "--max-new-tokens",
        "8",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("decode"));
    // the prompt text tokenizes exactly as the fixture says
    let text = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(fixture().join("expected/inputs.json")).unwrap(),
    )
    .unwrap()["prompt1_text"]
        .as_str()
        .unwrap()
        .to_string();
    let v = json_of(&hici(&[
        "generate",
        "--prompt",
        &text,
        "--max-new-tokens",
        "16",
        "--json",
    ]));
    let want = expected("greedy_decode_unscrambled_cache_NONREFERENCE.safetensors");
    assert_eq!(generated(&v), want["prompt1_generated_ids"].i64);
}

#[test]
fn generate_full_mode_and_chat_template_run() {
    let ids = ids_arg(&input_ids("prompt1_ids"));
    let v = json_of(&hici(&[
        "generate",
        "--mode",
        "full",
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    assert_eq!(v["generated_tokens"], 4);
    let v = json_of(&hici(&[
        "generate",
        "--chat",
        "--system",
        "be brief",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    assert!(v["prompt_tokens"].as_u64().unwrap() > 5);
}

fn write_tokens(name: &str, ids: &[i64], width: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hici-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let mut bytes = Vec::new();
    for &x in ids {
        if width == 2 {
            bytes.extend((x as u16).to_le_bytes());
        } else {
            bytes.extend((x as u32).to_le_bytes());
        }
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn perplexity_on_token_file_equals_fixture_nll() {
    let mut ids = input_ids("long_ids");
    ids.push(1); // the reference rule needs len > seq_len for one window
    let f16 = write_tokens("long16.bin", &ids, 2);
    let f32 = write_tokens("long32.bin", &ids, 4);
    let s = summary();
    for (mode, extra, key) in [
        ("full", vec![], "full"),
        ("hici-segmented", vec!["--segments", "4"], "segmented"),
    ] {
        for (file, width) in [(&f16, "16"), (&f32, "32")] {
            let mut args = vec![
                "perplexity",
                "--tokens",
                file.to_str().unwrap(),
                "--token-width",
                width,
                "--seq-len",
                "256",
                "--mode",
                mode,
                "--json",
            ];
            args.extend(extra.iter());
            let v = json_of(&hici(&args));
            let got = v["mean_nll"].as_f64().unwrap();
            let want = s[key]["mean_nll_fp64_from_logits"].as_f64().unwrap();
            eprintln!("[parity] perplexity {mode} u{width}: mean NLL {got:.7} vs {want:.7}");
            assert!((got - want).abs() < 1e-4, "{mode}: {got} vs {want}");
            assert_eq!(v["windows"], 1);
            assert_eq!(v["predictions"], 255);
        }
    }
    // bad token file length
    std::fs::write(f16.with_extension("odd"), [1u8, 2, 3]).unwrap();
    let out = hici(&[
        "perplexity",
        "--tokens",
        f16.with_extension("odd").to_str().unwrap(),
        "--seq-len",
        "8",
    ]);
    assert_clean_error(&out, "odd");
}

#[test]
fn passkey_runs_end_to_end() {
    let v = json_of(&hici(&[
        "passkey",
        "--lengths",
        "300",
        "--trials",
        "2",
        "--json",
    ]));
    let r = &v.as_array().unwrap()[0];
    assert_eq!(r["target_tokens"], 300);
    assert_eq!(r["trials"], 2);
    assert!(r["mean_prompt_tokens"].as_u64().unwrap() > 100);
}

#[test]
fn chat_answers_two_turns_from_a_script() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hici"))
        .args(["chat", "--max-new-tokens", "6", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\n/reset\nwhat is the license\nand then?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "three answers");
    // the third turn carries the second turn's history: a longer prompt
    assert!(lines[2]["prompt_tokens"].as_u64() > lines[1]["prompt_tokens"].as_u64());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reset"));
}

#[test]
fn user_mistakes_give_one_line_errors() {
    assert_clean_error(
        &hici(&["generate", "--base", "/nonexistent/dir", "--prompt", "x"]),
        "/nonexistent/dir",
    );
    assert_clean_error(
        &hici(&["generate", "--device", "tpu", "--prompt", "x"]),
        "unknown device",
    );
    assert_clean_error(&hici(&["generate", "--prompt", ""]), "empty");
    assert_clean_error(&hici(&["generate", "--prompt-ids", "1,2,99999"]), "99999");
    assert_clean_error(&hici(&["generate"]), "prompt");
    assert_clean_error(
        &hici(&["generate", "--prompt", "x", "--dtype", "bf16"]),
        "bf16",
    );
    assert_clean_error(
        &hici(&["generate", "--prompt", "x", "--top-p", "0"]),
        "top-p",
    );
    let long = ids_arg(&vec![5; 300]);
    assert_clean_error(&hici(&["generate", "--prompt-ids", &long]), "context");
    let ok = hici(&[
        "generate",
        "--prompt-ids",
        &long,
        "--truncate",
        "middle",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    // truncated to leave room for the 2 new tokens in the 256-token context
    let v = json_of(&ok);
    assert_eq!(v["prompt_tokens"], 254);
    assert_eq!(v["generated_tokens"], 2);
    let ids = ids_arg(&input_ids("nondiv_ids"));
    let mut toks = input_ids("nondiv_ids");
    toks.push(1);
    let f = write_tokens("nondiv.bin", &toks, 2);
    assert_clean_error(
        &hici(&[
            "perplexity",
            "--tokens",
            f.to_str().unwrap(),
            "--seq-len",
            "250",
            "--mode",
            "hici-segmented",
        ]),
        "250",
    );
    assert_clean_error(
        &hici(&["generate", "--mode", "hici-segmented", "--prompt-ids", &ids]),
        "segment",
    );
    assert_clean_error(
        &hici(&[
            "perplexity",
            "--tokens",
            "/nonexistent.bin",
            "--seq-len",
            "8",
        ]),
        "/nonexistent.bin",
    );
}

#[test]
fn ctrl_c_stops_cleanly_with_exit_130() {
    let child = Command::new(env!("CARGO_BIN_EXE_hici"))
        .args([
            "generate",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "1000000",
            "--ignore-eos",
            "--mode",
            "full",
            // a context of 64K tokens, so that the generation is still running at the signal
            "--rope-scale",
            "256",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty(), "partial output was flushed");
}

/// `hici parity` (the command a GPU machine runs) passes on ndarray with its default f32
/// tolerance, and fails with exit 1 and a JSON report when the tolerance is below the
/// measured differences.
#[test]
fn parity_command_passes_and_can_fail() {
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let v = json_of(&hici(&["parity", "--fixture", fx, "--json"]));
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["tolerance"].as_f64().unwrap() as f32, 1e-4);
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 10, "{v}");
    for c in checks {
        assert!(c["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{c}");
        assert!(c["rms_diff"].as_f64().unwrap() > 0.0, "{c}");
    }
    let out = hici(&["parity", "--fixture", fx, "--tolerance", "1e-7", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 10, "{v}");
    assert_clean_error(&out, "above tolerance");
    assert_clean_error(
        &hici(&["parity", "--fixture", "no/such/dir"]),
        "no/such/dir",
    );
    assert_clean_error(&hici(&["parity", "--fixture", fx, "--dtype", "f16"]), "f16");
}

#[test]
fn devices_lists_compiled_in_backends() {
    let v = json_of(&hici(&["devices", "--json"]));
    let compiled = v["compiled_in"].as_array().unwrap();
    // `cpu` (the default) and `ndarray` both select the CPU backend
    assert!(compiled.iter().any(|d| d == "ndarray"), "{v}");
    assert!(compiled.iter().any(|d| d == "cpu"), "{v}");
    let devices = v["devices"].as_array().unwrap();
    let of = |b: &'static str| devices.iter().filter(move |d| d["backend"] == b);
    assert_eq!(of("ndarray").count(), 1);
    if cfg!(feature = "cuda") {
        // every CUDA row names a device (name + memory) or says why there is none
        for d in of("cuda") {
            assert!(
                d["memory_bytes"].as_u64().is_some() || d["why"].is_string(),
                "{d}"
            );
        }
        assert!(of("cuda").count() >= 1);
    }
    if cfg!(feature = "wgpu") {
        assert!(of("wgpu").count() >= 1);
        for d in of("wgpu") {
            assert!(d["api"].is_string() || d["why"].is_string(), "{d}");
        }
        // CI installs lavapipe: the software Vulkan adapter must show up by name
        if std::env::var_os("HICI_SKIP_WGPU").is_none() {
            assert!(
                of("wgpu").any(|d| d["usable"] == true && d["device"].is_string()),
                "no usable wgpu adapter listed: {v}"
            );
        }
    }
}
