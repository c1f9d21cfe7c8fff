//! The public entry point: a HiCI checkpoint (HF base dir + optional adapter dir) as one
//! f32 weight map plus the model configuration, following the loading recipe of spec §2.5:
//!
//! 1. base weights (`config.json` + safetensors / `.bin`, single or sharded);
//! 2. `trainable_params.{bin,safetensors}` from the adapter dir replaces the embedding and the
//!    norms and adds every HiCI module tensor;
//! 3. vocabulary resize (spec §2.4): when the embedding has more rows than `lm_head`, the
//!    missing `lm_head` rows are appended, each the f32 mean of the existing rows;
//! 4. the adapter's LoRA factors are added under normalized names
//!    (`model.layers.0.self_attn.q_proj.lora_A.weight`, ...); merging is the model's job;
//! 5. the RoPE factor is resolved (override > `config.json` `rope_scaling` > context-derived).

use crate::error::IoError;
use crate::hf::{is_hici_key, read_base, require_dir};
use crate::peft::{find_adapter_weights, parse_lora_key, read_adapter, read_adapter_config};
use crate::trainable::{find_trainable_params, read_trainable_params};
use hici_model::config::{resolve_rope_factor, HiciConfig, LlamaConfig, LoraConfig, ModelConfig};
use hici_model::weights::{HostTensor, WeightMap};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tracing::info;

/// Context length assumed for the RoPE factor when an adapter with HiCI modules is loaded and
/// neither an override nor `rope_scaling` is given (the released checkpoint's 16K).
pub const DEFAULT_HICI_CONTEXT: usize = 16384;

/// Choices that cannot be read from the files.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// LocalConstructor heads `hc` (not recoverable from weights, spec §9.2). Default 8.
    pub hici_heads: usize,
    /// GlobalIntegrator heads `hg`; `None` = `hici_heads`.
    pub gi_heads: Option<usize>,
    /// Explicit linear RoPE factor; wins over everything else.
    pub rope_factor: Option<f64>,
    /// Intended context length, used for the RoPE factor only when neither `rope_factor` nor
    /// `config.json` `rope_scaling` gives one. `None` = [`DEFAULT_HICI_CONTEXT`] when HiCI
    /// modules are present, else no scaling.
    pub context_size: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            hici_heads: 8,
            gi_heads: None,
            rope_factor: None,
            context_size: None,
        }
    }
}

/// Number of scalar parameters by origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// Plain Llama tensors in the final map (after overrides and vocab resize).
    pub base: usize,
    /// LoRA factors (`lora_A` + `lora_B`).
    pub lora: usize,
    /// HiCI module tensors (`local_constructor` + `global_integrator`).
    pub hici: usize,
    /// Base tensors replaced by `trainable_params` (embedding, norms; counted as in the file).
    pub overrides: usize,
}

/// What was read and done.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
    /// Human-readable notes on decisions taken (vocab resize, RoPE factor source, ...).
    pub notes: Vec<String>,
    pub counts: ParamCounts,
}

/// A checkpoint ready for the model builder.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: ModelConfig,
    /// LoRA hyper-parameters when an adapter with `adapter_config.json` was loaded.
    pub lora: Option<LoraConfig>,
    /// All tensors, f32, PyTorch layout, names without `base_model.model.`.
    pub weights: WeightMap,
    pub report: LoadReport,
}

/// Loads `base` (an HF Llama directory) and, optionally, `adapter` (a directory with
/// `adapter_config.json` + `adapter_model.{safetensors,bin}` and/or
/// `trainable_params.{bin,safetensors}`), checking names, shapes and values throughout.
pub fn load_checkpoint(
    base: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Checkpoint, IoError> {
    let base_dir = read_base(base)?;
    let mut llama = base_dir.config;
    let mut weights = base_dir.weights;
    let mut origin = base_dir.origin;
    let mut report = LoadReport {
        files: base_dir.files,
        ..LoadReport::default()
    };

    // Where missing HiCI tensors would have been expected.
    let mut hici_home = base.to_path_buf();
    let mut lora = None;
    let mut lora_weights = None;
    if let Some(dir) = adapter {
        require_dir(dir)?;
        let trainable = find_trainable_params(dir);
        let has_config = dir.join("adapter_config.json").is_file();
        let adapter_file = find_adapter_weights(dir);
        if !has_config && adapter_file.is_some() {
            return Err(IoError::Adapter {
                path: dir.to_path_buf(),
                msg: "adapter weights without adapter_config.json".into(),
            });
        }
        if !has_config && trainable.is_none() {
            return Err(IoError::Adapter {
                path: dir.to_path_buf(),
                msg: "neither adapter_config.json nor trainable_params.{bin,safetensors} found"
                    .into(),
            });
        }
        if let Some(file) = trainable {
            let overrides = read_trainable_params(&file)?;
            apply_overrides(
                &llama,
                &mut weights,
                &mut origin,
                overrides,
                &file,
                &mut report,
            )?;
            report.files.push(file.clone());
            hici_home = file;
        } else {
            report
                .notes
                .push("adapter has no trainable_params: base embedding and norms kept".into());
            // Where HiCI tensors, if the adapter needs them, should have come from.
            hici_home = dir.join("trainable_params.bin");
        }
        if has_config {
            let cfg = read_adapter_config(dir)?;
            report.files.push(dir.join("adapter_config.json"));
            let (file, map) = read_adapter(dir, &cfg)?;
            report.files.push(file.clone());
            lora = Some(cfg);
            lora_weights = Some((file, map));
        }
    }

    resize_vocab(&mut llama, &mut weights, &origin, &mut report)?;

    let hici = check_hici(&llama, &weights, &origin, &hici_home, opts)?;

    if let Some((file, map)) = lora_weights {
        check_lora(&llama, &weights, &map, &file, &hici_home, &mut report)?;
        report.counts.lora = map.values().map(HostTensor::numel).sum();
        weights.extend(map);
    }

    let context = opts
        .context_size
        .or(hici.as_ref().map(|_| DEFAULT_HICI_CONTEXT));
    let rope_factor = resolve_rope_factor(opts.rope_factor, &llama, context);
    let source = if opts.rope_factor.is_some() {
        "explicit override".to_string()
    } else if llama.rope_scaling.is_some() {
        "config.json rope_scaling".to_string()
    } else {
        match context {
            Some(c) => format!(
                "context {c} / max_position_embeddings {}",
                llama.max_position_embeddings
            ),
            None => "no scaling".to_string(),
        }
    };
    report
        .notes
        .push(format!("RoPE linear factor {rope_factor} ({source})"));

    for (key, t) in &weights {
        if is_hici_key(key) && !key.contains(".lora_") {
            report.counts.hici += t.numel();
        } else if !key.contains(".lora_") {
            report.counts.base += t.numel();
        }
    }

    let config = ModelConfig {
        llama,
        hici,
        rope_factor,
    };
    config.validate()?;
    info!(
        "checkpoint: {} tensors; parameters: base {}, HiCI {}, LoRA {}; {}",
        weights.len(),
        report.counts.base,
        report.counts.hici,
        report.counts.lora,
        report.notes.join("; ")
    );
    Ok(Checkpoint {
        config,
        lora,
        weights,
        report,
    })
}

/// Step 2: `trainable_params` replaces same-named base tensors and adds HiCI tensors.
fn apply_overrides(
    llama: &LlamaConfig,
    weights: &mut WeightMap,
    origin: &mut BTreeMap<String, PathBuf>,
    overrides: WeightMap,
    file: &Path,
    report: &mut LoadReport,
) -> Result<(), IoError> {
    let mut replaced = 0usize;
    for (key, t) in overrides {
        if is_hici_key(&key) {
            // Shapes are checked together with the HiCI configuration.
            if weights.contains_key(&key) {
                replaced += 1;
            }
        } else {
            let base = weights
                .get(&key)
                .ok_or_else(|| IoError::unexpected(&key, file))?;
            let ok = if key == "model.embed_tokens.weight" {
                // May have more rows than the base (vocabulary resize, spec §2.4).
                t.shape.len() == 2 && t.shape[0] >= base.shape[0] && t.shape[1] == llama.hidden_size
            } else {
                t.shape == base.shape
            };
            if !ok {
                return Err(IoError::shape(&key, file, &base.shape, &t.shape));
            }
            report.counts.overrides += t.numel();
            replaced += 1;
        }
        origin.insert(key.clone(), file.to_path_buf());
        weights.insert(key, t);
    }
    report.notes.push(format!(
        "{replaced} base tensors replaced from {}",
        file.display()
    ));
    Ok(())
}

/// Step 3: append `lm_head` rows (mean of the existing rows) up to the embedding's row count.
fn resize_vocab(
    llama: &mut LlamaConfig,
    weights: &mut WeightMap,
    origin: &BTreeMap<String, PathBuf>,
    report: &mut LoadReport,
) -> Result<(), IoError> {
    let embed_key = "model.embed_tokens.weight";
    let embed_rows = weights.get(embed_key).map(|t| t.shape[0]).unwrap_or(0);
    if let Some(head) = weights.get_mut("lm_head.weight") {
        let (rows, cols) = (head.shape[0], head.shape[1]);
        if embed_rows < rows {
            let file = origin.get(embed_key).cloned().unwrap_or_default();
            return Err(IoError::shape(
                embed_key,
                &file,
                &[rows, cols],
                &[embed_rows, cols],
            ));
        }
        if embed_rows > rows {
            let extra = embed_rows - rows;
            let mut mean = vec![0f64; cols];
            for row in head.data.chunks_exact(cols) {
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += f64::from(v);
                }
            }
            let mean: Vec<f32> = mean.iter().map(|m| (m / rows as f64) as f32).collect();
            for _ in 0..extra {
                head.data.extend_from_slice(&mean);
            }
            head.shape[0] = embed_rows;
            report.notes.push(format!(
                "appended {extra} lm_head row(s) (mean of {rows} rows) for vocab resize {rows} -> {embed_rows}"
            ));
        }
    }
    if embed_rows != llama.vocab_size {
        report.notes.push(format!(
            "vocab_size {} -> {embed_rows} (embedding rows)",
            llama.vocab_size
        ));
        llama.vocab_size = embed_rows;
    }
    Ok(())
}

/// Expected HiCI tensor shapes of one layer.
fn hici_layer_shapes(layer: usize, h: usize, c: &HiciConfig) -> Vec<(String, Vec<usize>)> {
    let (m, k, bd, cd, sd) = (
        c.local_slots,
        c.global_slots,
        c.bottleneck_dim,
        c.compress_dim,
        c.shared_compress_dim,
    );
    let lc = format!("model.layers.{layer}.self_attn.local_constructor.");
    let gi = format!("model.layers.{layer}.self_attn.global_integrator.");
    let mut v = vec![
        (format!("{lc}memory_slots"), vec![m, h]),
        (format!("{lc}q_proj.weight"), vec![bd, h]),
        (format!("{lc}k_proj.weight"), vec![bd, h]),
        (format!("{lc}v_proj.weight"), vec![bd, h]),
        (format!("{lc}o_proj.weight"), vec![h, bd]),
        (format!("{gi}shared_compressor.0.weight"), vec![sd, h]),
        (format!("{gi}shared_compressor.1.weight"), vec![sd]),
        (format!("{gi}shared_compressor.1.bias"), vec![sd]),
    ];
    if c.has_stat_expand() {
        v.push((format!("{gi}stat_expand.0.weight"), vec![cd, sd]));
        v.push((format!("{gi}stat_expand.1.weight"), vec![cd]));
        v.push((format!("{gi}stat_expand.1.bias"), vec![cd]));
    }
    v.push((format!("{gi}global_queries"), vec![k, cd]));
    for p in ["q", "k", "v", "o"] {
        v.push((format!("{gi}{p}_proj.weight"), vec![cd, cd]));
    }
    v.push((format!("{gi}expand.weight"), vec![h, cd]));
    v.push((format!("{gi}expand_scale_param"), vec![]));
    v
}

/// Step 4 (part): derives the HiCI configuration from layer 0 (spec §8) and checks that every
/// layer has exactly the expected HiCI tensors. `None` when there are no HiCI tensors.
fn check_hici(
    llama: &LlamaConfig,
    weights: &WeightMap,
    origin: &BTreeMap<String, PathBuf>,
    home: &Path,
    opts: &LoadOptions,
) -> Result<Option<HiciConfig>, IoError> {
    if !weights.keys().any(|k| is_hici_key(k)) {
        return Ok(None);
    }
    let h = llama.hidden_size;
    let file_of = |key: &str| origin.get(key).cloned().unwrap_or(home.to_path_buf());
    // `[rows, cols]` of a layer-0 tensor; `cols` is checked when known.
    let dims = |name: &str, cols: Option<usize>| -> Result<(usize, usize), IoError> {
        let key = format!("model.layers.0.self_attn.{name}");
        let t = weights
            .get(&key)
            .ok_or_else(|| IoError::missing(&key, home))?;
        match t.shape.as_slice() {
            &[r, c] if r > 0 && c > 0 && cols.is_none_or(|want| want == c) => Ok((r, c)),
            found => {
                let r = found.first().copied().unwrap_or(1).max(1);
                let c = cols.unwrap_or_else(|| found.get(1).copied().unwrap_or(1).max(1));
                Err(IoError::shape(&key, &file_of(&key), &[r, c], found))
            }
        }
    };
    let (m, _) = dims("local_constructor.memory_slots", Some(h))?;
    let (bd, _) = dims("local_constructor.q_proj.weight", Some(h))?;
    let (sd, _) = dims("global_integrator.shared_compressor.0.weight", Some(h))?;
    let (k, cd) = dims("global_integrator.global_queries", None)?;
    let cfg = HiciConfig {
        local_slots: m,
        global_slots: k,
        lc_heads: opts.hici_heads,
        gi_heads: opts.gi_heads.unwrap_or(opts.hici_heads),
        bottleneck_dim: bd,
        compress_dim: cd,
        shared_compress_dim: sd,
    };
    cfg.validate()?;

    let expected: BTreeMap<String, Vec<usize>> = (0..llama.num_hidden_layers)
        .flat_map(|l| hici_layer_shapes(l, h, &cfg))
        .collect();
    for (key, t) in weights.iter().filter(|(k, _)| is_hici_key(k)) {
        let want = expected
            .get(key)
            .ok_or_else(|| IoError::unexpected(key, &file_of(key)))?;
        if &t.shape != want {
            return Err(IoError::shape(key, &file_of(key), want, &t.shape));
        }
    }
    for key in expected.keys() {
        if !weights.contains_key(key) {
            return Err(IoError::missing(key, home));
        }
    }
    info!(
        "HiCI: M={m} K={k} Bd={bd} Cd={cd} Sd={sd} hc={} hg={} in {} layers",
        cfg.lc_heads, cfg.gi_heads, llama.num_hidden_layers
    );
    Ok(Some(cfg))
}

/// Checks every LoRA pair against the weight it adapts.
fn check_lora(
    llama: &LlamaConfig,
    weights: &WeightMap,
    lora: &WeightMap,
    file: &Path,
    home: &Path,
    report: &mut LoadReport,
) -> Result<(), IoError> {
    let mut hici_lora = 0usize;
    for (name, t) in lora {
        let key = parse_lora_key(name).ok_or_else(|| IoError::unexpected(name, file))?;
        if key.layer >= llama.num_hidden_layers {
            return Err(IoError::unexpected(name, file));
        }
        let target = weights
            .get(&key.target)
            .ok_or_else(|| IoError::missing(&key.target, home))?;
        let (out_dim, in_dim) = (target.shape[0], target.shape[1]);
        let expected = match key.part {
            crate::peft::LoraPart::A => [t.shape[0], in_dim],
            crate::peft::LoraPart::B => [out_dim, t.shape[1]],
        };
        if t.shape != expected {
            return Err(IoError::shape(name, file, &expected, &t.shape));
        }
        if is_hici_key(name) {
            hici_lora += 1;
        }
    }
    if hici_lora == 0 && weights.keys().any(|k| is_hici_key(k)) {
        report.notes.push(
            "adapter has no LoRA for the HiCI projections (spec §9.1: unusual for released HiCI checkpoints)"
                .into(),
        );
    }
    report.notes.push(format!(
        "{} LoRA tensors ({} on HiCI projections) from {}",
        lora.len(),
        hici_lora,
        file.display()
    ));
    Ok(())
}
