//! HiCI patch: element-wise maps of large contiguous float arrays split over the rayon pool.
//!
//! ndarray's `mapv_into` walks the whole array on the calling thread. In a prefill the
//! transcendental passes (`exp` of the attention scores `[b, heads, s, keys]`, the sigmoid of
//! SwiGLU's gate `[b, s, ffn]`) are large enough that the other threads of the pool sit idle
//! for a sizable share of the time (SmolLM2 prefill of 512 tokens: about 1.5 of 2 cores busy).
//! Arrays of at least [`PAR_ELEMS`] values in standard layout are cut into contiguous chunks,
//! one rayon task each; everything else keeps `mapv_into`. Each value is computed by the same
//! scalar function either way, so the result does not depend on the split.

use crate::SharedArray;

/// Values below which one thread maps the array (handing work over costs more).
pub(crate) const PAR_ELEMS: usize = 1 << 15;

/// `array` with `f` applied to every value, in place where the storage is not shared.
pub(crate) fn map_into<E, F>(array: SharedArray<E>, f: F) -> SharedArray<E>
where
    E: Copy + Send + Sync,
    F: Fn(E) -> E + Send + Sync,
{
    #[cfg(feature = "multi-threads")]
    {
        let threads = rayon::current_num_threads();
        if threads > 1 && array.len() >= PAR_ELEMS && array.is_standard_layout() {
            use rayon::prelude::*;
            let mut array = array;
            // standard layout: `as_slice_mut` makes the storage unique (copying it if shared)
            // and gives the whole array as one slice
            if let Some(values) = array.as_slice_mut() {
                let chunk = values.len().div_ceil(2 * threads).max(PAR_ELEMS / 4);
                values.par_chunks_mut(chunk).for_each(|c| {
                    for v in c {
                        *v = f(*v);
                    }
                });
                return array;
            }
            return array.mapv_into(f);
        }
    }
    array.mapv_into(f)
}
