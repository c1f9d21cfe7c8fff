//! Shared helpers of the hici-io integration tests.
#![allow(dead_code)]

use hici_io::read_tensor_file;
use hici_model::weights::HostTensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The tiny-hici-a fixture (repo-relative).
pub fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-hici-a"
    ))
}

pub fn fixture_base() -> PathBuf {
    fixture().join("base")
}

pub fn fixture_adapter() -> PathBuf {
    fixture().join("adapter")
}

/// Files made by `tests/corpus/make_corpus.py`.
pub fn corpus() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus"))
}

/// A scratch directory under cargo's per-target tmp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hici-io-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies every file of `src` into `dst` (flat), making the copies writable.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create dir");
    for entry in std::fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            let to = dst.join(entry.file_name());
            std::fs::copy(entry.path(), &to).expect("copy file");
            let mut perm = std::fs::metadata(&to).expect("metadata").permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&to, perm).expect("chmod");
        }
    }
}

/// Writes f32 tensors as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                    .expect("tensor view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// All tensors of a file as a map.
pub fn read_map(path: &Path) -> HashMap<String, HostTensor> {
    read_tensor_file(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// Every tensor of the fixture's base dir (its shards merged).
pub fn fixture_base_tensors() -> HashMap<String, HostTensor> {
    let mut all = HashMap::new();
    for i in 1..=3 {
        all.extend(read_map(
            &fixture_base().join(format!("model-0000{i}-of-00003.safetensors")),
        ));
    }
    all
}

/// A copy of the fixture base dir in a temp dir.
pub fn base_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    copy_dir(&fixture_base(), dir.path());
    dir
}

/// A copy of the fixture adapter dir in a temp dir.
pub fn adapter_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    copy_dir(&fixture_adapter(), dir.path());
    dir
}

/// Asserts `result` is an error whose Display contains every needle, and returns it.
#[track_caller]
pub fn expect_err<T>(result: Result<T, hici_io::IoError>, needles: &[&str]) -> hici_io::IoError {
    let err = match result {
        Ok(_) => panic!("expected an error mentioning {needles:?}, got Ok"),
        Err(e) => e,
    };
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
    }
    err
}
