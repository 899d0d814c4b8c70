//! `repnoise defend`.

use super::*;

/// Train a defence on pairs (harmful answer, refusal) and write the defended model.
#[derive(Args)]
pub struct Args {
    /// Defence method (absent: the config's, else repnoise).
    #[arg(long, value_enum)]
    pub method: Option<repnoise::defence::Method>,
    #[command(flatten)]
    pub model: ModelArg,
    /// JSONL/JSON pairs `{prompt, harmful, harmless}` (not needed for random-init).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Run directory (required unless --print-config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A defend config TOML; flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from a named preset for the method: `repnoise` (this project's defaults) or
    /// `reference` (the reference code's settings, docs/REPNOISE.md "Presets"); other flags
    /// override it. In a config file: `preset = "reference"`.
    #[arg(long, value_enum, conflicts_with = "config")]
    pub preset: Option<repnoise::defence::Preset>,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub rn: RepNoiseFlags,
    /// Prompt format of the pairs: chat or plain (absent: the config's).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Tokens kept per pair sequence (absent: the config's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Train on at most this many pairs (absent: the config's, else all).
    #[arg(long)]
    pub max_pairs: Option<usize>,
    /// Weight of the harmful answer's cross-entropy in the adversarial loss (reference: 0.1).
    #[arg(long)]
    pub adversarial_weight: Option<f64>,
    /// Vaccine's perturbation budget: the norm of all layers' attention-output
    /// perturbations together (default 2, the Vaccine authors').
    #[arg(long)]
    pub vaccine_rho: Option<f64>,
    /// Tokens of the baselines' cross-entropies: `answer`, or `sequence` (every position
    /// up to --max-len, question and padding included, as the reference code).
    #[arg(long, value_enum)]
    pub loss_tokens: Option<LossTokensArg>,
    /// The security-vectors adapter.
    #[command(flatten)]
    pub lora: LoraFlags,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
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
    } = a;
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
    Ok(())
}
