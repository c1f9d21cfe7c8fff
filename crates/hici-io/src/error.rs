//! Typed errors of the checkpoint readers. Every variant names the file and/or tensor involved.

use hici_model::error::ModelError;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A list of dimensions, displayed as `[a, b, c]` (`[]` for a scalar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims(pub Vec<usize>);

impl fmt::Display for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&[usize]> for Dims {
    fn from(d: &[usize]) -> Self {
        Self(d.to_vec())
    }
}

impl From<Vec<usize>> for Dims {
    fn from(d: Vec<usize>) -> Self {
        Self(d)
    }
}

/// Everything that can go wrong while reading a checkpoint.
#[derive(Debug, Error)]
pub enum IoError {
    /// The path does not exist.
    #[error("{}: no such file or directory", .0.display())]
    NotFound(PathBuf),
    /// A directory was expected.
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A base model directory without `config.json`.
    #[error("directory {} has no config.json", .0.display())]
    MissingConfig(PathBuf),
    /// The directory holds no weight file this loader understands.
    #[error("directory {} has no weights (looked for {expected})", dir.display())]
    MissingWeights { dir: PathBuf, expected: String },
    /// An operating-system error while reading a file.
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    /// The file extension is not one of `.safetensors`, `.bin`, `.pt`, `.pth`.
    #[error("{}: unknown tensor file format (expected .safetensors, .bin, .pt or .pth)", .0.display())]
    UnknownFormat(PathBuf),
    /// Malformed JSON (config, index, adapter config).
    #[error("{}: invalid JSON: {msg}", path.display())]
    Json { path: PathBuf, msg: String },
    /// Malformed or truncated safetensors file.
    #[error("{}: invalid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    /// A PyTorch (`torch.save`) file that cannot be read, including pickles that reference a
    /// Python global outside the reader's allow-list (e.g. `posix.system`): nothing is executed.
    #[error("{}: cannot read PyTorch file: {msg}", path.display())]
    Pickle { path: PathBuf, msg: String },
    /// A tensor whose element type cannot be converted to f32 (only F32, F16, BF16, F64 can).
    #[error("{}: tensor `{key}` has unsupported dtype {dtype} (supported: F32, F16, BF16, F64)", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{key}` (expected in {})", file.display())]
    MissingKey { key: String, file: PathBuf },
    /// A tensor the loader does not know what to do with.
    #[error("unexpected tensor `{key}` in {}", file.display())]
    UnexpectedKey { key: String, file: PathBuf },
    /// A tensor has the wrong shape.
    #[error("tensor `{key}` in {} has shape {found}, expected {expected}", file.display())]
    ShapeMismatch {
        key: String,
        file: PathBuf,
        expected: Dims,
        found: Dims,
    },
    /// A tensor holds NaN or infinite values.
    #[error("tensor `{key}` in {} contains NaN or infinite values", file.display())]
    NonFinite { key: String, file: PathBuf },
    /// A PEFT adapter this loader does not support, or whose tensors contradict its config.
    #[error("adapter {}: {msg}", path.display())]
    Adapter { path: PathBuf, msg: String },
    /// A converted single-file model (`hici import`) that is not valid.
    #[error("{}: {msg}", path.display())]
    Converted { path: PathBuf, msg: String },
    /// A GGUF file that is malformed, truncated or describes a model this build cannot run.
    #[error("{}: {msg}", path.display())]
    Gguf { path: PathBuf, msg: String },
    /// Writing stopped on request (Ctrl-C); nothing was left behind.
    #[error("interrupted")]
    Interrupted,
    /// The resulting configuration is rejected by the model crate.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl IoError {
    /// Maps an `std::io::Error` on `path`, turning "not found" into [`IoError::NotFound`].
    pub(crate) fn from_io(path: &Path, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            IoError::NotFound(path.to_path_buf())
        } else {
            IoError::Io {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        }
    }

    /// A [`IoError::ShapeMismatch`].
    pub(crate) fn shape(key: &str, file: &Path, expected: &[usize], found: &[usize]) -> Self {
        IoError::ShapeMismatch {
            key: key.to_string(),
            file: file.to_path_buf(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// A [`IoError::MissingKey`].
    pub(crate) fn missing(key: &str, file: &Path) -> Self {
        IoError::MissingKey {
            key: key.to_string(),
            file: file.to_path_buf(),
        }
    }

    /// A [`IoError::UnexpectedKey`].
    pub(crate) fn unexpected(key: &str, file: &Path) -> Self {
        IoError::UnexpectedKey {
            key: key.to_string(),
            file: file.to_path_buf(),
        }
    }
}
