//! GGUF: dequantization against the `gguf` package, metadata of every type, the Llama mapping
//! (a GGUF written from the tiny fixture's base weights loads to the same tensors), and bad
//! files.

mod common;

use common::{fixture_base, TempDir};
use hici_io::gguf::llama::llama_gguf_writer;
use hici_io::gguf::quants::GgmlType;
use hici_io::gguf::GgufValue;
use hici_io::{load_checkpoint, load_gguf, GgufFile, LoadOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn quant_fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gguf-quants"
    ))
}

/// Every tensor of `quants.gguf` (written by bench/make_gguf_quant_fixture.py with the `gguf`
/// package) dequantizes to exactly what `gguf.quants.dequantize` gives.
#[test]
fn dequantization_equals_the_gguf_package_bit_for_bit() {
    let dir = quant_fixture();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let f = GgufFile::open(&dir.join("quants.gguf")).unwrap();
    assert_eq!(f.alignment, expected["alignment"].as_u64().unwrap());
    assert_eq!(
        f.data_offset,
        expected["tensor_data_offset"].as_u64().unwrap()
    );
    let tensors = expected["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 11);
    for (name, e) in tensors {
        let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.ty.name(), e["type"].as_str().unwrap(), "{name}");
        let dims: Vec<u64> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.nbytes, e["n_bytes"].as_u64().unwrap(), "{name}");
        let got = f.read_f32(t).unwrap();
        let want: Vec<f32> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{name}[{i}]: {g} vs gguf {w}");
        }
    }
}

fn json_of(v: &GgufValue) -> Value {
    match v {
        GgufValue::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        GgufValue::String(s) => Value::String(s.clone()),
        GgufValue::Bool(b) => Value::Bool(*b),
        GgufValue::F32(x) => serde_json::json!(*x as f64),
        GgufValue::F64(x) => serde_json::json!(*x),
        GgufValue::I8(x) => serde_json::json!(*x),
        GgufValue::I16(x) => serde_json::json!(*x),
        GgufValue::I32(x) => serde_json::json!(*x),
        GgufValue::I64(x) => serde_json::json!(*x),
        other => serde_json::json!(other.as_u64().unwrap()),
    }
}

#[test]
fn metadata_of_every_type_reads_as_written() {
    let dir = quant_fixture();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let f = GgufFile::open(&dir.join("quants.gguf")).unwrap();
    let meta = expected["metadata"].as_object().unwrap();
    assert_eq!(f.metadata.len(), meta.len());
    for (key, e) in meta {
        let v = f.get(key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(
            v.type_name(),
            e["type"].as_str().unwrap().to_lowercase(),
            "{key}"
        );
        assert_eq!(json_of(v), e["value"], "{key}");
    }
}

/// The tiny fixture's base weights written as llama.cpp would (names, permuted q/k, reversed
/// dims), after `edit` of the metadata and the tensors (name, ggml dims, type, bytes).
fn tiny_gguf(
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut Vec<(String, GgufValue)>, &mut Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>),
) -> PathBuf {
    let ck = load_checkpoint(&fixture_base(), None, &LoadOptions::default()).unwrap();
    let mut w = llama_gguf_writer(&ck).unwrap();
    let (meta, tensors) = w.parts_mut();
    edit(meta, tensors);
    let path = dir.join(name);
    std::fs::write(&path, w.to_bytes()).unwrap();
    path
}

#[test]
fn a_gguf_of_the_fixture_loads_to_the_same_tensors() {
    let dir = TempDir::new("gguf-map");
    let path = tiny_gguf(dir.path(), "tiny.gguf", |_, _| {});
    let g = load_gguf(&path, &LoadOptions::default()).unwrap();
    let hf = load_checkpoint(&fixture_base(), None, &LoadOptions::default()).unwrap();
    assert_eq!(
        g.checkpoint.config.llama.hidden_size,
        hf.config.llama.hidden_size
    );
    assert_eq!(
        g.checkpoint.config.llama.kv_heads(),
        hf.config.llama.kv_heads()
    );
    assert_eq!(
        g.checkpoint.weights.keys().collect::<Vec<_>>(),
        hf.weights.keys().collect::<Vec<_>>()
    );
    for (k, t) in &hf.weights {
        assert_eq!(&g.checkpoint.weights[k], t, "{k}");
    }
    assert!(g.vocab.is_none());
    assert_eq!(g.summary.architecture, "llama");
}

fn load_err(path: &Path) -> String {
    load_gguf(path, &LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_models_give_errors_naming_file_and_field() {
    let dir = TempDir::new("gguf-bad");
    let p = tiny_gguf(dir.path(), "arch.gguf", |m, _| {
        m[0].1 = GgufValue::String("mamba".into());
    });
    let e = load_err(&p);
    assert!(
        e.contains("arch.gguf") && e.contains("`mamba`") && e.contains("general.architecture"),
        "{e}"
    );

    let p = tiny_gguf(dir.path(), "missing.gguf", |_, t| {
        t.retain(|(n, ..)| n != "blk.1.ffn_up.weight");
    });
    let e = load_err(&p);
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("missing"),
        "{e}"
    );

    let p = tiny_gguf(dir.path(), "extra.gguf", |_, t| {
        t.push((
            "blk.0.attn_q.bias".into(),
            vec![4],
            GgmlType::F32,
            vec![0; 16],
        ));
    });
    assert!(load_err(&p).contains("unexpected tensor `blk.0.attn_q.bias`"));

    let p = tiny_gguf(dir.path(), "shape.gguf", |_, t| {
        let q = t
            .iter_mut()
            .find(|(n, ..)| n == "blk.0.ffn_down.weight")
            .unwrap();
        q.1.reverse();
    });
    let e = load_err(&p);
    assert!(
        e.contains("blk.0.ffn_down.weight") && e.contains("shape"),
        "{e}"
    );

    let p = tiny_gguf(dir.path(), "nometa.gguf", |m, _| {
        m.retain(|(k, _)| k != "llama.block_count");
    });
    assert!(load_err(&p).contains("`llama.block_count` is missing"));

    let p = tiny_gguf(dir.path(), "type.gguf", |m, _| {
        m.retain(|(k, _)| k != "llama.block_count");
        m.push(("llama.block_count".into(), GgufValue::String("two".into())));
    });
    assert!(load_err(&p).contains("`llama.block_count` must be an unsigned integer"));

    let p = tiny_gguf(dir.path(), "absurd.gguf", |m, _| {
        m.retain(|(k, _)| k != "llama.embedding_length");
        m.push(("llama.embedding_length".into(), GgufValue::U64(u64::MAX)));
    });
    assert!(load_err(&p).contains("absurd"));

    let p = tiny_gguf(dir.path(), "nan.gguf", |_, t| {
        t[0].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(load_err(&p).contains("NaN"));

    // a whole file cut short: the data section no longer fits
    let good = std::fs::read(tiny_gguf(dir.path(), "good.gguf", |_, _| {})).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let e = load_err(&cut);
    assert!(e.contains("cut.gguf") && e.contains("past the end"), "{e}");
}
