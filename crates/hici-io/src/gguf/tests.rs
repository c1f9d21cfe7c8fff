use super::writer::GgufWriter;
use super::*;

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hici-gguf-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn sample(version: u32, alignment: u64) -> GgufWriter {
    let mut w = GgufWriter::new(version, alignment);
    w.meta("general.architecture", GgufValue::String("llama".into()))
        .meta("u8", GgufValue::U8(200))
        .meta("i8", GgufValue::I8(-5))
        .meta("u16", GgufValue::U16(60000))
        .meta("i16", GgufValue::I16(-30000))
        .meta("u32", GgufValue::U32(4_000_000_000))
        .meta("i32", GgufValue::I32(-2_000_000_000))
        .meta("u64", GgufValue::U64(1 << 40))
        .meta("i64", GgufValue::I64(-(1 << 40)))
        .meta("f32", GgufValue::F32(1.5))
        .meta("f64", GgufValue::F64(-2.25))
        .meta("bool", GgufValue::Bool(true))
        .meta("str", GgufValue::String("héllo".into()))
        .meta(
            "nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ]),
        )
        .meta(
            "strs",
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String("".into()),
            ]),
        );
    w.f32_tensor("a", &[2, 3], &[1., 2., 3., 4., 5., 6.]);
    w.f32_tensor("b", &[1], &[7.]);
    w
}

#[test]
fn reads_every_value_type_in_v2_and_v3_with_alignment() {
    for (version, alignment) in [(2, 32), (3, 32), (3, 64), (3, 8)] {
        let bytes = sample(version, alignment).to_bytes();
        let p = tmp(&format!("v{version}-a{alignment}.gguf"), &bytes);
        let f = GgufFile::open(&p).unwrap();
        assert_eq!((f.version, f.alignment), (version, alignment));
        assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-5)));
        assert_eq!(f.get("u16"), Some(&GgufValue::U16(60000)));
        assert_eq!(f.get("i16"), Some(&GgufValue::I16(-30000)));
        assert_eq!(
            f.get("u32").and_then(GgufValue::as_u64),
            Some(4_000_000_000)
        );
        assert_eq!(f.get("i32"), Some(&GgufValue::I32(-2_000_000_000)));
        assert_eq!(f.get("u64").and_then(GgufValue::as_u64), Some(1 << 40));
        assert_eq!(f.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
        assert_eq!(f.get("f32").and_then(GgufValue::as_f64), Some(1.5));
        assert_eq!(f.get("f64").and_then(GgufValue::as_f64), Some(-2.25));
        assert_eq!(f.get("bool").and_then(GgufValue::as_bool), Some(true));
        assert_eq!(f.get("str").and_then(GgufValue::as_str), Some("héllo"));
        let nested = f.get("nested").and_then(GgufValue::as_array).unwrap();
        assert_eq!(
            nested[0],
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)])
        );
        assert_eq!(
            f.get("strs").and_then(GgufValue::as_array).unwrap().len(),
            2
        );
        assert_eq!(f.data_offset % alignment, 0);
        let a = f.tensor("a").unwrap();
        assert_eq!((a.shape(), a.ty), (vec![2, 3], GgmlType::F32));
        assert_eq!(f.read_f32(a).unwrap(), vec![1., 2., 3., 4., 5., 6.]);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset % alignment, 0);
        assert_eq!(f.read_f32(b).unwrap(), vec![7.]);
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample(3, 32).to_bytes();
    for cut in 0..bytes.len() - 1 {
        let p = tmp("cut.gguf", &bytes[..cut]);
        let r = GgufFile::open(&p);
        // the file is laid out so that only the trailing padding may be cut without harm
        if let Ok(f) = r {
            assert!(f.tensors.iter().all(|t| t.offset + t.nbytes <= cut as u64));
        } else {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("cut.gguf"), "{msg}");
        }
    }
}

fn open_err(name: &str, bytes: &[u8]) -> String {
    GgufFile::open(&tmp(name, bytes)).unwrap_err().to_string()
}

/// Patches the little-endian u64 at `at`.
fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn corrupt_headers_give_errors_naming_the_field() {
    let good = sample(3, 32).to_bytes();

    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(open_err("magic.gguf", &b).contains("not a GGUF file"));

    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open_err("v1.gguf", &b).contains("version 1"));
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err("be.gguf", &b).contains("big-endian"));

    let mut b = good.clone();
    patch_u64(&mut b, 8, u64::MAX);
    assert!(open_err("count.gguf", &b).contains("tensor count"));
    let mut b = good.clone();
    patch_u64(&mut b, 16, 1 << 60);
    assert!(open_err("kv.gguf", &b).contains("metadata count"));

    // a string length past the end of the file
    let mut b = good.clone();
    patch_u64(&mut b, 24, 1 << 50);
    assert!(open_err("strlen.gguf", &b).contains("string length"));
}

fn one_tensor(dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Vec<u8> {
    let mut w = GgufWriter::default();
    w.tensor("t", dims, ty, data);
    w.to_bytes()
}

#[test]
fn bad_tensor_infos_are_errors() {
    // dimensions whose product overflows
    let b = one_tensor(&[1 << 33, 1 << 33], GgmlType::F32, vec![0; 4]);
    assert!(open_err("overflow.gguf", &b).contains("overflow"));
    // data past the end of the file
    let b = one_tensor(&[1024], GgmlType::F32, vec![0; 16]);
    assert!(open_err("eof.gguf", &b).contains("past the end"));
    // a row that is not whole blocks
    let b = one_tensor(&[16], GgmlType::Q8_0, vec![0; 34]);
    assert!(open_err("block.gguf", &b).contains("block size"));
    // rank 0 and rank 5
    let b = one_tensor(&[], GgmlType::F32, vec![0; 4]);
    assert!(open_err("rank0.gguf", &b).contains("rank 0"));
    let b = one_tensor(&[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]);
    assert!(open_err("rank5.gguf", &b).contains("rank 5"));
    // unknown / unsupported element types: patch the type id after the one dim
    let mut b = one_tensor(&[4], GgmlType::F32, vec![0; 16]);
    let at = 24 + 8 + 1 + 4 + 8; // header, name length, "t", rank, dim
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let msg = open_err("type.gguf", &b);
    assert!(
        msg.contains("element type 77 (unknown)") && msg.contains("`t`"),
        "{msg}"
    );
    b[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
    assert!(open_err("q2k.gguf", &b).contains("Q2_K"));
    // an unaligned offset
    let mut b = one_tensor(&[4], GgmlType::F32, vec![0; 16]);
    patch_u64(&mut b, at + 4, 3);
    assert!(open_err("align.gguf", &b).contains("alignment"));
}

#[test]
fn duplicate_and_bad_values_are_errors() {
    let mut w = GgufWriter::default();
    w.meta("k", GgufValue::U8(1)).meta("k", GgufValue::U8(2));
    assert!(open_err("dup.gguf", &w.to_bytes()).contains("twice"));
    let mut w = GgufWriter::default();
    w.meta("general.alignment", GgufValue::U32(3));
    assert!(open_err("a3.gguf", &w.to_bytes()).contains("power-of-two"));
    let mut w = GgufWriter::default();
    w.meta("b", GgufValue::Bool(true));
    let mut b = w.to_bytes();
    let last = b.len() - 1;
    // the bool is the last header byte before padding: find it
    let pos = (0..=last).rev().find(|&i| b[i] == 1).unwrap();
    b[pos] = 7;
    assert!(open_err("bool.gguf", &b).contains("bool value 7"));
    // arrays nested too deep
    let mut v = GgufValue::U8(0);
    for _ in 0..12 {
        v = GgufValue::Array(vec![v]);
    }
    let mut w = GgufWriter::default();
    w.meta("deep", v);
    assert!(open_err("deep.gguf", &w.to_bytes()).contains("nested deeper"));
}
