//! `read_tensor_file` on arbitrary `.bin` (torch.save zip or legacy pickle) bytes: an error or
//! tensors, never a panic, never code execution (the pickle VM only knows tensor rebuilds).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "bin");
    if let Ok(tensors) = hici_io::read_tensor_file(&path) {
        for (_, t) in tensors {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
        }
    }
});
