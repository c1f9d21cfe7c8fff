//! Typed errors of the model crate.

use thiserror::Error;

/// Everything that can go wrong when building or running a model.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// A configuration value is inconsistent (e.g. bottleneck dim not divisible by the heads).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A weight the model needs was not provided.
    #[error("missing weight `{name}`")]
    MissingWeight { name: String },
    /// A weight has the wrong shape.
    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Mode T needs the sequence length to be a multiple of the number of segments.
    #[error(
        "sequence length {len} is not divisible into {segments} equal segments \
         (the reference crashes here; pick a length that is a multiple of {segments})"
    )]
    SegmentsDoNotDivide { len: usize, segments: usize },
    /// The input is unusable (empty, token id out of range, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// The operation needs HiCI modules, but the model was built without them.
    #[error("this mode needs HiCI modules, but the model has none")]
    NoHici,
}
