//! Shared by the fuzz targets: the readers take paths, so each input is written to a file.

use std::path::PathBuf;

/// Writes `data` to a per-process scratch file with extension `ext` and returns its path.
pub fn scratch_file(data: &[u8], ext: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hici-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&path, data).expect("write the fuzz input to a scratch file");
    path
}
