//! The converted single-file format: round trips, merging, atomic writes, tampered files.

mod common;

use common::*;
use hici_io::converted::{converted_info, load_converted_with};
use hici_io::gguf::quants::GgmlType;
use hici_io::validate::{validate_converted, validate_dirs, KeyStatus};
use hici_io::{
    load_checkpoint, load_converted, plan_checkpoint, write_converted, ConvertOptions,
    ConvertProgress, IoError, LoadOptions, StoreDtype, TensorGroup,
};
use hici_model::weights::HostTensor;
use std::path::Path;

fn opts() -> LoadOptions {
    LoadOptions {
        hici_heads: 4,
        ..LoadOptions::default()
    }
}

fn convert(out: &Path, dtype: StoreDtype, merge_lora: bool) {
    let plan = plan_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let o = ConvertOptions {
        dtype,
        merge_lora,
        tokenizer_json: Some("{\"tok\": 1}".into()),
        quantize: None,
    };
    write_converted(&plan, out, &o, &mut ()).unwrap_or_else(|e| panic!("{e}"));
}

type Tensors = Vec<(String, HostTensor)>;

/// Files in `dir` (to check that nothing is left behind).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn f32_round_trip_is_bitwise() {
    let dir = TempDir::new("conv-f32");
    let out = dir.path().join("m.safetensors");
    convert(&out, StoreDtype::F32, false);
    assert_eq!(
        listing(dir.path()),
        vec!["m.safetensors"],
        "no temp file left"
    );
    let direct = load_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let conv = load_converted(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.config, direct.config);
    assert_eq!(conv.lora, direct.lora);
    assert_eq!(conv.weights, direct.weights);
    assert_eq!(conv.report.counts.lora, direct.report.counts.lora);
    assert_eq!(conv.report.counts.hici, direct.report.counts.hici);
    let info = converted_info(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.tokenizer_json.as_deref(), Some("{\"tok\": 1}"));
    assert!(!info.lora_merged);
    assert!(info
        .notes
        .iter()
        .any(|n| n.contains("RoPE linear factor 4")));
    // A plain safetensors file: the crate itself reads it.
    let bytes = std::fs::read(&out).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    assert_eq!(st.len(), direct.weights.len());
}

#[test]
fn half_types_round_to_nearest() {
    let direct = load_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    for (dtype, round) in [
        (
            StoreDtype::BF16,
            (|v: f32| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (StoreDtype::F16, |v: f32| half::f16::from_f32(v).to_f32()),
    ] {
        let dir = TempDir::new("conv-half");
        let out = dir.path().join("m.safetensors");
        convert(&out, dtype, false);
        let conv = load_converted(&out).unwrap_or_else(|e| panic!("{e}"));
        for (k, t) in &direct.weights {
            let want: Vec<f32> = t.data.iter().map(|&v| round(v)).collect();
            assert_eq!(conv.weights[k].data, want, "{dtype:?} {k}");
        }
        let size = std::fs::metadata(&out).expect("meta").len();
        let params: usize = direct.weights.values().map(HostTensor::numel).sum();
        assert!(
            size < (params * 2 + 200_000) as u64,
            "{dtype:?}: {size} bytes"
        );
    }
}

#[test]
fn merged_file_has_no_lora_and_merged_weights() {
    let dir = TempDir::new("conv-merged");
    let out = dir.path().join("m.safetensors");
    convert(&out, StoreDtype::F32, true);
    let direct = load_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let conv = load_converted(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.lora, None);
    assert!(conv.weights.keys().all(|k| !k.contains("lora_")));
    let info = converted_info(&out).unwrap_or_else(|e| panic!("{e}"));
    assert!(info.lora_merged);
    assert_eq!(info.merged_lora, direct.lora);
    let scale = direct.lora.expect("fixture has LoRA").scale() as f32;
    let mut merged = 0;
    for (k, w) in &conv.weights {
        let Some(m) = k.strip_suffix(".weight") else {
            continue;
        };
        let a = direct.weights.get(&format!("{m}.lora_A.weight"));
        let b = direct.weights.get(&format!("{m}.lora_B.weight"));
        let base = &direct.weights[k];
        match (a, b) {
            (Some(a), Some(b)) => {
                merged += 1;
                let (o_dim, i_dim, r) = (base.shape[0], base.shape[1], a.shape[0]);
                let mut max = 0f32;
                for o in 0..o_dim {
                    for i in 0..i_dim {
                        let d: f64 = (0..r)
                            .map(|j| b.data[o * r + j] as f64 * a.data[j * i_dim + i] as f64)
                            .sum();
                        let want = base.data[o * i_dim + i] as f64 + scale as f64 * d;
                        max = max.max((w.data[o * i_dim + i] as f64 - want).abs() as f32);
                    }
                }
                assert!(max < 1e-6, "{k}: merged differs from f64 W + s*BA by {max}");
            }
            _ => assert_eq!(w, base, "{k} unchanged"),
        }
    }
    // 4 main + 8 HiCI projections in each of 2 layers.
    assert_eq!(merged, 24);
}

/// Cancels after `after` tensors.
struct CancelAfter {
    after: usize,
    done: usize,
    temp: Option<std::path::PathBuf>,
}

impl ConvertProgress for CancelAfter {
    fn tensor_done(&mut self, _: &str, _: u64) {
        self.done += 1;
    }
    fn temp_file(&mut self, p: &Path) {
        self.temp = Some(p.to_path_buf());
    }
    fn cancelled(&self) -> bool {
        self.done >= self.after
    }
}

#[test]
fn cancelled_or_failed_writes_leave_nothing() {
    let dir = TempDir::new("conv-cancel");
    let out = dir.path().join("m.safetensors");
    let plan = plan_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut p = CancelAfter {
        after: 10,
        done: 0,
        temp: None,
    };
    let e = write_converted(&plan, &out, &ConvertOptions::default(), &mut p).unwrap_err();
    assert!(matches!(e, IoError::Interrupted), "{e}");
    assert_eq!(p.done, 10);
    assert!(p.temp.is_some_and(|t| !t.exists()));
    assert!(listing(dir.path()).is_empty());

    // An existing output is left untouched by a failed import.
    std::fs::write(&out, b"previous").expect("write");
    let mut p = CancelAfter {
        after: 3,
        done: 0,
        temp: None,
    };
    write_converted(&plan, &out, &ConvertOptions::default(), &mut p).unwrap_err();
    assert_eq!(std::fs::read(&out).expect("read"), b"previous");
    assert_eq!(listing(dir.path()), vec!["m.safetensors"]);

    // Output directory missing; output is a directory.
    let e = write_converted(
        &plan,
        &dir.path().join("no/such/dir/m.safetensors"),
        &ConvertOptions::default(),
        &mut (),
    )
    .unwrap_err();
    assert!(e.to_string().contains("temporary file"), "{e}");
    let e = write_converted(&plan, dir.path(), &ConvertOptions::default(), &mut ()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    assert_eq!(listing(dir.path()), vec!["m.safetensors"]);
}

#[test]
fn value_errors_during_the_write_leave_nothing() {
    // A NaN in the last HiCI tensor of trainable_params: the plan (headers only) is fine, the
    // write fails after most of the file has been written.
    let adapter = adapter_copy("conv-nan");
    let path = adapter.path().join("trainable_params.bin");
    let mut tensors = read_map(&path);
    std::fs::remove_file(&path).expect("remove");
    let victim = "model.layers.1.self_attn.global_integrator.stat_expand.1.bias";
    tensors.get_mut(victim).expect("tensor").data[3] = f32::NAN;
    let mut v: Vec<(String, HostTensor)> = tensors.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&adapter.path().join("trainable_params.safetensors"), &v);
    let plan = plan_checkpoint(&fixture_base(), Some(adapter.path()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("conv-nan-out");
    let out = dir.path().join("m.safetensors");
    let e = expect_err(
        write_converted(&plan, &out, &ConvertOptions::default(), &mut ()),
        &[victim, "trainable_params.safetensors", "NaN"],
    );
    assert!(matches!(e, IoError::NonFinite { .. }), "{e:?}");
    assert!(listing(dir.path()).is_empty());
    // f16 cannot hold 1e6: refused, nothing written.
    let adapter2 = adapter_copy("conv-big");
    let path = adapter2.path().join("trainable_params.bin");
    let mut tensors = read_map(&path);
    std::fs::remove_file(&path).expect("remove");
    tensors.get_mut(victim).expect("tensor").data[0] = 1e6;
    let mut v: Vec<(String, HostTensor)> = tensors.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&adapter2.path().join("trainable_params.safetensors"), &v);
    let plan = plan_checkpoint(&fixture_base(), Some(adapter2.path()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let f16 = ConvertOptions {
        dtype: StoreDtype::F16,
        ..ConvertOptions::default()
    };
    expect_err(
        write_converted(&plan, &out, &f16, &mut ()),
        &[victim, "overflows F16"],
    );
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn tampered_converted_files_are_refused() {
    let dir = TempDir::new("conv-tamper");
    let good = dir.path().join("good.safetensors");
    convert(&good, StoreDtype::F32, false);
    let conv = load_converted(&good).unwrap_or_else(|e| panic!("{e}"));
    let info = converted_info(&good).unwrap_or_else(|e| panic!("{e}"));

    // Rewrites the file with `edit` applied to the tensors, keeping the metadata.
    let rewrite = |name: &str, edit: &dyn Fn(&mut Tensors)| {
        let mut v: Tensors = conv
            .weights
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        edit(&mut v);
        let bytes: Vec<Vec<u8>> = v
            .iter()
            .map(|(_, t)| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = v
            .iter()
            .zip(&bytes)
            .map(|((k, t), b)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        t.shape.clone(),
                        b,
                    )
                    .expect("view"),
                )
            })
            .collect();
        let bytes = std::fs::read(&good).expect("read");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        let path = dir.path().join(name);
        safetensors::serialize_to_file(views, meta.metadata().clone(), &path).expect("write");
        path
    };
    let missing_key = "model.layers.1.mlp.up_proj.weight";
    let p = rewrite("missing.safetensors", &|v| {
        v.retain(|(k, _)| k != missing_key)
    });
    let e = expect_err(load_converted(&p), &[missing_key, "missing.safetensors"]);
    assert!(matches!(e, IoError::MissingKey { .. }), "{e:?}");
    let p = rewrite("shape.safetensors", &|v| {
        let t = &mut v.iter_mut().find(|(k, _)| k == missing_key).expect("key").1;
        t.shape = vec![t.shape[1], t.shape[0]];
    });
    let e = expect_err(load_converted(&p), &[missing_key, "shape.safetensors"]);
    assert!(matches!(e, IoError::ShapeMismatch { .. }), "{e:?}");
    let p = rewrite("extra.safetensors", &|v| {
        v.push((
            "model.layers.0.mlp.extra.weight".into(),
            HostTensor::new(vec![2], vec![0.0, 1.0]).unwrap(),
        ))
    });
    expect_err(
        load_converted(&p),
        &["model.layers.0.mlp.extra.weight", "unexpected"],
    );
    let p = rewrite("nan.safetensors", &|v| v[0].1.data[0] = f32::NAN);
    expect_err(load_converted(&p), &["NaN"]);
    // The validator lists the same problems instead of stopping at the first.
    let p = rewrite("both.safetensors", &|v| {
        v.retain(|(k, _)| k != missing_key);
        v.push((
            "model.layers.0.mlp.extra.weight".into(),
            HostTensor::new(vec![2], vec![0.0, 1.0]).unwrap(),
        ))
    });
    let report = validate_converted(&p).unwrap_or_else(|e| panic!("{e}"));
    assert!(!report.is_ok());
    assert_eq!(report.unexpected.len(), 1);
    let bad: Vec<_> = report.bad_keys().map(|k| k.name.as_str()).collect();
    assert_eq!(bad, vec![missing_key]);

    // Truncated, not a converted file, other format version.
    let bytes = std::fs::read(&good).expect("read");
    let p = dir.path().join("trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).expect("write");
    expect_err(load_converted(&p), &["trunc.safetensors", "truncated"]);
    let shard = fixture_base().join("model-00001-of-00003.safetensors");
    expect_err(load_converted(&shard), &["not a converted HiCI model"]);
    expect_err(load_converted(&fixture_base()), &["is a directory"]);
    let needle = b"\"format_version\":\"1\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("format_version in the header")
        + needle.len()
        - 2;
    let mut raw = bytes.clone();
    raw[at] = b'9';
    let p = dir.path().join("v9.safetensors");
    std::fs::write(&p, &raw).expect("write");
    expect_err(load_converted(&p), &["format version 9"]);
    assert_eq!(info.format_version, 1);
}

#[test]
fn validation_report_of_the_fixture() {
    let v = validate_dirs(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(v.is_ok(), "{v:#?}");
    assert_eq!(v.counts_found, v.counts_expected);
    assert!(v.spec_7b.is_none());
    assert_eq!(v.rope_factor, 4.0);
    assert!(v.rope_source.contains("rope_scaling"));
    let groups: Vec<_> = v.groups.iter().map(|g| (g.group, g.ok)).collect();
    assert_eq!(
        groups,
        vec![
            (TensorGroup::Base, 21),
            (TensorGroup::Override, 6),
            (TensorGroup::Hici, 36),
            (TensorGroup::Lora, 48)
        ]
    );
    // Missing and unexpected tensors are all listed.
    let base = base_copy("validate-bad");
    let shard = base.path().join("model-00002-of-00003.safetensors");
    let mut t = read_map(&shard);
    std::fs::remove_file(&shard).expect("remove");
    let gone = "model.layers.1.mlp.down_proj.weight";
    let removed = t.remove(gone).expect("in shard 2");
    let mut v2: Vec<(String, HostTensor)> = t.into_iter().collect();
    v2.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&shard, &v2);
    // Keep the index consistent with the shard.
    let index_path = base.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).expect("index")).expect("json");
    index["weight_map"]
        .as_object_mut()
        .expect("map")
        .remove(gone);
    std::fs::remove_file(&index_path).expect("remove");
    std::fs::write(&index_path, index.to_string()).expect("write");
    let v = validate_dirs(base.path(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!v.is_ok());
    let bad: Vec<_> = v.bad_keys().map(|k| (k.name.as_str(), k.status)).collect();
    assert_eq!(bad, vec![(gone, KeyStatus::Missing)]);
    assert_eq!(
        v.counts_found.base + removed.numel(),
        v.counts_expected.base
    );
    // The loader stops on it, naming the key.
    expect_err(
        load_checkpoint(base.path(), Some(&fixture_adapter()), &opts()),
        &[gone, "missing"],
    );
}

/// A bounded, seeded mutation run over a converted file (the CI-sized cousin of
/// `cargo xtask fuzz`): header and data bytes flipped, lengths cut; never a panic, and
/// whatever loads is consistent.
#[test]
fn seeded_mutations_of_a_converted_file_never_panic() {
    let dir = TempDir::new("conv-mutate");
    let good = dir.path().join("good.safetensors");
    convert(&good, StoreDtype::BF16, true);
    let bytes = std::fs::read(&good).expect("read");
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let path = dir.path().join("m.safetensors");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut loaded = 0;
    for i in 0..300 {
        let mut b = bytes.clone();
        match i % 4 {
            // Mostly the header, where the structure is.
            0 | 1 => {
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % header_end;
                    b[at] ^= 1 << (next() % 8);
                }
            }
            2 => {
                let at = header_end + (next() as usize) % (b.len() - header_end);
                b[at] ^= 0xFF;
            }
            _ => b.truncate((next() as usize) % b.len()),
        }
        std::fs::write(&path, &b).expect("write");
        let result = std::panic::catch_unwind(|| load_converted(&path));
        let Ok(result) = result else {
            panic!("mutation {i} panicked");
        };
        if let Ok(ck) = result {
            loaded += 1;
            for t in ck.weights.values() {
                assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
                assert!(t.data.iter().all(|v| v.is_finite()));
            }
        }
    }
    eprintln!("[mutations] 300 mutated converted files, {loaded} still loaded");
}

/// Rewrites the safetensors header of `src` into `dst` with `edit` applied to its JSON.
fn edit_header(src: &Path, dst: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(src).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).expect("write");
}

/// `--quantize`: every linear weight whose rows are whole blocks of 32 is stored in ggml blocks
/// (each value within half a quantization step of the merged f32 weight, an independent
/// check of the quantizer), every other tensor is the f32 import's bitwise, the file is at
/// most 0.4x (Q8_0) / 0.3x (Q4_0; the float MLP down projections weigh most) of the f32 import, and the reader checks what it reads.
#[test]
fn quantized_import_stores_blocks_of_the_merged_weights() {
    let dir = TempDir::new("conv-quant");
    let plan = plan_checkpoint(&fixture_base(), Some(&fixture_adapter()), &opts())
        .unwrap_or_else(|e| panic!("{e}"));
    let f32_path = dir.path().join("f32.safetensors");
    let f32_opts = ConvertOptions {
        merge_lora: true,
        ..ConvertOptions::default()
    };
    write_converted(&plan, &f32_path, &f32_opts, &mut ()).unwrap_or_else(|e| panic!("{e}"));
    let reference = load_converted(&f32_path).unwrap_or_else(|e| panic!("{e}"));
    let f32_bytes = std::fs::metadata(&f32_path).expect("f32 file").len() as f64;
    for (ty, max_ratio) in [(GgmlType::Q8_0, 0.4), (GgmlType::Q4_0, 0.3)] {
        let path = dir.path().join(format!("{}.safetensors", ty.name()));
        let o = ConvertOptions {
            quantize: Some(ty),
            ..f32_opts.clone()
        };
        let summary = write_converted(&plan, &path, &o, &mut ()).unwrap_or_else(|e| panic!("{e}"));
        let ratio = summary.bytes as f64 / f32_bytes;
        eprintln!(
            "{}: {} bytes, {ratio:.3}x the f32 import",
            ty.name(),
            summary.bytes
        );
        assert!(ratio <= max_ratio, "{}: {ratio:.3}x", ty.name());
        assert_eq!(summary.format_version, 2);
        let info = converted_info(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.quantization, Some(ty));
        let expected: Vec<&String> = reference
            .weights
            .iter()
            .filter(|(k, t)| hici_io::quantizable(k, &t.shape, ty))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(summary.quantization, Some((ty, expected.len())));
        assert_eq!(info.quantized.keys().collect::<Vec<_>>(), expected);
        // The HiCI projections are among them; the MLP down projection (rows of 172) is not.
        assert!(expected
            .iter()
            .any(|k| k.contains("local_constructor.q_proj")));
        assert!(!expected.iter().any(|k| k.contains("down_proj")));

        let kept = load_converted_with(&path, true).unwrap_or_else(|e| panic!("{e}"));
        let expanded = load_converted(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(expanded.quantized.is_empty());
        assert_eq!(kept.quantized.len(), expected.len());
        assert_eq!(kept.config, reference.config);
        assert_eq!(kept.lora, None);
        for (name, want) in &reference.weights {
            match kept.quantized.get(name) {
                Some(q) => {
                    assert_eq!(q.shape().to_vec(), want.shape);
                    assert_eq!(q.offsets, None);
                    let deq = q.dequantize();
                    assert_eq!(&expanded.weights[name], &deq, "{name}: the f32 expansion");
                    for (i, (&w, &d)) in want.data.iter().zip(&deq.data).enumerate() {
                        // Half a step of the exact scale, plus |q| times the scale's f16
                        // rounding (relative 2^-11): |w - q·d'| <= d/2 + |q|·|d - d'|.
                        // Q4_0 (ggml's rule) maps the block's largest magnitude to -8 steps,
                        // so values of the other sign are clipped at 7 steps: up to one step.
                        let step = q.scales[i / 32].abs();
                        let round = if ty == GgmlType::Q4_0 && q.values[i] == 7 {
                            1.0
                        } else {
                            0.5
                        };
                        let bound =
                            step * (round + (q.values[i].unsigned_abs() as f32 + 1.0) / 2048.0);
                        assert!(
                            (w - d).abs() <= bound * (1.0 + 1e-5) + 1e-7,
                            "{} {name}[{i}]: {w} stored as {d} (step {step})",
                            ty.name()
                        );
                    }
                }
                None => {
                    assert_eq!(&kept.weights[name], want, "{name}: float tensor");
                    assert_eq!(&expanded.weights[name], want, "{name}: float tensor");
                }
            }
        }
        let report = validate_converted(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.is_ok(), "{report:#?}");
        let q_key = report
            .keys
            .iter()
            .find(|k| k.name == "model.layers.0.self_attn.q_proj.weight")
            .expect("q_proj listed");
        assert_eq!(q_key.dtype.as_deref(), Some(ty.name()));
    }

    // Refused requests write nothing.
    let out = dir.path().join("refused.safetensors");
    let q41 = ConvertOptions {
        quantize: Some(GgmlType::Q4_1),
        ..f32_opts.clone()
    };
    expect_err(
        write_converted(&plan, &out, &q41, &mut ()),
        &["cannot quantize to Q4_1", "Q8_0, Q4_0"],
    );
    let unmerged = ConvertOptions {
        quantize: Some(GgmlType::Q8_0),
        ..ConvertOptions::default()
    };
    expect_err(
        write_converted(&plan, &out, &unmerged, &mut ()),
        &["LoRA factors merged"],
    );
    assert!(!out.exists());

    // Tampered quantized files.
    let q8 = dir.path().join("Q8_0.safetensors");
    let p = dir.path().join("no-quant-meta.safetensors");
    edit_header(&q8, &p, &|h| {
        h["__metadata__"]
            .as_object_mut()
            .expect("metadata")
            .remove("quantization");
    });
    expect_err(load_converted(&p), &["is U8", "no `quantization`"]);
    let p = dir.path().join("bad-quant-meta.safetensors");
    edit_header(&q8, &p, &|h| {
        h["__metadata__"]["quantization"] = "F16".into()
    });
    expect_err(load_converted(&p), &["`F16` is not a block format"]);
    let p = dir.path().join("v1.safetensors");
    edit_header(&q8, &p, &|h| {
        h["__metadata__"]["format_version"] = "1".into()
    });
    expect_err(
        load_converted(&p),
        &["not a block format of format version 1"],
    );
    let victim = "model.layers.1.self_attn.q_proj.weight";
    let p = dir.path().join("shape.safetensors");
    edit_header(&q8, &p, &|h| {
        // 64 rows of 68 bytes stored as 32 rows of 136: same bytes, another logical shape
        h[victim]["shape"] = serde_json::json!([32, 136]);
    });
    expect_err(load_converted(&p), &[victim, "shape"]);
    let p = dir.path().join("partial-block.safetensors");
    edit_header(&q8, &p, &|h| {
        h[victim]["shape"] = serde_json::json!([128, 34])
    });
    // the logical shape follows from the stored one: 128 rows of 32
    expect_err(load_converted(&p), &[victim, "has shape [128, 32]"]);
    // A NaN scale (the first two bytes of the tensor's first block).
    let bytes = std::fs::read(&q8).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    let start = header[victim]["data_offsets"][0].as_u64().expect("offset") as usize;
    let mut raw = bytes.clone();
    raw[8 + n + start..8 + n + start + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let p = dir.path().join("nan-scale.safetensors");
    std::fs::write(&p, raw).expect("write");
    let e = expect_err(load_converted_with(&p, true), &[victim]);
    assert!(matches!(e, IoError::NonFinite { .. }), "{e:?}");
}
