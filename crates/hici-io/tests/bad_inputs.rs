//! Broken or unsupported checkpoints give a typed error naming the file and/or tensor.

mod common;

use common::*;
use hici_io::{
    load_checkpoint, read_adapter_config, read_base_dir, read_tensor_file, IoError, LoadOptions,
};
use hici_model::weights::HostTensor;
use std::path::Path;

fn opts() -> LoadOptions {
    LoadOptions {
        hici_heads: 4,
        ..LoadOptions::default()
    }
}

fn shard(i: usize) -> String {
    format!("model-0000{i}-of-00003.safetensors")
}

/// Rewrites one safetensors file of `dir` through `edit`.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut Vec<(String, HostTensor)>)) {
    let mut tensors = read_tensor_file(path).unwrap_or_else(|e| panic!("{e}"));
    edit(&mut tensors);
    std::fs::remove_file(path).expect("remove");
    write_safetensors(path, &tensors);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read json")).expect("json");
    edit(&mut v);
    std::fs::remove_file(path).expect("remove");
    std::fs::write(path, serde_json::to_string_pretty(&v).expect("json")).expect("write json");
}

#[test]
fn nonexistent_path() {
    let missing = fixture().join("does-not-exist");
    let e = expect_err(
        load_checkpoint(&missing, None, &opts()),
        &["does-not-exist", "no such file"],
    );
    assert!(matches!(e, IoError::NotFound(_)), "{e:?}");
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(&missing), &opts()),
        &["does-not-exist"],
    );
    assert!(matches!(e, IoError::NotFound(_)), "{e:?}");
    let e = expect_err(
        read_tensor_file(&missing.join("x.safetensors")),
        &["x.safetensors"],
    );
    assert!(matches!(e, IoError::NotFound(_)), "{e:?}");
}

#[test]
fn base_is_a_file() {
    let file = fixture_base().join("config.json");
    let e = expect_err(
        load_checkpoint(&file, None, &opts()),
        &["config.json", "not a directory"],
    );
    assert!(matches!(e, IoError::NotADirectory(_)), "{e:?}");
}

#[test]
fn dir_without_config_json() {
    let dir = base_copy("no-config");
    std::fs::remove_file(dir.path().join("config.json")).expect("remove");
    let e = expect_err(read_base_dir(dir.path()), &["has no config.json"]);
    assert!(matches!(e, IoError::MissingConfig(_)), "{e:?}");
    assert!(e.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn invalid_config_json() {
    let dir = base_copy("bad-config");
    std::fs::remove_file(dir.path().join("config.json")).expect("remove");
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").expect("write");
    let e = expect_err(read_base_dir(dir.path()), &["config.json"]);
    assert!(matches!(e, IoError::Json { .. }), "{e:?}");
}

#[test]
fn dir_without_weights() {
    let dir = TempDir::new("no-weights");
    std::fs::copy(
        fixture_base().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let e = expect_err(
        read_base_dir(dir.path()),
        &["has no weights", "model.safetensors"],
    );
    assert!(matches!(e, IoError::MissingWeights { .. }), "{e:?}");
}

#[test]
fn truncated_safetensors() {
    let dir = base_copy("truncated-st");
    let path = dir.path().join(shard(2));
    let bytes = std::fs::read(&path).expect("read");
    std::fs::remove_file(&path).expect("remove");
    for (len, what) in [(bytes.len() / 2, "truncated"), (4, "too short")] {
        std::fs::write(&path, &bytes[..len]).expect("write");
        let e = expect_err(read_base_dir(dir.path()), &[&shard(2), what]);
        assert!(matches!(e, IoError::Safetensors { .. }), "{e:?}");
        std::fs::remove_file(&path).expect("remove");
    }
    // Header length pointing past the end of the file.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    std::fs::write(&path, &bad).expect("write");
    expect_err(read_base_dir(dir.path()), &[&shard(2), "truncated"]);
}

#[test]
fn wrong_shape_in_a_shard() {
    let dir = base_copy("wrong-shape");
    edit_safetensors(&dir.path().join(shard(2)), |t| {
        let (_, w) = t
            .iter_mut()
            .find(|(k, _)| k == "model.layers.1.mlp.down_proj.weight")
            .expect("down_proj");
        w.shape = vec![172, 64]; // transposed
    });
    let e = expect_err(
        read_base_dir(dir.path()),
        &[
            "model.layers.1.mlp.down_proj.weight",
            &shard(2),
            "[172, 64]",
            "[64, 172]",
        ],
    );
    assert!(matches!(e, IoError::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn key_listed_in_index_but_missing_from_shard() {
    let dir = base_copy("missing-key");
    edit_safetensors(&dir.path().join(shard(2)), |t| {
        t.retain(|(k, _)| k != "model.norm.weight")
    });
    let e = expect_err(read_base_dir(dir.path()), &["model.norm.weight", &shard(2)]);
    assert!(matches!(e, IoError::MissingKey { .. }), "{e:?}");
}

#[test]
fn key_in_shard_but_not_in_index() {
    let dir = base_copy("extra-key");
    edit_safetensors(&dir.path().join(shard(3)), |t| {
        t.push((
            "model.layers.0.mlp.extra.weight".into(),
            HostTensor {
                shape: vec![2],
                data: vec![0.0, 1.0],
            },
        ))
    });
    let e = expect_err(
        read_base_dir(dir.path()),
        &["model.layers.0.mlp.extra.weight", &shard(3)],
    );
    assert!(matches!(e, IoError::UnexpectedKey { .. }), "{e:?}");
}

#[test]
fn unknown_tensor_in_single_file_base() {
    let dir = TempDir::new("single-extra");
    std::fs::copy(
        fixture_base().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let mut all: Vec<(String, HostTensor)> = fixture_base_tensors().into_iter().collect();
    all.push((
        "model.layers.0.self_attn.q_proj.bias".into(),
        HostTensor {
            shape: vec![64],
            data: vec![0.0; 64],
        },
    ));
    write_safetensors(&dir.path().join("model.safetensors"), &all);
    expect_err(
        read_base_dir(dir.path()),
        &["model.layers.0.self_attn.q_proj.bias", "model.safetensors"],
    );
}

#[test]
fn index_shard_outside_the_directory() {
    let dir = base_copy("index-escape");
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["lm_head.weight"] = "../model-00003-of-00003.safetensors".into();
    });
    let e = expect_err(
        read_base_dir(dir.path()),
        &["model.safetensors.index.json", "not a plain file name"],
    );
    assert!(matches!(e, IoError::Json { .. }), "{e:?}");
}

#[test]
fn nan_in_a_weight() {
    let dir = base_copy("nan");
    edit_safetensors(&dir.path().join(shard(1)), |t| {
        let (_, w) = t
            .iter_mut()
            .find(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
            .expect("q_proj");
        w.data[17] = f32::NAN;
    });
    let e = expect_err(
        load_checkpoint(dir.path(), Some(&fixture_adapter()), &opts()),
        &["model.layers.0.self_attn.q_proj.weight", &shard(1), "NaN"],
    );
    assert!(matches!(e, IoError::NonFinite { .. }), "{e:?}");
}

#[test]
fn unknown_key_in_trainable_params() {
    let adapter = adapter_copy("trainable-unknown");
    std::fs::remove_file(adapter.path().join("trainable_params.bin")).expect("remove");
    std::fs::copy(
        corpus().join("trainable-unknown-key/trainable_params.bin"),
        adapter.path().join("trainable_params.bin"),
    )
    .expect("copy");
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[
            "model.layers.0.mlp.down_proj.weight",
            "trainable_params.bin",
        ],
    );
    assert!(matches!(e, IoError::UnexpectedKey { .. }), "{e:?}");
}

/// The fixture's trainable params rewritten as `trainable_params.safetensors` after `edit`.
fn adapter_with_trainable(tag: &str, edit: impl FnOnce(&mut Vec<(String, HostTensor)>)) -> TempDir {
    let adapter = adapter_copy(tag);
    let bin = adapter.path().join("trainable_params.bin");
    let mut t = read_tensor_file(&bin).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_file(&bin).expect("remove");
    edit(&mut t);
    write_safetensors(&adapter.path().join("trainable_params.safetensors"), &t);
    adapter
}

#[test]
fn trainable_params_safetensors_is_accepted() {
    let adapter = adapter_with_trainable("trainable-st", |_| {});
    let ck = load_checkpoint(&fixture_base(), Some(adapter.path()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ck
        .report
        .files
        .iter()
        .any(|f| f.ends_with("trainable_params.safetensors")));
}

#[test]
fn missing_hici_tensor() {
    let key = "model.layers.1.self_attn.global_integrator.global_queries";
    let adapter = adapter_with_trainable("hici-missing", |t| t.retain(|(k, _)| k != key));
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[key, "trainable_params.safetensors"],
    );
    assert!(matches!(e, IoError::MissingKey { .. }), "{e:?}");
}

#[test]
fn inconsistent_hici_shapes() {
    let key = "model.layers.1.self_attn.local_constructor.memory_slots";
    let adapter = adapter_with_trainable("hici-shape", |t| {
        let (_, w) = t.iter_mut().find(|(k, _)| k == key).expect("memory_slots");
        w.shape = vec![7, 64];
        w.data.truncate(7 * 64);
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[key, "[7, 64]", "[8, 64]"],
    );
    assert!(matches!(e, IoError::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn unknown_hici_tensor() {
    let key = "model.layers.0.self_attn.global_integrator.shared_compressor.0.bias";
    let adapter = adapter_with_trainable("hici-extra", |t| {
        t.push((
            key.into(),
            HostTensor {
                shape: vec![16],
                data: vec![0.0; 16],
            },
        ))
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[key, "trainable_params.safetensors"],
    );
    assert!(matches!(e, IoError::UnexpectedKey { .. }), "{e:?}");
}

#[test]
fn norm_override_with_wrong_shape() {
    let key = "model.norm.weight";
    let adapter = adapter_with_trainable("norm-shape", |t| {
        let (_, w) = t.iter_mut().find(|(k, _)| k == key).expect("norm");
        w.shape = vec![32];
        w.data.truncate(32);
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[key, "[32]", "[64]"],
    );
    assert!(matches!(e, IoError::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn vocab_resize_appends_mean_lm_head_row() {
    let adapter = adapter_with_trainable("resize", |t| {
        let (_, e) = t
            .iter_mut()
            .find(|(k, _)| k == "model.embed_tokens.weight")
            .expect("embed");
        e.shape[0] += 1;
        e.data.extend((0..64).map(|i| i as f32 * 0.01));
    });
    let ck = load_checkpoint(&fixture_base(), Some(adapter.path()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.config.llama.vocab_size, 513);
    let head = &ck.weights["lm_head.weight"];
    assert_eq!(head.shape, vec![513, 64]);
    let base = fixture_base_tensors();
    let old = &base["lm_head.weight"];
    assert_eq!(head.data[..512 * 64], old.data[..]);
    for c in 0..64 {
        let mean = (0..512)
            .map(|r| f64::from(old.data[r * 64 + c]))
            .sum::<f64>()
            / 512.0;
        assert!((f64::from(head.data[512 * 64 + c]) - mean).abs() < 1e-6);
    }
    assert!(
        ck.report
            .notes
            .iter()
            .any(|n| n.contains("appended 1 lm_head row(s) (mean of 512 rows)")),
        "{:?}",
        ck.report.notes
    );
}

#[test]
fn adapter_rank_mismatch() {
    let adapter = adapter_copy("rank");
    edit_json(&adapter.path().join("adapter_config.json"), |v| {
        v["r"] = 4.into()
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &["adapter_model.bin", "lora_A.weight", "r = 4", "[8, "],
    );
    assert!(matches!(e, IoError::Adapter { .. }), "{e:?}");
}

#[test]
fn adapter_unsupported_options() {
    for (field, value) in [
        ("fan_in_fan_out", serde_json::Value::from(true)),
        ("use_dora", true.into()),
        ("use_rslora", true.into()),
        ("bias", "lora_only".into()),
        ("peft_type", "PREFIX_TUNING".into()),
    ] {
        let adapter = adapter_copy("options");
        edit_json(&adapter.path().join("adapter_config.json"), |v| {
            v[field] = value.clone()
        });
        let e = expect_err(
            read_adapter_config(adapter.path()),
            &["adapter_config.json", field],
        );
        assert!(matches!(e, IoError::Adapter { .. }), "{e:?}");
        expect_err(
            load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
            &[field],
        );
    }
}

/// The fixture adapter rewritten as `adapter_model.safetensors` after `edit`.
fn adapter_with_lora(tag: &str, edit: impl FnOnce(&mut Vec<(String, HostTensor)>)) -> TempDir {
    let adapter = adapter_copy(tag);
    let bin = adapter.path().join("adapter_model.bin");
    let mut t = read_tensor_file(&bin).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_file(&bin).expect("remove");
    edit(&mut t);
    write_safetensors(&adapter.path().join("adapter_model.safetensors"), &t);
    adapter
}

#[test]
fn adapter_safetensors_with_default_segment_is_accepted() {
    let adapter = adapter_with_lora("lora-default", |t| {
        for (k, _) in t.iter_mut() {
            *k = k.replace(".weight", ".default.weight");
        }
    });
    let ck = load_checkpoint(&fixture_base(), Some(adapter.path()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ck
        .weights
        .contains_key("model.layers.1.self_attn.global_integrator.v_proj.lora_B.weight"));
    assert!(ck.weights.keys().all(|k| !k.contains(".default.")));
}

#[test]
fn adapter_unknown_key() {
    let key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight";
    let adapter = adapter_with_lora("lora-unknown", |t| {
        t.push((
            key.into(),
            HostTensor {
                shape: vec![8, 64],
                data: vec![0.0; 8 * 64],
            },
        ))
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[key, "adapter_model.safetensors"],
    );
    assert!(matches!(e, IoError::UnexpectedKey { .. }), "{e:?}");
}

#[test]
fn adapter_missing_partner() {
    let adapter = adapter_with_lora("lora-pair", |t| {
        t.retain(|(k, _)| !k.ends_with("layers.1.self_attn.o_proj.lora_B.weight"))
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[
            "model.layers.1.self_attn.o_proj.lora_B.weight",
            "adapter_model.safetensors",
        ],
    );
    assert!(matches!(e, IoError::MissingKey { .. }), "{e:?}");
}

#[test]
fn adapter_in_dim_mismatch() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let adapter = adapter_with_lora("lora-dims", |t| {
        let (_, a) = t.iter_mut().find(|(k, _)| k == key).expect("lora_A");
        a.shape = vec![8, 32];
        a.data.truncate(8 * 32);
    });
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &[
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "[8, 32]",
            "[8, 64]",
        ],
    );
    assert!(matches!(e, IoError::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn hici_lora_without_hici_modules() {
    let adapter = adapter_copy("no-trainable");
    std::fs::remove_file(adapter.path().join("trainable_params.bin")).expect("remove");
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(adapter.path()), &opts()),
        &["global_integrator.k_proj.weight", "trainable_params.bin"],
    );
    assert!(matches!(e, IoError::MissingKey { .. }), "{e:?}");
}

#[test]
fn adapter_dir_without_anything() {
    let empty = TempDir::new("empty-adapter");
    let e = expect_err(
        load_checkpoint(&fixture_base(), Some(empty.path()), &opts()),
        &["adapter_config.json", "trainable_params"],
    );
    assert!(matches!(e, IoError::Adapter { .. }), "{e:?}");
}
