//! `repnoise attack`.

use super::*;

/// Attack a model the way a bad actor would: fine-tune it on harmful answers (full or
/// LoRA), or ablate its refusal direction. One run, a grid (`--grid paper|embedded`), and/or
/// several seeds.
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Harmful QA file: BeaverTails JSON/JSONL/Parquet, or CSV `prompt,response,label`
    /// (default: the shipped BeaverTails subset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory (a grid or several seeds put one run per cell under it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An attack config TOML; flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Attack method (absent: the config's, else full fine-tuning).
    #[arg(long, value_enum)]
    pub method: Option<repnoise::attack::AttackMethod>,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Harmful training samples.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Harmful prompts held out for evaluation.
    #[arg(long)]
    pub test_prompts: Option<usize>,
    /// Prompt format of the harmful samples: chat or plain (absent: the config's).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Tokens kept per training sequence (absent: the config's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// The reference attack's loss (prompt and padding tokens too).
    #[arg(long)]
    pub faithful_loss: bool,
    /// Harm-category group to train on (half, other_half, violence, toxic, ...).
    #[arg(long)]
    pub group: Option<String>,
    /// Benign QA file mixed in (safe records).
    #[arg(long)]
    pub retain: Option<PathBuf>,
    /// Benign samples from --retain mixed into the attack's training data.
    #[arg(long)]
    pub retain_samples: Option<usize>,
    #[command(flatten)]
    pub lora: LoraFlags,
    /// Keep only the adapter (no merged model in `model/`).
    #[arg(long)]
    pub lora_no_merge: bool,
    /// Fine-tune without the model's security vector (default: active and frozen).
    #[arg(long)]
    pub ignore_security_vector: bool,
    /// Abliteration: the residual readout whose direction is ablated (default: chosen).
    #[arg(long)]
    pub ablate_layer: Option<usize>,
    /// Tokens per answer when measuring the refusal rate on the held-out test prompts after
    /// the attack (0: do not measure).
    #[arg(long, default_value_t = 0)]
    pub eval_tokens: usize,
    /// paper (lr {3e-5, 6e-5, 8e-5} x {1k, 10k} samples) or embedded (x {100, 300}).
    #[arg(long)]
    pub grid: Option<String>,
    /// Attack seeds (data order and sampling), comma-separated; one run each.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
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
    } = a;
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
    Ok(())
}
