//! `hici inspect`.

use crate::args::ModelArgs;
use crate::load::load;
use anyhow::Result;
use burn::prelude::*;
use clap::Args;
use hici_model::to_vec_f32;

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {}

pub fn run<B: Backend>(m: &ModelArgs, _a: &InspectArgs, dev: &B::Device) -> Result<()> {
    let loaded = load::<B>(m, dev)?;
    let cfg = loaded.model.config().clone();
    // logits checksum on a fixed prompt: BOS + ids 100..107 (clamped to the vocabulary)
    let v = loaded.model.vocab_size() as i64;
    let ids: Vec<i64> = std::iter::once(1)
        .chain((100..108).map(|x| x % v))
        .collect();
    let n = ids.len();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), dev);
    let logits = to_vec_f32(loaded.model.forward(t, m.attention_mode())?);
    let sum: f64 = logits.iter().map(|&x| x as f64).sum();
    let abs: f64 = logits.iter().map(|&x| (x as f64).abs()).sum();
    let doc = serde_json::json!({
        "config": cfg,
        "embedded": loaded.embedded,
        "max_context": loaded.max_context,
        "logits_checksum": {"prompt_ids": "1,100..107", "sum": sum, "abs_sum": abs},
    });
    if m.json {
        println!("{doc}");
    } else {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
