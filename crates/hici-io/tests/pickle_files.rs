//! Hostile and damaged PyTorch files: errors, never panics, never code execution.

mod common;

use common::*;
use hici_io::{load_checkpoint, read_tensor_file, IoError, LoadOptions};
use std::path::PathBuf;

/// Where the `os.system` payload of the evil pickles would create its marker.
fn marker_paths() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hici_pwned_marker")];
    if let Ok(cwd) = std::env::current_dir() {
        v.push(cwd.join("hici_pwned_marker"));
    }
    v
}

#[test]
fn malicious_pickles_are_refused_without_running() {
    for p in marker_paths() {
        let _ = std::fs::remove_file(p);
    }
    for name in ["evil.bin", "evil_toplevel.bin"] {
        let e = expect_err(
            read_tensor_file(&corpus().join(name)),
            &[name, "posix.system"],
        );
        assert!(matches!(e, IoError::Pickle { .. }), "{e:?}");
    }
    // Also when it is where trainable_params.bin should be.
    let adapter = adapter_copy("evil");
    std::fs::remove_file(adapter.path().join("trainable_params.bin")).expect("remove");
    std::fs::copy(
        corpus().join("evil.bin"),
        adapter.path().join("trainable_params.bin"),
    )
    .expect("copy");
    expect_err(
        load_checkpoint(
            &fixture_base(),
            Some(adapter.path()),
            &LoadOptions::default(),
        ),
        &["trainable_params.bin", "posix.system"],
    );
    for p in marker_paths() {
        assert!(!p.exists(), "{} was created: pickle code ran", p.display());
    }
}

#[test]
fn small_file_is_a_valid_control() {
    let t = read_map(&corpus().join("small.bin"));
    assert_eq!(t.len(), 2);
    assert_eq!(t["model.norm.weight"].shape, vec![64]);
}

#[test]
fn truncated_zip() {
    let e = expect_err(
        read_tensor_file(&corpus().join("truncated.bin")),
        &["truncated.bin", "zip"],
    );
    assert!(matches!(e, IoError::Pickle { .. }), "{e:?}");
    // Half of a real torch file from the fixture.
    let dir = TempDir::new("half-adapter");
    let bytes = std::fs::read(fixture_adapter().join("adapter_model.bin")).expect("read");
    let path = dir.path().join("adapter_model.bin");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    expect_err(read_tensor_file(&path), &["adapter_model.bin"]);
}

#[test]
fn corrupt_zip_member_is_detected() {
    // burn-store alone would return zeros for this tensor.
    let e = expect_err(
        read_tensor_file(&corpus().join("corrupt_member.bin")),
        &["corrupt_member.bin", "small/data/0", "corrupt"],
    );
    assert!(matches!(e, IoError::Pickle { .. }), "{e:?}");
}

#[test]
fn missing_storage_member_is_detected() {
    // burn-store alone would return zeros for this tensor.
    expect_err(
        read_tensor_file(&corpus().join("missing_member.bin")),
        &["missing_member.bin", "data/0", "missing"],
    );
}

#[test]
fn non_contiguous_tensor_is_refused() {
    // burn-store ignores strides: it would return the storage in row-major order.
    expect_err(
        read_tensor_file(&corpus().join("transposed.bin")),
        &["transposed.bin", "`transposed`", "non-contiguous"],
    );
}

#[test]
fn garbage_files_do_not_panic() {
    let dir = TempDir::new("garbage");
    let path = dir.path().join("garbage.bin");
    for content in [
        &b""[..],
        b"PK\x03\x04",
        b"\x80\x02}q\x00.",
        b"\x80\x02X\x05\x00\x00\x00hello.",
        b"not a pickle at all",
    ] {
        std::fs::write(&path, content).expect("write");
        if let Ok(t) = read_tensor_file(&path) {
            assert!(t.is_empty(), "{content:?} gave tensors");
        }
    }
}

/// Every single-byte corruption and every truncation of a small valid file either fails
/// cleanly or (for bytes nothing reads) yields exactly the original tensors.
#[test]
fn byte_flips_and_truncations_never_give_wrong_tensors() {
    let original = read_tensor_file(&corpus().join("small.bin")).unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(corpus().join("small.bin")).expect("read");
    let dir = TempDir::new("flips");
    let path = dir.path().join("flipped.bin");
    // Flips in bytes nobody reads (zip local-header fields and torch's alignment padding) are
    // accepted; everything else must be an error.
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x41;
        std::fs::write(&path, &b).expect("write");
        if let Ok(t) = read_tensor_file(&path) {
            assert_eq!(
                t, original,
                "flipping byte {i} changed the tensors silently"
            );
        }
    }
    for len in (0..bytes.len()).step_by(37) {
        std::fs::write(&path, &bytes[..len]).expect("write");
        assert!(read_tensor_file(&path).is_err(), "truncated to {len} bytes");
    }
}
