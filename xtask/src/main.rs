//! Developer tasks: `cargo xtask demo` (the README's main job), `cargo xtask ci` (what CI
//! runs), `cargo xtask fetch-models`, `cargo xtask gpu-bundle` (see --help).

mod models;

use std::process::{Command, ExitCode};

/// The one feature set CI builds (tests and binary share it, so there is one build).
const CI_FEATURES: &str = "wgpu,cuda";

fn cargo(args: &[&str]) -> bool {
    eprintln!("+ cargo {}", args.join(" "));
    Command::new(env!("CARGO"))
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fetches every model of the catalog; `false` if one could not be had.
fn fetch_models() -> bool {
    let entries = match models::catalog() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("fetch-models: {e}");
            return false;
        }
    };
    let mut ok = true;
    for e in &entries {
        if let Err(msg) = models::fetch(e) {
            eprintln!("fetch-models: {}: {msg}", e.key);
            ok = false;
        }
    }
    ok
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn ci() -> bool {
    // the real-model tests need the models: under CI a failed fetch fails the run, elsewhere
    // those tests skip (loudly)
    if !fetch_models() {
        if under_ci() {
            eprintln!("ci: the real models could not be fetched (CI=true): failing");
            return false;
        }
        eprintln!("ci: WARNING: real models missing; their tests will be skipped");
    }
    cargo(&["fmt", "--all", "--", "--check"])
        && cargo(&[
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--features",
            CI_FEATURES,
            "--",
            "-D",
            "warnings",
        ])
        && cargo(&[
            "test",
            "--release",
            "--workspace",
            "--features",
            CI_FEATURES,
        ])
}

/// The release binary with the one feature set tests and binary share.
fn build_binary() -> bool {
    cargo(&[
        "build",
        "--release",
        "--features",
        CI_FEATURES,
        "--bin",
        "hici",
    ])
}

/// `cargo xtask demo [QUESTION]`: fetches SmolLM2 (cached), builds the release binary and
/// streams its chat answer; without pip or network it says so and runs the embedded tiny model.
fn demo(question: Option<String>) -> bool {
    let question = question.unwrap_or_else(|| "What is the capital of France?".into());
    let model = models::catalog().and_then(|c| {
        let e = c
            .iter()
            .find(|e| e.key == "smollm2")
            .ok_or("models/catalog.json has no `smollm2`")?;
        models::fetch(e)
    });
    if !build_binary() {
        return false;
    }
    let bin = models::root().join("target/release/hici");
    let mut cmd = Command::new(&bin);
    match &model {
        Ok(path) => {
            eprintln!("demo: SmolLM2-135M-Instruct, chat: {question}");
            cmd.arg("generate").arg("--model").arg(path).args([
                "--chat",
                "--max-new-tokens",
                "128",
                "--prompt",
                &question,
            ]);
        }
        Err(e) => {
            eprintln!(
                "demo: could not fetch SmolLM2 ({e}); falling back to the embedded tiny model \
                 (random weights: the text is meaningless)"
            );
            cmd.args([
                "generate",
                "--prompt",
                "an individual or Legal Entity",
                "--max-new-tokens",
                "32",
            ]);
        }
    }
    eprintln!("+ {cmd:?}");
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Builds the release binary with cuda + wgpu and gathers what a GPU machine without a Rust
/// toolchain needs into `gpu-bundle/`: the binary, `scripts/gpu-check.sh` and the tiny fixture.
fn gpu_bundle() -> bool {
    if !build_binary() {
        return false;
    }
    let out = std::path::Path::new("gpu-bundle");
    let copy = || -> std::io::Result<()> {
        if out.exists() {
            std::fs::remove_dir_all(out)?;
        }
        std::fs::create_dir_all(out)?;
        std::fs::copy("target/release/hici", out.join("hici"))?;
        std::fs::copy("scripts/gpu-check.sh", out.join("gpu-check.sh"))?;
        copy_dir(
            std::path::Path::new("tests/fixtures/tiny-hici-a"),
            &out.join("tiny-hici-a"),
        )
    };
    match copy() {
        Ok(()) => {
            // symbols are ~15 MB of the ~70 MB binary; smaller bundles travel better
            let bin = out.join("hici");
            match std::process::Command::new("strip").arg(&bin).status() {
                Ok(s) if s.success() => {}
                _ => eprintln!(
                    "gpu-bundle: `strip` failed or is missing; the binary keeps its symbols"
                ),
            }
            let mib = std::fs::metadata(&bin).map(|m| m.len() >> 20).unwrap_or(0);
            eprintln!(
                "gpu-bundle/ ready (binary {mib} MiB): copy it to the GPU machine and run \
                 ./gpu-check.sh"
            );
            true
        }
        Err(e) => {
            eprintln!("gpu-bundle: {e}");
            false
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The cargo-fuzz targets in `fuzz/` (hici-io's readers) and their seed directories.
const FUZZ_TARGETS: [(&str, &[&str]); 4] = [
    (
        "safetensors_reader",
        &["fuzz/seeds/safetensors", "fuzz/seeds/converted"],
    ),
    ("pytorch_reader", &["crates/hici-io/tests/corpus"]),
    (
        "converted_reader",
        &["fuzz/seeds/converted", "fuzz/seeds/safetensors"],
    ),
    ("gguf_reader", &["fuzz/seeds/gguf"]),
];

/// `cargo xtask fuzz [SECONDS]`: every fuzz target for SECONDS (default 60) with cargo-fuzz.
/// libFuzzer and the address sanitizer need nightly: rustup's nightly toolchain when it has
/// one, else this toolchain with RUSTC_BOOTSTRAP=1. New inputs go to `fuzz/corpus/<target>/`,
/// crashes to `fuzz/artifacts/<target>/` (both git-ignored).
fn fuzz(seconds: u64) -> bool {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf();
    let works = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !works("cargo", &["fuzz", "--version"]) {
        eprintln!("cargo-fuzz is not installed: cargo install cargo-fuzz");
        return false;
    }
    let nightly = works("rustup", &["run", "nightly", "rustc", "--version"]);
    let mut ok = true;
    for (target, seeds) in FUZZ_TARGETS {
        let corpus = format!("fuzz/corpus/{target}");
        if let Err(e) = std::fs::create_dir_all(root.join(&corpus)) {
            eprintln!("{corpus}: {e}");
            return false;
        }
        let mut cmd = if nightly {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c
        } else {
            let mut c = Command::new("cargo");
            c.env("RUSTC_BOOTSTRAP", "1");
            c
        };
        // Do not inherit the outer `cargo run`'s toolchain choice.
        for var in [
            "RUSTUP_TOOLCHAIN",
            "RUSTC",
            "RUSTDOC",
            "CARGO",
            "RUSTC_WRAPPER",
        ] {
            cmd.env_remove(var);
        }
        cmd.current_dir(&root)
            .args(["fuzz", "run", target, &corpus])
            .args(seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=4096",
                "-timeout=20",
                "-print_final_stats=1",
            ]);
        eprintln!(
            "+ cargo fuzz run {target} {corpus} {} ({seconds} s{})",
            seeds.join(" "),
            if nightly {
                ", nightly"
            } else {
                ", RUSTC_BOOTSTRAP=1"
            }
        );
        match cmd.status() {
            Ok(s) if s.success() => eprintln!("fuzz {target}: no failure in {seconds} s"),
            _ => {
                eprintln!("fuzz {target}: FAILED (inputs under fuzz/artifacts/{target}/)");
                ok = false;
            }
        }
    }
    ok
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let ok = match task.as_str() {
        "fuzz" => match std::env::args().nth(2).map(|s| s.parse::<u64>()) {
            None => fuzz(60),
            Some(Ok(secs)) => fuzz(secs),
            Some(Err(_)) => {
                eprintln!("usage: cargo xtask fuzz [SECONDS per target, default 60]");
                return ExitCode::from(2);
            }
        },
        "ci" => ci(),
        "demo" => demo(std::env::args().nth(2)),
        "fetch-models" => fetch_models(),
        "gpu-bundle" => gpu_bundle(),
        "test" => cargo(&[
            "test",
            "--release",
            "--workspace",
            "--features",
            CI_FEATURES,
        ]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  demo [QUESTION]  fetch SmolLM2, build, stream a chat \
                 answer (embedded tiny model without network)\n  ci     fetch models, fmt --check, \
                 clippy -D warnings, tests (release profile, features {CI_FEATURES})\n  test   the \
                 tests only\n  fetch-models  the real models of models/catalog.json into \
                 $HICI_MODELS_DIR (default target/models)\n  \
                 fuzz [SECONDS]  cargo-fuzz targets of hici-io's readers, SECONDS each (60)\n  \
                 gpu-bundle  release binary + scripts/gpu-check.sh + fixture in gpu-bundle/"
            );
            return ExitCode::from(2);
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
