//! Shared helpers of the integration tests: fixture paths, expected-value readers, diffs.
#![allow(dead_code)]

use hici::io::{load_checkpoint, LoadOptions};
use hici::model::lora::{QuantProduct, QuantWeight};
use hici::model::synthetic::XorShift;
use hici::model::weights::BlockQuant;
use hici::model::{to_vec_f32, HiciLlama, LoraMode};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

pub type B = burn::backend::NdArray<f32>;

/// The tiny HiCI fixture shipped in the repo.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-hici-a")
}

/// A tensor read from an expected-output file.
#[derive(Debug, Clone)]
pub struct Expected {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Reads every tensor of `expected/<name>` (F32 and I64 only).
pub fn expected(name: &str) -> BTreeMap<String, Expected> {
    let path = fixture().join("expected").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = BTreeMap::new();
    for (k, v) in st.tensors() {
        let raw = v.data();
        let (f, i) = match v.dtype() {
            Dtype::F32 => (
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            Dtype::I64 => (
                vec![],
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            d => panic!("unexpected dtype {d:?} in {name}:{k}"),
        };
        out.insert(
            k.to_string(),
            Expected {
                shape: v.shape().to_vec(),
                f32: f,
                i64: i,
            },
        );
    }
    out
}

/// Token ids of `inputs.safetensors` entry `key`.
pub fn input_ids(key: &str) -> Vec<i64> {
    expected("inputs.safetensors")[key].i64.clone()
}

/// Parsed `expected/summary.json`.
pub fn summary() -> serde_json::Value {
    let p = fixture().join("expected/summary.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("summary.json")).expect("json")
}

/// Loads the fixture through the real importer (HiCI heads 4, as the fixture was made).
pub fn load_model(mode: LoraMode) -> HiciLlama<B> {
    load_model_on::<B>(mode, &Default::default())
}

/// [`load_model`] on any backend.
pub fn load_model_on<Bk: burn::tensor::backend::Backend>(
    mode: LoraMode,
    device: &Bk::Device,
) -> HiciLlama<Bk> {
    let opts = LoadOptions {
        hici_heads: 4,
        ..LoadOptions::default()
    };
    let fx = fixture();
    let ck =
        load_checkpoint(&fx.join("base"), Some(&fx.join("adapter")), &opts).expect("fixture loads");
    let mut weights = ck.weights;
    let model = HiciLlama::<Bk>::from_weights(&ck.config, ck.lora, mode, &mut weights, device)
        .expect("model builds");
    assert!(
        weights.is_empty(),
        "unused weights: {:?}",
        weights.keys().collect::<Vec<_>>()
    );
    model
}

/// `[1, n]` int tensor.
pub fn ids_tensor(ids: &[i64]) -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    ids_tensor_on::<B>(ids, &Default::default())
}

/// `[1, n]` int tensor on any backend.
pub fn ids_tensor_on<Bk: burn::tensor::backend::Backend>(
    ids: &[i64],
    device: &Bk::Device,
) -> burn::tensor::Tensor<Bk, 2, burn::tensor::Int> {
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(ids.to_vec(), [1, ids.len()]),
        device,
    )
}

/// Max absolute difference; panics on length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Asserts `max |a-b| <= tol`, printing the measured value (collected in the closing notes).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs_diff(got, want);
    eprintln!("[parity] {what}: max abs diff {d:.3e} (tol {tol:.0e})");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// Mean next-token NLL of logits `[S, V]` for `ids` (log-softmax in f64).
pub fn mean_nll(logits: &[f32], vocab: usize, ids: &[i64]) -> f64 {
    let s = ids.len();
    let mut total = 0.0f64;
    for t in 0..s - 1 {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[ids[t + 1] as usize] as f64;
    }
    total / (s - 1) as f64
}

/// Runs the `hici` binary of this package.
pub fn hici(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hici"))
        .args(args)
        .output()
        .expect("run hici")
}

pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "hici failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A failed run: non-zero exit, a one-line `error:` message mentioning `needle`, no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
}

/// Token ids as a `--prompt-ids` value.
pub fn ids_arg(ids: &[i64]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `generated_ids` of a `hici generate --json` document.
pub fn generated(v: &serde_json::Value) -> Vec<i64> {
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Where `cargo xtask fetch-models` puts the real models: `$HICI_MODELS_DIR`, else
/// `target/models` of the workspace.
pub fn models_dir() -> PathBuf {
    std::env::var_os("HICI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models"))
}

/// The path of real model `key` of `models/catalog.json` when it has been fetched. Missing:
/// a test failure under CI (`CI=true`, where `.ci/run` fetches it), else a loud skip (`None`).
pub fn real_model(key: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let catalog: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("models/catalog.json")).expect("models/catalog.json"),
    )
    .expect("valid catalog");
    let file = catalog[key]["file"]
        .as_str()
        .expect("catalog entry with a file");
    let path = models_dir().join(file);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing under CI: `cargo xtask fetch-models` must run first",
            path.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: real model `{key}` not found at {} (run `cargo xtask fetch-models`) ***\n",
        path.display()
    );
    None
}

/// Greedy decoding of several prompts two ways: each alone (`decode_tokens`, batch 1) and all
/// together (`decode_batch`, one step for every sequence). Returns the largest logit difference
/// over all steps and whether the greedy ids agree everywhere (batch-1 ids drive both, so one
/// near-tie cannot derail the comparison).
pub fn batched_vs_single<Bk: burn::tensor::backend::Backend>(
    model: &HiciLlama<Bk>,
    prompts: &[Vec<i64>],
    mode: hici::model::AttentionMode,
    cache: hici::model::DecodeCache,
    steps: usize,
) -> (f32, bool) {
    use hici::model::Logits;
    use hici::runtime::sampler::argmax;
    let v = model.vocab_size();
    let prefill = |p: &Vec<i64>| {
        let (l, c) = model
            .prefill_tokens(p, mode, cache, Logits::Last)
            .expect("prefill");
        (argmax(&to_vec_f32(l)) as i64, c)
    };
    // batch 1
    let mut single: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut single_ids: Vec<Vec<i64>> = Vec::new();
    for p in prompts {
        let (mut next, mut c) = prefill(p);
        let (mut rows, mut ids) = (Vec::new(), vec![next]);
        for _ in 0..steps {
            let row = to_vec_f32(model.decode_tokens(&[next], &mut c).expect("decode"));
            next = argmax(&row) as i64;
            ids.push(next);
            rows.push(row);
        }
        single.push(rows);
        single_ids.push(ids);
    }
    // all together
    let mut caches = Vec::new();
    let mut same = true;
    for (i, p) in prompts.iter().enumerate() {
        let (first, c) = prefill(p);
        same &= first == single_ids[i][0];
        caches.push(c);
    }
    let mut worst = 0f32;
    for step in 0..steps {
        let next: Vec<i64> = single_ids.iter().map(|ids| ids[step]).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let rows = to_vec_f32(
            model
                .decode_batch(&next, &mut refs)
                .expect("batched decode"),
        );
        for (i, row) in rows.chunks(v).enumerate() {
            worst = worst.max(max_abs_diff(row, &single[i][step]));
            same &= argmax(row) as i64 == single_ids[i][step + 1];
        }
    }
    (worst, same)
}

/// A random `[rows, cols]` weight in 8-bit blocks (values in [-127, 127], scales ~1e-2,
/// offsets when asked).
pub fn random_blocks(rows: usize, cols: usize, offsets: bool, seed: u64) -> BlockQuant {
    random_blocks_in(rows, cols, offsets, seed, -127, 127)
}

/// [`random_blocks`] with values in `[lo, hi]`.
pub fn random_blocks_in(
    rows: usize,
    cols: usize,
    offsets: bool,
    seed: u64,
    lo: i32,
    hi: i32,
) -> BlockQuant {
    let mut rng = XorShift::new(seed);
    let n = rows * cols;
    let span = (hi - lo + 1) as u64;
    let values = (0..n)
        .map(|_| (rng.next_u64() % span) as i32 + lo)
        .map(|v| v as i8)
        .collect();
    let mut real = |lo: f32, span: f32| lo + span * rng.next_f32();
    let scales = (0..n / 32).map(|_| real(0.002, 0.02)).collect();
    let offsets = offsets.then(|| (0..n / 32).map(|_| real(-0.3, 0.6)).collect());
    BlockQuant {
        rows,
        cols,
        values,
        scales,
        offsets,
    }
}

/// burn's quantized weights (`QuantWeight`, multiplied as `product`) against an f64 product
/// with their dequantized values: few rows (decode), many rows (prefill), with and without
/// per-block offsets, a 3-D input. `four_bit` draws the values of every other case from 16
/// levels (`[-8, 7]`, and `[0, 15]` re-centred into the offsets), which `Dequantize` packs 8
/// per word; its weights are cut into row chunks of 7 rows' values (uneven last chunk).
/// `transposed_dequantize` also dequantizes a transposed view (`Backend` only: the scales
/// follow the storage order; fixed in vendor/burn-ndarray, wrong on CubeCL 0.21, and the
/// model never does it). Tolerance: `tol` relative to the sum of |terms| (f32 rounding over
/// k <= 576 terms is ~1e-6; half-precision tiles on a GPU need more). Returns the worst
/// relative error.
pub fn check_quantized_linear<Bk: burn::tensor::backend::Backend>(
    dev: &Bk::Device,
    tol: f64,
    product: QuantProduct,
    four_bit: bool,
    transposed_dequantize: bool,
) -> f64 {
    use burn::tensor::{Tensor, TensorData};
    let mut worst = 0f64;
    for (i, &(m, k, n, off)) in [
        (1, 64, 96, false),
        (1, 576, 1536, true),
        (3, 128, 200, false),
        (16, 96, 64, true),
        (17, 64, 300, false),
        (300, 128, 520, true),
    ]
    .iter()
    .enumerate()
    {
        let (lo, hi) = match (four_bit, i % 4) {
            (true, 0) => (-8, 7),
            (true, 2) => (0, 15),
            _ => (-127, 127),
        };
        let q = random_blocks_in(n, k, off, 7 + i as u64, lo, hi);
        let dense = q.dequantize().data; // [n, k]
        let mut rng = XorShift::new(100 + i as u64);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let w = QuantWeight::<Bk>::from_blocks_chunked(&q, product, 7 * k, dev);
        if product == QuantProduct::Dequantize {
            assert_eq!(w.values.len(), n.div_ceil(7), "row chunks");
        }
        let xt = Tensor::<Bk, 2>::from_data(TensorData::new(x.clone(), [m, k]), dev);
        let got2 = to_vec_f32(w.forward(xt.clone()));
        let got3 = to_vec_f32(w.forward(xt.reshape([1, m, k])));
        assert_eq!(got2, got3, "2-D and 3-D inputs, m={m} k={k} n={n}");
        for r in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for c in 0..k {
                    let t = x[r * k + c] as f64 * dense[j * k + c] as f64;
                    s += t;
                    a += t.abs();
                }
                let err = (got2[r * n + j] as f64 - s).abs() / a.max(1.0);
                worst = worst.max(err);
                assert!(
                    err <= tol,
                    "{product:?} m={m} k={k} n={n} values [{lo}, {hi}] offsets={off} ({r}, {j}): \
                     {} vs {s}",
                    got2[r * n + j]
                );
            }
        }
        if !transposed_dequantize {
            continue;
        }
        // the weight's transposed view, dequantized: dense^T (without the offsets)
        let back = to_vec_f32(w.values[0].val().transpose().dequantize());
        let plain = BlockQuant {
            offsets: None,
            ..q.clone()
        }
        .dequantize()
        .data;
        for c in 0..k {
            for j in 0..n {
                let (g, e) = (back[c * n + j], plain[j * k + c]);
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                    "transposed dequantize ({c}, {j}): {g} vs {e}"
                );
            }
        }
    }
    worst
}

/// Writes the fixture's base weights (a plain Llama) to `path` as a GGUF file, its matrices
/// re-encoded as `quantize` (Q8_0/Q4_1) when given.
pub fn write_fixture_gguf(
    path: &std::path::Path,
    quantize: Option<hici::io::gguf::quants::GgmlType>,
) {
    let ck = load_checkpoint(&fixture().join("base"), None, &LoadOptions::default()).unwrap();
    let mut w = hici::io::gguf::llama::llama_gguf_writer(&ck).unwrap();
    if let Some(ty) = quantize {
        assert!(w.quantize_matrices(ty) >= 7, "the matrices are quantized");
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

/// `src` re-encoded the way `llama-quantize --allow-requantize SRC DST <ty>` does it: every
/// tensor dequantized to f32, then every matrix whose rows are whole blocks of 32 quantized to
/// `ty` with llama.cpp's reference quantizer; vectors (norms) stay f32. The metadata (tokenizer,
/// chat template, hyper-parameters) is copied, `general.file_type` set to `ty`'s.
pub fn requantize_gguf(
    src: &std::path::Path,
    dst: &std::path::Path,
    ty: hici::io::gguf::quants::GgmlType,
) {
    use hici::io::gguf::quants::GgmlType;
    use hici::io::gguf::{writer::GgufWriter, GgufValue};
    let f = hici::io::GgufFile::open(src).expect("gguf header");
    // llama.cpp's llama_ftype
    let file_type = match ty {
        GgmlType::Q8_0 => 7,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        other => panic!("no file type for {}", other.name()),
    };
    let mut w = GgufWriter::new(f.version, f.alignment);
    for (k, v) in &f.metadata {
        match k.as_str() {
            "general.alignment" => {}
            "general.file_type" => {
                w.meta(k, GgufValue::U32(file_type));
            }
            _ => {
                w.meta(k, v.clone());
            }
        }
    }
    for t in &f.tensors {
        let values = f.read_f32(t).expect("tensor data");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.tensor(&t.name, &t.dims, GgmlType::F32, bytes);
    }
    assert!(w.quantize_matrices(ty) > 0, "no matrix to quantize");
    let tmp = dst.with_extension("partial");
    std::fs::write(&tmp, w.to_bytes()).expect("write the requantized file");
    std::fs::rename(&tmp, dst).expect("rename the requantized file");
}

/// Peak resident memory (bytes) of `hici args`, measured by GNU time (`/usr/bin/time -f %M`),
/// with its output; `None` when GNU time is not installed.
pub fn hici_peak_rss(args: &[&str]) -> Option<(u64, Output)> {
    let time = std::path::Path::new("/usr/bin/time");
    if !time.is_file() {
        return None;
    }
    let report = std::env::temp_dir().join(format!(
        "hici-rss-{}-{:?}.txt",
        std::process::id(),
        std::thread::current().id()
    ));
    let out = Command::new(time)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&report)
        .arg(env!("CARGO_BIN_EXE_hici"))
        .args(args)
        .output()
        .expect("run hici under /usr/bin/time");
    let kib: u64 = std::fs::read_to_string(&report)
        .expect("GNU time's report")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("a KiB count");
    std::fs::remove_file(&report).ok();
    Some((kib * 1024, out))
}
