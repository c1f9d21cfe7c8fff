//! The converted single-file model written by `hici import` and read by `--model FILE`.
//!
//! Format: a standard safetensors file (readable by any safetensors reader) whose
//! `__metadata__` holds
//!
//! | key | value |
//! |---|---|
//! | `format` | `"hici-converted"` |
//! | `format_version` | `"2"` ([`FORMAT_VERSION`]) for a file with quantized tensors, else `"1"` |
//! | `config` | the [`ModelConfig`] as JSON (final vocabulary, resolved RoPE factor, HiCI heads) |
//! | `lora` | the [`LoraConfig`] of the stored LoRA factors as JSON, or `null` |
//! | `lora_merged` | `"true"` when `W + alpha/r B A` was folded into the weights |
//! | `merged_lora` | the merged adapter's [`LoraConfig`] (JSON) or `null` |
//! | `dtype` | `"F32"`, `"F16"` or `"BF16"`: the type of every float tensor |
//! | `quantization` | `"Q8_0"` or `"Q4_0"` (version 2, `hici import --quantize`): the block format of every U8 tensor |
//! | `counts` | the source's [`ParamCounts`] as JSON |
//! | `notes` | the loader's notes (vocabulary resize, RoPE factor source, ...) as a JSON array |
//! | `tokenizer.json` | the checkpoint's `tokenizer.json`, verbatim (optional) |
//!
//! Tensors use the names and PyTorch layout of [`hici_model::weights`]. With `quantization`, every
//! linear weight `[rows, cols]` whose rows are whole blocks of 32 ([`quantizable`]: the
//! attention, MLP and HiCI projections, the embedding and the LM head) is a U8 tensor of shape
//! `[rows, cols / 32 · block_bytes]` holding ggml's blocks of that format along each row, byte
//! for byte as in a GGUF file (Q8_0: an f16 scale and 32 int8 values, 34 bytes; Q4_0: an f16
//! scale and 16 bytes of 4-bit values `q - 8`, low nibbles first, 18 bytes). Norms, HiCI slots
//! and queries, biases, and matrices whose rows are not whole blocks (an intermediate size of
//! 172, say) stay float in `dtype`; LoRA is always merged first. The file is written
//! tensor by tensor from a [`CheckpointPlan`] (one tensor in memory at a time), to a temporary
//! file in the output directory that is fsynced and renamed into place only when complete.
//! It is read back with positioned reads, one tensor at a time, upcasting F16/BF16 to f32.
//!
//! Why this format: safetensors is validated from its header alone (no code, no pickle), any
//! tool can read it, and it needs no model skeleton to load (burnpack stores burn's module
//! layout — transposed `[in, out]` weights, merged or not — and is loaded *into* an existing
//! model, which `HiciLlama` can only build from weights). Why positioned reads rather than a
//! memory map: reading each f32 tensor straight into its destination buffer is as fast as
//! copying out of a map (2.0 GB/s both, warm cache, 2.77 GB file on the dev VM) but keeps the
//! resident set at 1.0x the weights, where the map adds the touched file pages (2.0x RSS).

use crate::checkpoint::{Checkpoint, CheckpointPlan, LoadReport, ParamCounts, TensorGroup};
use crate::error::IoError;
use crate::gguf::quants::{block_quant, quantizer, BlockError, GgmlType};
use crate::hf::is_hici_key;
use crate::layout::model_tensors;
use crate::peft::parse_lora_key;
use crate::tensor_file::{check_finite, FloatType, TensorFile, MAX_SAFETENSORS_HEADER};
use half::{bf16, f16};
use hici_model::config::{LoraConfig, ModelConfig};
use hici_model::weights::{HostTensor, QuantMap, WeightMap, QUANT_BLOCK};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tracing::info;

/// `__metadata__["format"]` of a converted file.
pub const FORMAT_NAME: &str = "hici-converted";
/// `__metadata__["format_version"]` of a file with quantized tensors: the newest this build
/// writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// `__metadata__["format_version"]` of a file of float tensors only (read by every build).
pub const FORMAT_VERSION_FLOAT: u32 = 1;

/// The block formats `hici import --quantize` writes.
pub const IMPORT_QUANTIZATIONS: [GgmlType; 2] = [GgmlType::Q8_0, GgmlType::Q4_0];

/// Whether tensor `name` of logical `shape` is stored in blocks of `ty` when quantizing: a
/// linear weight (`*.weight`, 2-D, not a LoRA factor) whose rows are whole blocks of `ty`.
pub fn quantizable(name: &str, shape: &[usize], ty: GgmlType) -> bool {
    name.ends_with(".weight")
        && !name.contains(".lora_")
        && shape.len() == 2
        && shape[1] > 0
        && shape[1].is_multiple_of(ty.block_len())
        && shape[1].is_multiple_of(QUANT_BLOCK)
}

/// Stored shape of a quantized `[rows, cols]` tensor: `[rows, cols / block_len · block_bytes]`.
fn packed_shape(shape: &[usize], ty: GgmlType) -> Vec<usize> {
    vec![shape[0], shape[1] / ty.block_len() * ty.block_bytes()]
}

/// Element type of the stored tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::BF16 => "BF16",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(StoreDtype::F32),
            "F16" => Some(StoreDtype::F16),
            "BF16" => Some(StoreDtype::BF16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::F16 | StoreDtype::BF16 => 2,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            StoreDtype::F32 => safetensors::Dtype::F32,
            StoreDtype::F16 => safetensors::Dtype::F16,
            StoreDtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    pub(crate) fn float_type(self) -> FloatType {
        match self {
            StoreDtype::F32 => FloatType::F32,
            StoreDtype::F16 => FloatType::F16,
            StoreDtype::BF16 => FloatType::BF16,
        }
    }
}

/// What [`write_converted`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    pub dtype: StoreDtype,
    /// Fold `W + alpha/r · B A` (computed in f32) into every adapted weight and store no LoRA
    /// factors.
    pub merge_lora: bool,
    /// `tokenizer.json` text to embed.
    pub tokenizer_json: Option<String>,
    /// Store the linear weights in this block format (one of [`IMPORT_QUANTIZATIONS`]); needs
    /// `merge_lora` when the checkpoint has LoRA factors.
    pub quantize: Option<GgmlType>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            dtype: StoreDtype::F32,
            merge_lora: false,
            tokenizer_json: None,
            quantize: None,
        }
    }
}

/// Progress and cancellation hooks of [`write_converted`].
pub trait ConvertProgress {
    /// A group of tensors starts: its name, tensor count and bytes to write.
    fn group_start(&mut self, _group: &str, _tensors: usize, _bytes: u64) {}
    /// One tensor of the current group was written.
    fn tensor_done(&mut self, _name: &str, _bytes: u64) {}
    /// The current group is complete.
    fn group_done(&mut self) {}
    /// The temporary file being written (removed on error; renamed to the output when done),
    /// so that a caller that may exit abruptly can delete it.
    fn temp_file(&mut self, _path: &Path) {}
    /// Polled before every tensor; `true` stops with [`IoError::Interrupted`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// No progress display, never cancelled.
impl ConvertProgress for () {}

/// What [`write_converted`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    pub path: PathBuf,
    pub format_version: u32,
    pub dtype: StoreDtype,
    /// The block format of the quantized tensors, and how many there are.
    pub quantization: Option<(GgmlType, usize)>,
    pub tensors: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// Parameters stored, by group (LoRA 0 when merged).
    pub stored: ParamCounts,
    pub lora_merged: bool,
}

/// The header of a converted file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertedInfo {
    pub path: PathBuf,
    pub format_version: u32,
    pub config: ModelConfig,
    /// LoRA configuration of the stored factors (`None` when merged or absent).
    pub lora: Option<LoraConfig>,
    pub lora_merged: bool,
    /// The adapter configuration that was merged, if any.
    pub merged_lora: Option<LoraConfig>,
    pub dtype: StoreDtype,
    /// The block format of the U8 tensors (version 2).
    pub quantization: Option<GgmlType>,
    /// Parameter counts of the source checkpoint.
    pub source_counts: ParamCounts,
    pub notes: Vec<String>,
    pub tokenizer_json: Option<String>,
    /// Every float tensor: name -> (shape, stored type).
    pub tensors: BTreeMap<String, (Vec<usize>, FloatType)>,
    /// Every quantized tensor: name -> logical `[rows, cols]`.
    pub quantized: BTreeMap<String, Vec<usize>>,
}

/// Removes the temporary file unless [`TempFile::commit`] renamed it into place.
struct TempFile {
    path: PathBuf,
    done: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `dir/.name.tmp-<pid>-<n>`, created exclusively.
fn create_temp(out: &Path) -> Result<(File, TempFile), IoError> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| IoError::Io {
            path: out.to_path_buf(),
            msg: "output path has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    if out.is_dir() {
        return Err(IoError::Io {
            path: out.to_path_buf(),
            msg: "is a directory, expected a file name".into(),
        });
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            ".{name}.tmp-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, TempFile { path, done: false })),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(IoError::Io {
                    path: dir,
                    msg: format!("cannot create a temporary file for {name}: {e}"),
                })
            }
        }
    }
    Err(IoError::Io {
        path: dir,
        msg: "cannot create a temporary file".into(),
    })
}

/// One tensor to write.
struct OutTensor<'a> {
    name: &'a str,
    shape: Vec<usize>,
    group: TensorGroup,
    /// `(lora_A, lora_B)` names to merge in.
    merge: Option<(String, String)>,
    /// Stored in blocks of this format.
    quant: Option<GgmlType>,
}

impl OutTensor<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in the file.
    fn stored_bytes(&self, float: StoreDtype) -> usize {
        match self.quant {
            Some(ty) => packed_shape(&self.shape, ty).iter().product(),
            None => self.numel() * float.size(),
        }
    }
}

/// `W += scale · B A` for `W [out, in]`, `A [r, in]`, `B [out, r]`, in f32: for each element
/// the rank-r dot product is accumulated with fused multiply-adds over k = 0..r in order, then
/// scaled and added. This is the rounding of a BLAS-style `Aᵀ Bᵀ` product (what the model's
/// load-time merge computes on the CPU backend), so a `--merge-lora` file loads bitwise equal to
/// merging at load time there.
pub(crate) fn merge_lora_into(w: &mut HostTensor, a: &HostTensor, b: &HostTensor, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked just above).
            unsafe { merge_fma(w, a, b, scale) };
            return;
        }
    }
    merge_generic(w, a, b, scale);
}

/// [`merge_generic`] compiled with hardware FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn merge_fma(w: &mut HostTensor, a: &HostTensor, b: &HostTensor, scale: f32) {
    merge_generic(w, a, b, scale)
}

#[inline(always)]
fn merge_generic(w: &mut HostTensor, a: &HostTensor, b: &HostTensor, scale: f32) {
    let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
    let r = a.shape[0];
    let mut acc = vec![0f32; in_dim];
    for o in 0..out_dim {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for k in 0..r {
            let bk = b.data[o * r + k];
            let a_row = &a.data[k * in_dim..(k + 1) * in_dim];
            for (s, &av) in acc.iter_mut().zip(a_row) {
                *s = av.mul_add(bk, *s);
            }
        }
        let w_row = &mut w.data[o * in_dim..(o + 1) * in_dim];
        for (wv, &s) in w_row.iter_mut().zip(&acc) {
            *wv += s * scale;
        }
    }
}

/// Writes `plan` as one converted file at `out` (see the module docs), atomically: on any
/// error, and when `progress.cancelled()`, the temporary file is removed and `out` is left as
/// it was.
pub fn write_converted(
    plan: &CheckpointPlan,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn ConvertProgress,
) -> Result<ConvertSummary, IoError> {
    let merge = opts.merge_lora && plan.lora.is_some();
    if let Some(ty) = opts.quantize {
        if !IMPORT_QUANTIZATIONS.contains(&ty) {
            return Err(IoError::Converted {
                path: out.to_path_buf(),
                msg: format!(
                    "cannot quantize to {} (supported: {})",
                    ty.name(),
                    IMPORT_QUANTIZATIONS.map(GgmlType::name).join(", ")
                ),
            });
        }
        if plan.lora.is_some() && !merge {
            return Err(IoError::Converted {
                path: out.to_path_buf(),
                msg: "quantized weights need the LoRA factors merged first (merge_lora)".into(),
            });
        }
    }
    let planned = plan.tensors();
    let mut tensors: Vec<OutTensor<'_>> = Vec::new();
    for name in plan.read_order() {
        let p = &planned[name];
        if merge && p.group == TensorGroup::Lora {
            continue;
        }
        let merge_pair = merge
            .then(|| name.strip_suffix(".weight"))
            .flatten()
            .map(|m| (format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight")))
            .filter(|(a, b)| planned.contains_key(a) && planned.contains_key(b));
        let quant = opts.quantize.filter(|&ty| quantizable(name, &p.shape, ty));
        tensors.push(OutTensor {
            name,
            shape: p.shape.clone(),
            group: p.group,
            merge: merge_pair,
            quant,
        });
    }
    // The LoRA factors, read once (small: 14M parameters for 7B).
    let mut lora_factors = WeightMap::new();
    if merge {
        for (name, p) in planned {
            if p.group == TensorGroup::Lora {
                lora_factors.insert(name.clone(), plan.read(name)?);
            }
        }
    }
    let scale = plan.lora.map(|l| l.scale() as f32).unwrap_or(0.0);

    // Header.
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    let mut stored = ParamCounts::default();
    for t in &tensors {
        let len = t.stored_bytes(opts.dtype);
        let (dtype, shape) = match t.quant {
            Some(ty) => (safetensors::Dtype::U8, packed_shape(&t.shape, ty)),
            None => (opts.dtype.safetensors(), t.shape.clone()),
        };
        infos.push((
            t.name.to_string(),
            safetensors::tensor::TensorInfo {
                dtype,
                shape,
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
        let n = t.numel();
        match t.group {
            TensorGroup::Base => stored.base += n,
            TensorGroup::Override => stored.overrides += n,
            TensorGroup::Hici => stored.hici += n,
            TensorGroup::Lora => stored.lora += n,
        }
    }
    let quantized = tensors.iter().filter(|t| t.quant.is_some()).count();
    let quantization = opts.quantize.filter(|_| quantized > 0);
    let format_version = if quantization.is_some() {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_FLOAT
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT_NAME.to_string());
    meta.insert("format_version".to_string(), format_version.to_string());
    if let Some(ty) = quantization {
        meta.insert("quantization".to_string(), ty.name().to_string());
    }
    meta.insert("config".to_string(), json(&plan.config));
    let stored_lora = if merge { None } else { plan.lora };
    meta.insert("lora".to_string(), json(&stored_lora));
    meta.insert("lora_merged".to_string(), merge.to_string());
    meta.insert(
        "merged_lora".to_string(),
        json(&if merge { plan.lora } else { None }),
    );
    meta.insert("dtype".to_string(), opts.dtype.name().to_string());
    meta.insert("counts".to_string(), json(&plan.report.counts));
    meta.insert("notes".to_string(), json(&plan.report.notes));
    meta.insert(
        "writer".to_string(),
        format!("hici-io {}", env!("CARGO_PKG_VERSION")),
    );
    if let Some(tok) = &opts.tokenizer_json {
        meta.insert("tokenizer.json".to_string(), tok.clone());
    }
    let header =
        safetensors::tensor::Metadata::new(Some(meta), infos).map_err(|e| IoError::Converted {
            path: out.to_path_buf(),
            msg: format!("cannot build the header: {e}"),
        })?;
    let mut header = serde_json::to_vec(&header).map_err(|e| IoError::Converted {
        path: out.to_path_buf(),
        msg: format!("cannot serialize the header: {e}"),
    })?;
    // Pad with spaces so the data section starts 8-byte aligned (as the safetensors crate does).
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    if header.len() as u64 > MAX_SAFETENSORS_HEADER {
        return Err(IoError::Converted {
            path: out.to_path_buf(),
            msg: format!(
                "header of {} bytes exceeds the {MAX_SAFETENSORS_HEADER}-byte limit",
                header.len()
            ),
        });
    }

    let (file, temp) = create_temp(out)?;
    progress.temp_file(&temp.path);
    let io = |e: std::io::Error| IoError::Io {
        path: temp.path.clone(),
        msg: format!("writing: {e}"),
    };
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&header))
        .map_err(io)?;

    let mut current_group = None;
    let mut chunk = Vec::with_capacity(1 << 20);
    for t in &tensors {
        if current_group != Some(t.group) {
            if current_group.is_some() {
                progress.group_done();
            }
            current_group = Some(t.group);
            let (n, bytes) = tensors
                .iter()
                .filter(|x| x.group == t.group)
                .fold((0usize, 0u64), |(n, b), x| {
                    (n + 1, b + x.stored_bytes(opts.dtype) as u64)
                });
            let label = if merge
                && matches!(t.group, TensorGroup::Base | TensorGroup::Hici)
                && tensors
                    .iter()
                    .any(|x| x.group == t.group && x.merge.is_some())
            {
                format!("{} (+ merged LoRA)", t.group.name())
            } else {
                t.group.name().to_string()
            };
            progress.group_start(&label, n, bytes);
        }
        if progress.cancelled() {
            return Err(IoError::Interrupted);
        }
        let mut value = plan.read(t.name)?;
        if value.shape != t.shape {
            return Err(IoError::shape(
                t.name,
                &planned[t.name].file,
                &t.shape,
                &value.shape,
            ));
        }
        if let Some((a, b)) = &t.merge {
            merge_lora_into(&mut value, &lora_factors[a], &lora_factors[b], scale);
            check_finite(&value, t.name, &planned[t.name].file)?;
        }
        if let Some(ty) = t.quant {
            let quantize = quantizer(ty).expect("an import quantization has a quantizer");
            w.write_all(&quantize(&value.data)).map_err(io)?;
            progress.tensor_done(t.name, t.stored_bytes(opts.dtype) as u64);
            continue;
        }
        write_values(&mut w, &value.data, opts.dtype, &mut chunk).map_err(|e| match e {
            WriteError::Io(e) => io(e),
            WriteError::Overflow(v) => IoError::Converted {
                path: out.to_path_buf(),
                msg: format!(
                    "tensor `{}` holds {v}, which overflows {}; use --dtype bf16 or f32",
                    t.name,
                    opts.dtype.name()
                ),
            },
        })?;
        progress.tensor_done(t.name, t.stored_bytes(opts.dtype) as u64);
    }
    if current_group.is_some() {
        progress.group_done();
    }
    if progress.cancelled() {
        return Err(IoError::Interrupted);
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    drop(file);
    std::fs::rename(&temp.path, out).map_err(|e| IoError::Io {
        path: out.to_path_buf(),
        msg: format!("cannot move {} into place: {e}", temp.path.display()),
    })?;
    let mut temp = temp;
    temp.done = true;
    // Make the rename durable.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    info!(
        "wrote {} ({} tensors, {} bytes, {}{})",
        out.display(),
        tensors.len(),
        bytes,
        opts.dtype.name(),
        quantization.map_or(String::new(), |ty| format!(
            ", {quantized} in {}",
            ty.name()
        ))
    );
    Ok(ConvertSummary {
        path: out.to_path_buf(),
        format_version,
        dtype: opts.dtype,
        quantization: quantization.map(|ty| (ty, quantized)),
        tensors: tensors.len(),
        bytes,
        stored,
        lora_merged: merge,
    })
}

enum WriteError {
    Io(std::io::Error),
    /// A finite value that does not fit the target type.
    Overflow(f32),
}

/// Writes `data` as little-endian `dtype`, converting in chunks of `chunk`'s capacity.
fn write_values(
    w: &mut impl Write,
    data: &[f32],
    dtype: StoreDtype,
    chunk: &mut Vec<u8>,
) -> Result<(), WriteError> {
    const STEP: usize = 1 << 18;
    for part in data.chunks(STEP) {
        chunk.clear();
        match dtype {
            StoreDtype::F32 => {
                for v in part {
                    chunk.extend_from_slice(&v.to_le_bytes());
                }
            }
            StoreDtype::F16 => {
                for &v in part {
                    let h = f16::from_f32(v);
                    if !h.is_finite() {
                        return Err(WriteError::Overflow(v));
                    }
                    chunk.extend_from_slice(&h.to_le_bytes());
                }
            }
            StoreDtype::BF16 => {
                for &v in part {
                    let h = bf16::from_f32(v);
                    if !h.is_finite() {
                        return Err(WriteError::Overflow(v));
                    }
                    chunk.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
        w.write_all(chunk).map_err(WriteError::Io)?;
    }
    Ok(())
}

/// A header value as JSON text.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

/// Reads the header of a converted file: configuration, metadata and the tensor list.
pub fn converted_info(path: &Path) -> Result<ConvertedInfo, IoError> {
    Ok(open_converted(path)?.1)
}

fn open_converted(path: &Path) -> Result<(TensorFile, ConvertedInfo), IoError> {
    let bad = |msg: String| IoError::Converted {
        path: path.to_path_buf(),
        msg,
    };
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(bad(
            "is a directory; --model takes the file written by `hici import` (use --base/--adapter for checkpoint directories)"
                .into(),
        ));
    }
    let (file, meta) = TensorFile::open_safetensors(path)?;
    let meta = meta.unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT_NAME) => {}
        _ => {
            return Err(bad(format!(
                "not a converted HiCI model (no `format: {FORMAT_NAME}` in the safetensors \
                 metadata); write one with `hici import`, or pass Hugging Face directories with \
                 --base/--adapter"
            )))
        }
    }
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing or invalid `format_version`".into()))?;
    if !(FORMAT_VERSION_FLOAT..=FORMAT_VERSION).contains(&version) {
        return Err(bad(format!(
            "format version {version} is not supported by this build (it reads versions \
             {FORMAT_VERSION_FLOAT} to {FORMAT_VERSION}); re-run `hici import`"
        )));
    }
    fn field<T: serde::de::DeserializeOwned>(
        meta: &HashMap<String, String>,
        key: &str,
        bad: &dyn Fn(String) -> IoError,
    ) -> Result<T, IoError> {
        let text = meta
            .get(key)
            .ok_or_else(|| bad(format!("metadata has no `{key}`")))?;
        serde_json::from_str(text).map_err(|e| bad(format!("metadata `{key}`: {e}")))
    }
    let config: ModelConfig = field(&meta, "config", &bad)?;
    config.validate()?;
    let lora: Option<LoraConfig> = field(&meta, "lora", &bad)?;
    let merged_lora: Option<LoraConfig> = field(&meta, "merged_lora", &bad)?;
    let lora_merged: bool = field(&meta, "lora_merged", &bad)?;
    let source_counts: ParamCounts = field(&meta, "counts", &bad)?;
    let notes: Vec<String> = field(&meta, "notes", &bad)?;
    let dtype = meta
        .get("dtype")
        .and_then(|d| StoreDtype::from_name(d))
        .ok_or_else(|| bad("missing or invalid `dtype`".into()))?;
    if let Some(l) = lora {
        if l.r == 0 || !l.alpha.is_finite() {
            return Err(bad(format!("invalid LoRA configuration {l:?}")));
        }
    }
    let quantization = match meta.get("quantization") {
        None => None,
        Some(name) => match GgmlType::from_name(name) {
            Some(ty) if version >= 2 && ty.is_quantized() => Some(ty),
            _ => {
                return Err(bad(format!(
                    "metadata `quantization`: `{name}` is not a block format of format \
                     version {version}"
                )))
            }
        },
    };
    let mut quantized = BTreeMap::new();
    for e in file.packed() {
        let Some(ty) = quantization else {
            return Err(bad(format!(
                "tensor `{}` is U8, but the metadata declares no `quantization`",
                e.key
            )));
        };
        let bb = ty.block_bytes();
        if e.shape.len() != 2 || !e.shape[1].is_multiple_of(bb) {
            return Err(bad(format!(
                "tensor `{}`: stored shape {:?} is not rows of whole {} blocks ({bb} bytes)",
                e.key,
                e.shape,
                ty.name()
            )));
        }
        let logical = vec![e.shape[0], e.shape[1] / bb * ty.block_len()];
        quantized.insert(e.key.clone(), logical);
    }
    let tensors = file
        .entries()
        .iter()
        .map(|e| (e.key.clone(), (e.shape.clone(), e.dtype)))
        .collect();
    let info = ConvertedInfo {
        path: path.to_path_buf(),
        format_version: version,
        config,
        lora,
        lora_merged,
        merged_lora,
        dtype,
        quantization,
        source_counts,
        notes,
        tokenizer_json: meta.get("tokenizer.json").cloned(),
        tensors,
        quantized,
    };
    Ok((file, info))
}

/// Checks every tensor of a converted file against its configuration: all present, right
/// shape and stored type, nothing unexpected.
fn check_converted(info: &ConvertedInfo) -> Result<(), IoError> {
    let path = &info.path;
    let expected = model_tensors(&info.config, None);
    let want_type = info.dtype.float_type();
    for (name, (shape, ty)) in &info.tensors {
        let want = if let Some(s) = expected.get(name) {
            s.clone()
        } else if let Some(key) = parse_lora_key(name).filter(|k| k.name == *name) {
            let Some(l) = info.lora else {
                return Err(IoError::unexpected(name, path));
            };
            let target = expected
                .get(&key.target)
                .ok_or_else(|| IoError::unexpected(name, path))?;
            match key.part {
                crate::peft::LoraPart::A => vec![l.r, target[1]],
                crate::peft::LoraPart::B => vec![target[0], l.r],
            }
        } else {
            return Err(IoError::unexpected(name, path));
        };
        if *shape != want {
            return Err(IoError::shape(name, path, &want, shape));
        }
        if *ty != want_type {
            return Err(IoError::Converted {
                path: path.clone(),
                msg: format!(
                    "tensor `{name}` is {ty}, but the file declares {}",
                    info.dtype.name()
                ),
            });
        }
    }
    for (name, shape) in &info.quantized {
        let ty = info.quantization.expect("checked with the header");
        match expected.get(name) {
            None => return Err(IoError::unexpected(name, path)),
            Some(want) if want != shape => return Err(IoError::shape(name, path, want, shape)),
            Some(_) if !quantizable(name, shape, ty) => {
                return Err(IoError::Converted {
                    path: path.clone(),
                    msg: format!("tensor `{name}` cannot be stored in {} blocks", ty.name()),
                })
            }
            Some(_) => {}
        }
    }
    for name in expected.keys() {
        if !info.tensors.contains_key(name) && !info.quantized.contains_key(name) {
            return Err(IoError::missing(name, path));
        }
    }
    for name in info.tensors.keys() {
        let partner = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            format!("{m}.lora_B.weight")
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            format!("{m}.lora_A.weight")
        } else {
            continue;
        };
        if !info.tensors.contains_key(&partner) {
            return Err(IoError::missing(&partner, path));
        }
    }
    Ok(())
}

/// Loads a file written by [`write_converted`] with every tensor in f32 (quantized ones
/// dequantized): [`load_converted_with`] without keeping blocks.
pub fn load_converted(path: &Path) -> Result<Checkpoint, IoError> {
    load_converted_with(path, false)
}

/// Loads a file written by [`write_converted`]: every tensor checked against the stored
/// configuration (missing, unexpected and mis-shaped tensors are errors naming the file and
/// key), float values upcast to f32 and checked for NaN/Inf. Quantized tensors go to
/// [`Checkpoint::quantized`] as they are when `keep_quantized`, else dequantized to f32.
pub fn load_converted_with(path: &Path, keep_quantized: bool) -> Result<Checkpoint, IoError> {
    let t0 = std::time::Instant::now();
    let (file, info) = open_converted(path)?;
    check_converted(&info)?;
    let mut weights = WeightMap::new();
    let mut quantized = QuantMap::new();
    let mut counts = ParamCounts::default();
    let mut count = |key: &str, n: usize| {
        if key.contains(".lora_") {
            counts.lora += n;
        } else if is_hici_key(key) {
            counts.hici += n;
        } else {
            counts.base += n;
        }
    };
    for (i, e) in file.entries().iter().enumerate() {
        let t = file.read(i)?;
        check_finite(&t, &e.key, path)?;
        count(&e.key, t.numel());
        weights.insert(e.key.clone(), t);
    }
    for (i, e) in file.packed().iter().enumerate() {
        let ty = info.quantization.expect("checked with the header");
        let [rows, cols] = info.quantized[&e.key][..] else {
            unreachable!("a logical shape is 2-D")
        };
        let bytes = file.read_packed(i)?;
        let q = block_quant(ty, &bytes, rows, cols).map_err(|err| match err {
            BlockError::NonFinite => IoError::NonFinite {
                key: e.key.clone(),
                file: path.to_path_buf(),
            },
            BlockError::Layout(msg) => IoError::Converted {
                path: path.to_path_buf(),
                msg: format!("tensor `{}`: {msg}", e.key),
            },
        })?;
        count(&e.key, rows * cols);
        if keep_quantized {
            quantized.insert(e.key.clone(), q);
        } else {
            weights.insert(e.key.clone(), q.dequantize());
        }
    }
    counts.overrides = info.source_counts.overrides;
    let mut notes = info.notes.clone();
    let blocks = match info.quantization {
        Some(ty) if keep_quantized => {
            format!(", {} tensors in {} blocks", info.quantized.len(), ty.name())
        }
        Some(ty) => format!(
            ", {} tensors in {} dequantized to f32",
            info.quantized.len(),
            ty.name()
        ),
        None => String::new(),
    };
    notes.push(format!(
        "loaded converted file {} ({}{}{blocks}{}) in {:.2} s",
        path.display(),
        info.dtype.name(),
        if info.dtype == StoreDtype::F32 {
            ""
        } else {
            ", upcast to f32"
        },
        if info.lora_merged {
            ", LoRA merged at import"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    ));
    info!("{}", notes.last().expect("just pushed"));
    Ok(Checkpoint {
        config: info.config,
        lora: info.lora,
        weights,
        quantized,
        report: LoadReport {
            files: vec![path.to_path_buf()],
            notes,
            counts,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_matches_naive_formula() {
        let w = HostTensor::new(vec![3, 4], (0..12).map(|v| v as f32 * 0.5).collect()).unwrap();
        let a = HostTensor::new(vec![2, 4], (0..8).map(|v| v as f32 - 3.0).collect()).unwrap();
        let b = HostTensor::new(vec![3, 2], vec![0.5, -1.0, 2.0, 0.25, 0.0, 1.5]).unwrap();
        let mut m = w.clone();
        merge_lora_into(&mut m, &a, &b, 2.0);
        for o in 0..3 {
            for i in 0..4 {
                let d = (0..2).fold(0f32, |s, k| a.data[k * 4 + i].mul_add(b.data[o * 2 + k], s));
                assert_eq!(m.data[o * 4 + i], w.data[o * 4 + i] + 2.0 * d);
            }
        }
    }

    #[test]
    fn half_overflow_is_reported() {
        let mut out = Vec::new();
        let mut chunk = Vec::new();
        let r = write_values(&mut out, &[1.0, 1e6], StoreDtype::F16, &mut chunk);
        assert!(matches!(r, Err(WriteError::Overflow(v)) if v == 1e6));
        out.clear();
        write_values(&mut out, &[1.0, 1e6], StoreDtype::BF16, &mut chunk)
            .map_err(|_| ())
            .expect("bf16 has the f32 range");
        assert_eq!(out.len(), 4);
    }
}
