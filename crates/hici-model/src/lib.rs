//! HiCI (Hierarchical Construction-Integration, arXiv 2603.20843) on Llama-2, written once in
//! burn and generic over the backend. Pure math: no file I/O, no tokenizer.
//!
//! Layout follows the paper: [`hici::LocalConstructor`] (local construction),
//! [`hici::GlobalIntegrator`] (global integration), [`hici::broadcast`] (top-down broadcast),
//! with the attention rule in [`attention`] and the modes in [`AttentionMode`].

pub mod attention;
pub mod cache;
pub mod config;
pub mod error;
pub mod hici;
pub mod layer;
pub mod layout;
pub mod lora;
pub mod model;
pub mod rope;
pub mod synthetic;
mod tensor_util;
pub mod weights;

pub use attention::AttentionKernel;
pub use cache::{DecodeCache, KvCache, KvStorage, LayerCache};
pub use config::{
    resolve_rope_factor, HiciConfig, LlamaConfig, LoraConfig, LoraMode, ModelConfig, RopeScaling,
};
pub use error::ModelError;
pub use model::{AttentionMode, HiciLlama, LayerTrace, Logits};
pub use rope::{Rope, RopeTables};
pub use tensor_util::to_vec_f32;
pub use weights::{HostTensor, WeightMap, WeightSource};
