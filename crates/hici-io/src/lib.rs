//! Checkpoint readers for HiCI: Hugging Face Llama base directories, PEFT LoRA adapters and
//! HiCI's `trainable_params.bin`, producing one f32 [`WeightMap`] plus a [`ModelConfig`].
//!
//! Pickled PyTorch files are parsed by burn-store's Rust pickle VM, which only knows a fixed
//! allow-list of PyTorch globals: no Python code is executed, and files referencing anything
//! else are refused. See [`load_checkpoint`] for the loading recipe.
//!
//! [`WeightMap`]: hici_model::weights::WeightMap
//! [`ModelConfig`]: hici_model::config::ModelConfig

pub mod checkpoint;
pub mod error;
pub mod hf;
pub mod peft;
mod pickle_scan;
pub mod tensor_file;
pub mod trainable;

pub use checkpoint::{
    load_checkpoint, Checkpoint, LoadOptions, LoadReport, ParamCounts, DEFAULT_HICI_CONTEXT,
};
pub use error::{Dims, IoError};
pub use hf::read_base_dir;
pub use peft::{read_adapter_config, read_adapter_weights};
pub use tensor_file::read_tensor_file;
pub use trainable::{find_trainable_params, read_trainable_params};
