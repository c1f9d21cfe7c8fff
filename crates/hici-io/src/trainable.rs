//! HiCI's `trainable_params.bin`: f32 overrides for the embedding and norms plus all HiCI
//! module tensors, with plain `LlamaForCausalLM` names (no `base_model.model.` prefix).

use crate::catalog::{Catalog, MetaMap};
use crate::error::IoError;
use hici_model::weights::WeightMap;
use std::path::{Path, PathBuf};
use tracing::info;

/// File names accepted, in lookup order.
const TRAINABLE_FILES: [&str; 2] = ["trainable_params.bin", "trainable_params.safetensors"];

/// Substrings one of which every key must contain (the filter of `get_trainable_weights.py`).
const ALLOWED: [&str; 4] = ["embed", "norm", "local_constructor", "global_integrator"];

/// `dir/trainable_params.bin` or `dir/trainable_params.safetensors`, if present.
pub fn find_trainable_params(dir: &Path) -> Option<PathBuf> {
    TRAINABLE_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Reads a trainable-params file; keys are used as-is.
///
/// A key must start with `model.`, contain one of `embed`, `norm`, `local_constructor`,
/// `global_integrator` and not be a LoRA factor; anything else is an
/// [`IoError::UnexpectedKey`]. NaN/Inf values are rejected.
pub fn read_trainable_params(file: &Path) -> Result<WeightMap, IoError> {
    let mut catalog = Catalog::default();
    let metas = index_trainable_params(file, &mut catalog)?;
    catalog.read_all(&metas)
}

/// Whether `key` may appear in a trainable-params file.
pub(crate) fn is_trainable_key(key: &str) -> bool {
    key.starts_with("model.") && ALLOWED.iter().any(|s| key.contains(s)) && !key.contains("lora_")
}

/// Indexes a trainable-params file with the name checks of [`read_trainable_params`].
pub(crate) fn index_trainable_params(
    file: &Path,
    catalog: &mut Catalog,
) -> Result<MetaMap, IoError> {
    let id = catalog.open(file)?;
    let mut out = MetaMap::new();
    for (key, t) in catalog.metas(id) {
        if !is_trainable_key(key) {
            return Err(IoError::unexpected(key, file));
        }
        out.insert(key.to_string(), t);
    }
    let params: usize = out.values().map(|t| t.numel()).sum();
    info!(
        "trainable params {}: {} tensors, {} parameters",
        file.display(),
        out.len(),
        params
    );
    Ok(out)
}
