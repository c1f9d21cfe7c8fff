//! The one description of the tensors a configuration implies: names (Hugging Face / PEFT
//! layout of [`crate::weights`]), shapes and what each tensor is. The checkpoint loaders and
//! validation (hici-io), the parameter counts, the GGUF mapping and the synthetic weights
//! ([`crate::synthetic`]) all walk these lists; the model builder takes exactly these tensors
//! (tested in `synthetic`).

use crate::config::{HiciConfig, LlamaConfig, ModelConfig};

/// What a tensor is (decides how synthetic weights fill it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Token embedding `[V, H]`.
    Embedding,
    /// A `Linear` weight `[out, in]`.
    Linear { fan_in: usize },
    /// A norm's gain (RMSNorm / LayerNorm weight).
    NormGain,
    /// A LayerNorm's bias.
    NormBias,
    /// Learned slots / queries (`memory_slots`, `global_queries`).
    Slots,
    /// A 0-dim scalar (`expand_scale_param`).
    Scalar,
    /// A LoRA factor (`lora_A` `[r, in]`, `lora_B` `[out, r]`).
    Lora,
}

/// Which part of the model a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// Plain Llama.
    Base,
    /// HiCI modules (`local_constructor`, `global_integrator`).
    Hici,
    /// LoRA factors.
    Lora,
}

/// One tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
    pub part: Part,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>, kind: TensorKind, part: Part) -> Self {
        Self {
            name,
            shape,
            kind,
            part,
        }
    }

    fn linear(name: String, out: usize, fan_in: usize, part: Part) -> Self {
        Self::new(name, vec![out, fan_in], TensorKind::Linear { fan_in }, part)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The projections of a decoder layer's attention and MLP: `(module, out, in)`.
fn base_projections(l: &LlamaConfig) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (l.hidden_size, l.intermediate_size);
    let (q, kv) = (
        l.num_attention_heads * l.head_dim(),
        l.kv_heads() * l.head_dim(),
    );
    [
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]
}

/// Plain Llama tensors: embedding, per layer two RMSNorms and seven projections, final norm,
/// `lm_head` unless the embeddings are tied.
pub fn base_tensors(l: &LlamaConfig) -> Vec<TensorSpec> {
    let (h, v) = (l.hidden_size, l.vocab_size);
    let mut out = vec![TensorSpec::new(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        TensorKind::Embedding,
        Part::Base,
    )];
    for li in 0..l.num_hidden_layers {
        let p = format!("model.layers.{li}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            out.push(TensorSpec::new(
                format!("{p}.{n}.weight"),
                vec![h],
                TensorKind::NormGain,
                Part::Base,
            ));
        }
        for (m, o, i) in base_projections(l) {
            out.push(TensorSpec::linear(
                format!("{p}.{m}.weight"),
                o,
                i,
                Part::Base,
            ));
        }
    }
    out.push(TensorSpec::new(
        "model.norm.weight".into(),
        vec![h],
        TensorKind::NormGain,
        Part::Base,
    ));
    if !l.tie_word_embeddings {
        out.push(TensorSpec::linear(
            "lm_head.weight".into(),
            v,
            h,
            Part::Base,
        ));
    }
    out
}

/// The HiCI tensors of layer `layer` (spec §2.3): LocalConstructor slots and projections,
/// GlobalIntegrator shared compressor, optional `stat_expand` (iff `Sd < Cd`), queries,
/// projections, `expand` and the 0-dim `expand_scale_param`.
pub fn hici_layer_tensors(layer: usize, h: usize, c: &HiciConfig) -> Vec<TensorSpec> {
    let (m, k, bd, cd, sd) = (
        c.local_slots,
        c.global_slots,
        c.bottleneck_dim,
        c.compress_dim,
        c.shared_compress_dim,
    );
    let lc = format!("model.layers.{layer}.self_attn.local_constructor");
    let gi = format!("model.layers.{layer}.self_attn.global_integrator");
    let part = Part::Hici;
    let lin = |name: String, o: usize, i: usize| TensorSpec::linear(name, o, i, part);
    let gain = |name: String, n: usize| TensorSpec::new(name, vec![n], TensorKind::NormGain, part);
    let bias = |name: String, n: usize| TensorSpec::new(name, vec![n], TensorKind::NormBias, part);
    let mut v = vec![TensorSpec::new(
        format!("{lc}.memory_slots"),
        vec![m, h],
        TensorKind::Slots,
        part,
    )];
    for p in ["q", "k", "v"] {
        v.push(lin(format!("{lc}.{p}_proj.weight"), bd, h));
    }
    v.push(lin(format!("{lc}.o_proj.weight"), h, bd));
    v.push(lin(format!("{gi}.shared_compressor.0.weight"), sd, h));
    v.push(gain(format!("{gi}.shared_compressor.1.weight"), sd));
    v.push(bias(format!("{gi}.shared_compressor.1.bias"), sd));
    if c.has_stat_expand() {
        v.push(lin(format!("{gi}.stat_expand.0.weight"), cd, sd));
        v.push(gain(format!("{gi}.stat_expand.1.weight"), cd));
        v.push(bias(format!("{gi}.stat_expand.1.bias"), cd));
    }
    v.push(TensorSpec::new(
        format!("{gi}.global_queries"),
        vec![k, cd],
        TensorKind::Slots,
        part,
    ));
    for p in ["q", "k", "v", "o"] {
        v.push(lin(format!("{gi}.{p}_proj.weight"), cd, cd));
    }
    v.push(lin(format!("{gi}.expand.weight"), h, cd));
    v.push(TensorSpec::new(
        format!("{gi}.expand_scale_param"),
        vec![],
        TensorKind::Scalar,
        part,
    ));
    v
}

/// HiCI tensors of every layer.
pub fn hici_tensors(l: &LlamaConfig, c: &HiciConfig) -> Vec<TensorSpec> {
    (0..l.num_hidden_layers)
        .flat_map(|li| hici_layer_tensors(li, l.hidden_size, c))
        .collect()
}

/// `(module, in, out)` of each LoRA-able projection of one layer (spec §2.2): the four
/// attention projections and, with `hici`, the LocalConstructor's and GlobalIntegrator's.
pub fn lora_targets(l: &LlamaConfig, hici: Option<&HiciConfig>) -> Vec<(String, usize, usize)> {
    let mut v: Vec<(String, usize, usize)> = base_projections(l)[..4]
        .iter()
        .map(|&(m, o, i)| (m.to_string(), i, o))
        .collect();
    if let Some(c) = hici {
        let (h, bd, cd) = (l.hidden_size, c.bottleneck_dim, c.compress_dim);
        for p in ["q", "k", "v"] {
            v.push((format!("self_attn.local_constructor.{p}_proj"), h, bd));
        }
        v.push(("self_attn.local_constructor.o_proj".into(), bd, h));
        for p in ["q", "k", "v", "o"] {
            v.push((format!("self_attn.global_integrator.{p}_proj"), cd, cd));
        }
    }
    v
}

/// LoRA factors of rank `r` on every target of [`lora_targets`].
pub fn lora_tensors(l: &LlamaConfig, hici: Option<&HiciConfig>, r: usize) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for li in 0..l.num_hidden_layers {
        for (m, i, o) in lora_targets(l, hici) {
            let p = format!("model.layers.{li}.{m}");
            out.push(TensorSpec::new(
                format!("{p}.lora_A.weight"),
                vec![r, i],
                TensorKind::Lora,
                Part::Lora,
            ));
            out.push(TensorSpec::new(
                format!("{p}.lora_B.weight"),
                vec![o, r],
                TensorKind::Lora,
                Part::Lora,
            ));
        }
    }
    out
}

/// Every tensor of a complete model with `cfg`, LoRA factors of rank `r` when `lora_r` is
/// given.
pub fn model_tensors(cfg: &ModelConfig, lora_r: Option<usize>) -> Vec<TensorSpec> {
    let mut out = base_tensors(&cfg.llama);
    if let Some(h) = &cfg.hici {
        out.extend(hici_tensors(&cfg.llama, h));
    }
    if let Some(r) = lora_r {
        out.extend(lora_tensors(&cfg.llama, cfg.hici.as_ref(), r));
    }
    out
}
