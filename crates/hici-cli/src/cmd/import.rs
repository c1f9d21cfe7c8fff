//! `hici import`: convert a checkpoint (HF base dir + HiCI adapter dir, or the embedded model)
//! once into a single safetensors file with its configuration, for `--model FILE`.

use crate::args::{DtypeArg, ModelArgs};
use crate::load::{model_source, tokenizer_in_dirs, ModelSource};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hici_engine::CancelToken;
use hici_io::gguf::quants::GgmlType;
use hici_io::{plan_checkpoint, write_converted, ConvertOptions, ConvertProgress, StoreDtype};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "The output is a safetensors file whose metadata holds the model \
configuration (and tokenizer.json); tensors are stored in --dtype (f32, f16 or bf16) and upcast \
to f32 when loaded with --model. With --quantize q8_0|q4_0 the linear weights whose rows are \
whole blocks of 32 are stored in ggml's blocks of that format (LoRA merged first) and stay \
quantized in memory on --device ndarray; the rest is stored in --dtype. Writing is atomic: a temporary file in the output directory is \
renamed into place only when complete; on an error or Ctrl-C nothing is left behind."
)]
pub struct ImportArgs {
    /// Output file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Fold LoRA into the weights (W + alpha/r * B@A, computed in f32, for the main attention
    /// and the HiCI projections) and store no LoRA factors.
    #[arg(long)]
    pub merge_lora: bool,
    /// Store the linear weights (attention, MLP, HiCI projections, embedding, LM head) in this
    /// block format; implies --merge-lora.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantizeArg>,
}

/// Block formats of `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// 8-bit values with an f16 scale per 32 (8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit values with an f16 scale per 32 (4.5 bits per weight).
    #[value(name = "q4_0")]
    Q4_0,
}

impl QuantizeArg {
    /// The ggml block type.
    pub fn ggml(self) -> GgmlType {
        match self {
            QuantizeArg::Q8_0 => GgmlType::Q8_0,
            QuantizeArg::Q4_0 => GgmlType::Q4_0,
        }
    }
}

/// One progress bar per tensor group on stderr (hidden when stderr is not a terminal).
struct Bars {
    quiet: bool,
    cancel: CancelToken,
    bar: Option<ProgressBar>,
    temp: Option<PathBuf>,
}

impl ConvertProgress for Bars {
    fn group_start(&mut self, group: &str, tensors: usize, bytes: u64) {
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let pb = ProgressBar::with_draw_target(Some(bytes), target);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>24} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg} [{elapsed}]",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("{group} ({tensors} tensors)"));
        self.bar = Some(pb);
    }

    fn tensor_done(&mut self, _name: &str, bytes: u64) {
        if let Some(pb) = &self.bar {
            pb.inc(bytes);
        }
    }

    fn group_done(&mut self) {
        if let Some(pb) = self.bar.take() {
            pb.finish();
        }
    }

    fn temp_file(&mut self, path: &Path) {
        self.temp = Some(path.to_path_buf());
        self.cancel.track_partial_file(path);
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(pb) = self.bar.take() {
            pb.abandon();
        }
        if let Some(t) = &self.temp {
            self.cancel.untrack_partial_file(t);
        }
    }
}

pub fn run(m: &ModelArgs, a: &ImportArgs, cancel: &CancelToken) -> Result<()> {
    let (base, adapter, opts, embedded) = match model_source(&m.spec())? {
        ModelSource::Dirs {
            base,
            adapter,
            opts,
            embedded,
        } => (base, adapter, opts, embedded),
        ModelSource::Converted(p) => bail!(
            "--model {} is already a converted file; import reads --base/--adapter directories",
            p.display()
        ),
        ModelSource::Gguf(p) => bail!(
            "--model {} is a GGUF file, which loads directly with --model; import reads \
             --base/--adapter directories",
            p.display()
        ),
    };
    let dtype = match m.dtype {
        DtypeArg::F32 => StoreDtype::F32,
        DtypeArg::F16 => StoreDtype::F16,
        DtypeArg::Bf16 => StoreDtype::BF16,
    };
    let t0 = Instant::now();
    let plan = plan_checkpoint(&base, adapter.as_deref(), &opts)
        .with_context(|| format!("loading {}", base.display()))?;
    for note in &plan.report.notes {
        eprintln!("note: {note}");
    }
    if a.merge_lora && plan.lora.is_none() {
        eprintln!("note: --merge-lora: the checkpoint has no LoRA adapter, nothing to merge");
    }
    let merge_lora = a.merge_lora || (a.quantize.is_some() && plan.lora.is_some());
    if merge_lora && !a.merge_lora {
        eprintln!("note: --quantize merges the LoRA factors into the weights first");
    }
    let tok_path = m
        .tokenizer
        .clone()
        .or_else(|| tokenizer_in_dirs(&base, adapter.as_deref()));
    let tokenizer_json = match &tok_path {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let convert = ConvertOptions {
        dtype,
        merge_lora,
        tokenizer_json,
        quantize: a.quantize.map(QuantizeArg::ggml),
    };
    let mut bars = Bars {
        cancel: cancel.clone(),
        quiet: m.json,
        bar: None,
        temp: None,
    };
    let summary = write_converted(&plan, &a.out, &convert, &mut bars)
        .with_context(|| format!("writing {}", a.out.display()))?;
    drop(bars);
    let secs = t0.elapsed().as_secs_f64();
    let source = if embedded {
        "embedded tiny-hici-a".to_string()
    } else {
        match &adapter {
            Some(ad) => format!("{} + {}", base.display(), ad.display()),
            None => base.display().to_string(),
        }
    };
    let doc = serde_json::json!({
        "out": summary.path,
        "source": source,
        "format": hici_io::FORMAT_NAME,
        "format_version": summary.format_version,
        "dtype": summary.dtype.name(),
        "quantization": summary.quantization.map(|(ty, n)| serde_json::json!({
            "format": ty.name(),
            "tensors": n,
        })),
        "lora_merged": summary.lora_merged,
        "tensors": summary.tensors,
        "bytes": summary.bytes,
        "params": {
            "base": summary.stored.base,
            "overrides": summary.stored.overrides,
            "hici": summary.stored.hici,
            "lora": summary.stored.lora,
        },
        "tokenizer": tok_path.is_some(),
        "seconds": secs,
    });
    if m.json {
        println!("{doc}");
    } else {
        let params = summary.stored.base
            + summary.stored.overrides
            + summary.stored.hici
            + summary.stored.lora;
        println!(
            "wrote {} ({} tensors, {:.1} M parameters, {} bytes, {}{}{}{}) in {secs:.1} s",
            summary.path.display(),
            summary.tensors,
            params as f64 / 1e6,
            summary.bytes,
            summary.dtype.name(),
            match summary.quantization {
                Some((ty, n)) => format!(", {n} linear weights in {}", ty.name()),
                None => String::new(),
            },
            if summary.lora_merged {
                ", LoRA merged"
            } else {
                ""
            },
            if tok_path.is_some() {
                ", with tokenizer"
            } else {
                ""
            },
        );
        println!(
            "use it with: hici --model {} <command>",
            summary.path.display()
        );
    }
    Ok(())
}
