//! Model configuration: the Llama-2 part (read from HF `config.json`) and the HiCI part.

use crate::error::ModelError;
use serde::{Deserialize, Serialize};

/// `rope_scaling` entry of an HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Only `"linear"` (position interpolation) is supported.
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    pub factor: f64,
}

fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_bos() -> Option<u32> {
    Some(1)
}
fn default_eos() -> Option<u32> {
    Some(2)
}

/// The subset of a Hugging Face Llama `config.json` the model needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA) when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_eos")]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

impl LlamaConfig {
    /// Parses an HF `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// KV heads (`num_key_value_heads`, or the query heads when absent).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension `hidden / heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act `{act}` is not supported (only silu)"));
            }
        }
        if self.attention_bias {
            return bad("attention_bias = true is not supported (Llama-2 has none)".into());
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.kind != "linear" {
                return bad(format!(
                    "rope_scaling type `{}` is not supported (only linear)",
                    rs.kind
                ));
            }
            if !(rs.factor.is_finite() && rs.factor > 0.0) {
                return bad(format!("rope_scaling factor {} must be > 0", rs.factor));
            }
        }
        Ok(())
    }
}

/// Hyper-parameters of the HiCI plug-in (per attention layer).
///
/// Everything but the head counts can be read from tensor shapes; `lc_heads`/`gi_heads` cannot
/// (spec §9.2) and default to 8 for the released checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiciConfig {
    /// `M`: local slots per segment (`memory_slots` rows).
    pub local_slots: usize,
    /// `K`: global slots (`global_queries` rows).
    pub global_slots: usize,
    /// `hc`: LocalConstructor heads.
    pub lc_heads: usize,
    /// `hg`: GlobalIntegrator heads (the reference registration uses `hc`).
    pub gi_heads: usize,
    /// `Bd`: LocalConstructor bottleneck dimension.
    pub bottleneck_dim: usize,
    /// `Cd`: GlobalIntegrator compress dimension (`global_queries` columns).
    pub compress_dim: usize,
    /// `Sd`: shared compressor dimension. `stat_expand` exists iff `Sd < Cd`.
    pub shared_compress_dim: usize,
}

impl HiciConfig {
    /// The released Llama-2-7B setting: M=8, K=4, hc=hg=8, Bd=Cd=512, Sd=128.
    pub fn llama2_7b() -> Self {
        Self {
            local_slots: 8,
            global_slots: 4,
            lc_heads: 8,
            gi_heads: 8,
            bottleneck_dim: 512,
            compress_dim: 512,
            shared_compress_dim: 128,
        }
    }

    /// Whether the GI has a `stat_expand` (Linear Sd->Cd + LayerNorm) stage.
    pub fn has_stat_expand(&self) -> bool {
        self.shared_compress_dim < self.compress_dim
    }

    /// Prefix length `K + M` each segment's tokens see.
    pub fn prefix_len(&self) -> usize {
        self.global_slots + self.local_slots
    }

    /// Checks divisibility and non-zero sizes.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.local_slots == 0 || self.global_slots == 0 {
            return bad("HiCI local_slots and global_slots must be > 0".into());
        }
        if self.lc_heads == 0 || !self.bottleneck_dim.is_multiple_of(self.lc_heads) {
            return bad(format!(
                "HiCI bottleneck dim {} is not divisible by the LocalConstructor heads {}",
                self.bottleneck_dim, self.lc_heads
            ));
        }
        if self.gi_heads == 0 || !self.compress_dim.is_multiple_of(self.gi_heads) {
            return bad(format!(
                "HiCI compress dim {} is not divisible by the GlobalIntegrator heads {}",
                self.compress_dim, self.gi_heads
            ));
        }
        if self.shared_compress_dim == 0 {
            return bad("HiCI shared_compress_dim must be > 0".into());
        }
        if self.shared_compress_dim > self.compress_dim {
            return bad(format!(
                "HiCI shared_compress_dim {} > compress dim {}: without stat_expand Cd equals Sd",
                self.shared_compress_dim, self.compress_dim
            ));
        }
        Ok(())
    }
}

/// LoRA hyper-parameters (PEFT `r`, `lora_alpha`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
}

impl LoraConfig {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// How LoRA deltas are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoraMode {
    /// `W' = W + alpha/r * B A` once at load time (fastest).
    #[default]
    Merged,
    /// `y = x W^T + alpha/r * (x A^T) B^T` at run time.
    Unmerged,
}

/// Everything needed to build a [`crate::HiciLlama`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub llama: LlamaConfig,
    /// `None` builds a plain Llama-2 (only Mode F is then available).
    pub hici: Option<HiciConfig>,
    /// Linear RoPE interpolation factor `s` actually used (see spec §1.3 for the precedence).
    pub rope_factor: f64,
}

impl ModelConfig {
    /// The context the configuration supports (tokens): `max_position_embeddings` x the
    /// linear RoPE factor.
    pub fn context(&self) -> usize {
        (self.llama.max_position_embeddings as f64 * self.rope_factor).round() as usize
    }

    /// Validates both parts.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.llama.validate()?;
        if let Some(h) = &self.hici {
            h.validate()?;
        }
        if !(self.rope_factor.is_finite() && self.rope_factor > 0.0) {
            return Err(ModelError::Config(format!(
                "rope factor {} must be > 0",
                self.rope_factor
            )));
        }
        Ok(())
    }
}

/// Linear RoPE factor by the precedence of spec §1.3:
/// explicit override > `config.json` `rope_scaling` > `ceil(context / max_position_embeddings)`.
pub fn resolve_rope_factor(
    override_factor: Option<f64>,
    config: &LlamaConfig,
    intended_context: Option<usize>,
) -> f64 {
    if let Some(f) = override_factor {
        return f;
    }
    if let Some(rs) = &config.rope_scaling {
        return rs.factor;
    }
    match intended_context {
        Some(ctx) if ctx > config.max_position_embeddings => {
            ctx.div_ceil(config.max_position_embeddings) as f64
        }
        _ => 1.0,
    }
}
