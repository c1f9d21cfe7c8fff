//! GGUF files (llama.cpp's model format), versions 2 and 3, little-endian.
//!
//! Layout: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count, the metadata
//! key/value pairs (`u64`-length strings, typed values, arrays of any type incl. nested
//! arrays), the tensor infos (name, `u32` rank, `u64` dims with `ne0` the fastest-varying, `u32`
//! ggml type, `u64` offset), then the tensor data from the next multiple of
//! `general.alignment` (default 32). Every count, length, offset and dimension is checked
//! against the file size before anything is allocated, so a corrupt or hostile file gives an
//! error naming the field, never a huge allocation or a panic.
//!
//! [`GgufFile::open`] reads only the header; tensor data is read per tensor with positioned
//! reads ([`GgufFile::read_f32`]), so the file is never held in memory twice.

pub mod llama;
pub mod quants;
pub mod writer;

use crate::error::IoError;
use hici_model::weights::BlockQuant;
use quants::GgmlType;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting depth of arrays accepted (an array of arrays of arrays ...).
const MAX_ARRAY_DEPTH: usize = 8;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// GGUF's name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml dimensions, `ne0` (contiguous) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: u64,
}

impl GgufTensorInfo {
    /// Row-major (PyTorch) shape: the dims reversed, e.g. a `Linear` weight is `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata and tensor infos; tensor data stays on disk.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Where the tensor data section starts.
    pub data_offset: u64,
    pub file_len: u64,
    index: BTreeMap<String, usize>,
    tensor_index: BTreeMap<String, usize>,
}

/// Whether `path` starts with the GGUF magic (false for unreadable files).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == GGUF_MAGIC
}

/// A reader over the header that knows how many bytes the file has left.
struct Header<'a> {
    r: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Header<'_> {
    fn err(&self, msg: impl Into<String>) -> IoError {
        IoError::Gguf {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], IoError> {
        if self.remaining() < N as u64 {
            return Err(self.err(format!("truncated file: end of file in {}", what())));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("reading {}: {e}", what())))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, IoError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, IoError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, IoError> {
        let n = self.u64(&|| format!("the length of {}", what()))?;
        if n > self.remaining() {
            return Err(self.err(format!(
                "{}: string length {n} exceeds the {} bytes left in the file",
                what(),
                self.remaining()
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("reading {}: {e}", what())))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| self.err(format!("{} is not valid UTF-8", what())))
    }

    fn value(
        &mut self,
        ty: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue, IoError> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.bytes(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.bytes(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => match self.bytes::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{}: bool value {b} (must be 0 or 1)", what()))),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_DEPTH}",
                        what()
                    )));
                }
                let elem = self.u32(&|| format!("the element type of {}", what()))?;
                let n = self.u64(&|| format!("the length of {}", what()))?;
                let min = min_value_bytes(elem).ok_or_else(|| {
                    self.err(format!("{}: unknown array element type {elem}", what()))
                })?;
                if n.checked_mul(min).is_none_or(|b| b > self.remaining()) {
                    return Err(self.err(format!(
                        "{}: array of {n} elements does not fit in the {} bytes left",
                        what(),
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    v.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            t => return Err(self.err(format!("{}: unknown value type {t}", what()))),
        })
    }
}

/// The fewest bytes a value of type `ty` occupies (for bounding array lengths).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

impl GgufFile {
    /// Parses the header of `path` (metadata and tensor infos) and checks that every tensor's
    /// data lies inside the file.
    pub fn open(path: &Path) -> Result<Self, IoError> {
        let f = File::open(path).map_err(|e| IoError::from_io(path, e))?;
        let len = f.metadata().map_err(|e| IoError::from_io(path, e))?.len();
        let mut h = Header {
            r: BufReader::with_capacity(1 << 16, f),
            pos: 0,
            len,
            path,
        };
        let magic = h.bytes::<4>(&|| "the magic".into())?;
        if &magic != GGUF_MAGIC {
            return Err(h.err(format!(
                "not a GGUF file (magic {:?}, expected \"GGUF\")",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = h.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => return Err(h.err("GGUF version 1 is not supported (only 2 and 3)")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(h.err("big-endian GGUF files are not supported"))
            }
            v => return Err(h.err(format!("GGUF version {v} is not supported (only 2 and 3)"))),
        }
        let n_tensors = h.u64(&|| "the tensor count".into())?;
        let n_kv = h.u64(&|| "the metadata count".into())?;
        // a key/value pair takes at least 13 bytes, a tensor info at least 28
        if n_kv.checked_mul(13).is_none_or(|b| b > h.remaining()) {
            return Err(h.err(format!(
                "metadata count {n_kv} is impossible for a file of {len} bytes"
            )));
        }
        if n_tensors.checked_mul(28).is_none_or(|b| b > h.remaining()) {
            return Err(h.err(format!(
                "tensor count {n_tensors} is impossible for a file of {len} bytes"
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = BTreeMap::new();
        for i in 0..n_kv {
            let key = h.string(&|| format!("metadata key {i}"))?;
            let ty = h.u32(&|| format!("the type of metadata `{key}`"))?;
            let value = h.value(ty, 0, &|| format!("metadata `{key}`"))?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(h.err(format!("metadata key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(h.err(format!(
                    "metadata `general.alignment` must be a power-of-two uint32, got {v:?}"
                )))
            }
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = h.string(&|| format!("the name of tensor {i}"))?;
            let what = |field: &str| format!("{field} of tensor `{name}`");
            let n_dims = h.u32(&|| what("the rank"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(h.err(format!(
                    "tensor `{name}`: rank {n_dims} (must be 1..={MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(h.u64(&|| what(&format!("dimension {d}")))?);
            }
            let ty_id = h.u32(&|| what("the type"))?;
            let offset = h.u64(&|| what("the offset"))?;
            let ty = GgmlType::from_id(ty_id).map_err(|name_of| {
                h.err(format!(
                    "tensor `{name}`: element type {ty_id} ({name_of}) is not supported \
                     (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
                ))
            })?;
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    h.err(format!(
                        "tensor `{name}`: dimensions {dims:?} overflow the element count"
                    ))
                })?;
            if dims.contains(&0) {
                return Err(h.err(format!("tensor `{name}`: zero dimension in {dims:?}")));
            }
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(h.err(format!(
                    "tensor `{name}`: row length {} is not a multiple of the {} block size {}",
                    dims[0],
                    ty.name(),
                    ty.block_len()
                )));
            }
            if offset % alignment != 0 {
                return Err(h.err(format!(
                    "tensor `{name}`: offset {offset} is not a multiple of the alignment \
                     {alignment}"
                )));
            }
            let nbytes = ty
                .bytes_for(numel)
                .ok_or_else(|| h.err(format!("tensor `{name}`: byte size overflows")))?;
            if tensor_index.insert(name.clone(), raw.len()).is_some() {
                return Err(h.err(format!("tensor `{name}` appears twice")));
            }
            raw.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset,
                nbytes,
            });
        }
        let data_offset = h.pos.div_ceil(alignment) * alignment;
        for t in &mut raw {
            let end = t
                .offset
                .checked_add(data_offset)
                .and_then(|o| o.checked_add(t.nbytes));
            match end {
                Some(e) if e <= len => t.offset += data_offset,
                _ => {
                    return Err(h.err(format!(
                        "tensor `{}`: data at offset {} + {} bytes lies past the end of the \
                         file ({len} bytes; truncated?)",
                        t.name,
                        t.offset.saturating_add(data_offset),
                        t.nbytes
                    )))
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors: raw,
            data_offset,
            file_len: len,
            index,
            tensor_index,
        })
    }

    /// The metadata value `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The tensor info `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// An error about this file.
    pub fn err(&self, msg: impl Into<String>) -> IoError {
        IoError::Gguf {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// The raw bytes of tensor `t`.
    pub fn read_bytes(&self, t: &GgufTensorInfo) -> Result<Vec<u8>, IoError> {
        use std::io::{Seek, SeekFrom};
        let mut f = File::open(&self.path).map_err(|e| IoError::from_io(&self.path, e))?;
        let mut buf = vec![0u8; t.nbytes as usize];
        f.seek(SeekFrom::Start(t.offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| self.err(format!("reading tensor `{}`: {e}", t.name)))?;
        Ok(buf)
    }

    /// Quantized tensor `t` (`[rows, cols]`) in 8-bit blocks of 32 along its rows (see
    /// [`quants::to_blocks`]); non-finite scales or offsets are an error.
    pub fn read_blocks(&self, t: &GgufTensorInfo) -> Result<BlockQuant, IoError> {
        let bytes = self.read_bytes(t)?;
        let shape = t.shape();
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        quants::block_quant(t.ty, &bytes, rows, cols).map_err(|e| match e {
            quants::BlockError::NonFinite => IoError::NonFinite {
                key: t.name.clone(),
                file: self.path.clone(),
            },
            quants::BlockError::Layout(msg) => self.err(format!("tensor `{}`: {msg}", t.name)),
        })
    }

    /// Tensor `t` dequantized to f32, row-major in [`GgufTensorInfo::shape`]; NaN or
    /// infinite values are an error.
    pub fn read_f32(&self, t: &GgufTensorInfo) -> Result<Vec<f32>, IoError> {
        let bytes = self.read_bytes(t)?;
        let mut out = vec![0f32; t.numel() as usize];
        quants::dequantize(t.ty, &bytes, &mut out);
        if out.iter().any(|v| !v.is_finite()) {
            return Err(IoError::NonFinite {
                key: t.name.clone(),
                file: self.path.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
