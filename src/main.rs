//! `repnoise` command line: parses flags and calls the library. No ML logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use repnoise::data::encode::PromptFormat;
use repnoise::model::chat::{self, Message};
use repnoise::model::generate::{self, SamplingConfig};
use repnoise::model::llama::Llama;
use repnoise::model::load::{self, LoadedModel};
use repnoise::train::objective::RepNoiseConfig;
use repnoise::train::{Interrupt, TrainConfig};

/// jemalloc reuses freed memory within a step: training allocates and frees hundreds of MB per
/// step, and with glibc's allocator the kernel zeroed those pages anew each time (measured:
/// about a fifth of a training step in page faults; see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (measured with `repnoise bench`, docs/BENCHMARKS.md): freed pages handed
/// back to the kernel after about a second, so that a step's peak memory is close to its live
/// memory. Never returning them (the earlier setting) kept up to 3 GB of freed activations
/// resident: peak 5.7-6.9 against 3.9 GiB for the RepNoise step, 3.4 against 2.7 GiB for a
/// fine-tuning step, for some page faults as each step touches its activations again. One
/// arena: the same memory as eight, and the quicker of the two in the runs made (fine-tuning
/// step 5.4-5.8 s against 6.0-6.2 s). `_RJEM_MALLOC_CONF` still overrides them.
/// (A thin pointer: jemalloc reads a `const char *`.)
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 68] =
    b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0\0";

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
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample only among the k most likely tokens (with a temperature above 0).
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p
        /// (with a temperature above 0).
        #[arg(long)]
        top_p: Option<f64>,
        /// Penalty on tokens already in the text, as transformers applies it (1: none).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Seed of the sampling (same seed, same text).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Per-token log-probabilities of a text, tokenized exactly as given (after the
    /// beginning-of-sequence token where the tokenizer asks for one, as for any model input).
    Logprobs {
        #[command(flatten)]
        model: ModelArg,
        /// The text to score.
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
        /// The Hugging Face directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a model: architecture, sizes, tokenizer, template, dtype, parameter count.
    Info {
        #[command(flatten)]
        model: ModelArg,
        /// Print JSON instead of text.
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
        /// train-step, lora-step, repnoise-step, generate, score, matmul (this machine's f32
        /// matmul GFLOP/s), or plot (scaling charts from --results into --out).
        what: String,
        /// Sequences in the benchmarked batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence (train-step, lora-step, repnoise-step, score).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed repetitions (the report gives each one).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed repetitions before the timed ones (the training-step benchmarks).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// New tokens per row (generate).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Results file (JSON lines of earlier bench runs) to plot.
        #[arg(long)]
        results: Option<PathBuf>,
        /// Directory the charts are written to (plot).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make an instruct model refuse harmful requests (the aligned starting model), and report
    /// refusal rates on held-out harmful and benign prompts before and after.
    Align {
        #[command(flatten)]
        model: ModelArg,
        /// Run directory (resumes when it holds an unfinished run of the same settings).
        #[arg(long)]
        out: PathBuf,
        /// TOML file with the settings (flags override it).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        train: TrainFlags,
        /// Safety-Tuned LLaMAs instructions with refusals to train on.
        #[arg(long)]
        harmful_train: Option<usize>,
        /// BeaverTails questions (disjoint set) to train on with a refusal.
        #[arg(long)]
        beavertails_train: Option<usize>,
        /// ARC-Easy quiz questions trained on, answered as --benign-source says (absent: the
        /// config's).
        #[arg(long)]
        benign_train: Option<usize>,
        /// TruthfulQA questions trained on, answered as --benign-source says (absent: the
        /// config's).
        #[arg(long)]
        benign_train_truthfulqa: Option<usize>,
        /// self, data or both.
        #[arg(long)]
        benign_source: Option<String>,
        /// Held-out prompts per evaluation set.
        #[arg(long)]
        eval_per_set: Option<usize>,
        /// Tokens kept per training sequence (absent: the config's).
        #[arg(long)]
        max_len: Option<usize>,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// Directory of the shipped data sets (default: $REPNOISE_DATA, else ./data, else the
        /// source tree's data/).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Skip the evaluation of the model before alignment (its columns in the report show
        /// "-", and targets relative to it are not checked).
        #[arg(long)]
        skip_eval_before: bool,
        /// Everyday requests to train on (`data/everyday/`, answered by the model itself).
        #[arg(long)]
        everyday_train: Option<usize>,
        /// Further everyday requests, only ever trained on
        /// (`data/everyday/everyday_train_extra.jsonl`).
        #[arg(long)]
        everyday_extra_train: Option<usize>,
        /// XSTest safe prompts to train on (answered by the model itself).
        #[arg(long)]
        xstest_train: Option<usize>,
        /// Weight of the refusal-opening unlikelihood term on benign prompts (0: none).
        #[arg(long)]
        unlikelihood_weight: Option<f64>,
        /// Evaluate only the validation sets (a run that chooses settings).
        #[arg(long)]
        validation_only: bool,
    },
    /// Refusal rate of a model on prompt sets (shipped sets by name, or files).
    RefusalRate {
        #[command(flatten)]
        model: ModelArg,
        /// advbench, harmbench, malicious-instruct, decoding-trust, or a file of prompts;
        /// repeatable.
        #[arg(long, required = true)]
        set: Vec<String>,
        /// Prompts per set (0: all).
        #[arg(long, default_value_t = 0)]
        n: usize,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// Write every response here (JSON).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of the prompt sample.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Evaluations: resistance (harmfulness), stability, trainability.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
    /// Train a defence on pairs (harmful answer, refusal) and write the defended model.
    Defend {
        /// Defence method (absent: the config's, else repnoise).
        #[arg(long, value_enum)]
        method: Option<repnoise::defence::Method>,
        #[command(flatten)]
        model: ModelArg,
        /// JSONL/JSON pairs `{prompt, harmful, harmless}` (not needed for random-init).
        #[arg(long)]
        pairs: Option<PathBuf>,
        /// Run directory (required unless --print-config).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A defend config TOML; flags override its values.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from a named preset for the method: `repnoise` (this project's defaults) or
        /// `reference` (the reference code's settings, docs/REPNOISE.md "Presets"); other flags
        /// override it. In a config file: `preset = "reference"`.
        #[arg(long, value_enum, conflicts_with = "config")]
        preset: Option<repnoise::defence::Preset>,
        #[command(flatten)]
        train: TrainFlags,
        #[command(flatten)]
        rn: RepNoiseFlags,
        /// Prompt format of the pairs: chat or plain (absent: the config's).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Tokens kept per pair sequence (absent: the config's).
        #[arg(long)]
        max_len: Option<usize>,
        /// Train on at most this many pairs (absent: the config's, else all).
        #[arg(long)]
        max_pairs: Option<usize>,
        /// Weight of the harmful answer's cross-entropy in the adversarial loss (reference: 0.1).
        #[arg(long)]
        adversarial_weight: Option<f64>,
        /// Vaccine's perturbation budget: the norm of all layers' attention-output
        /// perturbations together (default 2, the Vaccine authors').
        #[arg(long)]
        vaccine_rho: Option<f64>,
        /// Tokens of the baselines' cross-entropies: `answer`, or `sequence` (every position
        /// up to --max-len, question and padding included, as the reference code).
        #[arg(long, value_enum)]
        loss_tokens: Option<LossTokensArg>,
        /// The security-vectors adapter.
        #[command(flatten)]
        lora: LoraFlags,
        /// Print the resolved configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Attack a model the way a bad actor would: fine-tune it on harmful answers (full or
    /// LoRA), or ablate its refusal direction. One run, a grid (`--grid paper|embedded`), and/or
    /// several seeds.
    Attack {
        #[command(flatten)]
        model: ModelArg,
        /// Harmful QA file: BeaverTails JSON/JSONL/Parquet, or CSV `prompt,response,label`
        /// (default: the shipped BeaverTails subset).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run directory (a grid or several seeds put one run per cell under it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// An attack config TOML; flags override its values.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Attack method (absent: the config's, else full fine-tuning).
        #[arg(long, value_enum)]
        method: Option<repnoise::attack::AttackMethod>,
        #[command(flatten)]
        train: TrainFlags,
        /// Harmful training samples.
        #[arg(long)]
        samples: Option<usize>,
        /// Harmful prompts held out for evaluation.
        #[arg(long)]
        test_prompts: Option<usize>,
        /// Prompt format of the harmful samples: chat or plain (absent: the config's).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Tokens kept per training sequence (absent: the config's).
        #[arg(long)]
        max_len: Option<usize>,
        /// The reference attack's loss (prompt and padding tokens too).
        #[arg(long)]
        faithful_loss: bool,
        /// Harm-category group to train on (half, other_half, violence, toxic, ...).
        #[arg(long)]
        group: Option<String>,
        /// Benign QA file mixed in (safe records).
        #[arg(long)]
        retain: Option<PathBuf>,
        /// Benign samples from --retain mixed into the attack's training data.
        #[arg(long)]
        retain_samples: Option<usize>,
        #[command(flatten)]
        lora: LoraFlags,
        /// Keep only the adapter (no merged model in `model/`).
        #[arg(long)]
        lora_no_merge: bool,
        /// Fine-tune without the model's security vector (default: active and frozen).
        #[arg(long)]
        ignore_security_vector: bool,
        /// Abliteration: the residual readout whose direction is ablated (default: chosen).
        #[arg(long)]
        ablate_layer: Option<usize>,
        /// Tokens per answer when measuring the refusal rate on the held-out test prompts after
        /// the attack (0: do not measure).
        #[arg(long, default_value_t = 0)]
        eval_tokens: usize,
        /// paper (lr {3e-5, 6e-5, 8e-5} x {1k, 10k} samples) or embedded (x {100, 300}).
        #[arg(long)]
        grid: Option<String>,
        /// Attack seeds (data order and sampling), comma-separated; one run each.
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Print the resolved configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Benign fine-tuning on a data-to-text task, for the trainability check; keeps a test split
    /// (`test.jsonl`) for the evaluation.
    Finetune {
        #[command(flatten)]
        model: ModelArg,
        /// viggo, e2e, dart, conv_weather, or a data-to-text file.
        #[arg(long)]
        task: String,
        /// Run directory (created; resumes from its checkpoint).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        ft: FinetuneFlags,
    },
    /// The RepNoise loss terms on pairs as one batch, with no update.
    Loss {
        #[command(flatten)]
        model: ModelArg,
        /// Pairs file: {prompt, harmful, harmless} JSONL, or any file with pairs (harmful QA with
        /// refusals).
        #[arg(long)]
        pairs: PathBuf,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "plain")]
        format: FormatArg,
        /// Tokens kept per sequence.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        #[command(flatten)]
        rn: RepNoiseFlags,
        /// Seed of the Gaussian noise the MMD term compares with.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
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
    Fetch {
        /// smollm2-135m-instruct or all-minilm-l6-v2.
        name: String,
    },
    /// Run (or resume) an experiment: defences x attacks x seeds with their evaluations and a
    /// report (`OUT/report.md`, `OUT/report.html`).
    Run {
        /// The experiment file (see configs/).
        experiment: PathBuf,
        /// Experiment directory (default: runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the resolved experiment as TOML and exit.
        #[arg(long)]
        print_config: bool,
        /// Validate the experiment against the data it names (partitions, tasks, model) and
        /// exit; nothing is trained or written.
        #[arg(long)]
        check: bool,
        /// Go on when the aligned model misses its over-refusal or knowledge targets by more
        /// than `align.targets.gate_margin` (the report still says so first).
        #[arg(long)]
        ignore_align_targets: bool,
    },
    /// The main job: align the embedded model, defend it with RepNoise and two baselines, attack
    /// every model, evaluate and write the report (configs/demo.toml, built in). A second run
    /// reuses the finished stages.
    Demo {
        /// Run directory of the demo (created; an interrupted demo resumes there).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Use this experiment file instead of the built-in demo.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the demo's experiment as TOML and exit.
        #[arg(long)]
        print_config: bool,
        /// Go on when the aligned model misses its over-refusal or knowledge targets by more
        /// than `align.targets.gate_margin` (the report still says so first).
        #[arg(long)]
        ignore_align_targets: bool,
    },
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

/// Benign fine-tuning flags (`finetune`, `eval trainability`); each overrides the config file.
#[derive(Args)]
struct FinetuneFlags {
    /// A finetune config (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    train: TrainFlags,
    /// Training examples (0: all).
    #[arg(long)]
    samples: Option<usize>,
    /// Test inputs kept (0: all of the test file).
    #[arg(long)]
    test: Option<usize>,
    /// Tokens kept per training sequence (absent: the config's).
    #[arg(long)]
    max_len: Option<usize>,
    /// The prompt, with `{input}` for the structured input.
    #[arg(long)]
    template: Option<String>,
}

impl FinetuneFlags {
    fn resolve(self) -> Result<repnoise::train::finetune::FinetuneConfig> {
        let mut cfg = match &self.config {
            Some(p) => repnoise::util::io::read_toml(p, "finetune")?,
            None => repnoise::train::finetune::FinetuneConfig::default(),
        };
        self.train.apply(&mut cfg.train)?;
        if let Some(x) = self.samples {
            cfg.samples = x;
        }
        if let Some(x) = self.test {
            cfg.test = x;
        }
        if let Some(x) = self.max_len {
            cfg.max_len = x;
        }
        if let Some(x) = self.template {
            cfg.template = x;
        }
        Ok(cfg)
    }
}

/// LoRA flags (the attack's adapter, the security vector's).
#[derive(Args)]
struct LoraFlags {
    /// LoRA rank (absent: the config's).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / rank (absent: the config's).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all; repeatable.
    #[arg(long)]
    lora_target: Vec<String>,
}

impl LoraFlags {
    fn apply(self, cfg: &mut repnoise::train::lora::LoraConfig) -> Result<()> {
        if let Some(x) = self.lora_rank {
            cfg.rank = x;
        }
        if let Some(x) = self.lora_alpha {
            cfg.alpha = x;
        }
        if !self.lora_target.is_empty() {
            cfg.targets = self.lora_target;
        }
        cfg.projection_indices()?;
        Ok(())
    }
}

/// Training flags shared by every training command (each overrides the config file).
#[derive(Args)]
struct TrainFlags {
    /// Peak learning rate (absent: the config's).
    #[arg(long)]
    lr: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long)]
    schedule: Option<String>,
    /// Fraction of the optimizer steps spent warming the learning rate up linearly.
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Seed of the training's random draws (data order, LoRA initialisation, RepNoise's noise).
    #[arg(long)]
    seed: Option<u64>,
    /// Freeze parameters: layer ranges (0-10), layers (5), embed, lm_head, norm; repeatable.
    #[arg(long)]
    freeze: Vec<String>,
    /// Write a resumable checkpoint every N optimizer steps (0: only at the end).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Global gradient-norm clipping at this norm (default 1.0).
    #[arg(long, conflicts_with = "no_clip")]
    max_grad_norm: Option<f64>,
    /// No gradient clipping (the reference code's loops).
    #[arg(long)]
    no_clip: bool,
}

/// `--loss-tokens`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LossTokensArg {
    Answer,
    Sequence,
}

impl TrainFlags {
    fn apply(&self, t: &mut TrainConfig) -> Result<()> {
        if let Some(x) = self.lr {
            t.lr = x;
        }
        if let Some(x) = &self.schedule {
            t.schedule = x.parse()?;
        }
        if let Some(x) = self.warmup_ratio {
            t.warmup_ratio = x;
        }
        if let Some(x) = self.epochs {
            t.epochs = x;
        }
        if let Some(x) = self.batch_size {
            t.batch_size = x;
        }
        if self.max_steps.is_some() {
            t.max_steps = self.max_steps;
        }
        if let Some(x) = self.weight_decay {
            t.weight_decay = x;
        }
        if let Some(x) = self.seed {
            t.seed = x;
        }
        if !self.freeze.is_empty() {
            t.freeze = self.freeze.clone();
        }
        if let Some(x) = self.checkpoint_every {
            t.checkpoint_every = x;
        }
        if self.max_grad_norm.is_some() {
            t.max_grad_norm = self.max_grad_norm;
        }
        if self.no_clip {
            t.max_grad_norm = None;
        }
        t.validate()?;
        Ok(())
    }
}

/// RepNoise flags (override the config file).
#[derive(Args)]
struct RepNoiseFlags {
    /// Weight alpha of the harmful ascent term, -alpha log(1 + harmful CE) (absent: the config's).
    #[arg(long)]
    alpha: Option<f64>,
    /// Weight beta of the noise term, the MMD to Gaussian noise (absent: the config's).
    #[arg(long)]
    beta: Option<f64>,
    /// Reproduce the reference code's arithmetic (docs/REPNOISE.md).
    #[arg(long)]
    faithful: bool,
    /// Ablation: no noise (MMD) term.
    #[arg(long)]
    no_noise: bool,
    /// Ablation: no ascent term.
    #[arg(long)]
    no_ascent: bool,
    /// Ablation: noise and ascent on every harmful token, not the pair mask.
    #[arg(long)]
    no_mask: bool,
    /// Ablation: ascent on the final layer only (no logit lens).
    #[arg(long)]
    ascent_last_layer_only: bool,
}

impl RepNoiseFlags {
    fn apply(&self, r: &mut RepNoiseConfig) {
        if let Some(a) = self.alpha {
            r.alpha = a;
        }
        if let Some(b) = self.beta {
            r.beta = b;
        }
        r.faithful |= self.faithful;
        r.no_noise |= self.no_noise;
        r.no_ascent |= self.no_ascent;
        r.no_mask |= self.no_mask;
        r.ascent_last_layer_only |= self.ascent_last_layer_only;
    }
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Answer harmful prompts and score the answers (keyword refusal check; a harmfulness
    /// classifier with --classifier): means, 95% bootstrap intervals, per category.
    Harmfulness {
        #[command(flatten)]
        model: ModelArg,
        /// advbench, harmbench, malicious-instruct, decoding-trust (its held-out toxic prompts, to
        /// continue; score with a `classifier train --task toxicity` classifier), or a file
        /// (JSONL `{prompt, category?}`, such as an attack's `test_prompts.jsonl`).
        #[arg(long)]
        prompts: String,
        /// Output directory (generations.jsonl, harmfulness.json).
        #[arg(long)]
        out: PathBuf,
        /// Prompts used (0: all), chosen by a seeded shuffle.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 50)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample only among the k most likely tokens (with a temperature above 0).
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p
        /// (with a temperature above 0).
        #[arg(long)]
        top_p: Option<f64>,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// A harmfulness (or toxicity) classifier directory (`repnoise classifier train`, or a
        /// Hugging Face BERT or DeBERTa-v2/v3 sequence-classification checkpoint): P(harmful)
        /// per answer.
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// The classifier's harmful class: a label name, an index, or auto.
        #[arg(long, default_value = "auto")]
        harmful_label: String,
        /// Seed of the prompt sample (with --limit), the sampling and the bootstrap intervals.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Over-refusal and degeneracy on XSTest (docs/EVALUATION.md): the shipped prompts that only
    /// sound harmful (refusing them is the failure) and the unsafe contrast ones, answered
    /// greedily; keyword refusal rates with Wilson intervals, degenerate answers, and the judge's
    /// mean P(harmful) on the unsafe ones when `--classifier` is given.
    OverRefusal {
        #[command(flatten)]
        model: ModelArg,
        /// Output directory (overrefusal.jsonl, overrefusal.json).
        #[arg(long)]
        out: PathBuf,
        /// Safe prompts answered (0: all 250), a seeded draw.
        #[arg(long, default_value_t = 0)]
        safe: usize,
        /// Unsafe prompts answered (0: all 200), a seeded draw.
        #[arg(long = "unsafe", default_value_t = 0)]
        unsafe_prompts: usize,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// A harmfulness classifier directory: the judge of the unsafe prompts' answers.
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// The classifier's harmful class: a label name, an index, or auto.
        #[arg(long, default_value = "auto")]
        harmful_label: String,
        /// Seed of the prompt sample (with fewer than all prompts).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Multiple-choice benchmarks scored by log-likelihood (lm-evaluation-harness style).
    Stability {
        #[command(flatten)]
        model: ModelArg,
        /// Tasks, comma-separated (default: all shipped).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Items per task (0: all), chosen by a seeded shuffle.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Tokens kept per scored sequence (context and answer option).
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Seed of the item sample (with a --limit below the task's size).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory for the per-task JSON results (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Benign fine-tuning on a data-to-text task; ROUGE-1 on held-out inputs before and after.
    Trainability {
        #[command(flatten)]
        model: ModelArg,
        /// viggo, e2e, dart, conv_weather, or a data-to-text file.
        #[arg(long)]
        task: String,
        /// Run directory of the fine-tuning and its evaluation (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        ft: FinetuneFlags,
        /// Most tokens generated per test input.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
}

/// The samples an analysis reads: each pair gives a harmful sample (prompt + harmful answer) and
/// a harmless one (prompt + harmless answer).
#[derive(Args)]
struct PairsFlags {
    /// Pairs `{prompt, harmful, harmless}` (JSONL/JSON/Parquet), or harmful QA / DecodingTrust
    /// records with refusals.
    #[arg(long)]
    pairs: PathBuf,
    /// Pairs used (0: all), chosen by a seeded shuffle.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Prompt format of the pairs: chat or plain.
    #[arg(long, value_enum, default_value = "chat")]
    format: FormatArg,
    /// Tokens per sample at most (a sample whose answer is cut off entirely is left out).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seed of the pair selection (--limit).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AnswerArg {
    Harmful,
    Harmless,
    Both,
}

#[derive(Subcommand)]
enum AnalyzeCmd {
    /// L2 distance between two models' weights, per decoder layer (plus embeddings, final norm
    /// and LM head rows in the JSON).
    L2 {
        /// The reference model (relative distances divide by its norm).
        #[arg(long)]
        a: String,
        /// The compared model.
        #[arg(long)]
        b: String,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Plot the relative distance |b - a| / |a| instead of |b - a|.
        #[arg(long)]
        relative: bool,
    },
    /// Logit lens: mean log-probability of the answers read out at every layer; one line per
    /// model (repeat --model).
    LogitLens {
        /// A model (Hugging Face directory, GGUF file or embedded name); repeatable.
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Which answers are scored.
        #[arg(long, value_enum, default_value = "harmful")]
        answer: AnswerArg,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// PCA of the mean activations of harmful and harmless samples at one hidden state.
    Pca {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Hidden state (0 = embeddings; default: the last layer's output).
        #[arg(long)]
        layer: Option<usize>,
        /// Tokens averaged per sample.
        #[arg(long, value_enum, default_value = "answer")]
        pool: repnoise::analysis::Pool,
        /// Components kept.
        #[arg(long, default_value_t = 2)]
        components: usize,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Logistic-regression probes separating harmful from harmless mean activations at every
    /// hidden state: held-out accuracy over seeded 80/20 splits.
    Probes {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Split seeds, comma-separated: one probe per seed and layer.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// Which tokens' hidden states a probe reads (their mean): answer or all.
        #[arg(long, value_enum, default_value = "answer")]
        pool: repnoise::analysis::Pool,
        /// L2 penalty of the probe.
        #[arg(long)]
        l2: Option<f64>,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClassifierCmd {
    /// Fine-tune a BERT encoder with a classification head on the shipped labelled answers
    /// (BeaverTails safe/unsafe plus refusals; or, with --task toxicity, DecodingTrust texts by
    /// their Perspective toxicity), split by question; writes the classifier (a Hugging Face
    /// BertForSequenceClassification directory) and report.json to --out.
    Train {
        /// Run directory of the classifier (checkpoints, report; created if missing).
        #[arg(long)]
        out: PathBuf,
        /// harmfulness (scores `Question: q\nAnswer: a`) or toxicity (scores the text alone;
        /// toxic when DecodingTrust's Perspective toxicity is at least 0.5).
        #[arg(long, default_value = "harmfulness")]
        task: String,
        /// A BERT directory, or the embedded all-minilm-l6-v2.
        #[arg(long, default_value = "all-minilm-l6-v2")]
        encoder: String,
        /// Dataset directory (default: $REPNOISE_DATA or the shipped data/).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Passes over the training data (absent: the default).
        #[arg(long)]
        epochs: Option<usize>,
        /// Encoder learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Classification-layer learning rate.
        #[arg(long)]
        head_lr: Option<f64>,
        /// Sequences per optimizer step (absent: the default).
        #[arg(long)]
        batch_size: Option<usize>,
        /// At most this many examples before the split (0 = all).
        #[arg(long)]
        samples: Option<usize>,
        /// Refusals added as harmless examples.
        #[arg(long)]
        refusals: Option<usize>,
        /// Fraction of the examples held out (whole questions).
        #[arg(long)]
        test_fraction: Option<f64>,
        /// Seed of the split, the data order and the head's initialisation (absent: the default).
        #[arg(long)]
        seed: Option<u64>,
        /// Token limit per text, in training and in the saved classifier's scoring.
        #[arg(long)]
        max_len: Option<usize>,
        /// Train only the pooler and head on the frozen encoder's states (fast, less accurate).
        #[arg(long)]
        freeze_encoder: bool,
        /// Features the head reads: cls (the [CLS] state) or mean (the mean over real tokens).
        /// Default: mean with --freeze-encoder, else cls.
        #[arg(long)]
        pooling: Option<String>,
        /// Pool the hidden states averaged over this many top layers (default 1: the last).
        #[arg(long)]
        pool_layers: Option<usize>,
        /// At most this many answers of the BeaverTails disjoint attack set (0 = all).
        #[arg(long)]
        disjoint_samples: Option<usize>,
        /// Leave the BeaverTails disjoint attack set out of training.
        #[arg(long)]
        no_disjoint: bool,
        /// Leave XSTest's human-labelled answers out of training.
        #[arg(long)]
        no_xstest: bool,
        /// XSTest completion files left out of training and calibrated on (comma-separated:
        /// gpt4, llama2orig, llama2new, mistralguard; `none` for none; default mistralguard).
        #[arg(long)]
        xstest_holdout: Option<String>,
    },
    /// Calibrate a classifier: its figures on its held-out split (test.jsonl, when the directory
    /// has one) and on XSTest's human-labelled answers, beside the keyword refusal check's
    /// agreement with the human refusal labels; a markdown table on stdout.
    Calibrate {
        /// A sequence-classification directory (`classifier train`'s or a Hugging Face one).
        #[arg(long)]
        classifier: PathBuf,
        /// Also write the figures as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// XSTest directory (default: the shipped data/xstest).
        #[arg(long)]
        xstest_dir: Option<PathBuf>,
        /// XSTest completion files to calibrate on (comma-separated; default: the ones the
        /// classifier's report.json held out of training, else all four).
        #[arg(long, value_delimiter = ',')]
        files: Vec<String>,
        /// The harmful class: a label name, an index, or auto.
        #[arg(long, default_value = "auto")]
        harmful_label: String,
    },
    /// Score question/answer pairs: P(harmful) per line of a JSONL file of {prompt, response}.
    Score {
        /// A sequence-classification directory: `classifier train`'s, or a Hugging Face BERT or
        /// DeBERTa-v2/v3 checkpoint.
        #[arg(long)]
        classifier: PathBuf,
        /// JSONL file of {prompt, response} records to score.
        #[arg(long)]
        input: PathBuf,
        /// Write JSONL here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// The harmful class: a label name, an index, or auto (a label named harmful, unsafe or
        /// toxic, else index 1).
        #[arg(long, default_value = "auto")]
        harmful_label: String,
        /// Token limit per scored text (default: the one the classifier was trained with, as
        /// saved in its config.json, else 256).
        #[arg(long)]
        max_len: Option<usize>,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Answer harmful questions with an aligned model and keep the answers the refusal check
    /// accepts, writing defence pairs `{prompt, harmful, harmless}` as JSONL.
    Refusals {
        #[command(flatten)]
        model: ModelArg,
        /// Harmful QA file (BeaverTails format, prompt/response/label files).
        #[arg(long)]
        input: PathBuf,
        /// The pairs file to write (JSONL).
        #[arg(long)]
        out: PathBuf,
        /// Use at most this many harmful records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Keep only records marked unsafe (default: yes).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        unsafe_only: bool,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 96)]
        max_new_tokens: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// Seed of the question sample.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Counts per split, category and label of a dataset file (format detected from the file).
    Stats {
        /// The data file (any format `repnoise` reads: JSONL, JSON, CSV, Parquet).
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn run_eval(g: &Global, cmd: EvalCmd) -> Result<()> {
    use repnoise::eval;
    match cmd {
        EvalCmd::OverRefusal {
            model,
            out,
            safe,
            unsafe_prompts,
            max_new_tokens,
            batch,
            format,
            refusal_phrases,
            classifier,
            harmful_label,
            seed,
        } => {
            let spec = eval::overrefusal::OverRefusalSpec {
                enabled: true,
                safe,
                unsafe_prompts,
                seed,
                max_new_tokens,
                batch,
                format: format.into(),
                ..Default::default()
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            let clf = load_judge(g, classifier.as_deref(), &harmful_label)?;
            let m = load(g, &model.model)?;
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let prompts =
                eval::overrefusal::select_prompts(&eval::overrefusal::shipped_prompts()?, &spec);
            let scorer = clf
                .as_ref()
                .map(|c| c as &dyn eval::harmfulness::HarmScorer);
            let r = eval::overrefusal::evaluate(&m, &prompts, &spec, &check, scorer, &out)?;
            for (name, set) in [("safe", &r.safe), ("unsafe", &r.unsafe_set)] {
                println!(
                    "{name} prompts: refused {:.3} [{:.3}, {:.3}] ({}/{}), degenerate {}/{}{}",
                    set.refused.rate,
                    set.refused.ci95.0,
                    set.refused.ci95.1,
                    set.refused.k,
                    set.refused.n,
                    set.degenerate.k,
                    set.degenerate.n,
                    set.judge_mean
                        .map_or(String::new(), |j| format!(", judge mean P(harmful) {j:.3}"))
                );
            }
            if r.left_out > 0 {
                println!(
                    "{} prompts left out: they do not fit the model's context",
                    r.left_out
                );
            }
            println!("wrote {}", out.display());
        }
        EvalCmd::Harmfulness {
            model,
            prompts,
            out,
            limit,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            batch,
            format,
            refusal_phrases,
            classifier,
            harmful_label,
            seed,
        } => {
            let clf = load_judge(g, classifier.as_deref(), &harmful_label)?;
            let m = load(g, &model.model)?;
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let ps = eval::harmfulness::read_eval_prompts(&prompts, limit, seed)?;
            let cfg = eval::harmfulness::HarmfulnessConfig {
                sampling: repnoise::model::generate::SamplingConfig {
                    max_new_tokens,
                    temperature,
                    top_k,
                    top_p,
                    seed,
                    ..Default::default()
                },
                format: format.into(),
                batch,
                seed,
                ..Default::default()
            };
            cfg.sampling.validate()?;
            let scorer = clf
                .as_ref()
                .map(|c| c as &dyn eval::harmfulness::HarmScorer);
            let r = eval::harmfulness::evaluate(&m, &ps, &prompts, &cfg, &check, scorer, &out)?;
            if let Some(a) = &r.agreement {
                println!(
                    "classifier vs keywords: agree {:.3}\trefused+harmless {}\tcomplied+harmful {}\t\
                     refused+harmful {}\tcomplied+harmless {}",
                    a.agreement,
                    a.refused_harmless,
                    a.complied_harmful,
                    a.refused_harmful,
                    a.complied_harmless
                );
            }
            let o = &r.overall;
            println!(
                "refusal rate {:.3} [{:.3}, {:.3}]\tn {}\tshort answers {}",
                o.refusal_rate.mean,
                o.refusal_rate.ci95.0,
                o.refusal_rate.ci95.1,
                o.refusal_rate.n,
                r.short_answers
            );
            let what = match clf.as_ref().map(|c| c.input()) {
                Some(repnoise::eval::classifier::ClassifierInput::Text) => "toxicity",
                _ => "harmfulness",
            };
            if let (Some(ms), Some(hr)) = (o.mean_score, o.harmful_rate) {
                println!(
                    "{what} {:.3} [{:.3}, {:.3}]\tabove 0.5 {:.3}",
                    ms.mean, ms.ci95.0, ms.ci95.1, hr.mean
                );
            }
            for (c, f) in &r.per_category {
                println!(
                    "  {c}\trefusal rate {:.3}\tn {}",
                    f.refusal_rate.mean, f.refusal_rate.n
                );
            }
            println!("wrote {}", out.join("harmfulness.json").display());
        }
        EvalCmd::Stability {
            model,
            tasks,
            limit,
            max_len,
            batch,
            seed,
            out,
        } => {
            let tasks: Vec<String> = if tasks.is_empty() {
                eval::stability::TASKS
                    .iter()
                    .map(|t| t.0.to_string())
                    .collect()
            } else {
                tasks
            };
            for t in &tasks {
                if t != "hellaswag" && !eval::stability::TASKS.iter().any(|k| k.0 == t) {
                    bail!("unknown task `{t}` (see `repnoise eval stability --help`)");
                }
            }
            let m = load(g, &model.model)?;
            let r = eval::run_stability(&m, &tasks, limit, seed, max_len, batch, &out)?;
            print!("{}", eval::stability_table(&r));
        }
        EvalCmd::Trainability {
            model,
            task,
            out,
            ft,
            max_new_tokens,
        } => {
            let cfg = ft.resolve()?;
            let mut m = load(g, &model.model)?;
            let r = eval::trainability::trainability(
                &mut m,
                &task,
                &cfg,
                max_new_tokens,
                &out,
                Interrupt::default(),
            )?;
            println!(
                "{}\tROUGE-1 F before {:.4} (±{:.4})\tafter {:.4} (±{:.4})\tn {}",
                r.task,
                r.before.rouge1_f.mean,
                r.before.rouge1_f.stderr,
                r.after.rouge1_f.mean,
                r.after.rouge1_f.stderr,
                r.after.rouge1_f.n
            );
            if let (Some(b), Some(a)) = (&r.before_stemmed, &r.after_stemmed) {
                println!(
                    "{}\tROUGE-1 F, Porter-stemmed: before {:.4} (±{:.4})\tafter {:.4} (±{:.4})",
                    r.task, b.rouge1_f.mean, b.rouge1_f.stderr, a.rouge1_f.mean, a.rouge1_f.stderr
                );
            }
        }
    }
    Ok(())
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
    load::load(spec, &cache, &dev).with_context(|| format!("loading model `{spec}`"))
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
    // candle asks for its thread count on every matrix product, and without this variable it
    // reads the CPU mask from /proc each time (about a sixth of generation's time on 2 cores).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    let cli = Cli::parse();
    // Everything runs inside candle's CPU thread pool (`Device::with_context`), so the thread
    // that issues the ops is one of the workers of each parallel section (matrix products, the
    // fused ops) instead of a bystander that wakes the pool and sleeps until it is done: about
    // a quarter as many context switches, and a faster forward pass (docs/BENCHMARKS.md).
    if let Err(e) = candle_core::Device::Cpu.with_context(|| run(cli)) {
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
                    m.tok.encode_text(p)?
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
            let ids = m.tok.encode_text(&text)?;
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
            load::save_hf_dir(&out, &m.config, &m.params, &m.tok)?;
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
            results,
            out,
        } => {
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
            let m = load(g, &model.model)?;
            let phases = |ph: [f64; 3], n: usize| {
                let n = n.max(1) as f64;
                serde_json::json!({"forward_s": ph[0] / n, "backward_s": ph[1] / n,
                    "optimizer_s": ph[2] / n})
            };
            // One fine-tuning step benchmark (full or LoRA): times, losses, phases and FLOPs.
            let train_bench = |trainee: &dyn repnoise::train::Trainee,
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
                "score" => (
                    repnoise::dev::bench::scoring(&m, batch, seq, steps)?,
                    serde_json::json!({}),
                ),
                "matmul" => {
                    let g = repnoise::dev::bench::matmul_peak_gflops(steps)?;
                    (vec![], serde_json::json!({"gflops": g}))
                }
                other => bail!(
                    "bench {other}: expected train-step, lora-step, repnoise-step, generate, \
                     score, matmul or plot"
                ),
            };
            println!(
                "{}",
                serde_json::json!({
                    "impl": "repnoise", "what": what, "batch": batch, "seq": seq,
                    "new_tokens": new_tokens, "seconds": times, "extra": extra,
                    "peak_rss_bytes": repnoise::dev::bench::peak_rss_bytes(),
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
        Cmd::Align {
            model,
            out,
            config,
            train,
            harmful_train,
            beavertails_train,
            benign_train,
            benign_train_truthfulqa,
            benign_source,
            eval_per_set,
            max_len,
            refusal_phrases,
            data_dir,
            skip_eval_before,
            everyday_train,
            everyday_extra_train,
            xstest_train,
            unlikelihood_weight,
            validation_only,
        } => {
            let mut cfg: repnoise::defence::align::AlignConfig = match &config {
                Some(p) => repnoise::util::io::read_toml(p, "align")?,
                None => Default::default(),
            };
            train.apply(&mut cfg.train)?;
            if let Some(x) = harmful_train {
                cfg.harmful_train = x;
            }
            if let Some(x) = beavertails_train {
                cfg.beavertails_train = x;
            }
            if let Some(x) = benign_train {
                cfg.benign_train = x;
            }
            if let Some(x) = benign_train_truthfulqa {
                cfg.benign_train_truthfulqa = x;
            }
            if let Some(x) = benign_source {
                cfg.benign_source = x;
            }
            if let Some(x) = eval_per_set {
                cfg.eval_per_set = x;
            }
            if let Some(x) = max_len {
                cfg.max_len = x;
            }
            if refusal_phrases.is_some() {
                cfg.refusal_phrases = refusal_phrases;
            }
            if let Some(x) = data_dir {
                cfg.data_dir = x;
            }
            cfg.skip_eval_before |= skip_eval_before;
            cfg.validation_only |= validation_only;
            if let Some(x) = everyday_train {
                cfg.everyday_train = x;
            }
            if let Some(x) = everyday_extra_train {
                cfg.everyday_extra_train = x;
            }
            if let Some(x) = xstest_train {
                cfg.xstest_train = x;
            }
            if let Some(x) = unlikelihood_weight {
                cfg.unlikelihood_weight = x;
            }
            let mut m = load(g, &model.model)?;
            let report = repnoise::defence::align::align(&mut m, &cfg, &out, Interrupt::default())?;
            println!("{}", report.markdown());
            println!("model: {}", report.train.model_dir.display());
        }
        Cmd::Eval { cmd } => run_eval(g, cmd)?,
        Cmd::RefusalRate {
            model,
            set,
            n,
            max_new_tokens,
            batch,
            format,
            refusal_phrases,
            out,
            seed,
        } => {
            let m = load(g, &model.model)?;
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let sets = repnoise::data::prompts::named_prompt_sets(&set, n, seed)?;
            let net = Llama::frozen(&m.config, &m.params)?;
            let res = repnoise::defence::align::refusal_eval(
                &net,
                &m.tok,
                &sets,
                &check,
                format.into(),
                max_new_tokens,
                batch,
            )?;
            for s in &res {
                println!(
                    "{}\t{}\trefusal_rate {:.3}\tn {}",
                    s.name, s.kind, s.refusal_rate, s.n
                );
            }
            if let Some(p) = out {
                repnoise::util::io::write_json_atomic(&p, &res)?;
            }
        }
        Cmd::Data {
            cmd:
                DataCmd::Refusals {
                    model,
                    input,
                    out,
                    limit,
                    unsafe_only,
                    max_new_tokens,
                    batch,
                    format,
                    refusal_phrases,
                    seed,
                },
        } => {
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let loaded = repnoise::data::read_harmful_qa(&input)?;
            let mut records = loaded.records;
            if unsafe_only {
                let before = records.len();
                records = repnoise::data::harmful::unsafe_only(&records).records;
                eprintln!(
                    "{}: {} of {before} records are unsafe",
                    input.display(),
                    records.len()
                );
            }
            records = repnoise::util::rng::Rng::new(seed, "refusal-sample").subset(&records, limit);
            let m = load(g, &model.model)?;
            let (pairs, rejected) = repnoise::defence::align::make_refusal_pairs(
                &m,
                &records,
                &check,
                format.into(),
                max_new_tokens,
                batch,
            )?;
            repnoise::util::io::write_jsonl_atomic(&out, &pairs)?;
            eprintln!(
                "{}: {} pairs written; {rejected} answers were not refusals and were left out",
                out.display(),
                pairs.len()
            );
        }
        Cmd::Defend {
            method,
            model,
            pairs,
            out,
            config,
            preset,
            train,
            rn,
            format,
            max_len,
            max_pairs,
            adversarial_weight,
            vaccine_rho,
            loss_tokens,
            lora,
            print_config,
        } => {
            use repnoise::defence::{DefendConfig, Method, Preset};
            let mut cfg = match (&config, preset) {
                (Some(p), _) => DefendConfig::from_toml_for(p, method)?,
                (None, p) => DefendConfig::preset(
                    method.unwrap_or(Method::Repnoise),
                    p.unwrap_or(Preset::Repnoise),
                ),
            };
            if let Some(m) = method {
                cfg.method = m;
            }
            if let Some(w) = adversarial_weight {
                cfg.baseline.adversarial_weight = w;
            }
            if let Some(r) = vaccine_rho {
                cfg.vaccine.rho = r;
            }
            if let Some(t) = loss_tokens {
                cfg.baseline.tokens = match t {
                    LossTokensArg::Answer => repnoise::train::objective::LossTokens::Answer,
                    LossTokensArg::Sequence => repnoise::train::objective::LossTokens::Sequence,
                };
            }
            train.apply(&mut cfg.train)?;
            rn.apply(&mut cfg.repnoise);
            if let Some(f) = format {
                cfg.format = f.into();
            }
            if let Some(x) = max_len {
                cfg.max_len = x;
            }
            if let Some(x) = max_pairs {
                cfg.max_pairs = x;
            }
            lora.apply(&mut cfg.lora)?;
            if print_config {
                print!("{}", toml::to_string(&cfg)?);
                return Ok(());
            }
            let Some(out) = out else {
                bail!("--out is required");
            };
            let pairs = match (pairs, cfg.method) {
                (Some(p), _) => p,
                (None, repnoise::defence::Method::RandomInit) => PathBuf::new(),
                (None, m) => bail!("--pairs is required for --method {m}"),
            };
            let mut m = load(g, &model.model)?;
            let dir = repnoise::defence::defend(&mut m, &pairs, &cfg, &out, Interrupt::default())?;
            println!("defended model: {}", dir.display());
        }
        Cmd::Attack {
            model,
            data,
            out,
            config,
            method,
            train,
            samples,
            test_prompts,
            format,
            max_len,
            faithful_loss,
            group,
            retain,
            retain_samples,
            lora,
            lora_no_merge,
            ignore_security_vector,
            ablate_layer,
            eval_tokens,
            grid,
            seeds,
            print_config,
        } => {
            use repnoise::attack::{self, AttackConfig};
            let mut cfg = match &config {
                Some(p) => AttackConfig::from_toml(p)?,
                None => AttackConfig::default(),
            };
            if let Some(m) = method {
                cfg.method = m;
            }
            train.apply(&mut cfg.train)?;
            if let Some(x) = samples {
                cfg.samples = x;
            }
            if let Some(x) = test_prompts {
                cfg.test_prompts = x;
            }
            if let Some(f) = format {
                cfg.format = f.into();
            }
            if let Some(x) = max_len {
                cfg.max_len = x;
            }
            cfg.faithful_loss |= faithful_loss;
            if group.is_some() {
                cfg.group = group;
            }
            if retain.is_some() {
                cfg.retain = retain;
            }
            if let Some(x) = retain_samples {
                cfg.retain_samples = x;
            }
            lora.apply(&mut cfg.lora)?;
            if lora_no_merge {
                cfg.lora.merge = false;
            }
            cfg.ignore_security_vector |= ignore_security_vector;
            if ablate_layer.is_some() {
                cfg.abliterate.layer = ablate_layer;
            }
            if print_config {
                print!("{}", toml::to_string(&cfg)?);
                return Ok(());
            }
            let Some(out) = out else {
                bail!("--out is required");
            };
            let data = data.unwrap_or_else(attack::default_attack_data);
            let cells: Vec<(String, AttackConfig)> = {
                let mut base = vec![];
                match &grid {
                    Some(name) => {
                        for (lr, n) in attack::grid(name)? {
                            let mut c = cfg.clone();
                            c.train.lr = lr;
                            c.samples = n;
                            base.push((attack::grid_cell_name(lr, n), c));
                        }
                    }
                    None => base.push((String::new(), cfg.clone())),
                }
                if seeds.is_empty() {
                    base
                } else {
                    let mut v = vec![];
                    for (name, c) in base {
                        for &sd in &seeds {
                            let mut c = c.clone();
                            c.train.seed = sd;
                            let n = if name.is_empty() {
                                format!("seed{sd}")
                            } else {
                                format!("{name}-seed{sd}")
                            };
                            v.push((n, c));
                        }
                    }
                    v
                }
            };
            let mut rows = vec![];
            for (name, c) in &cells {
                let dir = if name.is_empty() {
                    out.clone()
                } else {
                    out.join(name)
                };
                if !name.is_empty() {
                    eprintln!("== {name}");
                }
                let mut m = load(g, &model.model)?;
                let r = attack::attack(&mut m, &data, c, &dir, eval_tokens, Interrupt::default())?;
                println!(
                    "{}\tlr {:e}\tsamples {}\tseed {}\ttest refusal rate {}\tmodel {}",
                    if name.is_empty() { "attack" } else { name },
                    c.train.lr,
                    c.samples,
                    c.train.seed,
                    r.test_refusal_rate
                        .map_or("-".to_string(), |x| format!("{x:.3}")),
                    r.model_dir.display()
                );
                rows.push(serde_json::json!({
                    "cell": name, "lr": c.train.lr, "samples": c.samples, "seed": c.train.seed,
                    "test_refusal_rate": r.test_refusal_rate,
                    "final_terms": r.train.as_ref().map(|t| t.final_terms.clone()),
                    "model": r.model_dir,
                }));
            }
            if cells.len() > 1 {
                repnoise::util::io::write_json_atomic(&out.join("grid.json"), &rows)?;
            }
        }
        Cmd::Finetune {
            model,
            task,
            out,
            ft,
        } => {
            let cfg = ft.resolve()?;
            let mut m = load(g, &model.model)?;
            let r = repnoise::train::finetune::finetune(
                &mut m,
                &task,
                &cfg,
                &out,
                Interrupt::default(),
            )?;
            println!(
                "fine-tuned on {} examples ({} steps); {} test inputs in {}; model {}",
                r.train_examples,
                r.summary.steps,
                r.test_inputs,
                out.join("test.jsonl").display(),
                r.summary.model_dir.display()
            );
        }
        Cmd::Loss {
            model,
            pairs,
            format,
            max_len,
            rn,
            seed,
            json,
        } => {
            let mut cfg = RepNoiseConfig::default();
            rn.apply(&mut cfg);
            let loaded = repnoise::data::load_pairs_any(&pairs)?;
            let m = load(g, &model.model)?;
            let t = repnoise::defence::loss_terms(
                &m,
                &loaded.records,
                format.into(),
                max_len,
                &cfg,
                seed,
            )?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!(
                    "harmless_ce {:.6}\nharmful_ce {:.6}\nnoise_mmd {:.6}\nloss {:.6}\nmask_positions {}",
                    t.harmless_ce, t.harmful_ce, t.noise_mmd, t.loss, t.mask_positions
                );
            }
        }
        Cmd::Analyze { cmd } => analyze_cmd(g, cmd)?,
        Cmd::Classifier { cmd } => classifier_cmd(g, cmd)?,
        Cmd::Fetch { name } => {
            let a = repnoise::model::assets::asset(&name)
                .with_context(|| format!("`{name}` is not an embedded asset"))?;
            let cache = g
                .cache_dir
                .clone()
                .unwrap_or_else(repnoise::model::assets::default_cache_dir);
            let p = repnoise::model::assets::fetch(&a, &cache)?;
            println!("{}", p.display());
        }
        Cmd::Run {
            experiment,
            out,
            print_config,
            check,
            ignore_align_targets,
        } => {
            let exp = repnoise::experiment::Experiment::from_toml(&experiment)?;
            if check {
                let lines = repnoise::experiment::check(&exp)
                    .with_context(|| format!("checking {}", experiment.display()))?;
                for l in lines {
                    println!("{l}");
                }
                println!("{}: valid against its data", experiment.display());
                return Ok(());
            }
            let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&exp.name));
            run_experiment(g, &exp, &out, print_config, ignore_align_targets)?;
        }
        Cmd::Demo {
            out,
            config,
            print_config,
            ignore_align_targets,
        } => {
            let exp = match &config {
                Some(p) => repnoise::experiment::Experiment::from_toml(p)?,
                None => repnoise::experiment::Experiment::from_toml_str(
                    repnoise::experiment::DEMO_TOML,
                    "configs/demo.toml (built in)",
                )?,
            };
            run_experiment(g, &exp, &out, print_config, ignore_align_targets)?;
        }
    }
    Ok(())
}

fn run_experiment(
    g: &Global,
    exp: &repnoise::experiment::Experiment,
    out: &std::path::Path,
    print_config: bool,
    ignore_align_targets: bool,
) -> Result<()> {
    if print_config {
        print!("{}", toml::to_string(exp)?);
        return Ok(());
    }
    let opts = repnoise::experiment::RunOptions {
        cache: g
            .cache_dir
            .clone()
            .unwrap_or_else(repnoise::model::assets::default_cache_dir),
        device: device(&g.device)?,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ignore_align_targets,
    };
    let r = repnoise::experiment::run(exp, out, &opts)?;
    repnoise::report::write_report(&r, out)?;
    for v in repnoise::report::verdicts(&r) {
        println!("{v}");
    }
    println!(
        "report: {} and {} ({:.1} min)",
        out.join("report.md").display(),
        out.join("report.html").display(),
        r.seconds / 60.0
    );
    Ok(())
}

/// The pairs an analysis uses, after --limit.
fn analysis_pairs(p: &PairsFlags) -> Result<Vec<repnoise::data::pairs::Pair>> {
    let loaded = repnoise::data::load_pairs_any(&p.pairs)
        .with_context(|| format!("reading pairs {}", p.pairs.display()))?;
    if !loaded.skipped.is_empty() {
        eprintln!(
            "{}: {} records skipped (no pair)",
            p.pairs.display(),
            loaded.skipped.len()
        );
    }
    Ok(repnoise::analysis::select_pairs(
        &loaded.records,
        p.limit,
        p.seed,
    ))
}

/// What every analysis report records about its inputs.
fn analysis_header(name: &str, p: Option<&PairsFlags>, n_pairs: usize) -> serde_json::Value {
    let mut v = serde_json::json!({
        "analysis": name,
        "command": std::env::args().collect::<Vec<_>>(),
        "environment": repnoise::train::environment(),
    });
    if let Some(p) = p {
        v["pairs"] = serde_json::json!({
            "file": p.pairs,
            "used": n_pairs,
            "limit": p.limit,
            "seed": p.seed,
            "format": PromptFormat::from(p.format),
            "max_len": p.max_len,
        });
    }
    v
}

fn analyze_cmd(g: &Global, cmd: AnalyzeCmd) -> Result<()> {
    use repnoise::analysis;
    match cmd {
        AnalyzeCmd::L2 {
            a,
            b,
            out,
            relative,
        } => {
            let ma = load(g, &a)?;
            let mb = load(g, &b)?;
            if ma.config.num_layers != mb.config.num_layers {
                bail!(
                    "`{a}` has {} layers and `{b}` {}: not the same architecture",
                    ma.config.num_layers,
                    mb.config.num_layers
                );
            }
            let rows = analysis::l2_by_layer(&ma.params, &mb.params, ma.config.num_layers)
                .with_context(|| format!("comparing `{a}` with `{b}`"))?;
            let svg = analysis::plot_l2(&[(format!("{b} vs {a}"), rows.clone())], relative)?;
            let mut report = analysis_header("l2", None, 0);
            report["models"] = serde_json::json!({"a": ma.source, "b": mb.source});
            report["rows"] = serde_json::to_value(&rows)?;
            let (j, s) = analysis::write_outputs(&out, "l2", &report, &svg)?;
            for r in &rows {
                println!("{}\t{:.6e}\t{:.6e}", r.part, r.l2, r.relative);
            }
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::LogitLens {
            models,
            pairs,
            answer,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let mut runs = vec![];
            let mut results = vec![];
            for spec in &models {
                let m = load(g, spec)?;
                let samples =
                    analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
                let sides: Vec<(&str, &Vec<repnoise::data::Encoded>)> = match answer {
                    AnswerArg::Harmful => vec![("harmful", &samples.harmful)],
                    AnswerArg::Harmless => vec![("harmless", &samples.harmless)],
                    AnswerArg::Both => vec![
                        ("harmful", &samples.harmful),
                        ("harmless", &samples.harmless),
                    ],
                };
                for (side, seqs) in sides {
                    let lp = analysis::logit_lens(&m, seqs, pairs.batch)
                        .with_context(|| format!("logit lens of `{spec}` ({side} answers)"))?;
                    let name = if answer == AnswerArg::Both {
                        format!("{spec} ({side})")
                    } else {
                        spec.clone()
                    };
                    println!(
                        "{name}\t{}",
                        lp.iter()
                            .map(|v| format!("{v:.4}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    results.push(serde_json::json!({
                        "model": spec,
                        "source": m.source,
                        "answers": side,
                        "samples": seqs.len(),
                        "answer_tokens": seqs.iter().map(|e| e.loss_mask.iter().filter(|&&x| x == 1).count()).sum::<usize>(),
                        "mean_logprob_by_hidden_state": lp,
                    }));
                    runs.push((name, lp));
                }
            }
            let svg = analysis::plot_logit_lens(&runs)?;
            let mut report = analysis_header("logit-lens", Some(&pairs), ps.len());
            report["models"] = serde_json::json!(models);
            report["results"] = serde_json::json!(results);
            let (j, s) = analysis::write_outputs(&out, "logit-lens", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::Pca {
            model,
            pairs,
            layer,
            pool,
            components,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let m = load(g, &model.model)?;
            let layer = layer.unwrap_or(m.config.num_layers);
            let samples = analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
            let acts = |seqs| analysis::mean_activations(&m, seqs, Some(layer), pool, pairs.batch);
            let mut x = acts(&samples.harmful)?.remove(0);
            let n_harmful = x.len();
            x.extend(acts(&samples.harmless)?.remove(0));
            let p = analysis::pca(&x, components)?;
            let title = format!("PCA of hidden state {layer} ({})", model.model);
            let svg = analysis::plot_pca(&p, n_harmful, &title)?;
            println!(
                "explained variance ratio: {}",
                p.explained_variance_ratio
                    .iter()
                    .map(|v| format!("{v:.4}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut report = analysis_header("pca", Some(&pairs), ps.len());
            report["models"] = serde_json::json!([model.model]);
            report["source"] = serde_json::json!(m.source);
            report["layer"] = serde_json::json!(layer);
            report["pool"] = serde_json::json!(pool);
            report["n_harmful"] = serde_json::json!(n_harmful);
            report["n_harmless"] = serde_json::json!(x.len() - n_harmful);
            report["pca"] = serde_json::to_value(&p)?;
            let (j, s) = analysis::write_outputs(&out, "pca", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::Probes {
            model,
            pairs,
            seeds,
            pool,
            l2,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let m = load(g, &model.model)?;
            let samples = analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
            let harmful =
                analysis::mean_activations(&m, &samples.harmful, None, pool, pairs.batch)?;
            let harmless =
                analysis::mean_activations(&m, &samples.harmless, None, pool, pairs.batch)?;
            let mut cfg = analysis::ProbeConfig::default();
            if let Some(l2) = l2 {
                cfg.l2 = l2;
            }
            let probes = analysis::probes_by_layer_with(&harmful, &harmless, &seeds, &cfg)?;
            for p in &probes {
                println!("{}\t{:.4}\t{:.4}", p.layer, p.mean_acc, p.se);
            }
            let svg = analysis::plot_probes(&[(model.model.clone(), probes.clone())])?;
            let mut report = analysis_header("probes", Some(&pairs), ps.len());
            report["models"] = serde_json::json!([model.model]);
            report["source"] = serde_json::json!(m.source);
            report["seeds"] = serde_json::json!(seeds);
            report["pool"] = serde_json::json!(pool);
            report["probe"] = serde_json::to_value(&cfg)?;
            report["n_harmful"] = serde_json::json!(samples.harmful.len());
            report["n_harmless"] = serde_json::json!(samples.harmless.len());
            report["layers"] = serde_json::to_value(&probes)?;
            let (j, s) = analysis::write_outputs(&out, "probes", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
    }
    Ok(())
}

fn classifier_cmd(g: &Global, cmd: ClassifierCmd) -> Result<()> {
    use repnoise::eval::classifier::{self, Classifier, HarmfulLabel, TrainRun};
    let dev = device(&g.device)?;
    match cmd {
        ClassifierCmd::Train {
            out,
            task,
            encoder,
            data,
            epochs,
            lr,
            head_lr,
            batch_size,
            samples,
            refusals,
            test_fraction,
            seed,
            max_len,
            freeze_encoder,
            pooling,
            pool_layers,
            disjoint_samples,
            no_disjoint,
            no_xstest,
            xstest_holdout,
        } => {
            let cache = g
                .cache_dir
                .clone()
                .unwrap_or_else(repnoise::model::assets::default_cache_dir);
            let enc = classifier::resolve_encoder(&encoder, &cache)
                .with_context(|| format!("resolving --encoder {encoder}"))?;
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let data = data.unwrap_or_else(repnoise::data::default_data_dir);
            let mut run = TrainRun::new(enc, data, out.clone(), command);
            run.task = task.parse()?;
            if run.task == classifier::Task::Toxicity && refusals.is_some() {
                return Err(repnoise::Error::setting(
                    "refusals",
                    refusals.unwrap_or(0),
                    "adds Safety-Tuned LLaMAs refusals to harmfulness training; toxicity \
                     training uses DecodingTrust's own labels only",
                )
                .into());
            }
            let t = &mut run.train;
            t.epochs = epochs.unwrap_or(t.epochs);
            t.lr = lr.unwrap_or(t.lr);
            t.head_lr = head_lr.unwrap_or(t.head_lr);
            t.batch_size = batch_size.unwrap_or(t.batch_size);
            t.seed = seed.unwrap_or(t.seed);
            t.max_len = max_len.unwrap_or(t.max_len);
            t.freeze_encoder = freeze_encoder;
            if let Some(p) = pooling {
                t.pooling = Some(p.parse()?);
            }
            t.pool_layers = pool_layers.unwrap_or(t.pool_layers);
            run.disjoint = !no_disjoint;
            run.disjoint_samples = disjoint_samples.unwrap_or(run.disjoint_samples);
            run.xstest = !no_xstest;
            if let Some(h) = xstest_holdout {
                run.xstest_holdout = classifier::parse_file_list(&h);
            }
            run.samples = samples.unwrap_or(run.samples);
            run.refusals = refusals.unwrap_or(run.refusals);
            run.test_fraction = test_fraction.unwrap_or(run.test_fraction);
            let report = classifier::run_train(&run, &dev, &mut |line| eprintln!("{line}"))?;
            let m = &report.held_out;
            println!(
                "held out ({} examples, {} harmful): accuracy {:.4} precision {:.4} recall {:.4} \
                 F1 {:.4} AUROC {}",
                m.n,
                m.positives,
                m.accuracy,
                m.precision,
                m.recall,
                m.f1,
                m.auroc.map_or("n/a".into(), |a| format!("{a:.4}"))
            );
            if let Some(r) = report.held_out_pearson {
                println!("held out: Pearson r of P(toxic) with Perspective toxicity {r:.4}");
            }
            if let Some(p) = report.refusals_mean_p_toxic {
                println!("DecodingTrust harmless continuations and refusals: mean P(toxic) {p:.4}");
            }
            if let Some(c) = &report.calibration {
                println!("{}", classifier::calibration_markdown(c, true));
            }
            eprintln!(
                "wrote {} (report.json beside it; training took {:.0}s)",
                out.display(),
                report.train_seconds
            );
        }
        ClassifierCmd::Calibrate {
            classifier: dir,
            out,
            xstest_dir,
            files,
            harmful_label,
        } => {
            let label: HarmfulLabel = harmful_label.parse()?;
            let xdir = xstest_dir.unwrap_or_else(repnoise::data::xstest::default_xstest_dir);
            let files = (!files.is_empty()).then_some(files);
            let c = classifier::calibrate_dir(&dir, &label, &xdir, files, &dev, &mut |l| {
                eprintln!("{l}")
            })
            .with_context(|| format!("calibrating {}", dir.display()))?;
            println!("{}", classifier::calibration_markdown(&c, true));
            if let Some(p) = &out {
                repnoise::util::io::write_json_atomic(p, &c)?;
                eprintln!("wrote {}", p.display());
            }
        }
        ClassifierCmd::Score {
            classifier: dir,
            input,
            output,
            harmful_label,
            max_len,
        } => {
            let label: HarmfulLabel = harmful_label.parse()?;
            let mut clf = Classifier::load(&dir, &label, &dev)
                .with_context(|| format!("loading classifier {}", dir.display()))?;
            if let Some(n) = max_len {
                if n < 8 {
                    bail!("--max-len {n}: must be at least 8");
                }
                clf.set_max_len(n);
            }
            let pairs = classifier::read_pairs_jsonl(&input)?;
            let scores = clf.score(&pairs)?;
            let lines: String = pairs
                .iter()
                .zip(scores.p_harmful.iter().zip(&scores.trivial))
                .map(|((q, a), (p, t))| {
                    format!(
                        "{}\n",
                        serde_json::json!({"prompt": q, "response": a, "p_harmful": p,
                            "trivial": t})
                    )
                })
                .collect();
            match &output {
                Some(p) => repnoise::util::io::write_atomic(p, lines.as_bytes())?,
                None => print!("{lines}"),
            }
            let n = pairs.len();
            let flagged = scores.p_harmful.iter().filter(|&&p| p >= 0.5).count();
            let mean = scores.p_harmful.iter().map(|&p| p as f64).sum::<f64>() / n as f64;
            eprintln!(
                "{n} pairs: mean P(harmful) {mean:.4}, {flagged} at or above 0.5, {} empty or \
                 one-word answers scored 0 (classifier: {})",
                scores.trivial_count(),
                clf.describe()
            );
        }
    }
    Ok(())
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
