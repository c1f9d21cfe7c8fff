//! The embedded default model: the tiny random-weight HiCI fixture shipped in the repo, so every
//! command works on a fresh machine without a download. Written once to a per-version cache
//! directory and loaded through the normal directory reader.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

macro_rules! fixture_file {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!("../../../tests/fixtures/tiny-hici-a/", $rel)).as_slice(),
        )
    };
}

const FILES: &[(&str, &[u8])] = &[
    fixture_file!("base/config.json"),
    fixture_file!("base/generation_config.json"),
    fixture_file!("base/model.safetensors.index.json"),
    fixture_file!("base/model-00001-of-00003.safetensors"),
    fixture_file!("base/model-00002-of-00003.safetensors"),
    fixture_file!("base/model-00003-of-00003.safetensors"),
    fixture_file!("adapter/adapter_config.json"),
    fixture_file!("adapter/adapter_model.bin"),
    fixture_file!("adapter/trainable_params.bin"),
    fixture_file!("adapter/tokenizer.json"),
    fixture_file!("adapter/tokenizer_config.json"),
    fixture_file!("adapter/special_tokens_map.json"),
];

/// HiCI heads the embedded fixture was made with.
pub const EMBEDDED_HICI_HEADS: usize = 4;

/// Materialises the embedded model and returns `(base_dir, adapter_dir)`.
pub fn materialise() -> Result<(PathBuf, PathBuf)> {
    let root = std::env::temp_dir().join(format!(
        "hici-embedded-tiny-hici-a-{}",
        env!("CARGO_PKG_VERSION")
    ));
    for (rel, bytes) in FILES {
        let path = root.join(rel);
        if path.metadata().map(|m| m.len() as usize).ok() == Some(bytes.len()) {
            continue;
        }
        write_atomic(&path, bytes)
            .with_context(|| format!("writing the embedded model to {}", path.display()))?;
    }
    Ok((root.join("base"), root.join("adapter")))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
