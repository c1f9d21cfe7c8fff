//! The engine layer the `hici` CLI and the HTTP server share: a plain [`LoadSpec`] becomes a
//! model on a device chosen at run time ([`load`] for code generic over the backend,
//! [`load_engine`] for callers that want one type-erased [`Engine`]), generation runs with an
//! explicit [`CancelToken`] and [`GenerateOptions`] whose limits come from the model's context.
//! No process-wide state, no command-line words.

pub mod batch;
pub mod device;
pub mod embedded;
mod engine;
pub mod load;

pub use batch::{BatchJob, Scheduler, Sink, DEFAULT_PREFILL_CHUNK};
pub use device::DeviceChoice;
pub use engine::{load_engine, Engine, EngineInfo, StepItem};
pub use hici_runtime::cancel::CancelToken;
pub use hici_runtime::generate::{GenerateOptions, GenerateOutput, StopReason, Timings};
pub use load::{
    context_of, load, AttentionChoice, Fusion, LoadSpec, Loaded, ModeChoice, ModelSource,
};
