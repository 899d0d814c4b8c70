//! Flag groups shared by several subcommands, each with how it changes the library's
//! configuration.

use super::*;

/// Benign fine-tuning flags (`finetune`, `eval trainability`); each overrides the config file.
#[derive(Args)]
pub struct FinetuneFlags {
    /// A finetune config (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Training examples (0: all).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Test inputs kept (0: all of the test file).
    #[arg(long)]
    pub test: Option<usize>,
    /// Tokens kept per training sequence (absent: the config's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// The prompt, with `{input}` for the structured input.
    #[arg(long)]
    pub template: Option<String>,
}

impl FinetuneFlags {
    pub fn resolve(self) -> Result<repnoise::train::finetune::FinetuneConfig> {
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
pub struct LoraFlags {
    /// LoRA rank (absent: the config's).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / rank (absent: the config's).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all; repeatable.
    #[arg(long)]
    pub lora_target: Vec<String>,
}

impl LoraFlags {
    pub fn apply(self, cfg: &mut repnoise::train::lora::LoraConfig) -> Result<()> {
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
pub struct TrainFlags {
    /// Peak learning rate (absent: the config's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Fraction of the optimizer steps spent warming the learning rate up linearly.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Passes over the training data.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Seed of the training's random draws (data order, LoRA initialisation, RepNoise's noise).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Freeze parameters: layer ranges (0-10), layers (5), embed, lm_head, norm; repeatable.
    #[arg(long)]
    pub freeze: Vec<String>,
    /// Write a resumable checkpoint every N optimizer steps (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Global gradient-norm clipping at this norm (default 1.0).
    #[arg(long, conflicts_with = "no_clip")]
    pub max_grad_norm: Option<f64>,
    /// No gradient clipping (the reference code's loops).
    #[arg(long)]
    pub no_clip: bool,
}

/// `--loss-tokens`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LossTokensArg {
    Answer,
    Sequence,
}

impl TrainFlags {
    pub fn apply(&self, t: &mut TrainConfig) -> Result<()> {
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
pub struct RepNoiseFlags {
    /// Weight alpha of the harmful ascent term, -alpha log(1 + harmful CE) (absent: the config's).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Weight beta of the noise term, the MMD to Gaussian noise (absent: the config's).
    #[arg(long)]
    pub beta: Option<f64>,
    /// Reproduce the reference code's arithmetic (docs/REPNOISE.md).
    #[arg(long)]
    pub faithful: bool,
    /// Ablation: no noise (MMD) term.
    #[arg(long)]
    pub no_noise: bool,
    /// Ablation: no ascent term.
    #[arg(long)]
    pub no_ascent: bool,
    /// Ablation: noise and ascent on every harmful token, not the pair mask.
    #[arg(long)]
    pub no_mask: bool,
    /// Ablation: ascent on the final layer only (no logit lens).
    #[arg(long)]
    pub ascent_last_layer_only: bool,
}

impl RepNoiseFlags {
    pub fn apply(&self, r: &mut RepNoiseConfig) {
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

/// The samples an analysis reads: each pair gives a harmful sample (prompt + harmful answer) and
/// a harmless one (prompt + harmless answer).
#[derive(Args)]
pub struct PairsFlags {
    /// Pairs `{prompt, harmful, harmless}` (JSONL/JSON/Parquet), or harmful QA / DecodingTrust
    /// records with refusals.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Pairs used (0: all), chosen by a seeded shuffle.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Prompt format of the pairs: chat or plain.
    #[arg(long, value_enum, default_value = "chat")]
    pub format: FormatArg,
    /// Tokens per sample at most (a sample whose answer is cut off entirely is left out).
    #[arg(long, default_value_t = repnoise::experiment::AnalysisSpec::default().max_len)]
    pub max_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Seed of the pair selection (--limit).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AnswerArg {
    Harmful,
    Harmless,
    Both,
}
