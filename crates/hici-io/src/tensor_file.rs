//! Reads one tensor file (`.safetensors` or a `torch.save` file) into f32 host tensors.
//!
//! * `.safetensors`: the header is parsed with the `safetensors` crate and each tensor is read
//!   with plain file reads (no memory map), so only one tensor's raw bytes are held at a time.
//! * `.bin` / `.pt` / `.pth` (`torch.save`): always parsed first by burn-store's
//!   [`PytorchReader`], a pickle VM written in Rust with an allow-list of globals. **No Python
//!   code is ever executed**: a pickle that references anything else (e.g. `posix.system`) is
//!   an error. For zip-format files (PyTorch >= 1.6) every archive member is also read once to
//!   check its CRC-32, and the pickle is scanned ([`crate::pickle_scan`]) to check each
//!   tensor's storage member, size, offset and contiguity; the tensor data is then read from the
//!   archive here, each storage member once. This is needed because burn-store silently
//!   returns zeros for unreadable or short storages, ignores strides, and re-reads a whole
//!   storage for every tensor that views it. Legacy (pre-1.6) files, and pickles the scan does
//!   not understand, are read through burn-store's data path.
//!
//! F32, F16, BF16 and F64 are converted to f32 on the host; other dtypes are refused.

use crate::error::IoError;
use crate::pickle_scan::{storage_element_size, TensorRef};
use burn::tensor::DType;
use burn_store::pytorch::PytorchReader;
use half::{bf16, f16};
use hici_model::weights::HostTensor;
use std::collections::{BTreeMap, HashMap};
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

/// What [`inspect_zip`] found.
#[derive(Debug)]
enum ZipLayout {
    /// Not a zip archive (legacy `torch.save` format): left to burn-store.
    NotZip,
    /// A zip archive whose pickle the scan does not understand.
    Unverified,
    /// Every tensor, checked against the archive's members.
    Verified(Vec<Located>),
}

/// Checks the structure of a zip-format PyTorch file before anything reads tensor data.
///
/// burn-store reads tensor storages lazily and, when a storage cannot be read (CRC mismatch,
/// missing member) or is too short, silently returns zeros; it also ignores strides. So the
/// pickle is scanned ([`crate::pickle_scan`]) and each tensor must be contiguous and lie inside
/// an existing storage member of the size the pickle declares. Member data is not read here:
/// [`read_zip_storages`] checks each member's CRC-32 as it reads it, and [`check_all_crcs`]
/// does so before burn-store's data path is used.
fn inspect_zip(path: &Path) -> Result<ZipLayout, IoError> {
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
        return Ok(ZipLayout::NotZip);
    }
    let file = open(path)?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("corrupt or truncated zip archive: {e}")))?;
    let mut members: HashMap<String, u64> = HashMap::new();
    for i in 0..archive.len() {
        let member = archive
            .by_index(i)
            .map_err(|e| bad(format!("corrupt zip archive (member #{i}): {e}")))?;
        members.insert(member.name().to_string(), member.size());
    }

    // The pickle burn-store reads: `data.pkl`, `archive/data.pkl`, else the first `*data.pkl`.
    let pkl_name = ["data.pkl", "archive/data.pkl"]
        .into_iter()
        .map(str::to_string)
        .find(|n| members.contains_key(n))
        .or_else(|| {
            (0..archive.len())
                .filter_map(|i| archive.name_for_index(i).map(str::to_string))
                .find(|n| n.ends_with("data.pkl"))
        })
        .ok_or_else(|| bad("no data.pkl in the zip archive".into()))?;
    let mut pickle = Vec::new();
    archive
        .by_name(&pkl_name)
        .and_then(|mut m| m.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| bad(format!("zip member `{pkl_name}` is corrupt: {e}")))?;
    let Some(tensors) = crate::pickle_scan::scan_tensors(&pickle) else {
        tracing::warn!(
            "{}: pickle not understood by the layout check; tensors read unverified",
            path.display()
        );
        return Ok(ZipLayout::Unverified);
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let mut located = Vec::with_capacity(tensors.len());
    for t in tensors {
        let what = match &t.name {
            Some(n) => format!("tensor `{n}`"),
            None => format!("a tensor of storage `{}`", t.storage.key),
        };
        if !t.is_contiguous() {
            return Err(bad(format!(
                "{what} has size {:?} and non-contiguous strides {:?}; not supported \
                 (re-save it with .contiguous())",
                t.size, t.stride
            )));
        }
        let key = &t.storage.key;
        let member = [format!("{prefix}data/{key}"), format!("data/{key}")]
            .into_iter()
            .find(|n| members.contains_key(n))
            .or_else(|| {
                members
                    .keys()
                    .find(|n| n.ends_with(&format!("/data/{key}")))
                    .cloned()
            })
            .ok_or_else(|| bad(format!("{what}: storage member data/{key} is missing")))?;
        let bytes = members[&member];
        if let Some(elem) = storage_element_size(&t.storage.class) {
            if t.storage.numel.checked_mul(elem) != Some(bytes) {
                return Err(bad(format!(
                    "{what}: storage `{member}` holds {bytes} bytes, the pickle says {} x {elem}",
                    t.storage.numel
                )));
            }
        }
        if t.offset.saturating_add(t.numel()) > t.storage.numel {
            return Err(bad(format!(
                "{what}: elements {}..{} lie outside its storage of {} elements",
                t.offset,
                t.offset.saturating_add(t.numel()),
                t.storage.numel
            )));
        }
        located.push(Located { tensor: t, member });
    }
    Ok(ZipLayout::Verified(located))
}

/// Reads every member of a zip archive once so that its CRC-32 is checked.
fn check_all_crcs(path: &Path) -> Result<(), IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let mut archive = zip::ZipArchive::new(BufReader::new(open(path)?))
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

/// A tensor of a zip-format file and the archive member holding its storage.
#[derive(Debug, Clone)]
struct Located {
    tensor: TensorRef,
    member: String,
}

/// Pairs burn-store's tensor names with the scanned layout, if they describe the same tensors
/// (always the case for flat state dicts; nested dicts fall back to burn-store's data path).
fn match_layout(keys: &[String], layout: Vec<Located>) -> Option<Vec<(String, Located)>> {
    if layout.len() != keys.len() {
        return None;
    }
    let mut by_name: HashMap<String, Located> = HashMap::new();
    for l in layout {
        let name = l.tensor.name.clone()?;
        if by_name.insert(name, l).is_some() {
            return None;
        }
    }
    keys.iter()
        .map(|k| by_name.remove(k).map(|l| (k.clone(), l)))
        .collect()
}

/// f32-convertible element type of a PyTorch storage class.
fn storage_float_type(class: &str) -> Option<FloatType> {
    match class {
        "FloatStorage" => Some(FloatType::F32),
        "HalfStorage" => Some(FloatType::F16),
        "BFloat16Storage" => Some(FloatType::BF16),
        "DoubleStorage" => Some(FloatType::F64),
        _ => None,
    }
}

/// Reads the tensors of a verified zip-format file, each storage member once.
///
/// burn-store re-reads a tensor's whole storage member for every tensor, which is quadratic
/// when many tensors are views of one flat buffer (as DeepSpeed consolidations can be).
fn read_zip_storages(
    path: &Path,
    reader: &PytorchReader,
    plan: Vec<(String, Located)>,
) -> Result<Vec<(String, HostTensor)>, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let mut by_member: BTreeMap<String, Vec<(String, TensorRef, FloatType)>> = BTreeMap::new();
    for (key, l) in plan {
        let ty = storage_float_type(&l.tensor.storage.class).ok_or_else(|| {
            IoError::UnsupportedDtype {
                path: path.to_path_buf(),
                key: key.clone(),
                dtype: l.tensor.storage.class.clone(),
            }
        })?;
        // Cross-check with burn-store's view of the same tensor.
        if let Some(snap) = reader.get(&key) {
            let shape: Vec<u64> = snap.shape.iter().map(|&d| d as u64).collect();
            if shape != l.tensor.size || float_type(snap.dtype) != Some(ty) {
                return Err(bad(format!(
                    "tensor `{key}`: pickle scan ({:?} {:?}) and reader ({:?} {:?}) disagree",
                    l.tensor.storage.class, l.tensor.size, snap.dtype, shape
                )));
            }
        }
        by_member
            .entry(l.member)
            .or_default()
            .push((key, l.tensor, ty));
    }
    let file = open(path)?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("corrupt or truncated zip archive: {e}")))?;
    let mut out = Vec::new();
    for (member, tensors) in by_member {
        let mut bytes = Vec::new();
        archive
            .by_name(&member)
            .and_then(|mut m| m.read_to_end(&mut bytes).map_err(Into::into))
            .map_err(|e| bad(format!("zip member `{member}` is corrupt: {e}")))?;
        for (key, t, ty) in tensors {
            let elem = ty.size() as u64;
            let range = t
                .offset
                .checked_mul(elem)
                .zip(
                    t.offset
                        .checked_add(t.numel())
                        .and_then(|e| e.checked_mul(elem)),
                )
                .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?))
                .filter(|r| r.end <= bytes.len())
                .ok_or_else(|| bad(format!("tensor `{key}` lies outside `{member}`")))?;
            let shape = t
                .size
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad(format!("tensor `{key}`: size {:?} too large", t.size)))?;
            let values = bytes_to_f32(&bytes[range], ty);
            out.push((key.clone(), host_tensor(shape, values, &key, bad)?));
        }
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<Vec<(String, HostTensor)>, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let layout = inspect_zip(path)?;
    // Parsing with burn-store's allow-listed pickle VM is the security gate, always applied.
    let reader = PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut keys = reader.keys();
    keys.sort();
    match layout {
        ZipLayout::Verified(l) => match match_layout(&keys, l) {
            Some(plan) => return read_zip_storages(path, &reader, plan),
            None => check_all_crcs(path)?,
        },
        ZipLayout::Unverified => check_all_crcs(path)?,
        ZipLayout::NotZip => {}
    }
    read_via_burn(path, &reader, keys)
}

/// burn-store's data path: each tensor through `TensorSnapshot::to_data`.
fn read_via_burn(
    path: &Path,
    reader: &PytorchReader,
    keys: Vec<String>,
) -> Result<Vec<(String, HostTensor)>, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
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

    /// The archive path and burn-store's data path give the same tensors on real torch files.
    #[test]
    fn zip_path_matches_burn_store() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in [
            "../../tests/fixtures/tiny-hici-a/adapter/trainable_params.bin",
            "../../tests/fixtures/tiny-hici-a/adapter/adapter_model.bin",
            "tests/corpus/base-bin-f16/pytorch_model-00001-of-00002.bin",
            "tests/corpus/base-bin-bf16/pytorch_model.bin",
            "tests/corpus/views.bin",
        ] {
            let path = root.join(file);
            let ZipLayout::Verified(layout) = inspect_zip(&path).unwrap_or_else(|e| panic!("{e}"))
            else {
                panic!("{file}: zip layout not understood");
            };
            let reader = PytorchReader::new(&path).unwrap_or_else(|e| panic!("{e}"));
            let mut keys = reader.keys();
            keys.sort();
            let plan = match_layout(&keys, layout).expect("names match");
            let mut ours =
                read_zip_storages(&path, &reader, plan).unwrap_or_else(|e| panic!("{e}"));
            ours.sort_by(|a, b| a.0.cmp(&b.0));
            let burn = read_via_burn(&path, &reader, keys).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(ours, burn, "{file}");
        }
    }

    #[test]
    fn unknown_extension_is_an_error() {
        let e = read_tensor_file(Path::new("weights.npz")).unwrap_err();
        assert!(matches!(e, IoError::UnknownFormat(_)), "{e}");
    }
}
