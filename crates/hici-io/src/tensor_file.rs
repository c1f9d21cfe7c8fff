//! Reads one tensor file (`.safetensors` or a `torch.save` file) into f32 host tensors.
//!
//! * `.safetensors`: the header is parsed with the `safetensors` crate and each tensor is read
//!   with plain file reads (no memory map), so only one tensor's raw bytes are held at a time.
//! * `.bin` / `.pt` / `.pth`: parsed with burn-store's [`PytorchReader`], a pickle VM written in
//!   Rust with an allow-list of globals. **No Python code is ever executed**: a pickle that
//!   references anything else (e.g. `posix.system`) is an error. Before that, every member of a
//!   zip-format file is read once to verify its CRC-32, because burn-store silently substitutes
//!   zeros for tensor data it cannot read.
//!
//! F32, F16, BF16 and F64 are converted to f32 on the host; other dtypes are refused.

use crate::error::IoError;
use burn::tensor::DType;
use burn_store::pytorch::PytorchReader;
use hici_model::weights::HostTensor;
use half::{bf16, f16};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Largest accepted safetensors JSON header (same limit as the `safetensors` crate).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Element types that can be converted to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloatType {
    F32,
    F16,
    BF16,
    F64,
}

impl FloatType {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F64 => 8,
        }
    }
}

/// Converts little-endian raw bytes to f32 values.
fn bytes_to_f32(bytes: &[u8], ty: FloatType) -> Vec<f32> {
    match ty {
        FloatType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FloatType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    }
}

/// Which reader a file needs, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    Pytorch,
}

fn format_of(path: &Path) -> Result<Format, IoError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(Format::Safetensors),
        Some("bin") | Some("pt") | Some("pth") => Ok(Format::Pytorch),
        _ => Err(IoError::UnknownFormat(path.to_path_buf())),
    }
}

/// Reads every tensor of one `.safetensors` / `.bin` / `.pt` / `.pth` file as f32, sorted by
/// name. Shapes are PyTorch's (`Linear` weights `[out, in]`); a 0-dim tensor has shape `[]`
/// and one value. Values are returned as stored (NaN/Inf are not rejected here).
pub fn read_tensor_file(path: &Path) -> Result<Vec<(String, HostTensor)>, IoError> {
    let mut tensors = match format_of(path)? {
        Format::Safetensors => read_safetensors(path)?,
        Format::Pytorch => read_pytorch(path)?,
    };
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Like [`read_tensor_file`], but a tensor holding NaN or ±Inf is an [`IoError::NonFinite`].
pub(crate) fn read_finite_tensor_file(path: &Path) -> Result<Vec<(String, HostTensor)>, IoError> {
    let tensors = read_tensor_file(path)?;
    for (key, t) in &tensors {
        if t.data.iter().any(|v| !v.is_finite()) {
            return Err(IoError::NonFinite {
                key: key.clone(),
                file: path.to_path_buf(),
            });
        }
    }
    Ok(tensors)
}

fn open(path: &Path) -> Result<File, IoError> {
    let file = File::open(path).map_err(|e| IoError::from_io(path, e))?;
    let meta = file.metadata().map_err(|e| IoError::from_io(path, e))?;
    if meta.is_dir() {
        return Err(IoError::Io {
            path: path.to_path_buf(),
            msg: "is a directory, expected a file".into(),
        });
    }
    Ok(file)
}

/// Builds a [`HostTensor`], turning a size mismatch into an error of the file's format.
fn host_tensor(
    shape: Vec<usize>,
    data: Vec<f32>,
    key: &str,
    bad: impl Fn(String) -> IoError,
) -> Result<HostTensor, IoError> {
    HostTensor::new(shape, data).map_err(|e| bad(format!("tensor `{key}`: {e}")))
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, HostTensor)>, IoError> {
    let bad = |msg: String| IoError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let io = |e: std::io::Error| IoError::from_io(path, e);
    let file = open(path)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes long, too short for the 8-byte header length"
        )));
    }
    let mut reader = BufReader::new(file);
    let mut len_bytes = [0u8; 8];
    reader.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!(
            "header length {header_len} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit"
        )));
    }
    if 8 + header_len > file_len {
        return Err(bad(format!(
            "truncated: the header needs {header_len} bytes but the file has only {}",
            file_len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(io)?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
    let data_len = meta.data_len() as u64;
    let available = file_len - 8 - header_len;
    if data_len > available {
        return Err(bad(format!(
            "truncated: the header describes {data_len} bytes of tensor data, the file holds {available}"
        )));
    }
    if data_len < available {
        return Err(bad(format!(
            "{} unexpected trailing bytes after the tensor data",
            available - data_len
        )));
    }

    let mut out = Vec::new();
    // `offset_keys` lists tensors in data order, so the file is read front to back.
    for key in meta.offset_keys() {
        let info = meta
            .info(&key)
            .ok_or_else(|| bad(format!("tensor `{key}` listed but not described")))?;
        let ty = match info.dtype {
            safetensors::Dtype::F32 => FloatType::F32,
            safetensors::Dtype::F16 => FloatType::F16,
            safetensors::Dtype::BF16 => FloatType::BF16,
            safetensors::Dtype::F64 => FloatType::F64,
            other => {
                return Err(IoError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    key,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        reader.read_exact(&mut bytes).map_err(io)?;
        debug_assert_eq!(bytes.len() % ty.size(), 0);
        let values = bytes_to_f32(&bytes, ty);
        let tensor = host_tensor(info.shape.clone(), values, &key, bad)?;
        out.push((key, tensor));
    }
    Ok(out)
}

/// Zip local-file-header signature: `torch.save` files since PyTorch 1.6 are zip archives.
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

/// Reads every member of a zip-format PyTorch file once so that its CRC-32 is checked.
///
/// burn-store reads tensor storages lazily and, when a storage cannot be read (CRC mismatch,
/// missing member), silently returns zeros; this pass turns such files into errors. Files that
/// are not zip archives (legacy `torch.save` format) are left to the pickle reader.
fn verify_zip(path: &Path) -> Result<(), IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = open(path)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IoError::from_io(path, e)),
        }
    }
    if got < magic.len() || magic != ZIP_MAGIC {
        return Ok(());
    }
    let file = open(path)?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("corrupt or truncated zip archive: {e}")))?;
    for i in 0..archive.len() {
        let mut member = archive
            .by_index(i)
            .map_err(|e| bad(format!("corrupt zip archive (member #{i}): {e}")))?;
        let name = member.name().to_string();
        std::io::copy(&mut member, &mut std::io::sink())
            .map_err(|e| bad(format!("zip member `{name}` is corrupt: {e}")))?;
    }
    Ok(())
}

fn read_pytorch(path: &Path) -> Result<Vec<(String, HostTensor)>, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    verify_zip(path)?;
    let reader = PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut keys = reader.keys();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let snap = reader
            .get(&key)
            .ok_or_else(|| bad(format!("tensor `{key}` listed but not readable")))?;
        let ty = float_type(snap.dtype).ok_or_else(|| IoError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: key.clone(),
            dtype: format!("{:?}", snap.dtype),
        })?;
        let shape = snap.shape.to_vec();
        let data = snap
            .to_data()
            .map_err(|e| bad(format!("tensor `{key}`: {e}")))?;
        let data_ty = float_type(data.dtype).ok_or_else(|| IoError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: key.clone(),
            dtype: format!("{:?}", data.dtype),
        })?;
        if data_ty != ty {
            return Err(bad(format!(
                "tensor `{key}`: declared dtype {ty:?} but data is {data_ty:?}"
            )));
        }
        let values = bytes_to_f32(data.as_bytes(), ty);
        out.push((key.clone(), host_tensor(shape, values, &key, bad)?));
    }
    Ok(out)
}

fn float_type(dtype: DType) -> Option<FloatType> {
    match dtype {
        DType::F32 => Some(FloatType::F32),
        DType::F16 => Some(FloatType::F16),
        DType::BF16 => Some(FloatType::BF16),
        DType::F64 => Some(FloatType::F64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_half_types() {
        let one_f16 = f16::from_f32(1.5).to_le_bytes();
        let one_bf16 = bf16::from_f32(-2.0).to_le_bytes();
        assert_eq!(bytes_to_f32(&one_f16, FloatType::F16), vec![1.5]);
        assert_eq!(bytes_to_f32(&one_bf16, FloatType::BF16), vec![-2.0]);
        assert_eq!(
            bytes_to_f32(&0.25f64.to_le_bytes(), FloatType::F64),
            vec![0.25]
        );
    }

    #[test]
    fn unknown_extension_is_an_error() {
        let e = read_tensor_file(Path::new("weights.npz")).unwrap_err();
        assert!(matches!(e, IoError::UnknownFormat(_)), "{e}");
    }
}
