//! `repnoise init` and `repnoise memory`: models of a shape with random weights, and the memory
//! a step of one needs.

use super::*;

use repnoise::model::init::{resolve_shape, write_random};
use repnoise::model::memory::{plan, Workload};

/// Write a model of a given shape with random weights as a Hugging Face directory.
#[derive(Args)]
pub struct InitArgs {
    /// A shipped shape (llama-2-7b, llama-3-8b; configs/models/) or a config.json file.
    #[arg(long)]
    pub config: String,
    /// Random weights (N(0, 0.02) matrices, unit norms, zero biases; the only initialiser).
    #[arg(long)]
    pub random: bool,
    /// Seed of the weights: the same seed gives the same model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How the weights are stored: bf16 (half of f32's size), f16 or f32. They load as f32.
    #[arg(long, default_value = "bf16")]
    pub store_dtype: String,
    /// The directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_init(a: InitArgs) -> Result<()> {
    if !a.random {
        bail!("--random is required: random weights are the only initialiser");
    }
    let cfg = resolve_shape(&a.config)?;
    let store = repnoise::model::config::parse_compute_dtype(&a.store_dtype).map_err(|_| {
        anyhow::anyhow!("--store-dtype {}: expected f32, bf16 or f16", a.store_dtype)
    })?;
    eprintln!(
        "writing {} ({} parameters, {} layers, hidden {}) with random weights (seed {}) as {}",
        a.config,
        cfg.num_params(),
        cfg.num_layers,
        cfg.hidden_size,
        a.seed,
        store.as_str()
    );
    let n = write_random(&cfg, a.seed, store, &a.out)?;
    eprintln!("wrote {} ({n} parameters)", a.out.display());
    Ok(())
}

/// The memory a training or generation step needs, term by term (a model of what this
/// implementation holds; docs/BENCHMARKS.md checks it against measured peaks).
#[derive(Args)]
pub struct MemoryArgs {
    /// A shipped shape (llama-2-7b, llama-3-8b) or a config.json file; or use --model.
    #[arg(long)]
    pub config: Option<String>,
    #[command(flatten)]
    pub model: ModelArg,
    /// finetune, lora, repnoise or generate.
    #[arg(long, default_value = "repnoise")]
    pub workload: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (the prompt, for generate).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// LoRA rank (lora).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// New tokens (generate).
    #[arg(long, default_value_t = 50)]
    pub new_tokens: usize,
    /// Plan for a GPU (composed ops) even when --device is cpu.
    #[arg(long)]
    pub gpu: bool,
}

pub fn run_memory(g: &Global, a: MemoryArgs) -> Result<()> {
    let cfg = match &a.config {
        Some(c) => resolve_shape(c)?,
        None => load(g, &a.model.model)?.config,
    };
    let dtype = dtype(&g.dtype)?;
    let workload = match a.workload.as_str() {
        "finetune" => Workload::Finetune,
        "lora" => Workload::Lora { rank: a.rank },
        "repnoise" => Workload::Repnoise,
        "generate" => Workload::Generate {
            new_tokens: a.new_tokens,
        },
        other => bail!("--workload {other}: expected finetune, lora, repnoise or generate"),
    };
    let cpu = g.device == "cpu" && !a.gpu;
    let p = plan(&cfg, workload, a.batch, a.seq, dtype, cpu);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "{:?}, {} x {} tokens, {}, {}, {} parameters:",
        p.workload,
        p.batch,
        p.seq,
        p.dtype,
        if p.cpu { "CPU" } else { "GPU" },
        p.params
    );
    for (k, b) in &p.terms {
        println!("  {:>9.2} GiB  {k}", gib(*b));
    }
    println!("  {:>9.2} GiB  peak", gib(p.peak));
    Ok(())
}
