//! `repnoise` command line: parses flags and calls the library. No ML logic lives here.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use repnoise::chat::{self, Message};
use repnoise::generate::{self, SamplingConfig};
use repnoise::model::Llama;
use repnoise::modelio::{self, LoadedModel};

/// jemalloc keeps freed pages for reuse: training allocates and frees hundreds of MB per step,
/// and with glibc's allocator the kernel zeroed those pages anew each time (measured: about a
/// fifth of a training step in page faults; see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Never hand freed pages back to the kernel: each training step frees and reallocates the same
/// few GB, and returning them made every step fault them in (zeroed) again.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0";

#[derive(Parser)]
#[command(
    name = "repnoise",
    version,
    about = "Representation Noising: defend open-weight \
language models against harmful fine-tuning, attack them, and measure it"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// Cache for fetched models (default: $REPNOISE_CACHE, $XDG_CACHE_HOME/repnoise or
    /// ~/.cache/repnoise).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    /// Device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ModelArg {
    /// A Hugging Face model directory, a GGUF file, or an embedded model name
    /// (smollm2-135m-instruct).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from one or more prompts (batched).
    Generate {
        #[command(flatten)]
        model: ModelArg,
        /// Prompt text; repeat the flag for a batch.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        /// Wrap each prompt as a user turn in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// System message (with --chat).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Per-token log-probabilities of a text, tokenized exactly as given.
    Logprobs {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        text: String,
        /// Print `{"ids": [...], "logprobs": [...]}`.
        #[arg(long)]
        json: bool,
    },
    /// Write a model as a Hugging Face directory (f32 safetensors, tokenizer, chat template).
    Convert {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a model: architecture, sizes, tokenizer, template, dtype, parameter count.
    Info {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        json: bool,
    },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Time the hot paths and print JSON (used by bench/run.sh).
    #[command(hide = true)]
    Bench {
        #[command(flatten)]
        model: ModelArg,
        /// train-step, generate, score or matmul (this machine's f32 matmul GFLOP/s).
        what: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// New tokens per row (generate).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
    },
    /// Fetch an embedded asset into the cache and print its path.
    Fetch {
        /// smollm2-135m-instruct or all-minilm-l6-v2.
        name: String,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Counts per split, category and label of a dataset file (format detected from the file).
    Stats {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn device(spec: &str) -> Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .context("--device cuda:N")?;
            candle_core::Device::new_cuda(idx).with_context(|| {
                format!("cannot open {s} (was repnoise built with --features cuda?)")
            })
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

fn load(global: &Global, spec: &str) -> Result<LoadedModel> {
    let cache = global
        .cache_dir
        .clone()
        .unwrap_or_else(repnoise::fetch::default_cache_dir);
    let dev = device(&global.device)?;
    modelio::load(spec, &cache, &dev).with_context(|| format!("loading model `{spec}`"))
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

fn bench_prompts(m: &LoadedModel, batch: usize) -> Result<Vec<Vec<u32>>> {
    (0..batch)
        .map(|i| {
            let p = BENCH_PROMPTS[i % BENCH_PROMPTS.len()];
            Ok(chat::render(&m.tok, &[Message::user(p)], true)?.ids)
        })
        .collect()
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPNOISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            chat: use_chat,
            system,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            json,
        } => {
            let m = load(g, &model.model)?;
            let cfg = SamplingConfig {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
            };
            let mut prompts = vec![];
            for p in &prompt {
                let ids = if use_chat {
                    let mut msgs = vec![];
                    if let Some(s) = &system {
                        msgs.push(Message::new("system", s));
                    }
                    msgs.push(Message::user(p));
                    chat::render(&m.tok, &msgs, true)?.ids
                } else {
                    m.tok.encode(p)?
                };
                prompts.push(ids);
            }
            let net = Llama::frozen(&m.config, &m.params)?;
            let t0 = std::time::Instant::now();
            let outs = generate::generate(&net, &prompts, m.tok.pad_id, &m.tok.stop_ids, &cfg)?;
            let secs = t0.elapsed().as_secs_f64();
            let texts: Vec<String> = outs
                .iter()
                .map(|o| m.tok.decode(o, true))
                .collect::<repnoise::Result<_>>()?;
            if json {
                let n: usize = outs.iter().map(Vec::len).sum();
                println!(
                    "{}",
                    serde_json::json!({"completions": texts, "new_tokens": n, "seconds": secs})
                );
            } else {
                for (i, t) in texts.iter().enumerate() {
                    if texts.len() > 1 {
                        println!("--- [{i}]");
                    }
                    println!("{}", t.trim());
                }
            }
        }
        Cmd::Logprobs { model, text, json } => {
            let m = load(g, &model.model)?;
            let ids = m.tok.encode(&text)?;
            let net = Llama::frozen(&m.config, &m.params)?;
            let lps = generate::token_logprobs(&net, &ids)?;
            if json {
                println!("{}", serde_json::json!({"ids": ids, "logprobs": lps}));
            } else {
                for (i, id) in ids.iter().enumerate() {
                    let tok = m.tok.id_to_token(*id).unwrap_or_default();
                    match i.checked_sub(1).and_then(|j| lps.get(j)) {
                        Some(lp) => println!("{id:>7} {tok:<20} {lp:.4}"),
                        None => println!("{id:>7} {tok:<20}"),
                    }
                }
            }
        }
        Cmd::Convert { model, out } => {
            let m = load(g, &model.model)?;
            modelio::save_hf_dir(&out, &m.config, &m.params, &m.tok)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Info { model, json } => {
            let m = load(g, &model.model)?;
            let c = &m.config;
            let info = serde_json::json!({
                "source": m.source,
                "architecture": c.arch,
                "layers": c.num_layers,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "heads": c.num_heads,
                "kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim,
                "vocab_size": c.vocab_size,
                "max_positions": c.max_position_embeddings,
                "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_norm_eps,
                "tied_embeddings": c.tie_word_embeddings,
                "qkv_bias": c.qkv_bias,
                "parameters": m.params.num_elements(),
                "stored_dtype": m.stored_dtype,
                "compute_dtype": "f32",
                "tokenizer_vocab": m.tok.vocab_size(),
                "bos_token": m.tok.bos_token,
                "eos_token": m.tok.eos_token,
                "stop_ids": m.tok.stop_ids,
                "chat_template": m.tok.chat_template,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                for (k, v) in info.as_object().expect("object") {
                    let s = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    println!("{k:>18}: {s}");
                }
            }
        }
        Cmd::Bench {
            model,
            what,
            batch,
            seq,
            steps,
            warmup,
            new_tokens,
        } => {
            let m = load(g, &model.model)?;
            let (times, extra) = match what.as_str() {
                "train-step" => {
                    let (t, losses, ph) =
                        repnoise::bench::train_steps(&m, batch, seq, steps, warmup)?;
                    let n = t.len().max(1) as f64;
                    let flops = repnoise::bench::train_step_flops(&m.config, batch, seq);
                    (
                        t,
                        serde_json::json!({"losses": losses, "forward_s": ph[0] / n,
                        "backward_s": ph[1] / n, "optimizer_s": ph[2] / n, "step_flops": flops}),
                    )
                }
                "generate" => {
                    let prompts = bench_prompts(&m, batch)?;
                    let t = repnoise::bench::generation(&m, &prompts, new_tokens, steps)?;
                    let tps: Vec<f64> = t.iter().map(|s| (batch * new_tokens) as f64 / s).collect();
                    (t, serde_json::json!({"tokens_per_second": tps}))
                }
                "score" => (
                    repnoise::bench::scoring(&m, batch, seq, steps)?,
                    serde_json::json!({}),
                ),
                "matmul" => {
                    let g = repnoise::bench::matmul_peak_gflops(steps)?;
                    (vec![], serde_json::json!({"gflops": g}))
                }
                other => bail!("bench {other}: expected train-step, generate or score"),
            };
            println!(
                "{}",
                serde_json::json!({
                    "impl": "repnoise", "what": what, "batch": batch, "seq": seq,
                    "new_tokens": new_tokens, "seconds": times, "extra": extra,
                    "peak_rss_bytes": repnoise::bench::peak_rss_bytes(),
                    "threads": rayon::current_num_threads(),
                })
            );
        }
        Cmd::Data {
            cmd: DataCmd::Stats { file, json },
        } => {
            let st = repnoise::data::stats::stats(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("{st}");
            }
        }
        Cmd::Fetch { name } => {
            let a = repnoise::fetch::asset(&name)
                .with_context(|| format!("`{name}` is not an embedded asset"))?;
            let cache = g
                .cache_dir
                .clone()
                .unwrap_or_else(repnoise::fetch::default_cache_dir);
            let p = repnoise::fetch::fetch(&a, &cache)?;
            println!("{}", p.display());
        }
    }
    Ok(())
}
