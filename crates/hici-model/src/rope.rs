//! HF rotate-half RoPE with linear position interpolation (spec §1.2–1.3).
//!
//! Angles are computed exactly like transformers 4.34 in f32: `inv_freq[j] = 1/theta^(2j/hd)`,
//! `angle = f32(f32(p / s) * inv_freq[j])`; cos/sin are evaluated on those f32 angles.

use burn::prelude::*;

/// Host-side RoPE parameters (cheap to copy; tables are built per call for the needed positions).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `[hd/2]` inverse frequencies (f32, as torch computes them).
    pub inv_freq: Vec<f32>,
    /// Linear interpolation factor `s`.
    pub factor: f32,
    /// Head dimension `hd`.
    pub head_dim: usize,
}

impl Rope {
    /// Builds the inverse frequencies for `head_dim`, `theta` and linear factor `factor`.
    pub fn new(head_dim: usize, theta: f64, factor: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|j| {
                // torch: arange(0, dim, 2).float() / dim  (f32), then theta ** that (f32 pow).
                let e = (2 * j) as f32 / head_dim as f32;
                // f32 pow (evaluated in f64 and rounded once), then an f32 division, as torch.
                let p = theta.powf(e as f64) as f32;
                1.0f32 / p
            })
            .collect();
        Self {
            inv_freq,
            factor: factor as f32,
            head_dim,
        }
    }

    /// f32 angle of position `p`, frequency `j`.
    pub fn angle(&self, p: usize, j: usize) -> f32 {
        let t = p as f32 / self.factor;
        t * self.inv_freq[j]
    }

    /// `(cos, sin)` tables `[len, hd]` for positions `start .. start+len` (halves duplicated).
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.head_dim;
        let half = hd / 2;
        let mut cos = vec![0.0f32; len * hd];
        let mut sin = vec![0.0f32; len * hd];
        for i in 0..len {
            for j in 0..half {
                let a = self.angle(start + i, j) as f64;
                let (s, c) = (a.sin() as f32, a.cos() as f32);
                cos[i * hd + j] = c;
                cos[i * hd + j + half] = c;
                sin[i * hd + j] = s;
                sin[i * hd + j + half] = s;
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, hd]), device),
            Tensor::from_data(TensorData::new(sin, [len, hd]), device),
        )
    }
}

/// cos/sin tables `[len, hd]` (f32) for positions `start .. start+len`: built once per forward
/// call or decode step and shared by every layer.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// First position covered.
    pub start: usize,
    /// `[len, hd]`.
    pub cos: Tensor<B, 2>,
    /// `[len, hd]`.
    pub sin: Tensor<B, 2>,
}

impl Rope {
    /// [`Self::tables`] packed as [`RopeTables`].
    pub fn tables_for<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let (cos, sin) = self.tables::<B>(start, len, device);
        RopeTables { start, cos, sin }
    }
}

/// `x * cos + rotate_half(x) * sin` for `x: [n, h, s, hd]` and tables `[n | 1, s, hd]`
/// (broadcast over heads, and over `n` when the table has one row block).
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Tensor<B, 4> {
    let [n, h, s, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let dtype = x.dtype();
    let cos = crate::tensor_util::as_dtype(cos.clone(), dtype)
        .unsqueeze_dim::<4>(1)
        .expand([n, h, s, hd]);
    let sin = crate::tensor_util::as_dtype(sin.clone(), dtype)
        .unsqueeze_dim::<4>(1)
        .expand([n, h, s, hd]);
    x.mul(cos).add(rotated.mul(sin))
}
