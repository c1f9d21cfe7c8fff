//! Checkpoint readers for HiCI: Hugging Face Llama base directories, PEFT LoRA adapters and
//! HiCI's `trainable_params.bin`, producing one f32 [`WeightMap`] plus a [`ModelConfig`].
//!
//! Pickled PyTorch files are parsed by burn-store's Rust pickle VM, which only knows a fixed
//! allow-list of PyTorch globals: no Python code is executed, and files referencing anything
//! else are refused. See [`load_checkpoint`] for the loading recipe.
//!
//! Every check that needs no tensor data runs first, from file headers only
//! ([`plan_checkpoint`]); tensors are then read one at a time, so the converter
//! ([`write_converted`], `hici import`) streams a checkpoint into one file without holding it,
//! and [`load_converted`] reads that file back (`--model`). [`validate`] lists every expected,
//! missing and unexpected tensor and the parameter counts per group (`hici inspect`).
//!
//! [`WeightMap`]: hici_model::weights::WeightMap
//! [`ModelConfig`]: hici_model::config::ModelConfig

mod catalog;
pub mod checkpoint;
pub mod converted;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod layout;
pub mod peft;
mod pickle_scan;
pub mod tensor_file;
pub mod trainable;
pub mod validate;

pub use checkpoint::{
    load_checkpoint, plan_checkpoint, Checkpoint, CheckpointPlan, LoadOptions, LoadReport,
    ParamCounts, PlannedTensor, TensorGroup, DEFAULT_HICI_CONTEXT,
};
pub use converted::{
    converted_info, load_converted, load_converted_with, quantizable, write_converted,
    ConvertOptions, ConvertProgress, ConvertSummary, ConvertedInfo, StoreDtype, FORMAT_NAME,
    FORMAT_VERSION, FORMAT_VERSION_FLOAT, IMPORT_QUANTIZATIONS,
};
pub use error::{Dims, IoError};
pub use gguf::llama::{load_gguf, GgufModel, GgufSummary, GgufVocab};
pub use gguf::{is_gguf, GgufFile};
pub use hf::read_base_dir;
pub use peft::{read_adapter_config, read_adapter_weights};
pub use tensor_file::{read_tensor_file, FloatType};
pub use trainable::{find_trainable_params, read_trainable_params};
