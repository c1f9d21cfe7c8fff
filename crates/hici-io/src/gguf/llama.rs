//! GGUF models of the Llama family (`general.architecture = llama`): the configuration from
//! `llama.*` metadata, the tensors under llama.cpp's names mapped to the Hugging Face names of
//! [`hici_model::weights`], and the tokenizer description (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`).
//!
//! llama.cpp's converter stores the rows of `attn_q`/`attn_k` permuted for its interleaved
//! RoPE (per head `[hd/2, 2]`, i.e. rows `0, hd/2, 1, hd/2+1, ...`), where the model here (like
//! Hugging Face) rotates halves (per head `[2, hd/2]`). [`unpermute_rows`] undoes it on load.

use super::quants::BlockMapping;
use super::{GgufFile, GgufTensorInfo, GgufValue};
use crate::checkpoint::{Checkpoint, LoadOptions, LoadReport, ParamCounts};
use crate::error::IoError;
use crate::hf::{expected_base_shape, parse_layer, required_base_keys};
use hici_model::config::{resolve_rope_factor, LlamaConfig, ModelConfig, RopeScaling};
use hici_model::weights::{BlockQuant, HostTensor, QuantMap, WeightMap, QUANT_BLOCK};
use std::collections::BTreeMap;
use std::path::Path;

/// Architectures this loader maps (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The tokenizer a GGUF file describes, as stored (`tokenizer.ggml.*`); building a runnable
/// tokenizer from it is the runtime's job.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer (`smollm`, `llama-bpe`, ...).
    pub pre: Option<String>,
    /// Token texts by id.
    pub tokens: Vec<String>,
    /// llama.cpp token types by id (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte); empty when absent.
    pub token_types: Vec<i32>,
    /// SentencePiece scores by id; empty when absent.
    pub scores: Vec<f32>,
    /// BPE merges (`"a b"`), in rank order; empty when absent.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End-of-turn token (`tokenizer.ggml.eot_token_id`), when the file names one.
    pub eot: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default for SentencePiece models is true,
    /// for BPE models false).
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece `▁` prefix; default true for `llama`).
    pub add_space_prefix: bool,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
}

/// What a GGUF file holds, for `hici inspect` (from the header alone).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    pub version: u32,
    pub architecture: String,
    pub name: Option<String>,
    /// `general.file_type` as llama.cpp names it (`MOSTLY_Q4_1`, ...), when set.
    pub file_type: Option<String>,
    /// Tensor count by group (`embedding`, `attention`, `feed-forward`, `norms`, `output`)
    /// and ggml type.
    pub types: BTreeMap<String, BTreeMap<String, usize>>,
    pub n_tensors: usize,
    pub n_params: u64,
    pub tokenizer_model: Option<String>,
    pub tokenizer_pre: Option<String>,
    pub vocab_size: usize,
    pub context_length: usize,
    pub has_chat_template: bool,
    pub tied_embeddings: bool,
}

/// A GGUF model read into memory: the checkpoint (f32 weights under HF names), its
/// tokenizer description and a summary.
#[derive(Debug, Clone)]
pub struct GgufModel {
    pub checkpoint: Checkpoint,
    pub vocab: Option<GgufVocab>,
    pub summary: GgufSummary,
}

/// The llama.cpp name of the HF tensor `hf` (`model.layers.3.self_attn.q_proj.weight` ->
/// `blk.3.attn_q.weight`), `None` for names with no GGUF counterpart.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let (layer, rest) = parse_layer(hf.strip_prefix("model.layers.")?)?;
    let short = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// The inspect group of a llama.cpp tensor name.
fn group_of(gguf: &str) -> &'static str {
    if gguf == "token_embd.weight" {
        "embedding"
    } else if gguf == "output.weight" {
        "output"
    } else if gguf.ends_with("_norm.weight") {
        "norms"
    } else if gguf.contains(".attn_") {
        "attention"
    } else if gguf.contains(".ffn_") {
        "feed-forward"
    } else {
        "other"
    }
}

fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "ALL_F32",
        1 => "MOSTLY_F16",
        2 => "MOSTLY_Q4_0",
        3 => "MOSTLY_Q4_1",
        7 => "MOSTLY_Q8_0",
        8 => "MOSTLY_Q5_0",
        9 => "MOSTLY_Q5_1",
        10 => "MOSTLY_Q2_K",
        11 => "MOSTLY_Q3_K_S",
        12 => "MOSTLY_Q3_K_M",
        13 => "MOSTLY_Q3_K_L",
        14 => "MOSTLY_Q4_K_S",
        15 => "MOSTLY_Q4_K_M",
        16 => "MOSTLY_Q5_K_S",
        17 => "MOSTLY_Q5_K_M",
        18 => "MOSTLY_Q6_K",
        32 => "MOSTLY_BF16",
        _ => return None,
    })
}

impl GgufFile {
    fn arch(&self) -> Result<&str, IoError> {
        let arch = self
            .get("general.architecture")
            .ok_or_else(|| self.err("metadata `general.architecture` is missing"))?
            .as_str()
            .ok_or_else(|| self.err("metadata `general.architecture` is not a string"))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(self.err(format!(
                "architecture `{arch}` (general.architecture) is not supported; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        Ok(arch)
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, IoError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata `{key}` must be an unsigned integer, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    fn opt_usize(&self, key: &str, max: u64) -> Result<Option<usize>, IoError> {
        match self.opt_u64(key)? {
            Some(v) if v > max => {
                Err(self.err(format!("metadata `{key}` = {v} is absurd (> {max})")))
            }
            v => Ok(v.map(|v| v as usize)),
        }
    }

    fn req_usize(&self, key: &str, max: u64) -> Result<usize, IoError> {
        self.opt_usize(key, max)?
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, IoError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    self.err(format!(
                        "metadata `{key}` must be a finite number, got {v:?}"
                    ))
                }),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, IoError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata `{key}` must be a string, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, IoError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata `{key}` must be a bool, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    fn opt_id(&self, key: &str, vocab: usize) -> Result<Option<u32>, IoError> {
        match self.opt_u64(key)? {
            Some(id) if id as usize >= vocab => Err(self.err(format!(
                "metadata `{key}` = {id} is outside the vocabulary of {vocab} tokens"
            ))),
            id => Ok(id.map(|i| i as u32)),
        }
    }

    /// The model configuration from `{arch}.*` metadata (tied embeddings when the file has
    /// no `output.weight`).
    pub fn llama_config(&self) -> Result<LlamaConfig, IoError> {
        const MAX_DIM: u64 = 1 << 20;
        let arch = self.arch()?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.req_usize(&k("embedding_length"), MAX_DIM)?;
        let layers = self.req_usize(&k("block_count"), 4096)?;
        let heads = self.req_usize(&k("attention.head_count"), 4096)?;
        let kv_heads = self
            .opt_usize(&k("attention.head_count_kv"), 4096)?
            .unwrap_or(heads);
        let ffn = self.req_usize(&k("feed_forward_length"), MAX_DIM * 4)?;
        let context = self.req_usize(&k("context_length"), 1 << 26)?;
        let embd = self
            .tensor("token_embd.weight")
            .ok_or_else(|| self.err("tensor `token_embd.weight` is missing"))?;
        let vocab = match self.opt_usize(&k("vocab_size"), 1 << 24)? {
            Some(v) => v,
            None => embd.shape()[0],
        };
        if heads == 0 || hidden % heads != 0 {
            return Err(self.err(format!(
                "`{}` = {hidden} is not divisible by `{}` = {heads}",
                k("embedding_length"),
                k("attention.head_count")
            )));
        }
        let hd = hidden / heads;
        for key in [
            "rope.dimension_count",
            "attention.key_length",
            "attention.value_length",
        ] {
            if let Some(d) = self.opt_usize(&k(key), MAX_DIM)? {
                if d != hd {
                    return Err(self.err(format!(
                        "`{}` = {d} differs from the head dimension {hd}: partial RoPE or \
                         separate key/value widths are not supported",
                        k(key)
                    )));
                }
            }
        }
        let rope_scaling = match self.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let factor = self.opt_f64(&k("rope.scaling.factor"))?.ok_or_else(|| {
                    self.err(format!("`{}` is missing", k("rope.scaling.factor")))
                })?;
                Some(RopeScaling {
                    kind: "linear".into(),
                    factor,
                })
            }
            Some(other) => {
                return Err(self.err(format!(
                    "`{}` = `{other}` is not supported (only linear)",
                    k("rope.scaling.type")
                )))
            }
        };
        if self.tensor("rope_freqs.weight").is_some() {
            return Err(self.err(
                "tensor `rope_freqs.weight` (Llama-3.1-style RoPE frequency factors) is not \
                 supported",
            ));
        }
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            vocab_size: vocab,
            rms_norm_eps: self
                .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            max_position_embeddings: context,
            rope_scaling,
            bos_token_id: self.opt_id("tokenizer.ggml.bos_token_id", vocab)?,
            eos_token_id: self.opt_id("tokenizer.ggml.eos_token_id", vocab)?,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            attention_bias: false,
            hidden_act: None,
        };
        cfg.validate()
            .map_err(|e| self.err(format!("model metadata: {e}")))?;
        Ok(cfg)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, IoError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(format!("metadata `{key}` must be an array of strings")))?;
        arr.iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(format!("metadata `{key}`[{i}] is not a string")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn numbers<T>(
        &self,
        key: &str,
        n: usize,
        f: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Vec<T>, IoError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(format!("metadata `{key}` must be an array")))?;
        if arr.len() != n {
            return Err(self.err(format!(
                "metadata `{key}` has {} entries for {n} tokens",
                arr.len()
            )));
        }
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                f(x).ok_or_else(|| self.err(format!("metadata `{key}`[{i}] has the wrong type")))
            })
            .collect()
    }

    /// The tokenizer description, `None` when the file has no `tokenizer.ggml.model`.
    pub fn vocab(&self) -> Result<Option<GgufVocab>, IoError> {
        let Some(model) = self.opt_str("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        let tokens = self
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.err("metadata `tokenizer.ggml.tokens` is missing"))?;
        let n = tokens.len();
        let token_types = self.numbers("tokenizer.ggml.token_type", n, |v| match *v {
            GgufValue::I32(t) => Some(t),
            _ => v.as_u64().and_then(|t| i32::try_from(t).ok()),
        })?;
        let scores = self.numbers("tokenizer.ggml.scores", n, |v| v.as_f64().map(|s| s as f32))?;
        let merges = self.strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let spm = model == "llama";
        Ok(Some(GgufVocab {
            model: model.to_string(),
            pre: self.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            bos: self.opt_id("tokenizer.ggml.bos_token_id", n)?,
            eos: self.opt_id("tokenizer.ggml.eos_token_id", n)?,
            eot: self.opt_id("tokenizer.ggml.eot_token_id", n)?,
            unk: self.opt_id("tokenizer.ggml.unknown_token_id", n)?,
            pad: self.opt_id("tokenizer.ggml.padding_token_id", n)?,
            add_bos: self
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(spm),
            add_eos: self
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            add_space_prefix: self
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(spm),
            chat_template: self.opt_str("tokenizer.chat_template")?.map(str::to_string),
            tokens,
            token_types,
            scores,
            merges,
        }))
    }

    /// A summary of the model (header only).
    pub fn summary(&self) -> Result<GgufSummary, IoError> {
        let cfg = self.llama_config()?;
        let mut types: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for t in &self.tensors {
            *types
                .entry(group_of(&t.name).to_string())
                .or_default()
                .entry(t.ty.name().to_string())
                .or_default() += 1;
        }
        Ok(GgufSummary {
            version: self.version,
            architecture: self.arch()?.to_string(),
            name: self.opt_str("general.name")?.map(str::to_string),
            file_type: self
                .opt_u64("general.file_type")?
                .map(|t| file_type_name(t).map_or(format!("type {t}"), str::to_string)),
            types,
            n_tensors: self.tensors.len(),
            n_params: self.tensors.iter().map(GgufTensorInfo::numel).sum(),
            tokenizer_model: self.opt_str("tokenizer.ggml.model")?.map(str::to_string),
            tokenizer_pre: self.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            has_chat_template: self.get("tokenizer.chat_template").is_some(),
            tied_embeddings: cfg.tie_word_embeddings,
        })
    }
}

/// Reorders the rows of a q/k projection `[heads * hd, cols]` from llama.cpp's interleaved
/// RoPE order (per head: row `2i + p` holds pair element `p` of frequency `i`) to the
/// rotate-half order (per head: row `p * hd/2 + i`).
pub fn unpermute_rows<T: Copy + Default>(data: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = data.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for p in 0..2 {
                let src = (h * hd + 2 * i + p) * cols;
                let dst = (h * hd + p * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's `permute` (its converter's q/k row order for interleaved RoPE; the inverse of
/// [`unpermute_rows`]): per head, HF row `p * hd/2 + i` goes to row `2i + p`.
pub fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for p in 0..2 {
            for i in 0..hd / 2 {
                let src = (h * hd + p * (hd / 2) + i) * cols;
                let dst = (h * hd + i * 2 + p) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// A plain Llama checkpoint as a GGUF file the way llama.cpp's converter writes it: `llama.*`
/// metadata from the configuration, llama.cpp tensor names, q/k rows in its RoPE order, f32
/// data. HiCI modules and LoRA factors have no GGUF names: an error.
pub fn llama_gguf_writer(ck: &Checkpoint) -> Result<super::writer::GgufWriter, IoError> {
    let l = &ck.config.llama;
    let mut w = super::writer::GgufWriter::default();
    let u = |v: usize| GgufValue::U32(v as u32);
    w.meta("general.architecture", GgufValue::String("llama".into()))
        .meta("llama.block_count", u(l.num_hidden_layers))
        .meta("llama.context_length", u(l.max_position_embeddings))
        .meta("llama.embedding_length", u(l.hidden_size))
        .meta("llama.feed_forward_length", u(l.intermediate_size))
        .meta("llama.attention.head_count", u(l.num_attention_heads))
        .meta("llama.attention.head_count_kv", u(l.kv_heads()))
        .meta("llama.rope.freq_base", GgufValue::F32(l.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(l.rms_norm_eps as f32),
        );
    if let Some(rs) = &l.rope_scaling {
        w.meta(
            "llama.rope.scaling.type",
            GgufValue::String(rs.kind.clone()),
        )
        .meta(
            "llama.rope.scaling.factor",
            GgufValue::F32(rs.factor as f32),
        );
    }
    for (k, t) in &ck.weights {
        let name = gguf_name(k).ok_or_else(|| IoError::Gguf {
            path: "<gguf writer>".into(),
            msg: format!("tensor `{k}` has no GGUF name (HiCI modules and LoRA are not exported)"),
        })?;
        let cols = t.shape[1..].iter().product::<usize>().max(1);
        let data = if k.ends_with("q_proj.weight") {
            permute_rows(&t.data, l.num_attention_heads, cols)
        } else if k.ends_with("k_proj.weight") {
            permute_rows(&t.data, l.kv_heads(), cols)
        } else {
            t.data.clone()
        };
        w.f32_tensor(&name, &t.shape, &data);
    }
    Ok(w)
}

/// Reads a Llama-family GGUF model: every tensor the configuration implies, dequantized to
/// f32, q/k rows un-permuted; a tensor the model does not use is an error. `opts.rope_factor`
/// overrides the file's RoPE scaling; the HiCI options do not apply (no HiCI modules).
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<GgufModel, IoError> {
    let t0 = std::time::Instant::now();
    let file = GgufFile::open(path)?;
    let llama = file.llama_config()?;
    let vocab = file.vocab()?;
    let summary = file.summary()?;
    let mut weights = WeightMap::new();
    let mut quantized = QuantMap::new();
    let mut formats = BTreeMap::<super::GgmlType, usize>::new();
    let mut used = std::collections::BTreeSet::new();
    let (heads, kv_heads) = (llama.num_attention_heads, llama.kv_heads());
    for hf in required_base_keys(&llama) {
        let gname = gguf_name(&hf).expect("every base key has a GGUF name");
        let info = file
            .tensor(&gname)
            .ok_or_else(|| IoError::missing(&gname, path))?;
        let expected = expected_base_shape(&llama, &hf).expect("required keys have shapes");
        if info.shape() != expected {
            return Err(IoError::shape(&gname, path, &expected, &info.shape()));
        }
        let cols = expected[1..].iter().product::<usize>().max(1);
        let row_heads = if hf.ends_with("q_proj.weight") {
            Some(heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        if opts.keep_quantized && info.ty.is_quantized() && expected.len() == 2 {
            let mut q = file.read_blocks(info)?;
            if let Some(h) = row_heads {
                q.values = unpermute_rows(&q.values, h, cols);
                q.scales = unpermute_rows(&q.scales, h, cols / QUANT_BLOCK);
                q.offsets = q.offsets.map(|o| unpermute_rows(&o, h, cols / QUANT_BLOCK));
            }
            *formats.entry(info.ty).or_insert(0) += 1;
            quantized.insert(hf, q);
        } else {
            let mut data = file.read_f32(info)?;
            if let Some(h) = row_heads {
                data = unpermute_rows(&data, h, cols);
            }
            weights.insert(hf, HostTensor::new(expected, data)?);
        }
        used.insert(gname);
    }
    if let Some(extra) = file.tensors.iter().find(|t| !used.contains(&t.name)) {
        return Err(IoError::unexpected(&extra.name, path));
    }
    let rope_factor = resolve_rope_factor(opts.rope_factor, &llama, None);
    let config = ModelConfig {
        llama,
        hici: None,
        rope_factor,
    };
    config.validate()?;
    let base = weights.values().map(HostTensor::numel).sum::<usize>()
        + quantized.values().map(|q| q.values.len()).sum::<usize>();
    let kept = if quantized.is_empty() {
        "dequantized to f32".to_string()
    } else {
        let list: Vec<String> = formats
            .iter()
            .map(|(t, n)| {
                let how = match t.block_mapping() {
                    Some(BlockMapping::Requantized) => "re-quantized to 8 bits per 32",
                    _ => "exact",
                };
                format!("{n} {} ({how})", t.name())
            })
            .collect();
        format!(
            "{} kept in 8-bit blocks of 32 ({}, {:.1} MiB), {} in f32",
            quantized.len(),
            list.join(", "),
            quantized.values().map(BlockQuant::nbytes).sum::<usize>() as f64 / 1048576.0,
            weights.len()
        )
    };
    let mut notes = vec![format!(
        "GGUF v{} `{}` ({}), {} tensors: {kept}, read in {:.2} s",
        summary.version,
        summary.architecture,
        summary.file_type.as_deref().unwrap_or("file type not set"),
        summary.n_tensors,
        t0.elapsed().as_secs_f64()
    )];
    if config.llama.tie_word_embeddings {
        notes.push("no `output.weight`: the output layer reuses the token embedding".into());
    }
    Ok(GgufModel {
        checkpoint: Checkpoint {
            config,
            lora: None,
            weights,
            quantized,
            report: LoadReport {
                files: vec![path.to_path_buf()],
                notes,
                counts: ParamCounts {
                    base,
                    ..ParamCounts::default()
                },
            },
        },
        vocab,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hd, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let p = permute_rows(&w, heads, cols);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, heads, cols), w);
        // head_dim 4, one column: stored rows [0, 2, 1, 3] of the HF order
        assert_eq!(permute_rows(&[0., 1., 2., 3.], 1, 1), vec![0., 2., 1., 3.]);
    }

    #[test]
    fn names_map_both_ways_for_every_base_tensor() {
        let cfg = LlamaConfig::from_json(
            r#"{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "vocab_size": 10, "max_position_embeddings": 16}"#,
        )
        .unwrap();
        let names: std::collections::BTreeSet<_> = required_base_keys(&cfg)
            .iter()
            .map(|k| gguf_name(k).unwrap())
            .collect();
        assert_eq!(names.len(), required_base_keys(&cfg).len());
        assert!(names.contains("blk.1.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.01.mlp.up_proj.weight"), None);
    }
}
