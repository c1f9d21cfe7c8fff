//! Reads tensor files (`.safetensors` or a `torch.save` file) into f32 host tensors.
//!
//! A file is first *indexed* ([`TensorFile::open`]): names, shapes, element types and where
//! each tensor's bytes lie are read and checked without reading any tensor data. Tensors are
//! then read one at a time ([`TensorFile::read`]), so a caller that streams (the converter)
//! never holds more than one tensor of a file, and one that keeps everything
//! ([`read_tensor_file`]) holds no second copy.
//!
//! * `.safetensors`: the header is parsed with the `safetensors` crate; each tensor is read with
//!   one positioned read (no memory map).
//! * `.bin` / `.pt` / `.pth` (`torch.save`): always parsed first by burn-store's
//!   [`PytorchReader`], a pickle VM written in Rust with an allow-list of globals. **No Python
//!   code is ever executed**: a pickle that references anything else (e.g. `posix.system`) is
//!   an error. For zip-format files (PyTorch >= 1.6) the pickle is also scanned
//!   ([`crate::pickle_scan`]) to check each tensor's storage member, size, offset and
//!   contiguity; tensor data is then read from the archive here, each storage member whole (so
//!   its CRC-32 is checked), a member shared by several tensors once. This is needed because
//!   burn-store silently returns zeros for unreadable or short storages, ignores strides, and
//!   re-reads a whole storage for every tensor that views it. Legacy (pre-1.6) files, and
//!   pickles the scan does not understand, are read through burn-store's data path (after a
//!   CRC pass over every member for zip files).
//!
//! F32, F16, BF16 and F64 are converted to f32 on the host; other dtypes are refused.

use crate::error::IoError;
use crate::pickle_scan::{storage_element_size, TensorRef};
use burn::tensor::DType;
use burn_store::pytorch::PytorchReader;
use half::{bf16, f16};
use hici_model::weights::HostTensor;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest accepted safetensors JSON header (same limit as the `safetensors` crate).
pub(crate) const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Element types that can be converted to f32 (the stored type of a source tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FloatType {
    F32,
    F16,
    BF16,
    F64,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F64 => 8,
        }
    }

    /// `"F32"`, `"F16"`, `"BF16"`, `"F64"` (safetensors' spelling).
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "F32",
            FloatType::F16 => "F16",
            FloatType::BF16 => "BF16",
            FloatType::F64 => "F64",
        }
    }
}

impl fmt::Display for FloatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Converts little-endian raw bytes to f32 values.
pub(crate) fn bytes_to_f32(bytes: &[u8], ty: FloatType) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        // Fast paths when the bytes are aligned for the element type (they usually are).
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        match ty {
            FloatType::F32 => {
                if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                    return v.to_vec();
                }
            }
            FloatType::F16 => {
                if let Ok(bits) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
                    let mut out = vec![0f32; bits.len()];
                    bits.reinterpret_cast::<f16>()
                        .convert_to_f32_slice(&mut out);
                    return out;
                }
            }
            FloatType::BF16 => {
                if let Ok(bits) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
                    // bf16 is the upper half of an f32: exact, and vectorizes (7x faster than
                    // half's slice conversion here).
                    return bits
                        .iter()
                        .map(|&b| f32::from_bits(u32::from(b) << 16))
                        .collect();
                }
            }
            FloatType::F64 => {}
        }
    }
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
    let file = TensorFile::open(path)?;
    let mut tensors = Vec::with_capacity(file.len());
    for i in 0..file.len() {
        tensors.push((file.entry(i).key.clone(), file.read(i)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// `Err(NonFinite)` when `t` holds NaN or ±Inf.
pub(crate) fn check_finite(t: &HostTensor, key: &str, file: &Path) -> Result<(), IoError> {
    if t.data.iter().any(|v| !v.is_finite()) {
        return Err(IoError::NonFinite {
            key: key.to_string(),
            file: file.to_path_buf(),
        });
    }
    Ok(())
}

pub(crate) fn open(path: &Path) -> Result<File, IoError> {
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

/// One tensor of an indexed file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub shape: Vec<usize>,
    pub dtype: FloatType,
    loc: Loc,
}

/// A U8 tensor of a safetensors file read as raw bytes (the packed quantized blocks of a
/// converted file): its stored shape and byte range in the data section.
#[derive(Debug, Clone)]
pub(crate) struct PackedEntry {
    pub key: String,
    pub shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// Where an entry's bytes are.
#[derive(Debug, Clone)]
enum Loc {
    /// Byte range relative to the start of the safetensors data section.
    Safetensors { start: u64, len: usize },
    /// Byte range inside zip member `member` (an index into the file's member list).
    Zip {
        member: usize,
        start: usize,
        len: usize,
    },
    /// Read through burn-store's `TensorSnapshot::to_data`.
    Burn,
}

/// A storage member of a zip-format file.
#[derive(Debug)]
struct Member {
    name: String,
    /// Number of tensors that view it.
    users: usize,
}

enum Source {
    Safetensors { data_start: u64 },
    Zip { members: Vec<Member> },
    Burn(Box<PytorchReader>),
}

/// The bytes of the shared member read last, kept until its last tensor has been read.
#[derive(Default)]
struct MemberCache {
    member: Option<usize>,
    bytes: Vec<u8>,
    /// Reads left per member before its bytes are dropped.
    remaining: Vec<usize>,
}

/// An indexed tensor file: every tensor's name, shape and type, read lazily.
pub(crate) struct TensorFile {
    path: PathBuf,
    /// In read order (the order in which the file is best read front to back).
    entries: Vec<Entry>,
    /// U8 tensors (only from [`TensorFile::open_safetensors`]; empty otherwise).
    packed: Vec<PackedEntry>,
    source: Source,
    cache: RefCell<MemberCache>,
}

impl fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl TensorFile {
    /// Indexes a `.safetensors` / `.bin` / `.pt` / `.pth` file without reading tensor data
    /// (a `.bin` file's pickle is parsed, and for files the layout scan does not cover, every
    /// zip member is CRC-checked).
    pub fn open(path: &Path) -> Result<Self, IoError> {
        match format_of(path)? {
            Format::Safetensors => index_safetensors(path),
            Format::Pytorch => index_pytorch(path, false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Reads entry `i` as f32 (values as stored: NaN/Inf are not rejected here).
    pub fn read(&self, i: usize) -> Result<HostTensor, IoError> {
        let e = &self.entries[i];
        let path = &self.path;
        match (&self.source, &e.loc) {
            (Source::Safetensors { data_start }, Loc::Safetensors { start, len }) => {
                let bad = |msg: String| IoError::Safetensors {
                    path: path.clone(),
                    msg,
                };
                let mut file = open(path)?;
                let mut read = |buf: &mut [u8]| {
                    file.seek(SeekFrom::Start(data_start + start))
                        .and_then(|_| file.read_exact(buf))
                        .map_err(|err| bad(format!("reading tensor `{}`: {err}", e.key)))
                };
                let values = if e.dtype == FloatType::F32 && cfg!(target_endian = "little") {
                    // Straight into the destination: one copy, no byte buffer.
                    let mut values = vec![0f32; len / 4];
                    read(bytemuck::cast_slice_mut(&mut values))?;
                    values
                } else {
                    let mut bytes = vec![0u8; *len];
                    read(&mut bytes)?;
                    bytes_to_f32(&bytes, e.dtype)
                };
                host_tensor(e.shape.clone(), values, &e.key, bad)
            }
            (Source::Zip { members }, Loc::Zip { member, start, len }) => {
                let bad = |msg: String| IoError::Pickle {
                    path: path.clone(),
                    msg,
                };
                let m = &members[*member];
                let range = *start..start.saturating_add(*len);
                let values = if m.users <= 1 {
                    let bytes = read_member(path, &m.name)?;
                    let slice = bytes.get(range).ok_or_else(|| {
                        bad(format!("tensor `{}` lies outside `{}`", e.key, m.name))
                    })?;
                    bytes_to_f32(slice, e.dtype)
                } else {
                    let mut cache = self.cache.borrow_mut();
                    if cache.member != Some(*member) {
                        cache.bytes = Vec::new();
                        cache.member = None;
                        cache.bytes = read_member(path, &m.name)?;
                        cache.member = Some(*member);
                    }
                    let values = cache
                        .bytes
                        .get(range)
                        .map(|s| bytes_to_f32(s, e.dtype))
                        .ok_or_else(|| {
                            bad(format!("tensor `{}` lies outside `{}`", e.key, m.name))
                        })?;
                    let left = &mut cache.remaining[*member];
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        // Last tensor of this member: release its bytes (a later re-read of a
                        // tensor reads the member again).
                        cache.remaining[*member] = m.users;
                        cache.member = None;
                        cache.bytes = Vec::new();
                    }
                    values
                };
                host_tensor(e.shape.clone(), values, &e.key, bad)
            }
            (Source::Burn(reader), _) => read_via_burn(path, reader, e),
            _ => unreachable!("entry location matches its file's source"),
        }
    }
}

/// Reads a whole zip member (checking its CRC-32).
fn read_member(path: &Path, name: &str) -> Result<Vec<u8>, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let mut archive = zip::ZipArchive::new(BufReader::new(open(path)?))
        .map_err(|e| bad(format!("corrupt or truncated zip archive: {e}")))?;
    let mut bytes = Vec::new();
    archive
        .by_name(name)
        .and_then(|mut m| {
            bytes.reserve_exact(usize::try_from(m.size()).unwrap_or(0));
            m.read_to_end(&mut bytes).map_err(Into::into)
        })
        .map_err(|e| bad(format!("zip member `{name}` is corrupt: {e}")))?;
    Ok(bytes)
}

fn index_safetensors(path: &Path) -> Result<TensorFile, IoError> {
    Ok(index_safetensors_with_metadata(path, false)?.0)
}

/// The `__metadata__` map of a safetensors header.
pub(crate) type HeaderMetadata = Option<HashMap<String, String>>;

impl TensorFile {
    /// Indexes a `.safetensors` file (whatever its extension) and returns its `__metadata__`;
    /// U8 tensors are indexed as [`PackedEntry`]s (read with [`TensorFile::read_packed`]).
    pub fn open_safetensors(path: &Path) -> Result<(Self, HeaderMetadata), IoError> {
        index_safetensors_with_metadata(path, true)
    }

    /// The U8 tensors, in data order.
    pub fn packed(&self) -> &[PackedEntry] {
        &self.packed
    }

    /// The bytes of U8 tensor `i` of [`TensorFile::packed`].
    pub fn read_packed(&self, i: usize) -> Result<Vec<u8>, IoError> {
        let e = &self.packed[i];
        let Source::Safetensors { data_start } = self.source else {
            unreachable!("packed entries come from safetensors files only")
        };
        let mut file = open(&self.path)?;
        let mut bytes = vec![0u8; e.len];
        file.seek(SeekFrom::Start(data_start + e.start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|err| IoError::Safetensors {
                path: self.path.clone(),
                msg: format!("reading tensor `{}`: {err}", e.key),
            })?;
        Ok(bytes)
    }
}

fn index_safetensors_with_metadata(
    path: &Path,
    allow_packed: bool,
) -> Result<(TensorFile, HeaderMetadata), IoError> {
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

    let mut entries = Vec::new();
    let mut packed = Vec::new();
    // `offset_keys` lists tensors in data order, so the file is read front to back.
    for key in meta.offset_keys() {
        let info = meta
            .info(&key)
            .ok_or_else(|| bad(format!("tensor `{key}` listed but not described")))?;
        if allow_packed && info.dtype == safetensors::Dtype::U8 {
            let (start, end) = info.data_offsets;
            packed.push(PackedEntry {
                key,
                shape: info.shape.clone(),
                start: start as u64,
                len: end - start,
            });
            continue;
        }
        let dtype = match info.dtype {
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
        entries.push(Entry {
            key,
            shape: info.shape.clone(),
            dtype,
            loc: Loc::Safetensors {
                start: start as u64,
                len: end - start,
            },
        });
    }
    let file = TensorFile {
        path: path.to_path_buf(),
        entries,
        packed,
        source: Source::Safetensors {
            data_start: 8 + header_len,
        },
        cache: RefCell::default(),
    };
    Ok((file, meta.metadata().clone()))
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
/// [`read_member`] checks each member's CRC-32 as it reads it, and [`check_all_crcs`] does so
/// before burn-store's data path is used.
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

/// Indexes the tensors of a verified zip-format file (read later from the archive, each
/// storage member whole).
fn index_zip_storages(
    path: &Path,
    reader: &PytorchReader,
    plan: Vec<(String, Located)>,
) -> Result<TensorFile, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let mut members: Vec<Member> = Vec::new();
    let mut member_index: HashMap<String, usize> = HashMap::new();
    let mut entries = Vec::with_capacity(plan.len());
    for (key, l) in plan {
        let t = l.tensor;
        let ty = storage_float_type(&t.storage.class).ok_or_else(|| IoError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: key.clone(),
            dtype: t.storage.class.clone(),
        })?;
        // Cross-check with burn-store's view of the same tensor.
        if let Some(snap) = reader.get(&key) {
            let shape: Vec<u64> = snap.shape.iter().map(|&d| d as u64).collect();
            if shape != t.size || float_type(snap.dtype) != Some(ty) {
                return Err(bad(format!(
                    "tensor `{key}`: pickle scan ({:?} {:?}) and reader ({:?} {:?}) disagree",
                    t.storage.class, t.size, snap.dtype, shape
                )));
            }
        }
        let elem = ty.size() as u64;
        let range = t
            .offset
            .checked_mul(elem)
            .zip(
                t.offset
                    .checked_add(t.numel())
                    .and_then(|e| e.checked_mul(elem)),
            )
            .and_then(|(s, e)| Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?)))
            .ok_or_else(|| bad(format!("tensor `{key}` lies outside `{}`", l.member)))?;
        let shape = t
            .size
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad(format!("tensor `{key}`: size {:?} too large", t.size)))?;
        let m = *member_index.entry(l.member.clone()).or_insert_with(|| {
            members.push(Member {
                name: l.member.clone(),
                users: 0,
            });
            members.len() - 1
        });
        members[m].users += 1;
        entries.push(Entry {
            key,
            shape,
            dtype: ty,
            loc: Loc::Zip {
                member: m,
                start: range.0,
                len: range.1 - range.0,
            },
        });
    }
    // Read order: member by member (each read once), front to back inside a member.
    entries.sort_by(|a, b| match (&a.loc, &b.loc) {
        (
            Loc::Zip {
                member: ma,
                start: sa,
                ..
            },
            Loc::Zip {
                member: mb,
                start: sb,
                ..
            },
        ) => (&members[*ma].name, sa, &a.key).cmp(&(&members[*mb].name, sb, &b.key)),
        _ => a.key.cmp(&b.key),
    });
    let remaining = members.iter().map(|m| m.users).collect();
    Ok(TensorFile {
        path: path.to_path_buf(),
        entries,
        packed: Vec::new(),
        source: Source::Zip { members },
        cache: RefCell::new(MemberCache {
            remaining,
            ..MemberCache::default()
        }),
    })
}

/// Indexes a `torch.save` file; `via_burn` forces burn-store's data path (tests).
fn index_pytorch(path: &Path, via_burn: bool) -> Result<TensorFile, IoError> {
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
        ZipLayout::Verified(l) if !via_burn => match match_layout(&keys, l) {
            Some(plan) => return index_zip_storages(path, &reader, plan),
            None => check_all_crcs(path)?,
        },
        ZipLayout::Verified(_) | ZipLayout::Unverified => check_all_crcs(path)?,
        ZipLayout::NotZip => {}
    }
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let snap = reader
            .get(&key)
            .ok_or_else(|| bad(format!("tensor `{key}` listed but not readable")))?;
        let dtype = float_type(snap.dtype).ok_or_else(|| IoError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: key.clone(),
            dtype: format!("{:?}", snap.dtype),
        })?;
        entries.push(Entry {
            shape: snap.shape.to_vec(),
            key,
            dtype,
            loc: Loc::Burn,
        });
    }
    Ok(TensorFile {
        path: path.to_path_buf(),
        entries,
        packed: Vec::new(),
        source: Source::Burn(Box::new(reader)),
        cache: RefCell::default(),
    })
}

/// burn-store's data path: one tensor through `TensorSnapshot::to_data`.
fn read_via_burn(path: &Path, reader: &PytorchReader, e: &Entry) -> Result<HostTensor, IoError> {
    let bad = |msg: String| IoError::Pickle {
        path: path.to_path_buf(),
        msg,
    };
    let key = &e.key;
    let snap = reader
        .get(key)
        .ok_or_else(|| bad(format!("tensor `{key}` listed but not readable")))?;
    let data = snap
        .to_data()
        .map_err(|err| bad(format!("tensor `{key}`: {err}")))?;
    let data_ty = float_type(data.dtype).ok_or_else(|| IoError::UnsupportedDtype {
        path: path.to_path_buf(),
        key: key.clone(),
        dtype: format!("{:?}", data.dtype),
    })?;
    if data_ty != e.dtype {
        return Err(bad(format!(
            "tensor `{key}`: declared dtype {:?} but data is {data_ty:?}",
            e.dtype
        )));
    }
    let values = bytes_to_f32(data.as_bytes(), e.dtype);
    host_tensor(e.shape.clone(), values, key, bad)
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
    fn aligned_and_unaligned_bytes_convert_alike() {
        let vals = [1.5f32, -2.25, 3.0e-3, 65504.0, -0.0];
        for ty in [
            FloatType::F32,
            FloatType::F16,
            FloatType::BF16,
            FloatType::F64,
        ] {
            let mut bytes = vec![0u8];
            for &v in &vals {
                match ty {
                    FloatType::F32 => bytes.extend(v.to_le_bytes()),
                    FloatType::F16 => bytes.extend(f16::from_f32(v).to_le_bytes()),
                    FloatType::BF16 => bytes.extend(bf16::from_f32(v).to_le_bytes()),
                    FloatType::F64 => bytes.extend(f64::from(v).to_le_bytes()),
                }
            }
            let aligned = bytes[1..].to_vec();
            assert_eq!(
                bytes_to_f32(&bytes[1..], ty),
                bytes_to_f32(&aligned, ty),
                "{ty}"
            );
        }
    }

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

    fn read_all(file: &TensorFile) -> Vec<(String, HostTensor)> {
        let mut v: Vec<_> = (0..file.len())
            .map(|i| {
                let t = file.read(i).unwrap_or_else(|e| panic!("{e}"));
                (file.entry(i).key.clone(), t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The archive path and burn-store's data path give the same tensors on real torch files,
    /// also when tensors are read out of order and twice (the shared-member cache).
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
            let ours = TensorFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                matches!(ours.source, Source::Zip { .. }),
                "{file}: zip layout not understood"
            );
            let burn = index_pytorch(&path, true).unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(burn.source, Source::Burn(_)));
            let a = read_all(&ours);
            assert_eq!(a, read_all(&burn), "{file}");
            // Reverse order, twice.
            for _ in 0..2 {
                for i in (0..ours.len()).rev() {
                    let t = ours.read(i).unwrap_or_else(|e| panic!("{e}"));
                    let k = &ours.entry(i).key;
                    let want = &a.iter().find(|(n, _)| n == k).expect("key").1;
                    assert_eq!(&t, want, "{file}: {k}");
                }
            }
        }
    }

    #[test]
    fn unknown_extension_is_an_error() {
        let e = read_tensor_file(Path::new("weights.npz")).unwrap_err();
        assert!(matches!(e, IoError::UnknownFormat(_)), "{e}");
    }
}
