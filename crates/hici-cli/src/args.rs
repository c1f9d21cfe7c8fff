//! Options shared by every command.

use burn::tensor::DType;
use clap::{Args, ValueEnum};
use hici_engine::{AttentionChoice, DeviceChoice, Fusion, LoadSpec, ModeChoice};
use hici_model::{AttentionKernel, AttentionMode, DecodeCache, KvStorage, LoraMode};
use std::path::PathBuf;

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Plain causal attention over all tokens, HiCI unused (the paper's perplexity tables).
    Full,
    /// SFT inference (Mode I): the prompt is one segment; decoding sees [G ; L ; tokens].
    Hici,
    /// Mode T: `--segments` equal segments sharing G (the pre-training forward).
    HiciSegmented,
    /// Mode T-SFT: segments by the SFT rule (one per 4096 multiple, else largest divisor).
    HiciSft,
}

/// `--decode-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecodeCacheArg {
    /// Keep [G ; L] in the decode cache, correct (head, slot) order (default).
    Slots,
    /// Keep only token K/V: decode steps see no slots.
    Tokens,
    /// The reference's scrambled slot order (to reproduce its outputs only).
    Reference,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    /// The tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    /// The flag value (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::F16 => "f16",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

/// `--fusion`: burn's kernel-fusion layer on the GPU backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FusionArg {
    /// On for every precision (burn#5292, the half-precision crash, is fixed in vendor/).
    Auto,
    /// Fuse element-wise chains into fewer kernels (burn's `Fusion` backend).
    On,
    /// One kernel per op (burn's plain `CubeBackend`).
    Off,
}

/// `--attention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    /// `flash` on CUDA and on the CPU (its attention op is a one-pass f32 kernel), `exact` on
    /// wgpu.
    Auto,
    /// Exact softmax attention computed in f32 (parity path).
    Exact,
    /// Flash-eligible calls on wgpu/CUDA: one square `is_causal` call per segment and query
    /// group, no scale, no mask (autotune may pick a flash kernel: f16 tiles, ~1e-3 abs
    /// error on logits); on CPU the same calls go to the vendored one-pass f32 kernel.
    Flash,
}

/// `--weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// Keep the linear weights of a quantized file (GGUF Q8_0, Q4_0, Q4_1, K-quants) in blocks
    /// of 32: 8-bit values on the CPU (about a quarter of the f32 memory); on wgpu/CUDA 4-bit
    /// formats packed 8 values per word (about a sixth), the rest 8-bit.
    Native,
    /// Expand every tensor to f32 on load (the reference for the quantized path).
    F32,
}

/// `--kv-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheArg {
    /// The model's dtype (`--dtype`).
    Model,
    /// f16: half of f32 (devices with f16 tensors: wgpu, CUDA).
    F16,
    /// 8-bit values with one f32 scale per 32: 0.28x of f32 (devices with i8 tensors:
    /// ndarray; not wgpu; keys and values are dequantized at each step).
    Q8,
}

/// `--lora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoraArg {
    /// Merge `W + alpha/r B A` at load time (fastest).
    Merged,
    /// Keep the low-rank path at run time.
    Unmerged,
}

/// Model options common to all commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face Llama-2 base directory (config.json + safetensors or .bin shards).
    /// Without --base/--model the embedded tiny test model is used.
    #[arg(long, value_name = "DIR", global = true)]
    pub base: Option<PathBuf>,
    /// HiCI adapter directory (adapter_config.json, adapter_model.bin, trainable_params.bin,
    /// tokenizer files).
    #[arg(long, value_name = "DIR", global = true, requires = "base")]
    pub adapter: Option<PathBuf>,
    /// A single-file model written by `hici import` (instead of --base/--adapter).
    #[arg(long, value_name = "FILE", global = true, conflicts_with_all = ["base", "adapter"])]
    pub model: Option<PathBuf>,
    /// tokenizer.json (default: the adapter's, else the base's).
    #[arg(long, value_name = "FILE", global = true)]
    pub tokenizer: Option<PathBuf>,
    /// Device to run on: `cpu` (the fastest CPU backend compiled in: ndarray, with this
    /// project's few-row product kernels), `ndarray`, `wgpu[...]`, `cuda[:N]`.
    #[arg(long, default_value = "cpu", value_name = "DEVICE", global = true)]
    pub device: DeviceChoice,
    /// Weight and activation precision.
    #[arg(long, value_enum, default_value = "f32", global = true)]
    pub dtype: DtypeArg,
    /// Kernel fusion on wgpu/CUDA (ignored on ndarray).
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub fusion: FusionArg,
    /// Attention mode (default: `hici` for a model with HiCI modules, `full` otherwise).
    #[arg(long, value_enum, global = true)]
    pub mode: Option<ModeArg>,
    /// Segments for --mode hici-segmented (must divide the sequence length).
    #[arg(long, default_value_t = 4, global = true)]
    pub segments: usize,
    /// What a Mode-I prefill keeps in the decode cache.
    #[arg(long, value_enum, default_value = "slots", global = true)]
    pub decode_cache: DecodeCacheArg,
    /// HiCI LocalConstructor/GlobalIntegrator heads (not recoverable from the weights; 8 for the
    /// released checkpoints).
    #[arg(long, global = true)]
    pub hici_heads: Option<usize>,
    /// Linear RoPE factor (overrides config.json rope_scaling and --context-size).
    #[arg(long, global = true)]
    pub rope_scale: Option<f64>,
    /// Intended context length for deriving the RoPE factor (default 16384 for a HiCI adapter).
    #[arg(long, global = true)]
    pub context_size: Option<usize>,
    /// Attention kernel choice.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub attention: AttentionArg,
    /// How LoRA is applied.
    #[arg(long, value_enum, default_value = "merged", global = true)]
    pub lora: LoraArg,
    /// How the weights of a quantized model file are held.
    #[arg(long, value_enum, default_value = "native", global = true)]
    pub weights: WeightsArg,
    /// How the KV cache holds keys and values.
    #[arg(long, value_enum, default_value = "model", global = true)]
    pub kv_cache: KvCacheArg,
    /// Machine-readable JSON on stdout (human text and progress go to stderr).
    #[arg(long, global = true)]
    pub json: bool,
}

impl ModelArgs {
    /// The engine's load spec these flags describe (the one translation of model flags).
    pub fn spec(&self) -> LoadSpec {
        LoadSpec {
            model: self.model.clone(),
            base: self.base.clone(),
            adapter: self.adapter.clone(),
            tokenizer: self.tokenizer.clone(),
            device: self.device,
            dtype: self.dtype.dtype(),
            fusion: match self.fusion {
                FusionArg::Auto => Fusion::Auto,
                FusionArg::On => Fusion::On,
                FusionArg::Off => Fusion::Off,
            },
            mode: self.mode.map(|m| Self::mode_choice(m, self.segments)),
            decode_cache: match self.decode_cache {
                DecodeCacheArg::Slots => DecodeCache::Slots,
                DecodeCacheArg::Tokens => DecodeCache::Tokens,
                DecodeCacheArg::Reference => DecodeCache::ReferenceScrambled,
            },
            hici_heads: self.hici_heads,
            rope_scale: self.rope_scale,
            context_size: self.context_size,
            attention: match self.attention {
                AttentionArg::Auto => AttentionChoice::Auto,
                AttentionArg::Exact => AttentionChoice::Exact,
                AttentionArg::Flash => AttentionChoice::Flash,
            },
            lora: match self.lora {
                LoraArg::Merged => LoraMode::Merged,
                LoraArg::Unmerged => LoraMode::Unmerged,
            },
            dequantize: self.weights == WeightsArg::F32,
            kv_cache: match self.kv_cache {
                KvCacheArg::Model => KvStorage::Model,
                KvCacheArg::F16 => KvStorage::F16,
                KvCacheArg::Q8 => KvStorage::Q8,
            },
            progress: true,
        }
    }

    /// The engine's mode choice for `--mode` (with `--segments`).
    pub fn mode_choice(mode: ModeArg, segments: usize) -> ModeChoice {
        match mode {
            ModeArg::Full => ModeChoice::Full,
            ModeArg::Hici => ModeChoice::Hici,
            ModeArg::HiciSegmented => ModeChoice::HiciSegmented(segments),
            ModeArg::HiciSft => ModeChoice::HiciSft,
        }
    }

    /// `--mode` resolved against a model with (`has_hici`) or without HiCI modules.
    pub fn resolve_mode(&self, has_hici: bool) -> anyhow::Result<AttentionMode> {
        self.spec().resolve_mode(has_hici)
    }

    /// The typed attention mode of `mode`.
    pub fn mode_value(mode: ModeArg, segments: usize) -> AttentionMode {
        Self::mode_choice(mode, segments).mode()
    }

    pub fn decode_cache(&self) -> DecodeCache {
        self.spec().decode_cache
    }

    pub fn attention_kernel(&self) -> AttentionKernel {
        self.spec().attention_kernel()
    }

    /// Whether the GPU backend runs with burn's fusion layer.
    pub fn fused(&self) -> bool {
        self.spec().fused()
    }

    pub fn lora_mode(&self) -> LoraMode {
        self.spec().lora
    }
}
