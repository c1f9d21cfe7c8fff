//! A validation report of a checkpoint (`hici inspect`): unlike the loader, which stops at the
//! first problem, it reads only headers and lists every expected tensor with what was found,
//! every unexpected tensor, and parameter counts per group against the counts the
//! configuration implies (spec §8; "matches spec" for the 7B configuration).

use crate::catalog::{Catalog, Meta, MetaMap};
use crate::checkpoint::{
    derive_hici, rope_factor_and_source, LoadOptions, ParamCounts, TensorGroup,
};
use crate::converted::{converted_info, ConvertedInfo};
use crate::error::IoError;
use crate::hf::{index_base_files, is_hici_key, require_dir};
use crate::layout::{
    base_tensors, expected_counts, hici_tensors, is_llama2_7b, lora_tensors, model_tensors,
    SPEC_7B_COUNTS,
};
use crate::peft::{find_adapter_weights, parse_lora_key, read_adapter_config};
use crate::trainable::{find_trainable_params, is_trainable_key};
use hici_model::config::{HiciConfig, LoraConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The outcome for one expected tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Ok,
    Missing,
    WrongShape,
    WrongDtype,
}

/// One expected tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyCheck {
    pub name: String,
    pub group: TensorGroup,
    pub expected_shape: Vec<usize>,
    pub found_shape: Option<Vec<usize>>,
    /// Stored element type (`F16`, `BF16`, `F32`, `F64`).
    pub dtype: Option<String>,
    pub file: Option<PathBuf>,
    /// Whether loading fails without it (missing optional tensors are only listed: LoRA
    /// factors of a projection the adapter does not adapt, norms `trainable_params` does not
    /// override).
    pub required: bool,
    pub status: KeyStatus,
}

/// A tensor nothing expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unexpected {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub file: PathBuf,
    pub reason: String,
}

/// A tensor deliberately skipped (non-parameter buffer).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ignored {
    pub name: String,
    pub file: PathBuf,
}

/// Per-group totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSummary {
    pub group: TensorGroup,
    pub expected_tensors: usize,
    pub ok: usize,
    pub missing_required: usize,
    pub missing_optional: usize,
    pub wrong: usize,
    pub params_found: usize,
    pub params_expected: usize,
    /// Stored element types of the tensors found, with counts.
    pub dtypes: BTreeMap<String, usize>,
}

/// Comparison with the spec's numbers (only for the 7B configuration).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpecCheck {
    pub spec: ParamCounts,
    pub found: ParamCounts,
    pub base: bool,
    pub lora: bool,
    pub hici: bool,
    pub overrides: Option<bool>,
    pub matches: bool,
}

/// Vocabulary sizes and the resize decision (spec §2.4).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocabCheck {
    /// `vocab_size` of the base `config.json`.
    pub base_vocab: usize,
    pub embed_rows: Option<usize>,
    pub lm_head_rows: Option<usize>,
    /// Rows appended to `lm_head` (mean of the existing rows).
    pub appended_lm_head_rows: usize,
    pub note: String,
}

/// The full report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Validation {
    /// `"directories"` or `"converted file"`.
    pub source: String,
    pub files: Vec<PathBuf>,
    pub hici: Option<HiciConfig>,
    pub lora: Option<LoraConfig>,
    pub lora_merged: bool,
    pub rope_factor: f64,
    pub rope_source: String,
    pub vocab: VocabCheck,
    pub keys: Vec<KeyCheck>,
    pub unexpected: Vec<Unexpected>,
    pub ignored: Vec<Ignored>,
    pub groups: Vec<GroupSummary>,
    pub counts_found: ParamCounts,
    /// From the configuration (spec §8 formula), LoRA on every projection.
    pub counts_expected: ParamCounts,
    pub spec_7b: Option<SpecCheck>,
    /// Problems that are not about one key (e.g. the HiCI configuration cannot be derived).
    pub problems: Vec<String>,
}

impl Validation {
    /// No problem, no unexpected tensor, every required tensor present and right.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
            && self.unexpected.is_empty()
            && self.keys.iter().all(|k| {
                k.status == KeyStatus::Ok || (!k.required && k.status == KeyStatus::Missing)
            })
    }

    /// Expected keys that are not OK (required or wrong).
    pub fn bad_keys(&self) -> impl Iterator<Item = &KeyCheck> {
        self.keys
            .iter()
            .filter(|k| k.status != KeyStatus::Ok && (k.required || k.status != KeyStatus::Missing))
    }

    /// Optional keys that are absent.
    pub fn absent_optional(&self) -> impl Iterator<Item = &KeyCheck> {
        self.keys
            .iter()
            .filter(|k| !k.required && k.status == KeyStatus::Missing)
    }
}

fn check_key(
    name: &str,
    group: TensorGroup,
    expected: &[usize],
    found: Option<&Meta>,
    required: bool,
    want_dtype: Option<&str>,
) -> KeyCheck {
    let status = match found {
        None => KeyStatus::Missing,
        Some(m) if m.shape != expected => KeyStatus::WrongShape,
        Some(m) if want_dtype.is_some_and(|d| d != m.type_name()) => KeyStatus::WrongDtype,
        Some(_) => KeyStatus::Ok,
    };
    KeyCheck {
        name: name.to_string(),
        group,
        expected_shape: expected.to_vec(),
        found_shape: found.map(|m| m.shape.clone()),
        dtype: found.map(|m| m.type_name().to_string()),
        file: found.map(|m| m.file.clone()),
        required,
        status,
    }
}

fn unexpected(name: &str, m: &Meta, reason: &str) -> Unexpected {
    Unexpected {
        name: name.to_string(),
        shape: m.shape.clone(),
        dtype: m.type_name().to_string(),
        file: m.file.clone(),
        reason: reason.to_string(),
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// Validates an HF base directory and an optional adapter directory (headers only).
///
/// Errors only for what prevents any report (a missing directory or `config.json`, an
/// unreadable or unsafe file, an unsupported `adapter_config.json`); everything about tensor
/// names and shapes goes into the report.
pub fn validate_dirs(
    base: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Validation, IoError> {
    let mut catalog = Catalog::default();
    let base_dir = index_base_files(base, &mut catalog)?;
    let llama = base_dir.config.clone();
    let mut files = base_dir.files.clone();
    let mut problems = Vec::new();
    let mut unexpected_list = Vec::new();

    // All non-LoRA tensors by final name (trainable_params wins), and the overriding ones.
    let mut found: MetaMap = base_dir.tensors.clone();
    let mut overrides: MetaMap = MetaMap::new();
    let mut lora_found: MetaMap = MetaMap::new();
    let mut lora = None;
    let mut hici_home = base.to_path_buf();
    let mut has_trainable = false;
    if let Some(dir) = adapter {
        require_dir(dir)?;
        if let Some(file) = find_trainable_params(dir) {
            has_trainable = true;
            let id = catalog.open(&file)?;
            for (key, m) in catalog.metas(id) {
                if !is_trainable_key(key) {
                    unexpected_list.push(unexpected(
                        key,
                        &m,
                        "not an embedding, norm or HiCI tensor (trainable_params)",
                    ));
                } else if is_hici_key(key) {
                    found.insert(key.to_string(), m);
                } else if base_dir.tensors.contains_key(key) {
                    overrides.insert(key.to_string(), m.clone());
                    found.insert(key.to_string(), m);
                } else {
                    unexpected_list.push(unexpected(key, &m, "overrides no base tensor"));
                }
            }
            files.push(file.clone());
            hici_home = file;
        } else {
            hici_home = dir.join("trainable_params.bin");
        }
        if dir.join("adapter_config.json").is_file() {
            let cfg = read_adapter_config(dir)?;
            files.push(dir.join("adapter_config.json"));
            lora = Some(cfg);
            match find_adapter_weights(dir) {
                Some(file) => {
                    let id = catalog.open(&file)?;
                    for (raw, m) in catalog.metas(id) {
                        match parse_lora_key(raw) {
                            Some(k) => {
                                if lora_found.insert(k.name.clone(), m.clone()).is_some() {
                                    unexpected_list.push(unexpected(raw, &m, "duplicate"));
                                }
                            }
                            None => unexpected_list.push(unexpected(
                                raw,
                                &m,
                                "not a lora_A/lora_B weight of a q/k/v/o projection",
                            )),
                        }
                    }
                    files.push(file);
                }
                None => problems.push(format!(
                    "{}: adapter_config.json but no adapter_model.safetensors or adapter_model.bin",
                    dir.display()
                )),
            }
        } else if find_adapter_weights(dir).is_some() {
            problems.push(format!(
                "{}: adapter weights without adapter_config.json",
                dir.display()
            ));
        } else if !has_trainable {
            problems.push(format!(
                "{}: neither adapter_config.json nor trainable_params.{{bin,safetensors}} found",
                dir.display()
            ));
        }
    }

    // HiCI configuration from the layer-0 shapes.
    let hici = if found.keys().any(|k| is_hici_key(k)) {
        match derive_hici(&llama, &found, &hici_home, opts) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("cannot derive the HiCI configuration: {e}"));
                None
            }
        }
    } else {
        None
    };

    let mut keys = Vec::new();
    // Base: as in the base files (trainable_params may replace some, listed as overrides).
    let base_expected = base_tensors(&llama);
    for (name, shape) in &base_expected {
        keys.push(check_key(
            name,
            TensorGroup::Base,
            shape,
            base_dir.tensors.get(name),
            true,
            None,
        ));
    }
    for (name, m) in &base_dir.tensors {
        if !base_expected.contains_key(name) && !is_hici_key(name) {
            unexpected_list.push(unexpected(name, m, "not a Llama tensor of this config"));
        }
    }
    // Overrides: the embedding (possibly with more rows) and every norm.
    let embed_rows = overrides
        .get("model.embed_tokens.weight")
        .map(|m| m.shape[0])
        .filter(|&r| r >= llama.vocab_size);
    if has_trainable {
        for (name, shape) in &base_expected {
            if !(name.contains("embed") || name.contains("norm")) {
                continue;
            }
            let mut shape = shape.clone();
            if name == "model.embed_tokens.weight" {
                shape[0] = embed_rows.unwrap_or(llama.vocab_size);
            }
            keys.push(check_key(
                name,
                TensorGroup::Override,
                &shape,
                overrides.get(name),
                false,
                None,
            ));
        }
    }
    // HiCI.
    if let Some(h) = &hici {
        let expected = hici_tensors(&llama, h);
        for (name, shape) in &expected {
            keys.push(check_key(
                name,
                TensorGroup::Hici,
                shape,
                found.get(name),
                true,
                None,
            ));
        }
        for (name, m) in found.iter().filter(|(k, _)| is_hici_key(k)) {
            if !expected.contains_key(name) {
                unexpected_list.push(unexpected(name, m, "not a HiCI tensor of this config"));
            }
        }
    }
    // LoRA: every projection (12 per layer with HiCI, spec §2.2); absent ones are optional.
    if let Some(l) = &lora {
        let expected = lora_tensors(&llama, hici.as_ref(), l.r);
        for (name, shape) in &expected {
            keys.push(check_key(
                name,
                TensorGroup::Lora,
                shape,
                lora_found.get(name),
                false,
                None,
            ));
        }
        for (name, m) in &lora_found {
            if !expected.contains_key(name) {
                unexpected_list.push(unexpected(
                    name,
                    m,
                    "adapts no projection of this config (layer out of range, or HiCI LoRA without HiCI modules)",
                ));
            }
        }
        for name in lora_found.keys() {
            let partner = match name.strip_suffix(".lora_A.weight") {
                Some(m) => format!("{m}.lora_B.weight"),
                None => format!("{}.lora_A.weight", name.trim_end_matches(".lora_B.weight")),
            };
            if expected.contains_key(&partner) && !lora_found.contains_key(&partner) {
                problems.push(format!("`{name}` has no partner `{partner}`"));
            }
        }
    }

    let counts_found = ParamCounts {
        base: base_dir
            .tensors
            .iter()
            .filter(|(k, _)| !is_hici_key(k))
            .map(|(_, m)| m.numel())
            .sum(),
        lora: lora_found.values().map(Meta::numel).sum(),
        hici: found
            .iter()
            .filter(|(k, _)| is_hici_key(k))
            .map(|(_, m)| m.numel())
            .sum(),
        overrides: overrides.values().map(Meta::numel).sum(),
    };
    let counts_expected = expected_counts(
        &llama,
        hici.as_ref(),
        has_trainable.then_some(embed_rows.unwrap_or(llama.vocab_size)),
        lora.map(|l| l.r),
    );
    let spec_7b = (is_llama2_7b(&llama, hici.as_ref()) && llama.vocab_size == 32000).then(|| {
        let s = SPEC_7B_COUNTS;
        let c = counts_found;
        let overrides = has_trainable.then_some(c.overrides == s.overrides);
        let (b, l, h) = (c.base == s.base, c.lora == s.lora, c.hici == s.hici);
        SpecCheck {
            spec: s,
            found: c,
            base: b,
            lora: l,
            hici: h,
            overrides,
            matches: b && l && h && overrides.unwrap_or(true),
        }
    });

    // Vocabulary.
    let embed = found.get("model.embed_tokens.weight").map(|m| m.shape[0]);
    let head = base_dir.tensors.get("lm_head.weight").map(|m| m.shape[0]);
    let appended = match (embed, head) {
        (Some(e), Some(h)) if e > h => e - h,
        _ => 0,
    };
    let note = if appended > 0 {
        format!(
            "embedding has {} rows, lm_head {}: {appended} lm_head row(s) will be appended, each \
             the mean of the existing rows (spec §2.4); vocab_size {} -> {}",
            embed.unwrap_or(0),
            head.unwrap_or(0),
            llama.vocab_size,
            embed.unwrap_or(0)
        )
    } else {
        format!("no vocabulary resize (vocab_size {})", llama.vocab_size)
    };
    let vocab = VocabCheck {
        base_vocab: llama.vocab_size,
        embed_rows: embed,
        lm_head_rows: head,
        appended_lm_head_rows: appended,
        note,
    };
    let (rope_factor, rope_source) = rope_factor_and_source(&llama, hici.is_some(), opts);
    let ignored = base_dir
        .ignored
        .iter()
        .map(|(name, file)| Ignored {
            name: name.clone(),
            file: file.clone(),
        })
        .collect();
    let groups = summarize(
        &keys,
        &counts_found,
        &counts_expected,
        &found,
        &lora_found,
        &overrides,
    );
    Ok(Validation {
        source: "directories".into(),
        files,
        hici,
        lora,
        lora_merged: false,
        rope_factor,
        rope_source,
        vocab,
        keys,
        unexpected: unexpected_list,
        ignored,
        groups,
        counts_found,
        counts_expected,
        spec_7b,
        problems,
    })
}

fn summarize(
    keys: &[KeyCheck],
    found: &ParamCounts,
    expected: &ParamCounts,
    all: &MetaMap,
    lora: &MetaMap,
    overrides: &MetaMap,
) -> Vec<GroupSummary> {
    let mut out = Vec::new();
    for group in [
        TensorGroup::Base,
        TensorGroup::Override,
        TensorGroup::Hici,
        TensorGroup::Lora,
    ] {
        let ks: Vec<&KeyCheck> = keys.iter().filter(|k| k.group == group).collect();
        if ks.is_empty() {
            continue;
        }
        let mut dtypes = BTreeMap::new();
        let metas: Box<dyn Iterator<Item = &Meta>> = match group {
            TensorGroup::Base => Box::new(
                all.iter()
                    .filter(|(k, _)| !is_hici_key(k) && !overrides.contains_key(*k))
                    .map(|(_, m)| m),
            ),
            TensorGroup::Override => Box::new(overrides.values()),
            TensorGroup::Hici => {
                Box::new(all.iter().filter(|(k, _)| is_hici_key(k)).map(|(_, m)| m))
            }
            TensorGroup::Lora => Box::new(lora.values()),
        };
        for m in metas {
            *dtypes.entry(m.type_name().to_string()).or_insert(0) += 1;
        }
        let pick = |c: &ParamCounts| match group {
            TensorGroup::Base => c.base,
            TensorGroup::Override => c.overrides,
            TensorGroup::Hici => c.hici,
            TensorGroup::Lora => c.lora,
        };
        out.push(GroupSummary {
            group,
            expected_tensors: ks.len(),
            ok: ks.iter().filter(|k| k.status == KeyStatus::Ok).count(),
            missing_required: ks
                .iter()
                .filter(|k| k.required && k.status == KeyStatus::Missing)
                .count(),
            missing_optional: ks
                .iter()
                .filter(|k| !k.required && k.status == KeyStatus::Missing)
                .count(),
            wrong: ks
                .iter()
                .filter(|k| matches!(k.status, KeyStatus::WrongShape | KeyStatus::WrongDtype))
                .count(),
            params_found: pick(found),
            params_expected: pick(expected),
            dtypes,
        });
    }
    out
}

/// Validates a converted file (`hici import` output) against its stored configuration.
pub fn validate_converted(path: &Path) -> Result<Validation, IoError> {
    let info = converted_info(path)?;
    Ok(validate_info(&info))
}

fn validate_info(info: &ConvertedInfo) -> Validation {
    let cfg = &info.config;
    let llama = &cfg.llama;
    let file = info.path.clone();
    let mut metas: MetaMap = info
        .tensors
        .iter()
        .enumerate()
        .map(|(i, (k, (shape, dtype)))| {
            (
                k.clone(),
                Meta {
                    shape: shape.clone(),
                    dtype: *dtype,
                    quant: None,
                    file: file.clone(),
                    src: crate::catalog::SrcRef { file: 0, entry: i },
                },
            )
        })
        .collect();
    // Quantized tensors under their logical shape (`src` is not used for a converted file).
    for (i, (k, shape)) in info.quantized.iter().enumerate() {
        let meta = Meta {
            shape: shape.clone(),
            dtype: info.dtype.float_type(),
            quant: info.quantization,
            file: file.clone(),
            src: crate::catalog::SrcRef { file: 1, entry: i },
        };
        metas.insert(k.clone(), meta);
    }
    let float_type = info.dtype.name();
    let want_of = |name: &str| {
        Some(
            match (info.quantized.contains_key(name), info.quantization) {
                (true, Some(ty)) => ty.name(),
                _ => float_type,
            },
        )
    };
    let mut keys = Vec::new();
    let mut unexpected_list = Vec::new();
    let expected = model_tensors(cfg, None);
    for (name, shape) in &expected {
        let group = if is_hici_key(name) {
            TensorGroup::Hici
        } else {
            TensorGroup::Base
        };
        keys.push(check_key(
            name,
            group,
            shape,
            metas.get(name),
            true,
            want_of(name),
        ));
    }
    let lora_expected = info
        .lora
        .map(|l| lora_tensors(llama, cfg.hici.as_ref(), l.r))
        .unwrap_or_default();
    for (name, shape) in &lora_expected {
        keys.push(check_key(
            name,
            TensorGroup::Lora,
            shape,
            metas.get(name),
            false,
            want_of(name),
        ));
    }
    for (name, m) in &metas {
        if !expected.contains_key(name) && !lora_expected.contains_key(name) {
            unexpected_list.push(unexpected(name, m, "not a tensor of the stored config"));
        }
    }
    let sum = |f: &dyn Fn(&str) -> bool| -> usize {
        metas
            .iter()
            .filter(|(k, _)| f(k))
            .map(|(_, m)| m.numel())
            .sum()
    };
    let counts_found = ParamCounts {
        base: sum(&|k| !is_hici_key(k) && !k.contains(".lora_")),
        lora: sum(&|k| k.contains(".lora_")),
        hici: sum(&|k| is_hici_key(k) && !k.contains(".lora_")),
        overrides: 0,
    };
    let mut counts_expected =
        expected_counts(llama, cfg.hici.as_ref(), None, info.lora.map(|l| l.r));
    counts_expected.base = expected
        .iter()
        .filter(|(k, _)| !is_hici_key(k))
        .map(|(_, s)| numel(s))
        .sum();
    let lm_rows = metas.get("lm_head.weight").map(|m| m.shape[0]);
    // The 7B base as in the HF files has 32000 rows; the [PAD] rows were appended at import.
    let spec_7b =
        (is_llama2_7b(llama, cfg.hici.as_ref()) && llama.vocab_size >= 32000).then(|| {
            let s = SPEC_7B_COUNTS;
            let pad = llama.vocab_size - 32000;
            let base_hf = counts_found
                .base
                .saturating_sub(2 * pad * llama.hidden_size);
            let found = ParamCounts {
                base: base_hf,
                ..counts_found
            };
            let lora_ok = if info.lora_merged {
                true
            } else {
                counts_found.lora == s.lora
            };
            let (b, h) = (base_hf == s.base, counts_found.hici == s.hici);
            SpecCheck {
                spec: s,
                found,
                base: b,
                lora: lora_ok,
                hici: h,
                overrides: None,
                matches: b && h && lora_ok,
            }
        });
    let rope_source = info
        .notes
        .iter()
        .find_map(|n| {
            n.strip_prefix("RoPE linear factor ")
                .and_then(|r| r.split_once(" ("))
                .map(|(_, src)| src.trim_end_matches(')').to_string())
        })
        .map(|s| format!("{s}, stored at import"))
        .unwrap_or_else(|| "stored at import".into());
    let resize_note = info
        .notes
        .iter()
        .find(|n| n.contains("vocab resize"))
        .cloned();
    let vocab = VocabCheck {
        base_vocab: llama.vocab_size,
        embed_rows: metas.get("model.embed_tokens.weight").map(|m| m.shape[0]),
        lm_head_rows: lm_rows,
        appended_lm_head_rows: 0,
        note: match resize_note {
            Some(n) => format!("{n} (at import)"),
            None => format!(
                "no vocabulary resize at import (vocab_size {})",
                llama.vocab_size
            ),
        },
    };
    let empty = MetaMap::new();
    let lora_metas: MetaMap = metas
        .iter()
        .filter(|(k, _)| k.contains(".lora_"))
        .map(|(k, m)| (k.clone(), m.clone()))
        .collect();
    let non_lora: MetaMap = metas
        .iter()
        .filter(|(k, _)| !k.contains(".lora_"))
        .map(|(k, m)| (k.clone(), m.clone()))
        .collect();
    let groups = summarize(
        &keys,
        &counts_found,
        &counts_expected,
        &non_lora,
        &lora_metas,
        &empty,
    );
    let mut files = vec![file];
    files.dedup();
    Validation {
        source: "converted file".into(),
        files,
        hici: cfg.hici.clone(),
        lora: info.lora.or(info.merged_lora),
        lora_merged: info.lora_merged,
        rope_factor: cfg.rope_factor,
        rope_source,
        vocab,
        keys,
        unexpected: unexpected_list,
        ignored: Vec::new(),
        groups,
        counts_found,
        counts_expected,
        spec_7b,
        problems: Vec::new(),
    }
}
