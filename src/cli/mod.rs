//! The command line: one module per subcommand (its clap `Args` and a `run` that calls the
//! library), the shared flag groups in `flags`, and the dispatch below. No ML logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use repnoise::data::encode::PromptFormat;
use repnoise::defence::repnoise::RepNoiseConfig;
use repnoise::model::chat::{self, Message};
use repnoise::model::generate::SamplingConfig;
use repnoise::model::llama::Llama;
use repnoise::model::load::{self, LoadedModel};
use repnoise::train::{Interrupt, TrainConfig};

mod align;
mod analyze;
mod attack;
mod bench;
mod classifier;
mod convert;
mod data;
mod defend;
mod demo;
mod eval;
mod fetch;
mod finetune;
mod flags;
mod generate;
mod info;
mod init;
mod logprobs;
mod loss;
mod refusal_rate;
mod run;

use analyze::AnalyzeCmd;
use classifier::ClassifierCmd;
use data::DataCmd;
use eval::EvalCmd;
use flags::*;

#[derive(Parser)]
#[command(
    name = "repnoise",
    version,
    about = "Representation Noising: defend open-weight \
language models against harmful fine-tuning, attack them, and measure it"
)]
pub struct Cli {
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
    /// The dtype models compute in: f32, or bf16/f16 (mixed precision: weights, gradients and
    /// AdamW moments stay f32; activations in bf16/f16; logits, losses, the logit lens and the
    /// MMD in f32; f16 training scales the loss dynamically). For GPUs; f32 on CPU, where
    /// bf16/f16 run the unfused path, slower.
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
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
    Generate(generate::Args),
    /// Per-token log-probabilities of a text, tokenized exactly as given (after the
    /// beginning-of-sequence token where the tokenizer asks for one, as for any model input).
    Logprobs(logprobs::Args),
    /// Write a model as a Hugging Face directory (f32 safetensors, tokenizer, chat template).
    Convert(convert::Args),
    /// Describe a model: architecture, sizes, tokenizer, template, dtype, parameter count.
    Info(info::Args),
    /// Write a model of a shape (llama-2-7b, llama-3-8b, or a config.json) with random weights.
    Init(init::InitArgs),
    /// The memory a step needs, term by term, for a model or a shape (a model of what this
    /// implementation holds; checked against measured peaks in docs/BENCHMARKS.md).
    Memory(init::MemoryArgs),
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Time the hot paths and print JSON (used by bench/run.sh).
    #[command(hide = true)]
    Bench(bench::Args),
    /// Make an instruct model refuse harmful requests (the aligned starting model), and report
    /// refusal rates on held-out harmful and benign prompts before and after.
    Align(align::Args),
    /// Refusal rate of a model on prompt sets (shipped sets by name, or files).
    RefusalRate(refusal_rate::Args),
    /// Evaluations: resistance (harmfulness), stability, trainability.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
    /// Train a defence on pairs (harmful answer, refusal) and write the defended model.
    Defend(defend::Args),
    /// Attack a model the way a bad actor would: fine-tune it on harmful answers (full or
    /// LoRA), or ablate its refusal direction. One run, a grid (`--grid paper|embedded`), and/or
    /// several seeds.
    Attack(attack::Args),
    /// Benign fine-tuning on a data-to-text task, for the trainability check; keeps a test split
    /// (`test.jsonl`) for the evaluation.
    Finetune(finetune::Args),
    /// The RepNoise loss terms on pairs as one batch, with no update.
    Loss(loss::Args),
    /// The paper's analyses: weight distance by layer, logit lens, PCA and linear probes of
    /// harmful vs harmless activations. Each writes `<analysis>.json` and `<analysis>.svg` to
    /// --out.
    Analyze {
        #[command(subcommand)]
        cmd: AnalyzeCmd,
    },
    /// The learned harmfulness classifier: train one, or score answers with one.
    Classifier {
        #[command(subcommand)]
        cmd: ClassifierCmd,
    },
    /// Fetch an embedded asset into the cache and print its path.
    Fetch(fetch::Args),
    /// Run (or resume) an experiment: defences x attacks x seeds with their evaluations and a
    /// report (`OUT/report.md`, `OUT/report.html`).
    Run(run::Args),
    /// The main job: align the embedded model, defend it with RepNoise and two baselines, attack
    /// every model, evaluate and write the report (configs/demo.toml, built in). A second run
    /// reuses the finished stages.
    Demo(demo::Args),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Plain,
    Chat,
}

impl From<FormatArg> for PromptFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Plain => PromptFormat::Plain,
            FormatArg::Chat => PromptFormat::Chat,
        }
    }
}

/// The command line, parsed (clap prints help, or the error and exits, itself).
pub fn parse() -> Cli {
    Cli::parse()
}

/// Run the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.cmd {
        Cmd::Generate(a) => generate::run(g, a),
        Cmd::Logprobs(a) => logprobs::run(g, a),
        Cmd::Convert(a) => convert::run(g, a),
        Cmd::Init(a) => init::run_init(a),
        Cmd::Memory(a) => init::run_memory(g, a),
        Cmd::Info(a) => info::run(g, a),
        Cmd::Bench(a) => bench::run(g, a),
        Cmd::Align(a) => align::run(g, a),
        Cmd::RefusalRate(a) => refusal_rate::run(g, a),
        Cmd::Defend(a) => defend::run(g, a),
        Cmd::Attack(a) => attack::run(g, a),
        Cmd::Finetune(a) => finetune::run(g, a),
        Cmd::Loss(a) => loss::run(g, a),
        Cmd::Fetch(a) => fetch::run(g, a),
        Cmd::Run(a) => run::run(g, a),
        Cmd::Demo(a) => demo::run(g, a),
        Cmd::Eval { cmd } => eval::run(g, cmd),
        Cmd::Analyze { cmd } => analyze::run(g, cmd),
        Cmd::Classifier { cmd } => classifier::run(g, cmd),
        Cmd::Data { cmd } => data::run(g, cmd),
    }
}

fn dtype(spec: &str) -> Result<candle_core::DType> {
    Ok(repnoise::model::config::parse_compute_dtype(spec)?)
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

/// The judge of `--classifier DIR` (with its `--harmful-label`), when one is given.
fn load_judge(
    g: &Global,
    dir: Option<&Path>,
    harmful_label: &str,
) -> Result<Option<repnoise::eval::classifier::Classifier>> {
    let Some(dir) = dir else { return Ok(None) };
    let label: repnoise::eval::classifier::HarmfulLabel = harmful_label.parse()?;
    let clf = repnoise::eval::classifier::Classifier::load(dir, &label, &device(&g.device)?)
        .with_context(|| format!("loading classifier {}", dir.display()))?;
    Ok(Some(clf))
}

fn load(global: &Global, spec: &str) -> Result<LoadedModel> {
    let cache = global
        .cache_dir
        .clone()
        .unwrap_or_else(repnoise::model::assets::default_cache_dir);
    let dev = device(&global.device)?;
    let dt = dtype(&global.dtype)?;
    let mut m =
        load::load(spec, &cache, &dev).with_context(|| format!("loading model `{spec}`"))?;
    m.config.compute_dtype = dt;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it does in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "repnoise", &mut missing);
        assert!(missing.is_empty(), "flags without help text: {missing:#?}");
    }
}
