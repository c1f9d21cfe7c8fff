//! Hugging Face Llama base directories: `config.json` plus weights as a single file or shards.
//!
//! Weight files are looked up in this order: `model.safetensors.index.json`,
//! `model.safetensors`, `pytorch_model.bin.index.json`, `pytorch_model.bin`. With an index,
//! each shard it lists is read once and the index's `weight_map` must describe exactly the
//! tensors the shards hold. Non-parameter `*.rotary_emb.inv_freq` buffers are skipped.

use crate::catalog::{Catalog, MetaMap};
use crate::error::IoError;
use hici_model::config::LlamaConfig;
use hici_model::weights::WeightMap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use tracing::info;

/// Weight files of a base directory, in lookup order: (file name, is an index).
const WEIGHT_FILES: [(&str, bool); 4] = [
    ("model.safetensors.index.json", true),
    ("model.safetensors", false),
    ("pytorch_model.bin.index.json", true),
    ("pytorch_model.bin", false),
];

/// A base directory as indexed (no tensor data read yet).
#[derive(Debug)]
pub(crate) struct BaseDir {
    pub config: LlamaConfig,
    /// Every tensor of the weight files but the ignored buffers.
    pub tensors: MetaMap,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
    /// Skipped non-parameter buffers: (name, file).
    pub ignored: Vec<(String, PathBuf)>,
}

/// Non-parameter buffers some HF `.bin` saves contain; they are recomputed, never loaded.
pub(crate) fn is_ignored_buffer(key: &str) -> bool {
    key.ends_with(".rotary_emb.inv_freq")
}

/// Checks that `path` is an existing directory.
pub(crate) fn require_dir(path: &Path) -> Result<(), IoError> {
    let meta = std::fs::metadata(path).map_err(|e| IoError::from_io(path, e))?;
    if !meta.is_dir() {
        return Err(IoError::NotADirectory(path.to_path_buf()));
    }
    Ok(())
}

/// Reads a JSON file into a `serde_json::Value`.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, IoError> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::from_io(path, e))?;
    serde_json::from_str(&text).map_err(|e| IoError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads `dir/config.json` (required) and the base weights, as f32 in PyTorch layout.
///
/// Tensor shapes are checked against the config, unknown tensors are errors (HiCI
/// `local_constructor` / `global_integrator` tensors are accepted, for already-merged
/// checkpoints), and NaN/Inf values are rejected.
pub fn read_base_dir(dir: &Path) -> Result<(LlamaConfig, WeightMap), IoError> {
    let mut catalog = Catalog::default();
    let base = index_base(dir, &mut catalog)?;
    let weights = catalog.read_all(&base.tensors)?;
    Ok((base.config, weights))
}

/// Indexes a base directory and checks names and shapes against its config.
pub(crate) fn index_base(dir: &Path, catalog: &mut Catalog) -> Result<BaseDir, IoError> {
    let base = index_base_files(dir, catalog)?;
    check_base_shapes(dir, &base)?;
    let params: usize = base.tensors.values().map(|t| t.numel()).sum();
    info!(
        "base {}: {} tensors, {} parameters in {} weight file(s)",
        dir.display(),
        base.tensors.len(),
        params,
        base.files.len() - 1
    );
    Ok(base)
}

/// Reads `config.json` and indexes the weight files (single or sharded; the index must match
/// the shards), without checking tensor names or shapes against the config.
pub(crate) fn index_base_files(dir: &Path, catalog: &mut Catalog) -> Result<BaseDir, IoError> {
    require_dir(dir)?;
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(IoError::MissingConfig(dir.to_path_buf()));
    }
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| IoError::from_io(&config_path, e))?;
    let config = LlamaConfig::from_json(&text).map_err(|e| IoError::Json {
        path: config_path.clone(),
        msg: e.to_string(),
    })?;
    let mut base = BaseDir {
        config,
        tensors: MetaMap::new(),
        files: vec![config_path],
        ignored: Vec::new(),
    };

    let Some((name, is_index)) = WEIGHT_FILES
        .iter()
        .copied()
        .find(|(name, _)| dir.join(name).is_file())
    else {
        return Err(IoError::MissingWeights {
            dir: dir.to_path_buf(),
            expected: WEIGHT_FILES.map(|(n, _)| n).join(", "),
        });
    };
    if is_index {
        index_sharded(dir, &dir.join(name), &mut base, catalog)?;
    } else {
        let file = dir.join(name);
        add_file(&file, &mut base, catalog, |_| Ok(()))?;
    }
    Ok(base)
}

/// Indexes one weight file into `base`, calling `accept(key)` on every kept tensor first.
fn add_file(
    file: &Path,
    base: &mut BaseDir,
    catalog: &mut Catalog,
    accept: impl Fn(&str) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let id = catalog.open(file)?;
    let mut skipped = 0usize;
    let mut count = 0usize;
    for (key, meta) in catalog.metas(id) {
        count += 1;
        if is_ignored_buffer(key) {
            skipped += 1;
            base.ignored.push((key.to_string(), file.to_path_buf()));
            continue;
        }
        accept(key)?;
        if base.tensors.contains_key(key) {
            // The same tensor in two shards.
            return Err(IoError::unexpected(key, file));
        }
        base.tensors.insert(key.to_string(), meta);
    }
    info!(
        "indexed {} tensors in {}{}",
        count - skipped,
        file.display(),
        if skipped > 0 {
            format!(" (skipping {skipped} rotary_emb.inv_freq buffers)")
        } else {
            String::new()
        }
    );
    base.files.push(file.to_path_buf());
    Ok(())
}

/// Indexes the shards listed by an HF index file and checks the index against their contents.
fn index_sharded(
    dir: &Path,
    index_path: &Path,
    base: &mut BaseDir,
    catalog: &mut Catalog,
) -> Result<(), IoError> {
    let bad = |msg: String| IoError::Json {
        path: index_path.to_path_buf(),
        msg,
    };
    let index = read_json(index_path)?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut weight_map = BTreeMap::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map[\"{key}\"]` is not a string")))?;
        let mut parts = Path::new(file).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(bad(format!(
                "shard `{file}` of `{key}` is not a plain file name inside the directory"
            )));
        }
        weight_map.insert(key.clone(), file.to_string());
    }
    base.files.push(index_path.to_path_buf());

    let shards: BTreeSet<&String> = weight_map.values().collect();
    for shard in shards {
        let file = dir.join(shard);
        add_file(&file, base, catalog, |key| match weight_map.get(key) {
            Some(listed) if listed == shard => Ok(()),
            _ => Err(IoError::unexpected(key, &file)),
        })?;
    }
    for (key, shard) in &weight_map {
        if !is_ignored_buffer(key) && !base.tensors.contains_key(key) {
            return Err(IoError::missing(key, &dir.join(shard)));
        }
    }
    Ok(())
}

/// Is `key` a HiCI module tensor (`local_constructor` / `global_integrator`)?
pub(crate) fn is_hici_key(key: &str) -> bool {
    key.contains(".local_constructor.") || key.contains(".global_integrator.")
}

/// The shape every base Llama tensor must have under `cfg`, or `None` for an unknown name
/// (from [`hici_model::layout::base_tensors`]). `lm_head.weight` has a shape even when the
/// embeddings are tied (some tied checkpoints still carry a copy).
pub(crate) fn expected_base_shape(cfg: &LlamaConfig, key: &str) -> Option<Vec<usize>> {
    if key == "lm_head.weight" {
        return Some(vec![cfg.vocab_size, cfg.hidden_size]);
    }
    hici_model::layout::base_tensors(cfg)
        .into_iter()
        .find(|t| t.name == key)
        .map(|t| t.shape)
}

/// Splits `"{i}.{rest}"` into the layer index and the rest (canonical decimal only).
pub(crate) fn parse_layer(s: &str) -> Option<(usize, &str)> {
    let (layer, name) = s.split_once('.')?;
    let i: usize = layer.parse().ok()?;
    (i.to_string() == layer).then_some((i, name))
}

/// Every tensor name a plain Llama base must have under `cfg`.
pub(crate) fn required_base_keys(cfg: &LlamaConfig) -> Vec<String> {
    hici_model::layout::base_tensors(cfg)
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// Checks names and shapes of the base tensors against the config.
fn check_base_shapes(dir: &Path, base: &BaseDir) -> Result<(), IoError> {
    for (key, t) in &base.tensors {
        if is_hici_key(key) {
            continue; // checked with the HiCI configuration in `checkpoint`
        }
        let expected = expected_base_shape(&base.config, key)
            .ok_or_else(|| IoError::unexpected(key, &t.file))?;
        if t.shape != expected {
            return Err(IoError::shape(key, &t.file, &expected, &t.shape));
        }
    }
    for key in required_base_keys(&base.config) {
        if !base.tensors.contains_key(&key) {
            return Err(IoError::missing(&key, dir));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                "max_position_embeddings": 64}"#,
        )
        .expect("valid config")
    }

    #[test]
    fn base_shapes() {
        let c = cfg();
        assert_eq!(
            expected_base_shape(&c, "model.layers.1.self_attn.k_proj.weight"),
            Some(vec![32, 64])
        );
        assert_eq!(
            expected_base_shape(&c, "model.layers.1.mlp.down_proj.weight"),
            Some(vec![64, 172])
        );
        assert_eq!(
            expected_base_shape(&c, "model.layers.2.mlp.down_proj.weight"),
            None
        );
        assert_eq!(
            expected_base_shape(&c, "model.layers.01.mlp.down_proj.weight"),
            None
        );
        assert_eq!(expected_base_shape(&c, "model.layers.0.mlp.bias"), None);
        assert_eq!(required_base_keys(&c).len(), 3 + 2 * 9);
        // tied embeddings: no lm_head required (a copy is still accepted)
        let tied = LlamaConfig {
            tie_word_embeddings: true,
            ..c.clone()
        };
        assert_eq!(required_base_keys(&tied).len(), 2 + 2 * 9);
        assert!(!required_base_keys(&tied).contains(&"lm_head.weight".to_string()));
        assert_eq!(
            expected_base_shape(&tied, "lm_head.weight"),
            Some(vec![512, 64])
        );
    }
}
