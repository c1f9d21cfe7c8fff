//! Embeds build facts for `hici bench`: the git commit (`HICI_GIT_COMMIT`, "unknown" without
//! git) and the locked burn version (`HICI_BURN_VERSION`, from the workspace Cargo.lock).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The version of `name` in a Cargo.lock text.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == format!("name = \"{name}\"") {
            let v = lines.next()?.trim();
            return v
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_string);
        }
    }
    None
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());

    // Rebuild when HEAD moves: watch HEAD and the branch ref it points to.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = Path::new(&dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let p = dir.join(&r);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            } else {
                println!(
                    "cargo:rerun-if-changed={}",
                    dir.join("packed-refs").display()
                );
            }
        }
    }
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HICI_GIT_COMMIT={commit}");

    let lock = manifest.join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let burn = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|t| locked_version(&t, "burn"))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HICI_BURN_VERSION={burn}");
    println!("cargo:rerun-if-changed=build.rs");
}
