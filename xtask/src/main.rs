//! Developer tasks: `cargo xtask ci` (what CI runs), `cargo xtask gpu-bundle` (see --help).

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

fn ci() -> bool {
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

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let ok = match task.as_str() {
        "ci" => ci(),
        "test" => cargo(&[
            "test",
            "--release",
            "--workspace",
            "--features",
            CI_FEATURES,
        ]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  ci     fmt --check, clippy -D warnings, tests \
                 (release profile, features {CI_FEATURES})\n  test   the tests only"
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
