//! GGML tensor element types and their dequantization to f32, block by block, following
//! ggml's reference `dequantize_row_*` (ggml-quants.c). Each block format is documented at its
//! function; every `*_block` function turns one block of bytes into its values.

use half::{bf16, f16};
use hici_model::weights::{BlockQuant, QUANT_BLOCK};

/// A GGML element type as stored in GGUF tensor infos (`ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type with ggml id `id`, `Err(name)` for a known but unsupported one, `Err("unknown")`.
    pub fn from_id(id: u32) -> Result<Self, &'static str> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            9 => return Err("Q8_1"),
            10 => return Err("Q2_K"),
            11 => return Err("Q3_K"),
            15 => return Err("Q8_K"),
            16..=23 | 29 => return Err("an IQ quantization"),
            24 => return Err("I8"),
            25 => return Err("I16"),
            26 => return Err("I32"),
            27 => return Err("I64"),
            28 => return Err("F64"),
            34 | 35 => return Err("a ternary (TQ) quantization"),
            39 => return Err("MXFP4"),
            _ => return Err("unknown"),
        })
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name of the type (`Q4_K`, `F16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// The type named `name` as [`Self::name`] spells it (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ]
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `n` elements (`n` a multiple of [`Self::block_len`]), `None` on overflow.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        (n / self.block_len() as u64).checked_mul(self.block_bytes() as u64)
    }

    /// Whether the type is a block quantization (not a plain float).
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out` (`bytes.len() / block_bytes *
/// block_len` values).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    debug_assert_eq!(bytes.len() / bb * bl, out.len());
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let f = match ty {
                GgmlType::Q4_0 => q4_0_block,
                GgmlType::Q4_1 => q4_1_block,
                GgmlType::Q5_0 => q5_0_block,
                GgmlType::Q5_1 => q5_1_block,
                GgmlType::Q8_0 => q8_0_block,
                GgmlType::Q4K => q4_k_block,
                GgmlType::Q5K => q5_k_block,
                _ => q6_k_block,
            };
            for (o, b) in out.chunks_exact_mut(bl).zip(bytes.chunks_exact(bb)) {
                f(b, o);
            }
        }
    }
}

/// Q4_0: `d: f16`, `qs: [u8; 16]`; `y[j] = (lo(qs[j]) - 8) d`, `y[j+16] = (hi(qs[j]) - 8) d`.
fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `d: f16`, `m: f16`, `qs: [u8; 16]`; `y = q d + m`, nibbles as Q4_0.
fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: `d: f16`, `qh: u32` (5th bits), `qs: [u8; 16]`; `y = (q - 16) d`.
fn q5_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`; `y = q d + m`.
fn q5_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((q & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: `d: f16`, `qs: [i8; 32]`; `y = q d`.
fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min `j` (0..8) of a K-quant's packed 12-byte `scales`.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Q4_K (256 values): `d: f16`, `dmin: f16`, `scales: [u8; 12]` (8 six-bit scale/min pairs),
/// `qs: [u8; 128]`; sub-block `s` of 32: `y = d sc_s q - dmin m_s`.
fn q4_k_block(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K (256 values): `d`, `dmin`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]`.
fn q5_k_block(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let q = &ql[32 * c..32 * c + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            chunk[l] = d1 * ((q[l] & 0x0f) + h1) as f32 - m1;
            chunk[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K (256 values): `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`;
/// `y = d sc (q - 32)` with 6-bit `q`.
fn q6_k_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for (n, chunk) in y.chunks_exact_mut(128).enumerate() {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| (sc[is + k] as i8) as f32 * d;
            chunk[l] = s(0) * q1 as f32;
            chunk[l + 32] = s(2) * q2 as f32;
            chunk[l + 64] = s(4) * q3 as f32;
            chunk[l + 96] = s(6) * q4 as f32;
        }
    }
}

/// One tensor in 8-bit blocks of 32 (what [`to_blocks`] writes into).
pub struct Blocks<'a> {
    /// `[n]` values.
    pub values: &'a mut [i8],
    /// `[n / 32]` scales.
    pub scales: &'a mut [f32],
    /// `[n / 32]` offsets (zero where the format has none).
    pub offsets: &'a mut [f32],
}

/// How a GGML block format maps onto 8-bit blocks of 32 with a scale and an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMapping {
    /// Every value is `q · scale` exactly (Q8_0, Q4_0, Q5_0).
    Exact,
    /// Every value is `q · scale + offset` exactly (Q4_1, Q5_1, Q4_K, Q5_K).
    ExactWithOffset,
    /// Sub-blocks of 16 with their own scales (Q6_K): re-quantized to 8 bits per block of 32
    /// (`scale = max|v| / 127`, round to nearest), error at most `scale / 2` per value.
    Requantized,
}

impl GgmlType {
    /// How [`to_blocks`] stores this type; `None` for the float types.
    pub fn block_mapping(self) -> Option<BlockMapping> {
        Some(match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => BlockMapping::Exact,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                BlockMapping::ExactWithOffset
            }
            GgmlType::Q6K => BlockMapping::Requantized,
        })
    }
}

/// Converts `bytes` (whole blocks of the quantized type `ty`) into 8-bit blocks of 32:
/// `value = q · scale + offset` for every value (exactly, except for
/// [`BlockMapping::Requantized`] formats). `out` holds `bytes.len() / block_bytes ·
/// block_len` values.
pub fn to_blocks(ty: GgmlType, bytes: &[u8], out: Blocks<'_>) {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    debug_assert!(ty.is_quantized());
    debug_assert_eq!(bytes.len() / bb * bl, out.values.len());
    let subs = bl / 32;
    let it = bytes
        .chunks_exact(bb)
        .zip(out.values.chunks_exact_mut(bl))
        .zip(out.scales.chunks_exact_mut(subs))
        .zip(out.offsets.chunks_exact_mut(subs));
    for (((b, q), sc), off) in it {
        match ty {
            GgmlType::Q8_0 => {
                sc[0] = half_at(b, 0);
                for j in 0..32 {
                    q[j] = b[2 + j] as i8;
                }
            }
            GgmlType::Q4_0 => {
                sc[0] = half_at(b, 0);
                for j in 0..16 {
                    q[j] = (b[2 + j] & 0x0f) as i8 - 8;
                    q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
                }
            }
            GgmlType::Q4_1 => {
                (sc[0], off[0]) = (half_at(b, 0), half_at(b, 2));
                for j in 0..16 {
                    q[j] = (b[4 + j] & 0x0f) as i8;
                    q[j + 16] = (b[4 + j] >> 4) as i8;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (qh_at, qs_at, bias) = if ty == GgmlType::Q5_0 {
                    (2, 6, 16)
                } else {
                    off[0] = half_at(b, 2);
                    (4, 8, 0)
                };
                sc[0] = half_at(b, 0);
                let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
                for j in 0..16 {
                    let v = b[qs_at + j];
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    q[j] = (((v & 0x0f) as u32 | h0) as i32 - bias) as i8;
                    q[j + 16] = (((v >> 4) as u32 | h1) as i32 - bias) as i8;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                let scales = &b[4..16];
                let (qh, ql) = if ty == GgmlType::Q4K {
                    (None, &b[16..144])
                } else {
                    (Some(&b[16..48]), &b[48..176])
                };
                for c in 0..4 {
                    for half in 0..2 {
                        let (s, m) = scale_min_k4(2 * c + half, scales);
                        let sub = 2 * c + half;
                        (sc[sub], off[sub]) = (d * s, -(dmin * m));
                        let src = &ql[32 * c..32 * c + 32];
                        for l in 0..32 {
                            let lo = if half == 0 {
                                src[l] & 0x0f
                            } else {
                                src[l] >> 4
                            };
                            let hi = qh.map_or(0, |qh| {
                                if qh[l] & (1u8 << (2 * c + half)) != 0 {
                                    16
                                } else {
                                    0
                                }
                            });
                            q[32 * sub + l] = (lo + hi) as i8;
                        }
                    }
                }
            }
            _ => {
                // no exact 32-block form: dequantize, then 8 bits per block of 32
                let mut y = vec![0f32; bl];
                dequantize(ty, b, &mut y);
                for (sub, vals) in y.chunks_exact(32).enumerate() {
                    let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let scale = amax / 127.0;
                    sc[sub] = scale;
                    for (l, v) in vals.iter().enumerate() {
                        q[32 * sub + l] = if scale > 0.0 {
                            (v / scale).round().clamp(-127.0, 127.0) as i8
                        } else {
                            0
                        };
                    }
                }
            }
        }
    }
}

/// f32 values in Q4_1 blocks (`m = min`, `d = (max - min) / 15`, both rounded to f16,
/// `q = round((v - m) / d)` clamped to 0..15), as llama.cpp's `quantize_row_q4_1_ref`:
/// `20 · n / 32` bytes.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for block in values.chunks_exact(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id).round() as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

/// f32 values in Q4_0 blocks (`d = m / -8` for the value `m` of largest magnitude, rounded to
/// f16; `q = min(15, trunc(v / d + 8.5))`), as llama.cpp's `quantize_row_q4_0_ref`:
/// `18 · n / 32` bytes.
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 18);
    for block in values.chunks_exact(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if amax < v.abs() {
                (amax, max) = (v.abs(), v);
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

/// A quantizer: f32 values (a multiple of 32) to ggml blocks.
pub type Quantizer = fn(&[f32]) -> Vec<u8>;

/// The quantizer of `ty`, for the types this crate writes: Q8_0, Q4_0 and Q4_1.
pub fn quantizer(ty: GgmlType) -> Option<Quantizer> {
    match ty {
        GgmlType::Q8_0 => Some(quantize_q8_0),
        GgmlType::Q4_0 => Some(quantize_q4_0),
        GgmlType::Q4_1 => Some(quantize_q4_1),
        _ => None,
    }
}

/// Why [`block_quant`] refused a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockError {
    /// The shape is not whole blocks, or the byte count does not match it.
    Layout(String),
    /// A block scale or offset is NaN or infinite.
    NonFinite,
}

/// A `[rows, cols]` tensor stored as whole blocks of `ty` along its rows (`cols` a multiple of
/// 32 and of the block length), in 8-bit blocks of 32 (see [`to_blocks`]).
pub fn block_quant(
    ty: GgmlType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<BlockQuant, BlockError> {
    if !ty.is_quantized()
        || !cols.is_multiple_of(ty.block_len())
        || !cols.is_multiple_of(QUANT_BLOCK)
    {
        return Err(BlockError::Layout(format!(
            "rows of {cols} values are not whole {} blocks of {}",
            ty.name(),
            ty.block_len()
        )));
    }
    let n = rows * cols;
    let want = n / ty.block_len() * ty.block_bytes();
    if bytes.len() != want {
        return Err(BlockError::Layout(format!(
            "{} bytes for [{rows}, {cols}] in {}, expected {want}",
            bytes.len(),
            ty.name()
        )));
    }
    let (mut values, mut scales, mut offsets) = (
        vec![0i8; n],
        vec![0f32; n / QUANT_BLOCK],
        vec![0f32; n / QUANT_BLOCK],
    );
    to_blocks(
        ty,
        bytes,
        Blocks {
            values: &mut values,
            scales: &mut scales,
            offsets: &mut offsets,
        },
    );
    if scales.iter().chain(&offsets).any(|v| !v.is_finite()) {
        return Err(BlockError::NonFinite);
    }
    let has_offsets = ty.block_mapping() == Some(BlockMapping::ExactWithOffset);
    Ok(BlockQuant {
        rows,
        cols,
        values,
        scales,
        offsets: has_offsets.then_some(offsets),
    })
}

/// f32 values in Q8_0 blocks (`d = max|v| / 127` rounded to f16, `q = round(v / d)`), as
/// llama.cpp's `quantize_row_q8_0_ref` writes them: `34 · n / 32` bytes.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        // ggml's type_traits: blck_size / type_size
        for (t, bl, bb) in [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4K, 256, 144),
            (GgmlType::Q5K, 256, 176),
            (GgmlType::Q6K, 256, 210),
        ] {
            assert_eq!((t.block_len(), t.block_bytes()), (bl, bb), "{}", t.name());
            assert_eq!(GgmlType::from_id(t.id()), Ok(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(GgmlType::from_id(10), Err("Q2_K"));
        assert_eq!(GgmlType::from_id(1000), Err("unknown"));
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut y);
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
    }

    /// Every format's 8-bit blocks give back what ggml's dequantization gives: exactly for the
    /// exact mappings, within half a step for the re-quantized one.
    #[test]
    fn blocks_reproduce_the_dequantized_values() {
        let mut rng = 0x1234_5678_u64;
        let mut byte = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 24) as u8
        };
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let blocks = 4;
            let mut bytes: Vec<u8> = (0..blocks * ty.block_bytes()).map(|_| byte()).collect();
            // sane f16 scales (random bytes could be NaN/huge): small positive halves
            for b in bytes.chunks_exact_mut(ty.block_bytes()) {
                let at: &[usize] = match ty {
                    GgmlType::Q6K => &[208],
                    GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                    _ => &[0],
                };
                for &a in at {
                    let v = f16::from_f32(0.01 + (b[a + 1] % 16) as f32 * 0.003);
                    b[a..a + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            let n = blocks * ty.block_len();
            let mut want = vec![0f32; n];
            dequantize(ty, &bytes, &mut want);
            let (mut q, mut sc, mut off) = (vec![0i8; n], vec![0f32; n / 32], vec![0f32; n / 32]);
            to_blocks(
                ty,
                &bytes,
                Blocks {
                    values: &mut q,
                    scales: &mut sc,
                    offsets: &mut off,
                },
            );
            for i in 0..n {
                let got = q[i] as f32 * sc[i / 32] + off[i / 32];
                let tol = match ty.block_mapping() {
                    // half a step, plus the f32 rounding of v / scale at a tie
                    Some(BlockMapping::Requantized) => sc[i / 32] * 0.500_01,
                    // one f32 rounding apart (ggml computes d·q - m, here q·d + o)
                    _ => 2.0 * f32::EPSILON * want[i].abs().max(off[i / 32].abs()),
                };
                assert!(
                    (got - want[i]).abs() <= tol,
                    "{} value {i}: {got} vs {}",
                    ty.name(),
                    want[i]
                );
            }
        }
    }

    #[test]
    fn q8_0_quantizer_round_trips_within_half_a_step() {
        let v: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let bytes = quantize_q8_0(&v);
        assert_eq!(bytes.len(), 68);
        let mut back = vec![0f32; 64];
        dequantize(GgmlType::Q8_0, &bytes, &mut back);
        for (b, block) in back.chunks(32).zip(v.chunks(32)) {
            let d = block.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
            for (x, y) in b.iter().zip(block) {
                assert!((x - y).abs() <= d * 0.5 + d * 1e-3, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn q4_0_quantizer_matches_ggml_rounding() {
        let v: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let bytes = quantize_q4_0(&v);
        assert_eq!(bytes.len(), 36);
        let mut back = vec![0f32; 64];
        dequantize(GgmlType::Q4_0, &bytes, &mut back);
        for (b, block) in back.chunks(32).zip(v.chunks(32)) {
            // the value of largest magnitude is exactly -8 steps; every value within half a step
            let m = block
                .iter()
                .copied()
                .fold(0f32, |a, x| if x.abs() > a.abs() { x } else { a });
            let d = (m / -8.0).abs();
            for (x, y) in b.iter().zip(block) {
                assert!((x - y).abs() <= d * 0.5 + d * 1e-2, "{x} vs {y} (step {d})");
            }
            let at = block.iter().position(|x| *x == m).unwrap();
            assert!(
                (b[at] - m).abs() <= d * 1e-2,
                "extreme value {m} -> {}",
                b[at]
            );
        }
        let q = block_quant(GgmlType::Q4_0, &bytes, 2, 32).unwrap();
        assert!(q.offsets.is_none());
        for (i, x) in back.iter().enumerate() {
            assert_eq!(q.values[i] as f32 * q.scales[i / 32], *x);
        }
        assert!(block_quant(GgmlType::Q4_0, &bytes[..35], 2, 32).is_err());
        assert!(block_quant(GgmlType::Q4_0, &bytes, 1, 48).is_err());
    }
}
