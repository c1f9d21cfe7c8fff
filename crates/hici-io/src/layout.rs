//! The tensors a configuration implies and their parameter counts (spec §2.2, §2.3, §8),
//! computed from the configuration so that they hold for any size, not only 7B.

use crate::checkpoint::ParamCounts;
use hici_model::config::{HiciConfig, LlamaConfig, ModelConfig};
use std::collections::BTreeMap;

/// The spec's counts for Llama-2-7B + the released HiCI adapter: base as in the HF files
/// (vocab 32000, §1.1), LoRA on all 12 projections per layer (§2.2), HiCI modules (§2.3), and
/// the `trainable_params` overrides (embedding with 32001 rows + 65 norms, §2.3).
pub const SPEC_7B_COUNTS: ParamCounts = ParamCounts {
    base: 6_738_415_616,
    lora: 14_155_776,
    hici: 389_128_224,
    overrides: 131_076_096 + 266_240,
};

/// Whether `llama` (as in the base `config.json`) and `hici` are the Llama-2-7B / released
/// HiCI shapes the spec's numbers are for.
pub fn is_llama2_7b(llama: &LlamaConfig, hici: Option<&HiciConfig>) -> bool {
    llama.hidden_size == 4096
        && llama.num_hidden_layers == 32
        && llama.num_attention_heads == 32
        && llama.kv_heads() == 32
        && llama.intermediate_size == 11008
        && !llama.tie_word_embeddings
        && hici.is_none_or(|h| {
            (
                h.local_slots,
                h.global_slots,
                h.bottleneck_dim,
                h.compress_dim,
                h.shared_compress_dim,
            ) == (8, 4, 512, 512, 128)
        })
}

fn shapes(v: Vec<hici_model::layout::TensorSpec>) -> BTreeMap<String, Vec<usize>> {
    v.into_iter().map(|t| (t.name, t.shape)).collect()
}

/// Plain Llama tensors and their shapes under `llama` (its `vocab_size` for embedding and
/// `lm_head`).
pub fn base_tensors(llama: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    shapes(hici_model::layout::base_tensors(llama))
}

/// HiCI module tensors of every layer.
pub fn hici_tensors(llama: &LlamaConfig, hici: &HiciConfig) -> BTreeMap<String, Vec<usize>> {
    shapes(hici_model::layout::hici_tensors(llama, hici))
}

/// LoRA factors of rank `r` on every projection (12 per layer with HiCI, spec §2.2).
pub fn lora_tensors(
    llama: &LlamaConfig,
    hici: Option<&HiciConfig>,
    r: usize,
) -> BTreeMap<String, Vec<usize>> {
    shapes(hici_model::layout::lora_tensors(llama, hici, r))
}

/// Per-layer HiCI parameters, spec §8:
/// `M·H + 4·Bd·H + Sd·H + 2Sd + [Cd·Sd + 2Cd] + K·Cd + 4Cd² + Cd·H + 1`.
pub fn hici_params_per_layer(h: usize, c: &HiciConfig) -> usize {
    let (m, k, bd, cd, sd) = (
        c.local_slots,
        c.global_slots,
        c.bottleneck_dim,
        c.compress_dim,
        c.shared_compress_dim,
    );
    let stat_expand = if c.has_stat_expand() {
        cd * sd + 2 * cd
    } else {
        0
    };
    m * h + 4 * bd * h + sd * h + 2 * sd + stat_expand + k * cd + 4 * cd * cd + cd * h + 1
}

/// Expected parameter counts by group, from the configuration alone:
/// `base_llama` as in the base `config.json` (before any vocabulary resize), `embed_rows` the
/// rows of the overriding embedding (`None`: no `trainable_params`), `lora_r` the adapter rank
/// (`None`: no LoRA; LoRA on all projections, HiCI ones included when `hici` is given).
pub fn expected_counts(
    base_llama: &LlamaConfig,
    hici: Option<&HiciConfig>,
    embed_rows: Option<usize>,
    lora_r: Option<usize>,
) -> ParamCounts {
    let h = base_llama.hidden_size;
    let layers = base_llama.num_hidden_layers;
    let base = base_tensors(base_llama)
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let hici_count = hici.map_or(0, |c| layers * hici_params_per_layer(h, c));
    let lora = lora_r.map_or(0, |r| {
        layers
            * hici_model::layout::lora_targets(base_llama, hici)
                .iter()
                .map(|(_, i, o)| r * (i + o))
                .sum::<usize>()
    });
    let overrides = embed_rows.map_or(0, |v| v * h + (2 * layers + 1) * h);
    ParamCounts {
        base,
        lora,
        hici: hici_count,
        overrides,
    }
}

/// Every tensor of a complete model with `cfg` (final vocabulary), LoRA factors of rank `r`
/// on all projections when `lora_r` is given.
pub fn model_tensors(cfg: &ModelConfig, lora_r: Option<usize>) -> BTreeMap<String, Vec<usize>> {
    shapes(hici_model::layout::model_tensors(cfg, lora_r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_7b() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                "max_position_embeddings": 4096}"#,
        )
        .expect("valid config")
    }

    /// The general formulas reproduce every number of spec §1.1, §2.2 and §2.3.
    #[test]
    fn formulas_give_the_spec_numbers_for_7b() {
        let llama = llama_7b();
        let hici = HiciConfig::llama2_7b();
        assert!(is_llama2_7b(&llama, Some(&hici)));
        assert_eq!(hici_params_per_layer(4096, &hici), 12_160_257);
        let c = expected_counts(&llama, Some(&hici), Some(32001), Some(8));
        assert_eq!(c, SPEC_7B_COUNTS);
        // LoRA split of §2.2: main 8,388,608; LC 4,718,592; GI 1,048,576; 768 tensors.
        let lora = lora_tensors(&llama, Some(&hici), 8);
        assert_eq!(lora.len(), 768);
        let sum = |pat: &str| -> usize {
            lora.iter()
                .filter(|(k, _)| k.contains(pat))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        assert_eq!(sum("local_constructor"), 4_718_592);
        assert_eq!(sum("global_integrator"), 1_048_576);
        // trainable_params: 18 HiCI + 2 norm tensors per layer, embedding, final norm = 642.
        let hici_keys = hici_tensors(&llama, &hici);
        assert_eq!(hici_keys.len() + 2 * 32 + 2, 642);
        assert_eq!(
            hici_keys
                .values()
                .map(|s| s.iter().product::<usize>())
                .sum::<usize>(),
            389_128_224
        );
    }

    #[test]
    fn no_stat_expand_when_sd_equals_cd() {
        let mut c = HiciConfig::llama2_7b();
        c.shared_compress_dim = 512;
        let with = hici_params_per_layer(4096, &HiciConfig::llama2_7b());
        let without = hici_params_per_layer(4096, &c);
        // Sd·H and 2Sd grow, the stat_expand terms vanish.
        assert_eq!(
            without,
            with - (512 * 128 + 2 * 512) + (512 - 128) * 4096 + 2 * (512 - 128)
        );
    }
}
