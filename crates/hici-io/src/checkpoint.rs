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

use crate::catalog::{Catalog, Meta, MetaMap, SrcRef};
use crate::error::IoError;
use crate::hf::{index_base, is_hici_key, require_dir};
use crate::peft::{find_adapter_weights, index_adapter, parse_lora_key, read_adapter_config};
use crate::tensor_file::FloatType;
use crate::trainable::{find_trainable_params, index_trainable_params};
use hici_model::config::{resolve_rope_factor, HiciConfig, LlamaConfig, LoraConfig, ModelConfig};
use hici_model::weights::{HostTensor, QuantMap, WeightMap};
use serde::Serialize;
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
    /// Keep the linear weights of quantized files (GGUF Q8_0, Q4_0, Q4_1, K-quants, ...)
    /// quantized instead of expanding them to f32. Default true.
    pub keep_quantized: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            hici_heads: 8,
            gi_heads: None,
            rope_factor: None,
            context_size: None,
            keep_quantized: true,
        }
    }
}

/// Number of scalar parameters by origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    /// All float tensors, f32, PyTorch layout, names without `base_model.model.`.
    pub weights: WeightMap,
    /// Tensors kept in 8-bit blocks (quantized files), same names and layout.
    pub quantized: QuantMap,
    pub report: LoadReport,
}

/// Which part of a checkpoint a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorGroup {
    /// Plain Llama tensors from the base directory.
    Base,
    /// Base tensors replaced by `trainable_params` (embedding, norms).
    Override,
    /// HiCI module tensors (`local_constructor`, `global_integrator`).
    Hici,
    /// LoRA factors.
    Lora,
}

impl TensorGroup {
    pub fn name(self) -> &'static str {
        match self {
            TensorGroup::Base => "base",
            TensorGroup::Override => "overrides",
            TensorGroup::Hici => "HiCI",
            TensorGroup::Lora => "LoRA",
        }
    }
}

/// A tensor of the final checkpoint before its data is read.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// Final shape (for `lm_head` after the vocabulary resize).
    pub shape: Vec<usize>,
    /// Element type as stored in the source file.
    pub dtype: FloatType,
    /// The file it is read from.
    pub file: PathBuf,
    pub group: TensorGroup,
    src: SrcRef,
    /// `Some(rows)`: append mean rows up to `rows` (vocabulary resize of `lm_head`).
    resize_rows: Option<usize>,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checkpoint whose names, shapes and configuration have been checked from the file
/// headers, with its tensors still on disk: [`CheckpointPlan::read`] reads one at a time (the
/// converter streams this way), [`CheckpointPlan::load`] reads them all.
#[derive(Debug)]
pub struct CheckpointPlan {
    pub config: ModelConfig,
    /// LoRA hyper-parameters when an adapter with `adapter_config.json` was loaded.
    pub lora: Option<LoraConfig>,
    pub report: LoadReport,
    tensors: BTreeMap<String, PlannedTensor>,
    catalog: Catalog,
}

impl CheckpointPlan {
    /// Every tensor of the final checkpoint, by name.
    pub fn tensors(&self) -> &BTreeMap<String, PlannedTensor> {
        &self.tensors
    }

    /// Reads tensor `name` as f32 (NaN/Inf rejected, vocabulary resize applied).
    pub fn read(&self, name: &str) -> Result<HostTensor, IoError> {
        let p = self.tensors.get(name).ok_or_else(|| IoError::MissingKey {
            key: name.to_string(),
            file: PathBuf::from("<checkpoint plan>"),
        })?;
        let mut t = self.catalog.read(p.src)?;
        if let Some(rows) = p.resize_rows {
            append_mean_rows(&mut t, rows);
        }
        Ok(t)
    }

    /// Tensor names grouped by [`TensorGroup`], each group in file order (the order in which
    /// streaming them reads every file front to back).
    pub fn read_order(&self) -> Vec<&str> {
        let mut v: Vec<(&str, &PlannedTensor)> =
            self.tensors.iter().map(|(k, p)| (k.as_str(), p)).collect();
        v.sort_by_key(|(_, p)| (p.group, p.src));
        v.into_iter().map(|(k, _)| k).collect()
    }

    /// Reads every tensor into memory.
    pub fn load(self) -> Result<Checkpoint, IoError> {
        let t0 = std::time::Instant::now();
        let mut order: Vec<(&String, SrcRef)> =
            self.tensors.iter().map(|(k, p)| (k, p.src)).collect();
        order.sort_by_key(|(_, s)| *s);
        let mut weights = WeightMap::new();
        for (name, _) in order {
            weights.insert(name.clone(), self.read(name)?);
        }
        info!(
            "read {} tensors ({} parameters) in {:.2} s",
            weights.len(),
            weights.values().map(HostTensor::numel).sum::<usize>(),
            t0.elapsed().as_secs_f64()
        );
        Ok(Checkpoint {
            config: self.config,
            lora: self.lora,
            weights,
            quantized: QuantMap::new(),
            report: self.report,
        })
    }
}

/// Appends rows to a `[rows, cols]` tensor up to `rows_wanted`, each the f32 mean of the
/// existing rows (computed in f64).
fn append_mean_rows(t: &mut HostTensor, rows_wanted: usize) {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    if rows_wanted <= rows || cols == 0 {
        return;
    }
    let mut mean = vec![0f64; cols];
    for row in t.data.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / rows as f64) as f32).collect();
    t.data.reserve_exact((rows_wanted - rows) * cols);
    for _ in rows..rows_wanted {
        t.data.extend_from_slice(&mean);
    }
    t.shape[0] = rows_wanted;
}

/// Loads `base` (an HF Llama directory) and, optionally, `adapter` (a directory with
/// `adapter_config.json` + `adapter_model.{safetensors,bin}` and/or
/// `trainable_params.{bin,safetensors}`), checking names, shapes and values throughout.
pub fn load_checkpoint(
    base: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Checkpoint, IoError> {
    plan_checkpoint(base, adapter, opts)?.load()
}

/// The checks of [`load_checkpoint`] that need no tensor data (every name, shape, the
/// configuration), reading only file headers and pickles. Value checks (NaN/Inf, zip CRCs)
/// happen when tensors are read.
pub fn plan_checkpoint(
    base: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<CheckpointPlan, IoError> {
    let mut catalog = Catalog::default();
    let base_dir = index_base(base, &mut catalog)?;
    let mut llama = base_dir.config;
    let mut weights = base_dir.tensors;
    let mut groups: BTreeMap<String, TensorGroup> = weights
        .keys()
        .map(|k| {
            let g = if is_hici_key(k) {
                TensorGroup::Hici
            } else {
                TensorGroup::Base
            };
            (k.clone(), g)
        })
        .collect();
    let mut report = LoadReport {
        files: base_dir.files,
        ..LoadReport::default()
    };
    if !base_dir.ignored.is_empty() {
        report.notes.push(format!(
            "ignored {} non-parameter rotary_emb.inv_freq buffer(s) in the base files",
            base_dir.ignored.len()
        ));
    }

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
            let overrides = index_trainable_params(&file, &mut catalog)?;
            apply_overrides(
                &llama,
                &mut weights,
                &mut groups,
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
            let (file, map) = index_adapter(dir, &cfg, &mut catalog)?;
            report.files.push(file.clone());
            lora = Some(cfg);
            lora_weights = Some((file, map));
        }
    }

    let resize = resize_vocab(&mut llama, &mut weights, &mut report)?;

    let hici = check_hici(&llama, &weights, &hici_home, opts)?;

    if let Some((file, map)) = lora_weights {
        check_lora(&llama, &weights, &map, &file, &hici_home, &mut report)?;
        report.counts.lora = map.values().map(Meta::numel).sum();
        for k in map.keys() {
            groups.insert(k.clone(), TensorGroup::Lora);
        }
        weights.extend(map);
    }

    let (rope_factor, source) = rope_factor_and_source(&llama, hici.is_some(), opts);
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
    let tensors = weights
        .into_iter()
        .map(|(k, m)| {
            let group = groups.get(&k).copied().unwrap_or(TensorGroup::Base);
            let resize_rows = resize.filter(|_| k == "lm_head.weight");
            let planned = PlannedTensor {
                shape: m.shape,
                dtype: m.dtype,
                file: m.file,
                group,
                src: m.src,
                resize_rows,
            };
            (k, planned)
        })
        .collect();
    Ok(CheckpointPlan {
        config,
        lora,
        report,
        tensors,
        catalog,
    })
}

/// The linear RoPE factor by the precedence of spec §1.3 and where it came from.
pub fn rope_factor_and_source(
    llama: &LlamaConfig,
    has_hici: bool,
    opts: &LoadOptions,
) -> (f64, String) {
    let context = opts
        .context_size
        .or(has_hici.then_some(DEFAULT_HICI_CONTEXT));
    let rope_factor = resolve_rope_factor(opts.rope_factor, llama, context);
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
    (rope_factor, source)
}

/// Step 2: `trainable_params` replaces same-named base tensors and adds HiCI tensors.
fn apply_overrides(
    llama: &LlamaConfig,
    weights: &mut MetaMap,
    groups: &mut BTreeMap<String, TensorGroup>,
    overrides: MetaMap,
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
            groups.insert(key.clone(), TensorGroup::Hici);
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
            groups.insert(key.clone(), TensorGroup::Override);
        }
        weights.insert(key, t);
    }
    report.notes.push(format!(
        "{replaced} base tensors replaced from {}",
        file.display()
    ));
    Ok(())
}

/// Step 3: plan `lm_head` rows (mean of the existing rows) up to the embedding's row count.
/// Returns the row count `lm_head` must be extended to, if any.
fn resize_vocab(
    llama: &mut LlamaConfig,
    weights: &mut MetaMap,
    report: &mut LoadReport,
) -> Result<Option<usize>, IoError> {
    let embed_key = "model.embed_tokens.weight";
    let (embed_rows, embed_file) = weights
        .get(embed_key)
        .map(|t| (t.shape[0], t.file.clone()))
        .unwrap_or_default();
    let mut resize = None;
    if let Some(head) = weights.get_mut("lm_head.weight") {
        let (rows, cols) = (head.shape[0], head.shape[1]);
        if embed_rows < rows {
            return Err(IoError::shape(
                embed_key,
                &embed_file,
                &[rows, cols],
                &[embed_rows, cols],
            ));
        }
        if embed_rows > rows {
            let extra = embed_rows - rows;
            head.shape[0] = embed_rows;
            resize = Some(embed_rows);
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
    Ok(resize)
}

/// Expected HiCI tensor shapes of one layer.
pub(crate) fn hici_layer_shapes(
    layer: usize,
    h: usize,
    c: &HiciConfig,
) -> Vec<(String, Vec<usize>)> {
    hici_model::layout::hici_layer_tensors(layer, h, c)
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect()
}

/// Step 4 (part): derives the HiCI configuration from layer 0 (spec §8) and checks that every
/// layer has exactly the expected HiCI tensors. `None` when there are no HiCI tensors.
fn check_hici(
    llama: &LlamaConfig,
    weights: &MetaMap,
    home: &Path,
    opts: &LoadOptions,
) -> Result<Option<HiciConfig>, IoError> {
    if !weights.keys().any(|k| is_hici_key(k)) {
        return Ok(None);
    }
    let cfg = derive_hici(llama, weights, home, opts)?;
    let h = llama.hidden_size;
    let file_of = |key: &str| {
        weights
            .get(key)
            .map(|t| t.file.clone())
            .unwrap_or(home.to_path_buf())
    };
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
        "HiCI: M={} K={} Bd={} Cd={} Sd={} hc={} hg={} in {} layers",
        cfg.local_slots,
        cfg.global_slots,
        cfg.bottleneck_dim,
        cfg.compress_dim,
        cfg.shared_compress_dim,
        cfg.lc_heads,
        cfg.gi_heads,
        llama.num_hidden_layers
    );
    Ok(Some(cfg))
}

/// The HiCI configuration from the layer-0 tensor shapes (spec §8) and the head options.
pub(crate) fn derive_hici(
    llama: &LlamaConfig,
    weights: &MetaMap,
    home: &Path,
    opts: &LoadOptions,
) -> Result<HiciConfig, IoError> {
    let h = llama.hidden_size;
    let file_of = |key: &str| {
        weights
            .get(key)
            .map(|t| t.file.clone())
            .unwrap_or(home.to_path_buf())
    };
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
    Ok(cfg)
}

/// Checks every LoRA pair against the weight it adapts.
fn check_lora(
    llama: &LlamaConfig,
    weights: &MetaMap,
    lora: &MetaMap,
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
