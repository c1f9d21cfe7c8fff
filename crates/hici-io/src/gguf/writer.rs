//! A minimal GGUF writer (the inverse of [`super::GgufFile::open`]): metadata and tensors of
//! already-encoded bytes, laid out with `general.alignment`. Used to build test files and
//! by converters.

use super::quants::GgmlType;
use super::{GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// Builds a GGUF file in memory.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            // an empty array is written as an array of uint8
            let elem = items.first().map_or(0, type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

impl GgufWriter {
    /// An empty file of `version` with `alignment`.
    pub fn new(version: u32, alignment: u64) -> Self {
        Self {
            version,
            alignment,
            ..Self::default()
        }
    }

    /// The metadata entries and the tensors (name, ggml dims, type, bytes), for editing
    /// before [`Self::to_bytes`].
    #[allow(clippy::type_complexity)]
    pub fn parts_mut(
        &mut self,
    ) -> (
        &mut Vec<(String, GgufValue)>,
        &mut Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    ) {
        (&mut self.metadata, &mut self.tensors)
    }

    /// Adds a metadata entry (`general.alignment` is written from [`Self::alignment`]).
    pub fn meta(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor: `dims` ggml-order (`ne0` first), `data` its encoded bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// Re-encodes every 2-D f32 tensor whose rows are whole blocks of 32 as `ty` (`Q8_0` or
    /// `Q4_1`, llama.cpp's reference quantizers), the way `llama-quantize` treats a model's
    /// matrices; vectors (norms) stay f32. Returns how many tensors changed.
    pub fn quantize_matrices(&mut self, ty: GgmlType) -> usize {
        let Some(quantize) = super::quants::quantizer(ty) else {
            return 0;
        };
        let mut n = 0;
        for (_, dims, t, data) in &mut self.tensors {
            if *t != GgmlType::F32 || dims.len() != 2 || !dims[0].is_multiple_of(32) {
                continue;
            }
            let values: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            *data = quantize(&values);
            *t = ty;
            n += 1;
        }
        n
    }

    /// Adds an f32 tensor with the row-major `shape` (dims reversed into ggml order).
    pub fn f32_tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, GgmlType::F32, bytes)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let a = self.alignment.max(1);
        let mut out = Vec::new();
        out.extend(GGUF_MAGIC);
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        let mut meta = self.metadata.clone();
        if a != DEFAULT_ALIGNMENT && !meta.iter().any(|(k, _)| k == "general.alignment") {
            meta.push(("general.alignment".into(), GgufValue::U32(a as u32)));
        }
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).div_ceil(a) * a;
        }
        let pad = |out: &mut Vec<u8>| {
            let n = (out.len() as u64).div_ceil(a) * a;
            out.resize(n as usize, 0);
        };
        pad(&mut out);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            pad(&mut out);
        }
        out
    }
}
