//! Perplexity driver: window rule, token files, and the tiny fixture's mean NLL (spec §5.3).

use burn::backend::NdArray;
use hici_io::{load_checkpoint, LoadOptions};
use hici_model::{AttentionMode, HiciLlama, LoraMode, ModelError};
use hici_runtime::perplexity::{
    evaluate, read_token_file, window_starts, PplOptions, PplResult, TokenWidth,
};
use hici_runtime::RuntimeError;
use std::path::PathBuf;

type B = NdArray<f32>;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-hici-a"
    ))
}

fn load_model() -> HiciLlama<B> {
    let fx = fixture();
    let opts = LoadOptions {
        hici_heads: 4,
        ..Default::default()
    };
    let ck =
        load_checkpoint(&fx.join("base"), Some(&fx.join("adapter")), &opts).expect("fixture loads");
    let mut weights = ck.weights;
    HiciLlama::<B>::from_weights(
        &ck.config,
        ck.lora,
        LoraMode::Merged,
        &mut weights,
        &Default::default(),
    )
    .expect("model builds")
}

fn json(name: &str) -> serde_json::Value {
    let p = fixture().join("expected").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture json")).expect("valid json")
}

/// The fixture's 256 `long_ids`.
fn long_ids() -> Vec<u32> {
    json("inputs.json")["long_ids"]
        .as_array()
        .expect("long_ids list")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// A fresh path in the integration-test scratch directory.
fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hici-runtime-ppl-{}-{name}", std::process::id()))
}

fn write_u16(name: &str, ids: &[u32]) -> PathBuf {
    let p = tmp(name);
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| u16::try_from(t).expect("fits u16").to_le_bytes())
        .collect();
    std::fs::write(&p, bytes).expect("write token file");
    p
}

fn run(
    model: &HiciLlama<B>,
    tokens: &[u32],
    opts: &PplOptions,
) -> Result<(PplResult, Vec<(usize, usize)>), RuntimeError> {
    let mut progress = Vec::new();
    let r = evaluate(
        model,
        &Default::default(),
        tokens,
        opts,
        &mut |d, t| progress.push((d, t)),
        &|| false,
    )?;
    Ok((r, progress))
}

#[test]
fn window_starts_follow_the_reference_rule() {
    assert_eq!(window_starts(1000, 256, 256), vec![0, 256, 512]);
    assert_eq!(window_starts(257, 256, 256), vec![0]);
    assert_eq!(window_starts(256, 256, 256), Vec::<usize>::new());
    assert_eq!(window_starts(100, 256, 256), Vec::<usize>::new());
    // 768 < 1000 - 200 = 800, so 768 is a start.
    assert_eq!(window_starts(1000, 200, 256), vec![0, 256, 512, 768]);
    assert_eq!(window_starts(10, 4, 2), vec![0, 2, 4]);
    assert_eq!(window_starts(10, 4, 0), Vec::<usize>::new());
}

#[test]
fn fixture_mean_nll_full_and_segmented() {
    let model = load_model();
    let summary = json("summary.json");
    let mut ids = long_ids();
    assert_eq!(ids.len(), 256);
    // One extra token so that the reference rule yields exactly one window = long_ids.
    ids.push(1);
    let path = write_u16("fixture.bin", &ids);
    let tokens = read_token_file(&path, TokenWidth::U16).expect("read back");
    let _ = std::fs::remove_file(&path);
    assert_eq!(tokens, ids);

    for (mode, key) in [
        (AttentionMode::Full, "full"),
        (AttentionMode::Segmented { segments: 4 }, "segmented"),
    ] {
        let expected = summary[key]["mean_nll_fp64_from_logits"]
            .as_f64()
            .expect("expected mean NLL");
        let opts = PplOptions {
            seq_len: 256,
            stride: 256,
            max_windows: None,
            mode,
        };
        let (r, progress) = run(&model, &tokens, &opts).expect("evaluate");
        let diff = (r.mean_nll - expected).abs();
        println!(
            "{key}: mean NLL {:.12} expected {expected:.12} |diff| {diff:.3e} ppl {:.6}",
            r.mean_nll, r.ppl
        );
        assert_eq!(r.windows, 1);
        assert_eq!(r.predictions, 255);
        assert_eq!(progress, vec![(1, 1)]);
        assert!((r.nll_sum / 255.0 - r.mean_nll).abs() < 1e-12);
        assert!((r.ppl - r.mean_nll.exp()).abs() < 1e-9 * r.ppl);
        assert!(diff < 1e-4, "{key}: |diff| {diff} >= 1e-4");
    }
}

#[test]
fn several_windows_and_max_windows() {
    let model = load_model();
    let mut ids = long_ids();
    ids.extend(long_ids());
    // 512 tokens, seq 64, stride 128: starts 0,128,256,384 (384 < 448).
    let mut opts = PplOptions {
        seq_len: 64,
        stride: 128,
        max_windows: None,
        mode: AttentionMode::Full,
    };
    let (all, progress) = run(&model, &ids, &opts).expect("evaluate");
    assert_eq!(all.windows, 4);
    assert_eq!(all.predictions, 4 * 63);
    assert_eq!(progress, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    // Windows are independent: the first window alone equals a 2-window run's first part.
    opts.max_windows = Some(2);
    let (two, progress) = run(&model, &ids, &opts).expect("evaluate");
    assert_eq!(two.windows, 2);
    assert_eq!(progress, vec![(1, 2), (2, 2)]);
    // Window 2 (start 256) repeats window 0 (long_ids is repeated), so windows {0,2} and
    // {1,3} have equal sums: total = 2 * two.
    assert!((all.nll_sum - 2.0 * two.nll_sum).abs() < 1e-6 * all.nll_sum);
}

#[test]
fn u32_roundtrip_and_file_errors() {
    let ids = vec![0u32, 1, 65_535, 65_536, 4_000_000_000];
    let p = tmp("u32.bin");
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(read_token_file(&p, TokenWidth::U32).unwrap(), ids);
    // 20 bytes are also 10 u16 tokens.
    assert_eq!(read_token_file(&p, TokenWidth::U16).unwrap().len(), 10);

    std::fs::write(&p, [1u8, 0, 2]).unwrap();
    let err = read_token_file(&p, TokenWidth::U16).unwrap_err();
    let msg = err.to_string();
    println!("odd length: {msg}");
    assert!(matches!(err, RuntimeError::Input(_)));
    assert!(
        msg.contains("u32.bin") && msg.contains("byte length 3"),
        "{msg}"
    );
    std::fs::write(&p, [1u8, 0, 2, 0, 3, 0]).unwrap();
    assert!(matches!(
        read_token_file(&p, TokenWidth::U32),
        Err(RuntimeError::Input(_))
    ));

    std::fs::write(&p, []).unwrap();
    let err = read_token_file(&p, TokenWidth::U16).unwrap_err();
    println!("empty: {err}");
    assert!(matches!(err, RuntimeError::Input(_)));
    let _ = std::fs::remove_file(&p);

    let missing = tmp("does-not-exist.bin");
    assert!(matches!(
        read_token_file(&missing, TokenWidth::U16),
        Err(RuntimeError::File { .. })
    ));
}

#[test]
fn invalid_inputs_are_errors() {
    let model = load_model();
    let ids = long_ids();
    let opts = |seq_len, stride, mode| PplOptions {
        seq_len,
        stride,
        max_windows: None,
        mode,
    };

    // Out-of-range id, named with its position.
    let mut bad = ids.clone();
    bad[100] = 100_000;
    let err = run(&model, &bad, &opts(64, 64, AttentionMode::Full)).unwrap_err();
    let msg = err.to_string();
    println!("out of range: {msg}");
    assert!(matches!(err, RuntimeError::Input(_)));
    assert!(msg.contains("100000") && msg.contains("100"), "{msg}");

    // Exactly seq_len tokens: no window under the reference rule.
    let err = run(&model, &ids, &opts(256, 256, AttentionMode::Full)).unwrap_err();
    println!("too short: {err}");
    assert!(matches!(err, RuntimeError::Input(ref m) if m.contains("257")));

    assert!(matches!(
        run(&model, &ids, &opts(1, 1, AttentionMode::Full)),
        Err(RuntimeError::Input(_))
    ));
    assert!(matches!(
        run(&model, &ids, &opts(64, 0, AttentionMode::Full)),
        Err(RuntimeError::Input(_))
    ));
    let err = run(
        &model,
        &ids,
        &opts(62, 64, AttentionMode::Segmented { segments: 4 }),
    )
    .unwrap_err();
    println!("segments: {err}");
    assert!(matches!(
        err,
        RuntimeError::Model(ModelError::SegmentsDoNotDivide {
            len: 62,
            segments: 4
        })
    ));
    assert!(matches!(
        run(
            &model,
            &ids,
            &opts(64, 64, AttentionMode::Segmented { segments: 0 })
        ),
        Err(RuntimeError::Model(ModelError::Config(_)))
    ));
}

#[test]
fn cancel_stops_between_windows() {
    let model = load_model();
    let ids = long_ids();
    let opts = PplOptions {
        seq_len: 32,
        stride: 32,
        max_windows: None,
        mode: AttentionMode::Full,
    };
    let done = std::cell::Cell::new(0usize);
    let err = evaluate(
        &model,
        &Default::default(),
        &ids,
        &opts,
        &mut |d, _| done.set(d),
        &|| done.get() >= 2,
    )
    .unwrap_err();
    assert!(matches!(err, RuntimeError::Interrupted));
    assert_eq!(
        done.get(),
        2,
        "two windows ran before the cancel took effect"
    );

    let err = evaluate(
        &model,
        &Default::default(),
        &ids,
        &opts,
        &mut |_, _| {},
        &|| true,
    )
    .unwrap_err();
    assert!(matches!(err, RuntimeError::Interrupted));
}
