//! `load_converted` (the `hici import` format) and the validator on arbitrary bytes: an error
//! or a checkpoint whose tensors all match its configuration, never a panic.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "safetensors");
    let _ = hici_io::validate::validate_converted(&path);
    if let Ok(ck) = hici_io::load_converted(&path) {
        for t in ck.weights.values() {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
            assert!(t.data.iter().all(|v| v.is_finite()));
        }
    }
});
