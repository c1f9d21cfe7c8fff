//! `hici`: facade over the workspace crates, so integration tests and examples can use one
//! name.
//!
//! - [`model`] (`hici-model`): the model in pure burn math.
//! - [`io`] (`hici-io`): checkpoint readers and converters.
//! - [`runtime`] (`hici-runtime`): tokenizer, sampler, generation, perplexity, passkey.

pub use hici_io as io;
pub use hici_model as model;
pub use hici_runtime as runtime;
