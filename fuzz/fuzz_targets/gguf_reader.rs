//! The GGUF reader and the Llama mapping on arbitrary bytes: an error or a header whose every
//! tensor lies inside the file (and, when it maps, a model whose tensors fill their shapes),
//! never a panic or a huge allocation.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "gguf");
    if let Ok(f) = hici_io::GgufFile::open(&path) {
        for t in &f.tensors {
            assert!(t.offset + t.nbytes <= f.file_len);
        }
        let _ = f.vocab();
        let _ = f.summary();
    }
    if let Ok(m) = hici_io::load_gguf(&path, &hici_io::LoadOptions::default()) {
        for t in m.checkpoint.weights.values() {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
        }
    }
});
