//! Loading a model: HF directories, a converted file, a GGUF file or the embedded default,
//! described by a plain [`LoadSpec`], with progress on stderr.

use crate::device::DeviceChoice;
use crate::embedded;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use hici_io::{
    load_checkpoint, load_converted_with, load_gguf, Checkpoint, GgufSummary, GgufVocab,
    LoadOptions, LoadReport,
};
use hici_model::weights::{MixedWeights, QuantProduct};
use hici_model::{AttentionKernel, AttentionMode, DecodeCache, HiciLlama, KvStorage, LoraMode};
use hici_runtime::generate::GenerateOptions;
use hici_runtime::sampler::SamplingConfig;
use hici_runtime::template::ChatFormat;
use hici_runtime::tokenizer::HiciTokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Which attention mode to run (the default follows the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChoice {
    /// Plain causal attention over all tokens, HiCI unused.
    Full,
    /// SFT inference (Mode I): the prompt is one segment; decoding sees `[G ; L ; tokens]`.
    Hici,
    /// Mode T with this many equal segments.
    HiciSegmented(usize),
    /// Mode T-SFT: segments by the SFT rule.
    HiciSft,
}

impl ModeChoice {
    /// The name users type (`full`, `hici`, `hici-segmented`, `hici-sft`).
    pub fn name(self) -> &'static str {
        match self {
            ModeChoice::Full => "full",
            ModeChoice::Hici => "hici",
            ModeChoice::HiciSegmented(_) => "hici-segmented",
            ModeChoice::HiciSft => "hici-sft",
        }
    }

    /// The model's attention mode.
    pub fn mode(self) -> AttentionMode {
        match self {
            ModeChoice::Full => AttentionMode::Full,
            ModeChoice::Hici => AttentionMode::Inference,
            ModeChoice::HiciSegmented(segments) => AttentionMode::Segmented { segments },
            ModeChoice::HiciSft => AttentionMode::SftSegmented,
        }
    }
}

/// burn's kernel-fusion layer on the GPU backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// On for every precision (the half-precision crash of burn 0.21's fusion engine,
    /// burn#5292, is fixed in the vendored burn-cubecl-fusion; see vendor/README.md).
    Auto,
    /// burn's `Fusion<CubeBackend>`: element-wise chains fused into fewer kernels.
    On,
    /// The plain `CubeBackend`: one kernel per op.
    Off,
}

/// Attention kernel choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionChoice {
    /// `flash` on CUDA and on the CPU backend, `exact` on wgpu.
    Auto,
    Exact,
    Flash,
}

/// Everything needed to load a model onto a device: what to read and how to run it. No
/// command-line words: the CLI and the server both fill one in.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// A single-file model: GGUF (by magic or `.gguf`) or a file written by `hici import`.
    pub model: Option<PathBuf>,
    /// An HF Llama base directory (without it and `model`: the embedded tiny model).
    pub base: Option<PathBuf>,
    /// A HiCI adapter directory on top of `base`.
    pub adapter: Option<PathBuf>,
    /// A `tokenizer.json` overriding the model's own.
    pub tokenizer: Option<PathBuf>,
    pub device: DeviceChoice,
    /// Weight and activation precision.
    pub dtype: DType,
    pub fusion: Fusion,
    /// `None`: `hici` for a model with HiCI modules, `full` otherwise.
    pub mode: Option<ModeChoice>,
    pub decode_cache: DecodeCache,
    /// HiCI LocalConstructor/GlobalIntegrator heads (not recoverable from the weights).
    pub hici_heads: Option<usize>,
    /// Linear RoPE factor override.
    pub rope_scale: Option<f64>,
    /// Intended context length for deriving the RoPE factor.
    pub context_size: Option<usize>,
    pub attention: AttentionChoice,
    pub lora: LoraMode,
    /// Expand the linear weights of quantized files to f32 (default: keep them quantized).
    pub dequantize: bool,
    /// How decode caches hold keys and values.
    pub kv_cache: KvStorage,
    /// Show a spinner on stderr while loading.
    pub progress: bool,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            model: None,
            base: None,
            adapter: None,
            tokenizer: None,
            device: DeviceChoice::default(),
            dtype: DType::F32,
            fusion: Fusion::Auto,
            mode: None,
            decode_cache: DecodeCache::Slots,
            hici_heads: None,
            rope_scale: None,
            context_size: None,
            attention: AttentionChoice::Auto,
            lora: LoraMode::Merged,
            dequantize: false,
            kv_cache: KvStorage::Model,
            progress: true,
        }
    }
}

/// The name of a dtype as users type it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

impl LoadSpec {
    /// Whether the linear weights of quantized files stay quantized (`dequantize` unset).
    pub fn keeps_quantized(&self) -> bool {
        !self.dequantize
    }

    /// How the model multiplies quantized weights on this device: burn's quantized matmul on
    /// ndarray (vendor/burn-ndarray's block kernels, verified); elsewhere row chunks
    /// dequantized by burn's kernel, then the float matmul. burn 0.21's CubeCL quantized
    /// matmul returns wrong products for these block-quantized weights (measured on
    /// wgpu/lavapipe: a `[1, 576] x [576, 1536]` product off by 5x).
    pub fn quant_product(&self) -> QuantProduct {
        match self.device {
            DeviceChoice::Ndarray => QuantProduct::Backend,
            _ => QuantProduct::Dequantize,
        }
    }

    /// The mode for a model with (`has_hici`) or without HiCI modules: the default follows the
    /// model; a HiCI mode on a plain model is an error.
    pub fn resolve_mode(&self, has_hici: bool) -> Result<AttentionMode> {
        let mode = self.mode.unwrap_or(if has_hici {
            ModeChoice::Hici
        } else {
            ModeChoice::Full
        });
        if !has_hici && mode != ModeChoice::Full {
            bail!(
                "mode {} needs HiCI modules, but this model has none (a plain Llama runs mode \
                 full)",
                mode.name()
            );
        }
        Ok(mode.mode())
    }

    /// The kernel the choice stands for on this device. `auto` is the flash form on CUDA
    /// (burn's flash kernels) and on the CPU backend, whose attention op (vendored
    /// burn-ndarray) runs each call in one pass per block of query rows in f32, skipping the
    /// keys no row sees; `exact` (the parity reference) everywhere else.
    pub fn attention_kernel(&self) -> AttentionKernel {
        match (self.attention, self.device) {
            (AttentionChoice::Exact, _) => AttentionKernel::Exact,
            (AttentionChoice::Flash, _) => AttentionKernel::Flash,
            (AttentionChoice::Auto, DeviceChoice::Cuda(_) | DeviceChoice::Ndarray) => {
                AttentionKernel::Flash
            }
            (AttentionChoice::Auto, _) => AttentionKernel::Exact,
        }
    }

    /// Whether the GPU backend runs with burn's fusion layer.
    pub fn fused(&self) -> bool {
        match self.fusion {
            Fusion::On | Fusion::Auto => true,
            Fusion::Off => false,
        }
    }
}

/// A model ready to run.
pub struct Loaded<B: Backend> {
    pub model: HiciLlama<B>,
    /// Shared so that request handlers can tokenize while the model runs elsewhere.
    pub tokenizer: Option<Arc<HiciTokenizer>>,
    /// How chat prompts are built: the model's own template, else Llama-2's `[INST]`.
    pub chat: Arc<ChatFormat>,
    /// The model's own chat template source, when it has one.
    pub chat_template: Option<String>,
    /// The context: longest prompt + generation the model (and its RoPE setting) supports.
    pub max_context: usize,
    /// The attention mode the spec asks for, resolved against the model (`full` for a model
    /// without HiCI modules, `hici` for one with them).
    pub mode: AttentionMode,
    /// What a Mode-I prefill keeps in the decode cache.
    pub decode_cache: DecodeCache,
    pub embedded: bool,
    /// Files read and the loader's notes (RoPE factor source, vocab resize, ...).
    pub report: LoadReport,
    /// What the GGUF header says, for a GGUF model.
    pub gguf: Option<GgufSummary>,
}

impl<B: Backend> Loaded<B> {
    /// The ids that end a generation: the tokenizer's EOS / end-of-turn ids, else the config's
    /// EOS.
    pub fn stop_ids(&self) -> Vec<u32> {
        match &self.tokenizer {
            Some(t) if !t.stop_ids.is_empty() => t.stop_ids.clone(),
            _ => self.model.config().llama.eos_token_id.into_iter().collect(),
        }
    }

    /// Generation options for this model: the model's mode, decode cache, stop ids and whole
    /// context as the limit (callers may lower `max_context` and change the stops).
    pub fn options(&self, max_new_tokens: usize, sampling: SamplingConfig) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            sampling,
            stop_ids: self.stop_ids(),
            stop: Vec::new(),
            mode: self.mode,
            decode_cache: self.decode_cache,
            max_context: self.max_context,
        }
    }
}

fn spinner(msg: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Loads the model named by `args` (or the embedded one) onto `device`.
pub fn load<B: Backend>(args: &LoadSpec, device: &B::Device) -> Result<Loaded<B>> {
    let pb = spinner("loading checkpoint", !args.progress);
    let src = read_checkpoint(args)?;
    let (ck, embedded) = (src.checkpoint, src.embedded);
    if embedded && args.progress {
        pb.suspend(|| {
            eprintln!(
                "note: no model given; using the embedded tiny test model (random weights, \
                 output is meaningless)"
            )
        });
    }
    for note in &ck.report.notes {
        tracing::info!("{note}");
    }
    pb.set_message("building model");
    let mut weights = MixedWeights {
        dense: ck.weights,
        quantized: ck.quantized,
        product: args.quant_product(),
    };
    let model = HiciLlama::<B>::from_weights(&ck.config, ck.lora, args.lora, &mut weights, device)
        .context("building the model")?;
    if !weights.is_empty() {
        let names: Vec<_> = weights.names().take(5).cloned().collect();
        bail!(
            "{} tensor(s) in the checkpoint are not used by the model, e.g. {}",
            weights.len(),
            names.join(", ")
        );
    }
    let model = prepare(model, args, args.attention_kernel())?;
    pb.finish_and_clear();
    let tok_src = match &args.tokenizer {
        Some(p) => Some(TokenizerSource::File(p.clone())),
        None => src.tokenizer,
    };
    let tokenizer = match tok_src {
        Some(TokenizerSource::File(p)) => Some(Arc::new(HiciTokenizer::from_file(&p)?)),
        Some(TokenizerSource::Gguf(v)) => Some(Arc::new(HiciTokenizer::from_gguf(&v)?)),
        None => None,
    };
    let chat = Arc::new(match &tokenizer {
        Some(t) => ChatFormat::from_model(src.chat_template.as_deref(), t)?,
        None => ChatFormat::Llama2,
    });
    let mode = args.resolve_mode(ck.config.hici.is_some())?;
    Ok(Loaded {
        model,
        tokenizer,
        chat,
        chat_template: src.chat_template,
        max_context: context_of(&ck.config),
        mode,
        decode_cache: args.decode_cache,
        embedded,
        report: ck.report,
        gguf: src.gguf,
    })
}

/// The context a configuration supports: `max_position_embeddings` x the linear RoPE factor.
pub fn context_of(cfg: &hici_model::ModelConfig) -> usize {
    cfg.context()
}

/// The precision and attention-kernel steps every command applies to a freshly built model:
/// casts to the spec's dtype (an error naming dtype and device when the backend lacks it) and
/// selects `kernel`.
pub fn prepare<B: Backend>(
    model: HiciLlama<B>,
    args: &LoadSpec,
    kernel: AttentionKernel,
) -> Result<HiciLlama<B>> {
    model
        .with_dtype(args.dtype)
        .with_context(|| format!("dtype {} on device {}", dtype_name(args.dtype), args.device))?
        .with_attention_kernel(kernel)
        .with_kv_storage(args.kv_cache)
        .map_err(Into::into)
}

/// Where the model comes from, as the options say.
pub enum ModelSource {
    /// An HF base directory and optional adapter directory (`embedded`: the built-in tiny
    /// model, materialised to a cache directory).
    Dirs {
        base: PathBuf,
        adapter: Option<PathBuf>,
        opts: LoadOptions,
        embedded: bool,
    },
    /// A file written by `hici import`.
    Converted(PathBuf),
    /// A GGUF file (recognised by its magic or the `.gguf` extension).
    Gguf(PathBuf),
}

/// `model`, else `base`/`adapter`, else the embedded model.
pub fn model_source(args: &LoadSpec) -> Result<ModelSource> {
    if let Some(file) = &args.model {
        if hici_io::is_gguf(file) || file.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(file.clone()));
        }
        return Ok(ModelSource::Converted(file.clone()));
    }
    let (base, adapter, embedded) = match &args.base {
        Some(b) => (b.clone(), args.adapter.clone(), false),
        None => {
            let (b, a) = embedded::materialise()?;
            (b, Some(a), true)
        }
    };
    let heads = args.hici_heads.unwrap_or(if embedded {
        embedded::EMBEDDED_HICI_HEADS
    } else {
        8
    });
    let opts = load_options(args, heads);
    Ok(ModelSource::Dirs {
        base,
        adapter,
        opts,
        embedded,
    })
}

fn load_options(args: &LoadSpec, hici_heads: usize) -> LoadOptions {
    LoadOptions {
        hici_heads,
        gi_heads: None,
        rope_factor: args.rope_scale,
        context_size: args.context_size,
        keep_quantized: args.keeps_quantized(),
    }
}

/// `tokenizer.json` of the adapter directory, else of the base directory.
pub fn tokenizer_in_dirs(base: &Path, adapter: Option<&Path>) -> Option<PathBuf> {
    adapter
        .map(|a| a.join("tokenizer.json"))
        .into_iter()
        .chain(std::iter::once(base.join("tokenizer.json")))
        .find(|p| p.is_file())
}

/// `chat_template` of the `tokenizer_config.json` next to `tokenizer` (a string, or the
/// `default` entry of a list of named templates).
pub fn chat_template_near(tokenizer: &Path) -> Result<Option<String>> {
    let cfg = tokenizer.with_file_name("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&cfg) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg.display()))?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// Where the tokenizer comes from.
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// A GGUF file's `tokenizer.ggml.*` metadata.
    Gguf(GgufVocab),
}

/// A checkpoint in memory, its tokenizer and chat template, if any.
pub struct CheckpointSource {
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<TokenizerSource>,
    pub chat_template: Option<String>,
    pub embedded: bool,
    pub gguf: Option<GgufSummary>,
}

/// Reads the checkpoint the options name (all tensors f32 in host memory).
pub fn read_checkpoint(args: &LoadSpec) -> Result<CheckpointSource> {
    match model_source(args)? {
        ModelSource::Dirs {
            base,
            adapter,
            opts,
            embedded,
        } => {
            let checkpoint = load_checkpoint(&base, adapter.as_deref(), &opts)
                .with_context(|| format!("loading {}", base.display()))?;
            let tok = tokenizer_in_dirs(&base, adapter.as_deref());
            let chat_template = match &tok {
                Some(t) => chat_template_near(t)?,
                None => None,
            };
            Ok(CheckpointSource {
                checkpoint,
                tokenizer: tok.map(TokenizerSource::File),
                chat_template,
                embedded,
                gguf: None,
            })
        }
        ModelSource::Gguf(path) => {
            if args.hici_heads.is_some() || args.context_size.is_some() {
                bail!(
                    "hici heads and context size do not apply to {} (a GGUF model without HiCI \
                     modules; a RoPE scale overrides its RoPE factor)",
                    path.display()
                );
            }
            // the reader's errors name the file already
            let g = load_gguf(&path, &load_options(args, 8))?;
            let chat_template = g.vocab.as_ref().and_then(|v| v.chat_template.clone());
            Ok(CheckpointSource {
                checkpoint: g.checkpoint,
                tokenizer: g.vocab.map(TokenizerSource::Gguf),
                chat_template,
                embedded: false,
                gguf: Some(g.summary),
            })
        }
        ModelSource::Converted(path) => {
            let info = hici_io::converted::converted_info(&path)
                .with_context(|| format!("loading {}", path.display()))?;
            let mut checkpoint = load_converted_with(&path, args.keeps_quantized())
                .with_context(|| format!("loading {}", path.display()))?;
            let cfg = &mut checkpoint.config;
            if let Some(s) = args.rope_scale {
                checkpoint.report.notes.push(format!(
                    "RoPE linear factor {s} (explicit override; the file says {})",
                    cfg.rope_factor
                ));
                cfg.rope_factor = s;
            }
            if let (Some(h), Some(hici)) = (args.hici_heads, cfg.hici.as_mut()) {
                hici.lc_heads = h;
                hici.gi_heads = h;
            }
            if args.context_size.is_some() && args.rope_scale.is_none() {
                eprintln!(
                    "note: the context size is ignored for a converted file (the RoPE factor {} \
                     was resolved at import; a RoPE scale overrides it)",
                    cfg.rope_factor
                );
            }
            cfg.validate().context("hici heads / RoPE scale")?;
            let tokenizer = match &info.tokenizer_json {
                Some(text) => Some(TokenizerSource::File(cache_tokenizer(text)?)),
                None => None,
            };
            Ok(CheckpointSource {
                checkpoint,
                tokenizer,
                chat_template: None,
                embedded: false,
                gguf: None,
            })
        }
    }
}

/// Writes a `tokenizer.json` embedded in a converted file to a content-addressed file in the
/// temp directory (the tokenizer library reads files) and returns its path.
fn cache_tokenizer(text: &str) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    let path = std::env::temp_dir().join(format!(
        "hici-tokenizer-{:016x}-{}.json",
        h.finish(),
        text.len()
    ));
    if std::fs::read(&path).is_ok_and(|b| b == text.as_bytes()) {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing the embedded tokenizer to {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_from_tokenizer_config_string_or_named_list() {
        let dir = std::env::temp_dir().join(format!("hici-chat-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = dir.join("tokenizer.json");
        let cfg = dir.join("tokenizer_config.json");
        assert_eq!(chat_template_near(&tok).unwrap(), None);
        std::fs::write(&cfg, r#"{"chat_template": "{{ messages }}"}"#).unwrap();
        assert_eq!(
            chat_template_near(&tok).unwrap().as_deref(),
            Some("{{ messages }}")
        );
        std::fs::write(
            &cfg,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(chat_template_near(&tok).unwrap().as_deref(), Some("D"));
        std::fs::write(&cfg, "{oops").unwrap();
        assert!(chat_template_near(&tok)
            .unwrap_err()
            .to_string()
            .contains("tokenizer_config.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
