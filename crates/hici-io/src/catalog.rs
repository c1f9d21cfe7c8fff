//! Indexed tensor files of one checkpoint and where each named tensor comes from, so that
//! names and shapes can be checked before any tensor data is read, and tensors can then be
//! read one at a time.

use crate::error::IoError;
use crate::gguf::quants::GgmlType;
use crate::tensor_file::{check_finite, FloatType, TensorFile};
use hici_model::weights::{HostTensor, WeightMap};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor of an indexed file: `(file index in the catalog, entry index in the file)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SrcRef {
    pub file: usize,
    pub entry: usize,
}

/// Name-independent facts about a source tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Meta {
    pub shape: Vec<usize>,
    pub dtype: FloatType,
    /// Set for a tensor stored in quantized blocks (a converted file's packed tensors): then
    /// `shape` is the logical `[rows, cols]` and `dtype` is unused.
    pub quant: Option<GgmlType>,
    pub file: PathBuf,
    pub src: SrcRef,
}

impl Meta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The stored type's name: `F32`, `BF16`, ..., or the block format (`Q8_0`).
    pub fn type_name(&self) -> &'static str {
        self.quant.map_or(self.dtype.name(), GgmlType::name)
    }
}

/// Tensor name -> where it is.
pub(crate) type MetaMap = BTreeMap<String, Meta>;

/// The indexed files of a checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    files: Vec<TensorFile>,
}

impl Catalog {
    /// Indexes `path` and adds it.
    pub fn open(&mut self, path: &Path) -> Result<usize, IoError> {
        let f = TensorFile::open(path)?;
        self.files.push(f);
        Ok(self.files.len() - 1)
    }

    /// `(name as stored, meta)` of every tensor of file `i`, in read order.
    pub fn metas(&self, i: usize) -> impl Iterator<Item = (&str, Meta)> + '_ {
        let f = &self.files[i];
        f.entries().iter().enumerate().map(move |(entry, e)| {
            (
                e.key.as_str(),
                Meta {
                    shape: e.shape.clone(),
                    dtype: e.dtype,
                    quant: None,
                    file: f.path().to_path_buf(),
                    src: SrcRef { file: i, entry },
                },
            )
        })
    }

    /// Reads one tensor as f32, rejecting NaN/Inf ([`IoError::NonFinite`] naming `name` as
    /// stored in the file).
    pub fn read(&self, src: SrcRef) -> Result<HostTensor, IoError> {
        let f = &self.files[src.file];
        let t = f.read(src.entry)?;
        check_finite(&t, &f.entry(src.entry).key, f.path())?;
        Ok(t)
    }

    /// Reads every tensor of `metas` (in file read order), under the map's names.
    pub fn read_all(&self, metas: &MetaMap) -> Result<WeightMap, IoError> {
        let mut order: Vec<(&String, SrcRef)> = metas.iter().map(|(k, m)| (k, m.src)).collect();
        order.sort_by_key(|(_, s)| *s);
        let mut out = WeightMap::new();
        for (name, src) in order {
            out.insert(name.clone(), self.read(src)?);
        }
        Ok(out)
    }
}
