//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.{safetensors,bin}`.
//!
//! Only plain LoRA as written by PEFT 0.5 is supported (`y = x Wᵀ + α/r · x Aᵀ Bᵀ`); options
//! that change the math (`fan_in_fan_out`, rsLoRA, DoRA, biases, per-module ranks) are refused
//! rather than silently ignored.

use crate::catalog::{Catalog, MetaMap};
use crate::error::IoError;
use crate::hf::{parse_layer, read_json, require_dir};
use hici_model::config::LoraConfig;
use hici_model::weights::WeightMap;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tracing::info;

/// Prefix PEFT puts in front of every adapter key.
const PEFT_PREFIX: &str = "base_model.model.";

/// Adapter weight files, in lookup order (PEFT prefers safetensors).
const ADAPTER_FILES: [&str; 2] = ["adapter_model.safetensors", "adapter_model.bin"];

/// Reads `dir/adapter_config.json` and returns `r` and `lora_alpha`.
///
/// Refuses anything but `peft_type: "LORA"`, `bias: "none"`, `fan_in_fan_out: false`,
/// `use_rslora: false`, `use_dora: false`, empty `rank_pattern`/`alpha_pattern` and no
/// `modules_to_save`, naming the offending option.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, IoError> {
    require_dir(dir)?;
    let path = dir.join("adapter_config.json");
    let json = read_json(&path)?;
    parse_adapter_config(&json).map_err(|msg| IoError::Adapter { path, msg })
}

/// The checks of [`read_adapter_config`] on parsed JSON; the error is a message.
fn parse_adapter_config(json: &Value) -> Result<LoraConfig, String> {
    let obj = json
        .as_object()
        .ok_or_else(|| "adapter_config.json is not a JSON object".to_string())?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());

    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(format!("peft_type `{other}` is not supported (only LORA)")),
        None => return Err("peft_type is missing (expected \"LORA\")".into()),
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| "`r` must be a positive integer".to_string())? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or_else(|| "`lora_alpha` must be a number".to_string())?;

    let flag = |name: &str| field(name).and_then(Value::as_bool).unwrap_or(false);
    if flag("fan_in_fan_out") {
        return Err(
            "fan_in_fan_out = true (GPT-2 style Conv1D weights stored [in, out]) \
                    is not supported: Llama projections are nn.Linear"
                .into(),
        );
    }
    if flag("use_rslora") {
        return Err(
            "use_rslora = true (scale alpha/sqrt(r) instead of alpha/r) is not supported".into(),
        );
    }
    if flag("use_dora") {
        return Err("use_dora = true (weight-decomposed LoRA) is not supported".into());
    }
    match field("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(format!(
                "bias = \"{other}\" is not supported (only \"none\": no trained biases)"
            ))
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if field(pattern)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(format!(
                "a non-empty `{pattern}` (per-module LoRA rank/alpha) is not supported"
            ));
        }
    }
    if field("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty())
    {
        return Err("`modules_to_save` is not supported (fully trained copies of modules)".into());
    }
    Ok(LoraConfig { r, alpha })
}

/// Which factor a LoRA tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoraPart {
    /// `lora_A.weight`, shape `[r, in]`.
    A,
    /// `lora_B.weight`, shape `[out, r]`.
    B,
}

/// Parsed name of a LoRA tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoraKey {
    /// The normalized name, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Name of the adapted module's weight, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub target: String,
    pub layer: usize,
    pub part: LoraPart,
}

/// Normalizes a PEFT key (drops `base_model.model.` and the `.default` adapter-name segment)
/// and checks it names `lora_A`/`lora_B` of a `q|k|v|o_proj` of the main attention,
/// `local_constructor` or `global_integrator`.
pub(crate) fn parse_lora_key(raw: &str) -> Option<LoraKey> {
    let key = raw.strip_prefix(PEFT_PREFIX).unwrap_or(raw);
    let key = key
        .replace(".lora_A.default.weight", ".lora_A.weight")
        .replace(".lora_B.default.weight", ".lora_B.weight");
    let (module, part) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
        (m, LoraPart::A)
    } else {
        (key.strip_suffix(".lora_B.weight")?, LoraPart::B)
    };
    let (layer, rest) = parse_layer(module.strip_prefix("model.layers.")?)?;
    let proj = rest.strip_prefix("self_attn.")?;
    let proj = proj
        .strip_prefix("local_constructor.")
        .or_else(|| proj.strip_prefix("global_integrator."))
        .unwrap_or(proj);
    if !matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
        return None;
    }
    Some(LoraKey {
        target: format!("{module}.weight"),
        name: key.clone(),
        layer,
        part,
    })
}

/// The adapter weight file in `dir`, if any.
pub(crate) fn find_adapter_weights(dir: &Path) -> Option<PathBuf> {
    ADAPTER_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Reads the LoRA tensors of `dir/adapter_model.{safetensors,bin}` under normalized names
/// (`model.layers.0.self_attn.q_proj.lora_A.weight`, ...).
///
/// Every key must be a `lora_A`/`lora_B` weight of a `q|k|v|o_proj` (else
/// [`IoError::UnexpectedKey`]); every `lora_A` must be `[r, in]` and every `lora_B` `[out, r]`
/// for `lora.r` (else [`IoError::Adapter`]); A and B must come in pairs (else
/// [`IoError::MissingKey`]).
pub fn read_adapter_weights(dir: &Path, lora: &LoraConfig) -> Result<WeightMap, IoError> {
    let mut catalog = Catalog::default();
    let (_, metas) = index_adapter(dir, lora, &mut catalog)?;
    catalog.read_all(&metas)
}

/// Indexes the adapter weight file with the checks of [`read_adapter_weights`] (all but the
/// value checks), returning the file and the tensors under normalized names.
pub(crate) fn index_adapter(
    dir: &Path,
    lora: &LoraConfig,
    catalog: &mut Catalog,
) -> Result<(PathBuf, MetaMap), IoError> {
    require_dir(dir)?;
    let file = find_adapter_weights(dir).ok_or_else(|| IoError::MissingWeights {
        dir: dir.to_path_buf(),
        expected: ADAPTER_FILES.join(" or "),
    })?;
    let id = catalog.open(&file)?;
    let mut out = MetaMap::new();
    for (raw, t) in catalog.metas(id) {
        let key = parse_lora_key(raw).ok_or_else(|| IoError::unexpected(raw, &file))?;
        let rank_ok = match (key.part, t.shape.as_slice()) {
            (LoraPart::A, [rows, _]) => *rows == lora.r,
            (LoraPart::B, [_, cols]) => *cols == lora.r,
            _ => false,
        };
        if !rank_ok {
            let expected = match key.part {
                LoraPart::A => "[r, in]",
                LoraPart::B => "[out, r]",
            };
            return Err(IoError::Adapter {
                path: file.clone(),
                msg: format!(
                    "`{raw}` has shape {:?}, but adapter_config.json says r = {} (expected {expected})",
                    t.shape, lora.r
                ),
            });
        }
        if out.insert(key.name.clone(), t).is_some() {
            return Err(IoError::unexpected(raw, &file));
        }
    }
    for name in out.keys() {
        let partner = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            format!("{m}.lora_B.weight")
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            format!("{m}.lora_A.weight")
        } else {
            continue;
        };
        if !out.contains_key(&partner) {
            return Err(IoError::missing(&partner, &file));
        }
    }
    info!(
        "adapter {}: {} LoRA tensors (r = {}, alpha = {})",
        file.display(),
        out.len(),
        lora.r,
        lora.alpha
    );
    Ok((file, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_key_names() {
        let k = parse_lora_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
            .expect("valid key");
        assert_eq!(k.name, "model.layers.3.self_attn.q_proj.lora_A.weight");
        assert_eq!(k.target, "model.layers.3.self_attn.q_proj.weight");
        assert_eq!((k.layer, k.part), (3, LoraPart::A));
        let k = parse_lora_key(
            "base_model.model.model.layers.0.self_attn.global_integrator.o_proj.lora_B.default.weight",
        )
        .expect("valid key");
        assert_eq!(
            k.name,
            "model.layers.0.self_attn.global_integrator.o_proj.lora_B.weight"
        );
        assert_eq!(k.part, LoraPart::B);
        for bad in [
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.global_integrator.expand.lora_A.weight",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_lora_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn adapter_config_rules() {
        let ok = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "bias": "none", "fan_in_fan_out": false, "modules_to_save": null});
        assert_eq!(
            parse_adapter_config(&ok),
            Ok(LoraConfig { r: 8, alpha: 16.0 })
        );
        let with = |k: &str, v: Value| {
            let mut j = ok.clone();
            j[k] = v;
            parse_adapter_config(&j).unwrap_err()
        };
        assert!(with("fan_in_fan_out", true.into()).contains("fan_in_fan_out"));
        assert!(with("use_rslora", true.into()).contains("use_rslora"));
        assert!(with("use_dora", true.into()).contains("use_dora"));
        assert!(with("bias", "all".into()).contains("bias"));
        assert!(with("peft_type", "IA3".into()).contains("IA3"));
        assert!(with("r", 0.into()).contains("`r`"));
        assert!(with("rank_pattern", serde_json::json!({"q_proj": 4})).contains("rank_pattern"));
        assert!(with("modules_to_save", serde_json::json!(["lm_head"])).contains("modules_to_save"));
    }
}
