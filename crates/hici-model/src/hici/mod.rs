//! The HiCI plug-in, one file per stage of the paper:
//! [`local`] (LocalConstructor), [`global`] (GlobalIntegrator), [`broadcast`] (top-down prefix).

pub mod broadcast;
pub mod global;
pub mod local;

pub use broadcast::{segment_count, SegmentRule};
pub use global::GlobalIntegrator;
pub use local::LocalConstructor;
