//! Everything around the model that a server or the CLI reuses: tokenizer and chat template,
//! sampling, the generation loop with streaming detokenization, and the perplexity and passkey
//! evaluation drivers.

pub mod cancel;
pub mod error;
pub mod generate;
pub mod gguf_tokenizer;
pub mod passkey;
pub mod perplexity;
pub mod sampler;
pub mod template;
pub mod tokenizer;

pub use cancel::{CancelOnDrop, CancelToken};
pub use error::RuntimeError;
