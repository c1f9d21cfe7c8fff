//! `hici bench`: prefill and decode throughput, time to first token and peak memory, in the
//! style of `llama-bench` / `mistralrs bench`. Benchmarks are not tests: nothing here asserts a
//! time.
//!
//! One measured iteration of a (mode, prompt length) row:
//! 1. prefill `P` random tokens from an empty cache, logits of the last position only, read back
//!    to the host (this also synchronises GPU backends) -> prefill tokens/s; plus the greedy pick
//!    of the first token -> time to first token;
//! 2. (untimed) `--depth` more tokens fed through the decode path in chunks, so the cache holds
//!    `P + depth` tokens (plus the `K+M` HiCI slots in mode `hici`);
//! 3. `--gen-len` single-token greedy decode steps, each reading its logits back -> decode
//!    tokens/s.
//!
//! Modes `hici-segmented` and `hici-sft` have no decode (the reference defines none): they report
//! prefill only, computed layer by layer through the model's public API with the `lm_head` on
//! the last position only, exactly like the prefill of the other modes.

use crate::args::{DecodeCacheArg, ModeArg, ModelArgs};
use crate::backend::DeviceChoice;
use crate::cmd::import::QuantizeArg;
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::prelude::*;
use clap::{Args, ValueEnum};
use hici_engine::CancelToken;
use hici_io::converted::quantizable;
use hici_io::gguf::quants::{block_quant, quantizer, GgmlType};
use hici_model::hici::{segment_count, SegmentRule};
use hici_model::layout::model_tensors;
use hici_model::synthetic::{SyntheticWeights, XorShift};
use hici_model::weights::{BlockQuant, HostTensor, QuantProduct, WeightSource};
use hici_model::{
    resolve_rope_factor, to_vec_f32, AttentionMode, HiciConfig, HiciLlama, LlamaConfig, Logits,
    LoraMode, ModelConfig,
};
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, Clone, Args)]
#[command(
    long_about = "Measures prefill and decode throughput, time to first token and peak \
memory for each --modes x --prompt-len row (--warmup untimed runs, then --iters timed runs; \
mean/min/max over the timed runs). A table goes to stderr; --json prints a document on stdout. \
The model comes from the usual options (--base/--adapter, else the embedded tiny model) or from \
--synthetic (random weights generated in place, no download). Prompts are random token ids. \
Prefill always starts from an empty cache; --depth adds tokens to the cache (untimed) before the \
timed decode. Thread counts on the CPU backend follow RAYON_NUM_THREADS and MATMUL_NUM_THREADS."
)]
pub struct BenchArgs {
    /// Prompt lengths to prefill, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub prompt_len: Vec<usize>,
    /// Timed greedy decode steps after each prefill (0: prefill only).
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    /// Extra tokens put in the cache (untimed) between the prefill and the timed decode.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Attention modes to measure, comma-separated (hici-segmented uses --segments; default:
    /// full,hici,hici-segmented for a HiCI model, full for a plain one).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Option<Vec<ModeArg>>,
    /// Untimed runs per row before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per row.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Random weights generated in place instead of loading a checkpoint: `7b` (Llama-2-7B +
    /// the released HiCI sizes), `1b` (TinyLlama-1.1B shape + HiCI), `tiny`, or a JSON file
    /// (the `ModelConfig` layout {"llama": {HF config.json fields}, "hici": {...} | null,
    /// "rope_factor": f}, or a bare HF config.json with an optional "hici" object).
    #[arg(long, value_name = "PRESET|FILE")]
    pub synthetic: Option<String>,
    /// Seed of the synthetic weights and of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also measure continuous batching: N streams (each a --prompt-len prompt, prefilled one
    /// after another, then --gen-len tokens decoded together in one batch) for each N given,
    /// e.g. `--concurrency 1,4,8,16`: aggregate and per-stream decode tok/s, time to first token.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// With --synthetic: quantize the linear weights whose rows are whole blocks (as `hici
    /// import --quantize` does, llama.cpp's reference quantizers) and keep them quantized, to
    /// measure a quantized model's memory and speed at any shape.
    #[arg(long, value_enum, value_name = "FORMAT", requires = "synthetic")]
    pub quantize: Option<QuantizeArg>,
}

// ---------------------------------------------------------------------------------------------
// Synthetic models (weights: `hici_model::synthetic`)

fn llama(v: Value) -> Result<LlamaConfig> {
    let cfg: LlamaConfig = serde_json::from_value(v).context("synthetic Llama config")?;
    cfg.validate()?;
    Ok(cfg)
}

/// The model configuration of a `--synthetic` preset or file.
pub fn synthetic_config(spec: &str, m: &ModelArgs) -> Result<ModelConfig> {
    let hici_7b = HiciConfig::llama2_7b();
    let (llama_cfg, hici, factor) = match spec {
        "7b" => (
            llama(json!({
                "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rope_scaling": {"type": "linear", "factor": 4.0},
            }))?,
            Some(hici_7b),
            None,
        ),
        "1b" => (
            llama(json!({
                "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rope_scaling": {"type": "linear", "factor": 4.0},
            }))?,
            Some(hici_7b),
            None,
        ),
        "tiny" => (
            llama(json!({
                "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                "max_position_embeddings": 16384,
            }))?,
            Some(HiciConfig {
                local_slots: 8,
                global_slots: 4,
                lc_heads: 4,
                gi_heads: 4,
                bottleneck_dim: 32,
                compress_dim: 32,
                shared_compress_dim: 16,
            }),
            None,
        ),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("--synthetic {path}: not a preset (7b, 1b, tiny) nor a readable file")
            })?;
            let mut v: Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
            let obj = v
                .as_object_mut()
                .with_context(|| format!("{path}: expected a JSON object"))?;
            let hici = match obj.remove("hici") {
                None | Some(Value::Null) => None,
                Some(h) => Some(
                    serde_json::from_value::<HiciConfig>(h)
                        .with_context(|| format!("{path}: \"hici\""))?,
                ),
            };
            let factor = obj.remove("rope_factor").and_then(|f| f.as_f64());
            let l = match obj.remove("llama") {
                Some(l) => llama(l),
                None => llama(Value::Object(obj.clone())),
            }
            .with_context(|| format!("{path}: Llama part"))?;
            (l, hici, factor)
        }
    };
    let mut hici = hici;
    if let (Some(h), Some(n)) = (hici.as_mut(), m.hici_heads) {
        h.lc_heads = n;
        h.gi_heads = n;
    }
    let rope_factor = match (m.rope_scale, factor) {
        (Some(f), _) | (None, Some(f)) => f,
        _ => resolve_rope_factor(None, &llama_cfg, m.context_size),
    };
    let cfg = ModelConfig {
        llama: llama_cfg,
        hici,
        rope_factor,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds a random-weight model for `cfg` through the normal weight loader; with `quantize`,
/// its quantizable linear weights are quantized to that block format on the host and kept so
/// (multiplied as `product` says).
pub fn synthetic_model<B: Backend>(
    cfg: &ModelConfig,
    seed: u64,
    quantize: Option<(GgmlType, QuantProduct)>,
    device: &B::Device,
) -> Result<HiciLlama<B>> {
    let mut src = QuantizingSource {
        inner: SyntheticWeights::new(cfg, seed),
        shapes: model_tensors(cfg, None)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect(),
        quantize,
        errors: Vec::new(),
    };
    let built = HiciLlama::<B>::from_weights(cfg, None, LoraMode::Merged, &mut src, device);
    if let (Some((ty, _)), Some(e)) = (quantize, src.errors.first()) {
        bail!("quantizing the synthetic weights to {}: {e}", ty.name());
    }
    let model = built.context("building the synthetic model")?;
    let left = src.inner.remaining();
    if !left.is_empty() {
        bail!(
            "synthetic weights not used by the model (name drift?): {}",
            left.join(", ")
        );
    }
    Ok(model)
}

/// Synthetic weights that, with `quantize`, hand out the linear weights in that block format
/// when the model asks for them quantized and their rows are whole blocks ([`quantizable`],
/// the rule of `hici import --quantize`); everything else as generated.
struct QuantizingSource {
    inner: SyntheticWeights,
    /// Every tensor's logical shape.
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
    quantize: Option<(GgmlType, QuantProduct)>,
    /// Quantization failures (the tensor is then missing and the build fails too).
    errors: Vec<String>,
}

impl WeightSource for QuantizingSource {
    fn take(&mut self, name: &str) -> Option<HostTensor> {
        self.inner.take(name)
    }

    fn take_quantized(&mut self, name: &str) -> Option<BlockQuant> {
        let (ty, _) = self.quantize?;
        let shape = self.shapes.get(name)?;
        if !quantizable(name, shape, ty) {
            return None;
        }
        let quantize = quantizer(ty)?;
        let t = self.inner.take(name)?;
        let bytes = quantize(&t.data);
        drop(t);
        match block_quant(ty, &bytes, shape[0], shape[1]) {
            Ok(q) => Some(q),
            Err(e) => {
                self.errors.push(format!("{name}: {e:?}"));
                None
            }
        }
    }

    fn quant_product(&self) -> QuantProduct {
        self.quantize.map_or(QuantProduct::Backend, |(_, p)| p)
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

fn mode_name(mode: ModeArg) -> String {
    mode.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn attention_mode(mode: ModeArg, segments: usize) -> AttentionMode {
    match mode {
        ModeArg::Full => AttentionMode::Full,
        ModeArg::Hici => AttentionMode::Inference,
        ModeArg::HiciSegmented => AttentionMode::Segmented { segments },
        ModeArg::HiciSft => AttentionMode::SftSegmented,
    }
}

fn has_decode(mode: ModeArg) -> bool {
    matches!(mode, ModeArg::Full | ModeArg::Hici)
}

fn ids_tensor<B: Backend>(ids: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn argmax(row: &[f32]) -> i64 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as i64
}

/// Random prompt ids in `[3, vocab)` (skipping the special ids when the vocabulary allows).
fn random_ids(rng: &mut XorShift, n: usize, vocab: usize) -> Vec<i64> {
    let lo = if vocab > 3 { 3 } else { 0 };
    let span = (vocab - lo) as u64;
    (0..n)
        .map(|_| (lo as u64 + rng.next_u64() % span) as i64)
        .collect()
}

/// Prefill for the segmented modes (no decode cache exists for them): the model's layer loop,
/// with the `lm_head` on the last position only. `[1, S]` -> `[1, 1, V]`.
fn prefill_segmented<B: Backend>(
    model: &HiciLlama<B>,
    ids: Tensor<B, 2, Int>,
    mode: AttentionMode,
) -> Result<Tensor<B, 3>> {
    let s = ids.dims()[1];
    let rule = match mode {
        AttentionMode::Segmented { segments } => SegmentRule::Equal(segments),
        AttentionMode::SftSegmented => SegmentRule::Sft,
        _ => bail!("prefill_segmented: not a segmented mode"),
    };
    let n = segment_count(s, rule)?;
    let mut x = model.embed(ids);
    let rope = model.rope.tables_for::<B>(0, s, &x.device());
    for layer in &model.layers {
        let a = layer.input_layernorm.forward(x.clone());
        let out = layer
            .self_attn
            .forward_hici(a, n, &rope, None, model.kernel)?;
        x = layer.finish(x, out.out);
    }
    let last = x.narrow(1, s - 1, 1);
    Ok(model.lm_head.forward(model.norm.forward(last)))
}

/// Timings of one iteration (seconds).
struct Sample {
    prefill: f64,
    ttft: Option<f64>,
    decode: Option<f64>,
}

/// Tokens fed per call when filling `--depth`.
const DEPTH_CHUNK: usize = 256;

struct RowSpec {
    mode: ModeArg,
    prompt: usize,
    depth: usize,
    gen: usize,
    segments: usize,
}

/// `c` streams of `r.prompt` random tokens: prefilled one after another, then `r.gen` tokens
/// each decoded in `r.gen` batched steps. Returns (time to first token of each stream since
/// the start, decode seconds).
fn run_concurrent<B: Backend>(
    model: &HiciLlama<B>,
    r: &RowSpec,
    c: usize,
    m: &ModelArgs,
    rng: &mut XorShift,
    cancel: &CancelToken,
) -> Result<(Vec<f64>, f64)> {
    let vocab = model.vocab_size();
    let mode = attention_mode(r.mode, r.segments);
    let t0 = Instant::now();
    let mut caches = Vec::with_capacity(c);
    let mut next = Vec::with_capacity(c);
    let mut ttft = Vec::with_capacity(c);
    for _ in 0..c {
        let prompt = random_ids(rng, r.prompt, vocab);
        let (logits, mut cache) =
            model.prefill_tokens(&prompt, mode, m.decode_cache(), Logits::Last)?;
        cache.reserve(r.gen);
        next.push(argmax(&to_vec_f32(logits)));
        ttft.push(t0.elapsed().as_secs_f64());
        caches.push(cache);
    }
    let t1 = Instant::now();
    for _ in 0..r.gen {
        if cancel.is_cancelled() {
            break;
        }
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let rows = to_vec_f32(model.decode_batch(&next, &mut refs)?);
        for (n, row) in next.iter_mut().zip(rows.chunks(vocab)) {
            *n = argmax(row);
        }
    }
    Ok((ttft, t1.elapsed().as_secs_f64()))
}

fn run_once<B: Backend>(
    model: &HiciLlama<B>,
    r: &RowSpec,
    m: &ModelArgs,
    rng: &mut XorShift,
    device: &B::Device,
    cancel: &CancelToken,
) -> Result<Sample> {
    let vocab = model.vocab_size();
    let prompt = random_ids(rng, r.prompt, vocab);
    let mode = attention_mode(r.mode, r.segments);
    if !has_decode(r.mode) {
        let ids = ids_tensor::<B>(&prompt, device);
        let t0 = Instant::now();
        let logits = prefill_segmented(model, ids, mode)?;
        let _ = to_vec_f32(logits);
        return Ok(Sample {
            prefill: t0.elapsed().as_secs_f64(),
            ttft: None,
            decode: None,
        });
    }
    let t0 = Instant::now();
    let (logits, mut cache) =
        model.prefill_tokens(&prompt, mode, m.decode_cache(), Logits::Last)?;
    let row = to_vec_f32(logits);
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = argmax(&row);
    let ttft = t0.elapsed().as_secs_f64();
    if r.gen == 0 {
        return Ok(Sample {
            prefill,
            ttft: Some(ttft),
            decode: None,
        });
    }
    // as `generate` does: one reservation, so no timed step reallocates the cache
    cache.reserve(r.depth + r.gen);
    let mut left = r.depth;
    while left > 0 && !cancel.is_cancelled() {
        let n = left.min(DEPTH_CHUNK);
        let chunk = random_ids(rng, n, vocab);
        let logits = model.decode_tokens(&chunk, &mut cache)?;
        next = argmax(&to_vec_f32(logits.narrow(1, n - 1, 1)));
        left -= n;
    }
    let t1 = Instant::now();
    for _ in 0..r.gen {
        if cancel.is_cancelled() {
            break;
        }
        let logits = model.decode_tokens(&[next], &mut cache)?;
        next = argmax(&to_vec_f32(logits));
    }
    Ok(Sample {
        prefill,
        ttft: Some(ttft),
        decode: Some(t1.elapsed().as_secs_f64()),
    })
}

/// mean / min / max of a list.
fn stats(xs: &[f64]) -> Option<Value> {
    if xs.is_empty() {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let min = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Some(json!({"mean": mean, "min": min, "max": max}))
}

// ---------------------------------------------------------------------------------------------
// Memory and machine facts

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Peak resident set size so far (Linux `VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (`VmRSS`), bytes.
fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// Resets `VmHWM` to the current RSS (Linux >= 4.0: write "5" to clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Device memory in use (bytes) where the backend can tell, else the reason why not, with
/// what the number means. `loaded`: the model is on the device (wgpu's runtime is set up by
/// the load, with the API it names, so it is not asked before).
fn device_memory(
    choice: DeviceChoice,
    loaded: bool,
) -> std::result::Result<(u64, &'static str), String> {
    match choice {
        DeviceChoice::Ndarray => {
            Err("the ndarray backend runs on the host: see peak_rss_bytes".into())
        }
        #[allow(unused_variables)]
        DeviceChoice::Wgpu(sel) => {
            #[cfg(feature = "wgpu")]
            {
                use cubecl::Runtime;
                if !loaded {
                    return Err("asked after the load only".into());
                }
                let device = hici_engine::device::resolve_wgpu(sel).map_err(|e| e.to_string())?;
                let usage = burn::backend::wgpu::WgpuRuntime::client(&device)
                    .memory_usage()
                    .map_err(|e| format!("wgpu memory usage: {e:?}"))?;
                Ok((
                    usage.bytes_reserved,
                    "bytes reserved by burn's wgpu memory pools after the row (the model's \
                     tensors and the pools' free pages; the pools keep their high-water mark, \
                     so this approximates the peak; the driver's own memory is not included)",
                ))
            }
            #[cfg(not(feature = "wgpu"))]
            Err("wgpu is not compiled in".into())
        }
        #[allow(unused_variables)]
        DeviceChoice::Cuda(i) => {
            #[cfg(feature = "cuda")]
            {
                let ctx = cudarc::driver::CudaContext::new(i)
                    .map_err(|e| format!("CUDA context: {e:?}"))?;
                let (free, total) = ctx
                    .mem_get_info()
                    .map_err(|e| format!("cuMemGetInfo: {e:?}"))?;
                Ok((
                    (total - free) as u64,
                    "device-wide used memory (total - free) after the row; burn's memory pools \
                     keep their high-water mark, so this approximates the peak (other processes \
                     included)",
                ))
            }
            #[cfg(not(feature = "cuda"))]
            Err("CUDA is not compiled in".into())
        }
    }
}

#[allow(unused_variables)]
fn gpu_name(choice: DeviceChoice) -> Option<String> {
    match choice {
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(i) => cudarc::driver::CudaContext::new(i).ok()?.name().ok(),
        _ => None,
    }
}

fn machine(choice: DeviceChoice) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let logical = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| {
            l["MemTotal:".len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|k| k * 1024);
    let env = |k: &str| std::env::var(k).ok();
    json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu_model": cpu_model,
        "cpu_logical_cores": (logical > 0).then_some(logical),
        "available_parallelism": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_bytes": mem_total,
        "gpu": gpu_name(choice),
        "env": {
            "RAYON_NUM_THREADS": env("RAYON_NUM_THREADS"),
            "MATMUL_NUM_THREADS": env("MATMUL_NUM_THREADS"),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// The command

fn fmt_stat(v: &Value, key: &str, scale: f64) -> String {
    match v.get(key) {
        Some(s) if s.is_object() => {
            let g = |k: &str| s[k].as_f64().unwrap_or(f64::NAN) * scale;
            format!("{:9.2} ({:.2}-{:.2})", g("mean"), g("min"), g("max"))
        }
        _ => format!("{:>9}", "-"),
    }
}

fn print_table(rows: &[Value]) {
    eprintln!(
        "{:<15} {:>6} {:>6} {:>4} | {:<30} | {:>9} | {:<30} | {:>8}",
        "mode",
        "prompt",
        "depth",
        "gen",
        "prefill tok/s mean (min-max)",
        "TTFT ms",
        "decode tok/s mean (min-max)",
        "peak RSS"
    );
    for r in rows {
        let prefill = fmt_stat(&r["prefill"], "tokens_per_s", 1.0);
        let ttft = r["ttft_ms"]["mean"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.1}"));
        let decode = if r["decode"].is_null() {
            "-".to_string()
        } else {
            fmt_stat(&r["decode"], "tokens_per_s", 1.0)
        };
        let rss = r["memory"]["peak_rss_bytes"]
            .as_u64()
            .map_or("-".to_string(), |b| format!("{} MiB", b >> 20));
        let gen = r["gen_len"].as_u64().unwrap_or(0);
        let depth = r["depth"].as_u64().unwrap_or(0);
        let (depth, gen) = if r["decode"].is_null() {
            ("-".to_string(), "-".to_string())
        } else {
            (depth.to_string(), gen.to_string())
        };
        eprintln!(
            "{:<15} {:>6} {:>6} {:>4} | {:<30} | {:>9} | {:<30} | {:>8}",
            r["mode"].as_str().unwrap_or(""),
            r["prompt_len"].as_u64().unwrap_or(0),
            depth,
            gen,
            prefill,
            ttft,
            decode,
            rss
        );
    }
}

pub fn run<B: Backend>(
    m: &ModelArgs,
    a: &BenchArgs,
    dev: &B::Device,
    cancel: &CancelToken,
) -> Result<()> {
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!("--prompt-len needs lengths > 0");
    }
    if a.iters == 0 {
        bail!("--iters must be > 0");
    }
    if a.modes.as_ref().is_some_and(|m| m.is_empty()) {
        bail!("--modes needs at least one mode");
    }
    let requested = a.modes.clone().unwrap_or_default();
    if a.synthetic.is_some() && m.base.is_some() {
        bail!("--synthetic and --base are exclusive");
    }
    if requested.contains(&ModeArg::HiciSegmented) {
        let bad: Vec<_> = a
            .prompt_len
            .iter()
            .filter(|&&p| m.segments == 0 || p % m.segments != 0)
            .map(|p| p.to_string())
            .collect();
        if !bad.is_empty() {
            bail!(
                "hici-segmented needs prompt lengths divisible by --segments {}: {}",
                m.segments,
                bad.join(", ")
            );
        }
    }

    let dtype_name = m.dtype.name();
    let device_before = device_memory(m.device, false).ok().map(|(b, _)| b);
    let t_load = Instant::now();
    let (model, source, max_context) = match &a.synthetic {
        Some(spec) => {
            let cfg = synthetic_config(spec, m)?;
            eprintln!("bench: generating synthetic model `{spec}` (random weights)");
            let quantize = a.quantize.map(|q| (q.ggml(), m.spec().quant_product()));
            // the same precision and attention kernel steps as `crate::load::load`
            let model = crate::load::prepare(
                synthetic_model::<B>(&cfg, a.seed, quantize, dev)?,
                &m.spec(),
                m.attention_kernel(),
            )?;
            let ctx = cfg.context();
            let source = match a.quantize {
                Some(q) => format!("synthetic:{spec}:{}", q.ggml().name()),
                None => format!("synthetic:{spec}"),
            };
            (model, source, ctx)
        }
        None => {
            let loaded = crate::load::load::<B>(&m.spec(), dev)?;
            let src = match (&m.model, &m.base) {
                (Some(f), _) => f.display().to_string(),
                (None, Some(b)) => b.display().to_string(),
                (None, None) => "embedded:tiny-hici-a".to_string(),
            };
            (loaded.model, src, loaded.max_context)
        }
    };
    let load_s = t_load.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let modes = match &a.modes {
        Some(m) => m.clone(),
        None if cfg.hici.is_some() => vec![ModeArg::Full, ModeArg::Hici, ModeArg::HiciSegmented],
        None => vec![ModeArg::Full],
    };
    if modes.contains(&ModeArg::HiciSegmented) && a.modes.is_none() {
        let bad: Vec<_> = a
            .prompt_len
            .iter()
            .filter(|&&p| m.segments == 0 || p % m.segments != 0)
            .collect();
        if !bad.is_empty() {
            bail!(
                "hici-segmented (a default mode for a HiCI model) needs prompt lengths divisible \
                 by --segments {}: {bad:?} (or pass --modes)",
                m.segments
            );
        }
    }
    if cfg.hici.is_none() {
        if let Some(&bad) = modes.iter().find(|&&md| md != ModeArg::Full) {
            bail!(
                "mode {} needs HiCI modules, but the model has none",
                mode_name(bad)
            );
        }
    }
    let longest = a.prompt_len.iter().max().copied().unwrap_or(0) + a.depth + a.gen_len;
    if longest > max_context {
        eprintln!(
            "note: runs reach {longest} positions, beyond the {max_context} the RoPE setting \
             was made for (timings are still valid; outputs would not be)"
        );
    }
    let params = model.num_params();
    let rss_after_load = current_rss();
    let device_after_load = device_memory(m.device, true).ok().map(|(b, _)| b);
    eprintln!(
        "bench: {source}: {:.1} M parameters, loaded in {load_s:.1} s; device {}, {dtype_name}, \
         attention {:?}",
        params as f64 / 1e6,
        m.device,
        model.kernel
    );

    let mut rows = Vec::new();
    let mut interrupted = false;
    'outer: for &mode in &modes {
        for &p in &a.prompt_len {
            let spec = RowSpec {
                mode,
                prompt: p,
                depth: a.depth,
                gen: a.gen_len,
                segments: m.segments,
            };
            let name = mode_name(mode);
            eprintln!(
                "bench: {name} prompt {p}: {} warmup + {} timed",
                a.warmup, a.iters
            );
            let scoped = reset_peak_rss();
            // The same prompts for every mode: one stream per prompt length.
            let mut rng = XorShift::new(a.seed ^ (p as u64).wrapping_mul(0x51ed_270b));
            let mut samples = Vec::new();
            for it in 0..a.warmup + a.iters {
                if cancel.is_cancelled() {
                    interrupted = true;
                    break;
                }
                let s = run_once(&model, &spec, m, &mut rng, dev, cancel)
                    .with_context(|| format!("{name}, prompt {p}"))?;
                if it >= a.warmup {
                    samples.push(s);
                }
            }
            if cancel.is_cancelled() {
                interrupted = true;
            }
            if samples.is_empty() {
                break 'outer;
            }
            let prefill_s: Vec<f64> = samples.iter().map(|s| s.prefill).collect();
            let prefill_tps: Vec<f64> = prefill_s.iter().map(|t| p as f64 / t).collect();
            let ttft_ms: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.ttft)
                .map(|t| t * 1e3)
                .collect();
            let decode_s: Vec<f64> = samples.iter().filter_map(|s| s.decode).collect();
            let gen = a.gen_len as f64;
            let decode = if decode_s.is_empty() {
                Value::Null
            } else {
                let tps: Vec<f64> = decode_s.iter().map(|t| gen / t).collect();
                let ms: Vec<f64> = decode_s.iter().map(|t| t * 1e3 / gen).collect();
                let prefix = if mode == ModeArg::Hici && m.decode_cache != DecodeCacheArg::Tokens {
                    cfg.hici.as_ref().map_or(0, |h| h.prefix_len())
                } else {
                    0
                };
                json!({
                    "tokens_per_s": stats(&tps),
                    "ms_per_token": stats(&ms),
                    "seconds": stats(&decode_s),
                    "samples_s": decode_s,
                    "cache_entries_at_start": prefix + p + a.depth,
                })
            };
            let decode_note = if has_decode(mode) {
                if a.gen_len == 0 {
                    Some("--gen-len 0")
                } else {
                    None
                }
            } else {
                Some("this mode has no decode (segmented prefill only)")
            };
            let (dev_bytes, dev_note) = match device_memory(m.device, true) {
                Ok((b, note)) => (Some(b), note.to_string()),
                Err(e) => (None, e),
            };
            rows.push(json!({
                "mode": name,
                "segments": match mode {
                    ModeArg::HiciSegmented => Some(m.segments),
                    ModeArg::HiciSft => segment_count(p, SegmentRule::Sft).ok(),
                    ModeArg::Hici => Some(1),
                    ModeArg::Full => None,
                },
                "prompt_len": p,
                "depth": a.depth,
                "gen_len": a.gen_len,
                "iters": samples.len(),
                "prefill": {
                    "tokens_per_s": stats(&prefill_tps),
                    "seconds": stats(&prefill_s),
                    "samples_s": prefill_s,
                },
                "ttft_ms": stats(&ttft_ms),
                "decode": decode,
                "decode_note": decode_note,
                "memory": {
                    "peak_rss_bytes": peak_rss(),
                    "peak_rss_scope": if scoped { "row (VmHWM reset before the row)" }
                                      else { "process (VmHWM since start)" },
                    "device_bytes": dev_bytes,
                    "device_note": dev_note,
                },
            }));
            if interrupted {
                break 'outer;
            }
        }
    }
    let mut conc_rows = Vec::new();
    'conc: for &mode in modes.iter().filter(|&&md| has_decode(md)) {
        for &p in &a.prompt_len {
            for &c in &a.concurrency {
                if cancel.is_cancelled() || c == 0 || a.gen_len == 0 {
                    break 'conc;
                }
                let spec = RowSpec {
                    mode,
                    prompt: p,
                    depth: 0,
                    gen: a.gen_len,
                    segments: m.segments,
                };
                let name = mode_name(mode);
                eprintln!("bench: {name} prompt {p}, {c} concurrent streams");
                let mut rng = XorShift::new(a.seed ^ (p as u64).wrapping_mul(0x51ed_270b));
                let (mut agg, mut per, mut ttft_ms) = (Vec::new(), Vec::new(), Vec::new());
                for it in 0..a.warmup + a.iters {
                    let (ttft, dec) = run_concurrent(&model, &spec, c, m, &mut rng, cancel)
                        .with_context(|| format!("{name}, prompt {p}, {c} streams"))?;
                    if it >= a.warmup && !cancel.is_cancelled() {
                        agg.push((c * a.gen_len) as f64 / dec);
                        per.push(a.gen_len as f64 / dec);
                        ttft_ms.extend(ttft.iter().map(|t| t * 1e3));
                    }
                }
                if agg.is_empty() {
                    break 'conc;
                }
                conc_rows.push(json!({
                    "mode": name,
                    "prompt_len": p,
                    "gen_len": a.gen_len,
                    "concurrency": c,
                    "iters": agg.len(),
                    "aggregate_tokens_per_s": stats(&agg),
                    "per_stream_tokens_per_s": stats(&per),
                    "ttft_ms": stats(&ttft_ms),
                    "note": "prompts prefilled one after another (stream i's first token waits \
                             for i earlier prefills), then all streams decoded together",
                }));
            }
        }
    }
    eprintln!();
    print_table(&rows);
    if !conc_rows.is_empty() {
        eprintln!(
            "\n| mode | prompt | streams | aggregate tok/s | per-stream tok/s | TTFT ms (mean) |"
        );
        eprintln!("|---|---:|---:|---:|---:|---:|");
        for r in &conc_rows {
            eprintln!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} |",
                r["mode"].as_str().unwrap_or(""),
                r["prompt_len"],
                r["concurrency"],
                r["aggregate_tokens_per_s"]["mean"].as_f64().unwrap_or(0.0),
                r["per_stream_tokens_per_s"]["mean"].as_f64().unwrap_or(0.0),
                r["ttft_ms"]["mean"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if m.json {
        let doc = json!({
            "schema": "hici-bench/1",
            "hici_version": env!("CARGO_PKG_VERSION"),
            "git_commit": env!("HICI_GIT_COMMIT"),
            "burn_version": env!("HICI_BURN_VERSION"),
            "backend": m.device.to_string(),
            "dtype": dtype_name,
            "model_dtype": format!("{:?}", model.dtype()),
            "attention_kernel": format!("{:?}", model.kernel),
            "fusion": m.device != DeviceChoice::Ndarray && m.fused(),
            "machine": machine(m.device),
            "model": {
                "source": source,
                "parameters": params,
                "config": serde_json::to_value(&cfg)?,
                "load_s": load_s,
                "rss_after_load_bytes": rss_after_load,
                "device_bytes_before_load": device_before,
                "device_bytes_after_load": device_after_load,
                "quantize": a.quantize.map(|q| q.ggml().name()),
            },
            "settings": {
                "prompt_lens": a.prompt_len,
                "gen_len": a.gen_len,
                "depth": a.depth,
                "modes": modes.iter().map(|&md| mode_name(md)).collect::<Vec<_>>(),
                "warmup": a.warmup,
                "iters": a.iters,
                "segments": m.segments,
                "decode_cache": m.decode_cache.to_possible_value().map(|v| v.get_name().to_string()),
                "seed": a.seed,
                "concurrency": a.concurrency,
                "logits": "last position only",
            },
            "interrupted": interrupted,
            "results": rows,
            "concurrency_results": conc_rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
