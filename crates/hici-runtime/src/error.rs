//! Errors of the runtime crate.

use hici_model::ModelError;
use thiserror::Error;

/// Runtime failures; each names the offending file or value.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizer file missing/invalid, or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad user input (prompt too long, empty prompt, bad token file, ...).
    #[error("{0}")]
    Input(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The user interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}
