//! Smoke test of `hici bench` (no timing assertions: benchmarks are not tests).

use std::process::{Command, Output};

fn hici(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hici"))
        .args(args)
        .output()
        .expect("run hici")
}

fn stat_ok(v: &serde_json::Value, what: &str) {
    for k in ["mean", "min", "max"] {
        let x = v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{k} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{what}.{k} = {x}");
    }
    assert!(
        v["min"].as_f64() <= v["mean"].as_f64(),
        "{what}: min > mean"
    );
    assert!(
        v["mean"].as_f64() <= v["max"].as_f64(),
        "{what}: mean > max"
    );
}

#[test]
fn bench_synthetic_tiny_json() {
    let out = hici(&[
        "bench",
        "--synthetic",
        "tiny",
        "--prompt-len",
        "16,32",
        "--gen-len",
        "3",
        "--depth",
        "5",
        "--modes",
        "full,hici,hici-segmented",
        "--warmup",
        "0",
        "--iters",
        "2",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hici bench failed: {err}");
    assert!(err.contains("prefill tok/s"), "no table on stderr: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["schema"], "hici-bench/1");
    assert_eq!(v["backend"], "ndarray");
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["burn_version"], "0.21.0");
    assert!(!v["git_commit"].as_str().unwrap().is_empty());
    assert!(
        v["machine"]["cpu_logical_cores"].is_u64() || v["machine"]["cpu_logical_cores"].is_null()
    );
    assert!(v["machine"].get("cpu_model").is_some());
    assert_eq!(v["model"]["source"], "synthetic:tiny");
    assert!(v["model"]["parameters"].as_u64().unwrap() > 0);
    assert_eq!(v["settings"]["iters"], 2);
    assert_eq!(v["interrupted"], false);

    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 modes x 2 lengths");
    for r in rows {
        let mode = r["mode"].as_str().unwrap();
        let p = r["prompt_len"].as_u64().unwrap();
        assert!(p == 16 || p == 32);
        assert_eq!(r["iters"], 2);
        stat_ok(&r["prefill"]["tokens_per_s"], "prefill.tokens_per_s");
        stat_ok(&r["prefill"]["seconds"], "prefill.seconds");
        assert_eq!(r["prefill"]["samples_s"].as_array().unwrap().len(), 2);
        let mem = &r["memory"];
        if cfg!(target_os = "linux") {
            assert!(mem["peak_rss_bytes"].as_u64().unwrap() > 0);
        }
        assert!(
            mem["device_bytes"].is_null(),
            "CPU run reports no device memory"
        );
        assert!(mem["device_note"].as_str().is_some());
        match mode {
            "full" | "hici" => {
                stat_ok(&r["ttft_ms"], "ttft_ms");
                stat_ok(&r["decode"]["tokens_per_s"], "decode.tokens_per_s");
                stat_ok(&r["decode"]["ms_per_token"], "decode.ms_per_token");
                let prefix = if mode == "hici" { 12 } else { 0 };
                assert_eq!(
                    r["decode"]["cache_entries_at_start"].as_u64().unwrap(),
                    prefix + p + 5
                );
            }
            "hici-segmented" => {
                assert!(r["decode"].is_null(), "segmented mode has no decode");
                assert!(r["ttft_ms"].is_null());
                assert!(r["decode_note"].as_str().unwrap().contains("no decode"));
                assert_eq!(r["segments"], 4);
            }
            m => panic!("unexpected mode {m}"),
        }
    }
}

#[test]
fn bench_rejects_undividable_segmented_lengths() {
    let out = hici(&[
        "bench",
        "--synthetic",
        "tiny",
        "--prompt-len",
        "18",
        "--modes",
        "hici-segmented",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("divisible"), "{err}");
}

#[test]
fn bench_concurrency_rows() {
    let out = hici(&[
        "bench",
        "--synthetic",
        "tiny",
        "--prompt-len",
        "16",
        "--gen-len",
        "3",
        "--modes",
        "full,hici",
        "--concurrency",
        "1,3",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hici bench failed: {err}");
    assert!(
        err.contains("aggregate tok/s"),
        "no concurrency table: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["concurrency_results"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in rows {
        stat_ok(&r["aggregate_tokens_per_s"], "aggregate");
        stat_ok(&r["per_stream_tokens_per_s"], "per-stream");
        stat_ok(&r["ttft_ms"], "ttft");
    }
    assert_eq!(rows[1]["concurrency"], 3);
    assert_eq!(v["settings"]["concurrency"], serde_json::json!([1, 3]));
}

/// `--quantize` keeps a synthetic model's linear weights quantized: the same model holds far
/// less memory after load than in f32, and the JSON says what ran.
#[test]
fn bench_synthetic_quantized_holds_less() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/configs/cpu-512x8.json");
    let run = |quantize: Option<&str>| {
        let mut args = vec![
            "bench",
            "--synthetic",
            config,
            "--prompt-len",
            "16",
            "--gen-len",
            "2",
            "--modes",
            "hici",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
        ];
        if let Some(q) = quantize {
            args.extend(["--quantize", q]);
        }
        let out = hici(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "hici bench {quantize:?} failed: {err}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        stat_ok(
            &v["results"][0]["decode"]["tokens_per_s"],
            "decode.tokens_per_s",
        );
        v
    };
    let f32_run = run(None);
    assert!(f32_run["model"]["quantize"].is_null());
    let f32_rss = f32_run["model"]["rss_after_load_bytes"].as_u64().unwrap();
    // 61 M parameters: 245 MB in f32; Q8_0 values are held as i8 + an f32 scale per 32
    for q in ["q8_0", "q4_0"] {
        let v = run(Some(q));
        let name = q.to_uppercase();
        assert_eq!(v["model"]["quantize"], name.as_str());
        assert!(v["model"]["source"].as_str().unwrap().ends_with(&name));
        let rss = v["model"]["rss_after_load_bytes"].as_u64().unwrap();
        assert!(
            (rss as f64) < 0.5 * f32_rss as f64,
            "{q}: RSS after load {rss} vs f32 {f32_rss}"
        );
    }
    // --quantize only means something for random weights
    let out = hici(&["bench", "--quantize", "q8_0", "--prompt-len", "8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--synthetic"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
