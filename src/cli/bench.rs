//! `repnoise bench`.

use super::*;

/// Time the hot paths and print JSON (used by bench/run.sh).
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// train-step, lora-step, repnoise-step, generate, score, heldout-ce (the held-out
    /// cross-entropy of --items items' harmful answers and refusals), generate-eval (--new-tokens for --items prompts,
    /// --batch at a time), matmul (this machine's f32 matmul GFLOP/s), or plot (scaling charts
    /// from --results into --out).
    pub what: String,
    /// Sequences in the benchmarked batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (train-step, lora-step, repnoise-step, score).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Timed repetitions (the report gives each one).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed repetitions before the timed ones (the training-step benchmarks).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// New tokens per row (generate, generate-eval).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Sequences or prompts in all (heldout-ce, generate-eval).
    #[arg(long, default_value_t = 100)]
    pub items: usize,
    /// heldout-ce: score each item's two answers as separate sequences (the instrument's way
    /// before it packed them behind their shared prompt).
    #[arg(long)]
    pub apart: bool,
    /// heldout-ce: score these held-out items (the JSON an experiment writes to
    /// `OUT/heldout-KEY.json`: the items, then notes) in the chat format, cut to --seq tokens,
    /// instead of synthetic ones; --items caps how many.
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// score, heldout-ce: query rows per block of the attention without gradient
    /// (`Llama::with_query_block`; 0: the whole sequence at once); the model's default if not
    /// given.
    #[arg(long)]
    pub query_block: Option<usize>,
    /// Results file (JSON lines of earlier bench runs) to plot.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Directory the charts are written to (plot).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        model,
        what,
        batch,
        seq,
        steps,
        warmup,
        new_tokens,
        items,
        apart,
        query_block,
        heldout,
        results,
        out,
    } = a;
    if apart && what != "heldout-ce" {
        bail!("bench {what}: --apart applies to heldout-ce only");
    }
    if query_block.is_some() && what != "score" && what != "heldout-ce" {
        bail!("bench {what}: --query-block applies to score and heldout-ce only");
    }
    if heldout.is_some() && what != "heldout-ce" {
        bail!("bench {what}: --heldout applies to heldout-ce only");
    }
    if what == "plot" {
        let (Some(results), Some(out)) = (results, out) else {
            bail!("bench plot needs --results FILE and --out DIR");
        };
        for (name, svg) in repnoise::dev::bench::scaling_charts(&results)? {
            let path = out.join(name);
            repnoise::util::io::write_atomic(&path, svg.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    let mut m = load(g, &model.model)?;
    let phases = |ph: [f64; 3], n: usize| {
        let n = n.max(1) as f64;
        serde_json::json!({"forward_s": ph[0] / n, "backward_s": ph[1] / n,
            "optimizer_s": ph[2] / n})
    };
    // One fine-tuning step benchmark (full or LoRA): times, losses, phases and FLOPs.
    let train_bench =
        |trainee: &dyn repnoise::train::Trainee<Net = repnoise::model::llama::Llama>,
         lr: f64,
         flops: f64|
         -> Result<(Vec<f64>, serde_json::Value)> {
            let (t, losses, ph) =
                repnoise::dev::bench::train_steps(trainee, &m, lr, batch, seq, steps, warmup)?;
            let mut e = phases(ph, t.len());
            e["losses"] = serde_json::json!(losses);
            e["step_flops"] = serde_json::json!(flops);
            Ok((t, e))
        };
    let (times, extra) = match what.as_str() {
        "train-step" => {
            let flops = repnoise::dev::bench::train_step_flops(&m.config, batch, seq);
            train_bench(&m, 1e-5, flops)?
        }
        "lora-step" => {
            let lora = repnoise::train::lora::Lora::new(&m, &Default::default(), 0)?;
            let flops = repnoise::dev::bench::lora_step_flops(&m.config, batch, seq);
            let (t, mut e) = train_bench(&lora, 1e-4, flops)?;
            e["trainable_params"] = serde_json::json!(lora.num_elements());
            (t, e)
        }
        "repnoise-step" => {
            let (t, terms, ph) =
                repnoise::dev::bench::repnoise_steps(&m, batch, seq, steps, warmup)?;
            // Faithful rows: the answer span minus its first prediction (a constant).
            let rows = terms.first().map_or(0, |x| x.mask_positions - batch);
            let readouts = m.config.num_layers + 2;
            let flops = repnoise::dev::bench::repnoise_step_flops(
                &m.config, batch, seq, rows, rows, readouts,
            );
            let mut e = phases(ph, t.len());
            e["terms"] = serde_json::json!(terms);
            e["step_flops"] = serde_json::json!(flops);
            (t, e)
        }
        "generate" => {
            let prompts = bench_prompts(&m, batch)?;
            let t = repnoise::dev::bench::generation(&m, &prompts, new_tokens, steps)?;
            let tps: Vec<f64> = t.iter().map(|s| (batch * new_tokens) as f64 / s).collect();
            (t, serde_json::json!({"tokens_per_second": tps}))
        }
        "heldout-ce" => {
            let (enc, source) = match &heldout {
                None => (
                    repnoise::dev::bench::synthetic_heldout(&m, items, seq),
                    "synthetic".to_string(),
                ),
                Some(path) => (
                    real_heldout(&m, path, items, seq)?,
                    path.display().to_string(),
                ),
            };
            let net = with_query_block(repnoise::dev::bench::inference_net(&mut m)?, query_block);
            let (t, [harmful, refusal]) =
                repnoise::dev::bench::heldout_ce(&net, &enc, batch, steps, apart)?;
            (
                t,
                serde_json::json!({"items": enc.harmful.len(), "mean_harmful_ce": harmful,
                    "mean_refusal_ce": refusal, "source": source}),
            )
        }
        "generate-eval" => {
            let prompts = bench_prompts(&m, items)?;
            let t =
                repnoise::dev::bench::generation_batched(&m, &prompts, batch, new_tokens, steps)?;
            let tps: Vec<f64> = t.iter().map(|s| (items * new_tokens) as f64 / s).collect();
            (
                t,
                serde_json::json!({"items": items, "tokens_per_second": tps}),
            )
        }
        "score" => {
            let net = with_query_block(repnoise::dev::bench::inference_net(&mut m)?, query_block);
            (
                repnoise::dev::bench::scoring(&m, &net, batch, seq, steps)?,
                serde_json::json!({}),
            )
        }
        "matmul" => {
            let g = repnoise::dev::bench::matmul_peak_gflops(steps)?;
            (vec![], serde_json::json!({"gflops": g}))
        }
        other => bail!(
            "bench {other}: expected train-step, lora-step, repnoise-step, generate, \
             score, heldout-ce, generate-eval, matmul or plot"
        ),
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": if apart { "repnoise (answers apart)" } else { "repnoise" }, "what": what, "batch": batch, "seq": seq,
            "new_tokens": new_tokens, "seconds": times, "extra": extra,
            "peak_rss_bytes": repnoise::dev::bench::peak_rss_bytes(),
            "threads": rayon::current_num_threads(),
        })
    );
    Ok(())
}

/// The first `items` held-out items of an experiment's `heldout-KEY.json`, encoded as the
/// instrument encodes them (chat format, `max_len` tokens); items that do not fit are an error
/// (the experiment left them out already, at its own `max_len`).
fn real_heldout(
    m: &LoadedModel,
    path: &Path,
    items: usize,
    max_len: usize,
) -> Result<repnoise::eval::heldout::HeldoutEncoded> {
    use repnoise::eval::heldout::{encode, HeldoutConfig, HeldoutItem};
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let (mut list, _notes): (Vec<HeldoutItem>, Vec<String>) = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected [items, notes]", path.display()))?;
    list.truncate(items);
    let cfg = HeldoutConfig {
        max_len,
        ..HeldoutConfig::default()
    };
    Ok(encode(&m.tok, &list, &cfg).with_context(|| format!("{}", path.display()))?)
}

/// The fixed prompts both benchmark implementations generate from (see bench/reference.py).
pub const BENCH_PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "What causes rain?",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
];

pub fn bench_prompts(m: &LoadedModel, batch: usize) -> Result<Vec<Vec<u32>>> {
    (0..batch)
        .map(|i| {
            let p = BENCH_PROMPTS[i % BENCH_PROMPTS.len()];
            Ok(chat::render(&m.tok, &[Message::user(p)], true)?.ids)
        })
        .collect()
}

/// `net` with `--query-block`'s blocks, if given.
fn with_query_block(
    net: repnoise::model::llama::Llama,
    rows: Option<usize>,
) -> repnoise::model::llama::Llama {
    match rows {
        Some(r) => net.with_query_block(r),
        None => net,
    }
}
