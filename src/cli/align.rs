//! `repnoise align`.

use super::*;

/// Make an instruct model refuse harmful requests (the aligned starting model), and report
/// refusal rates on held-out harmful and benign prompts before and after.
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Run directory (resumes when it holds an unfinished run of the same settings).
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file with the settings (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Safety-Tuned LLaMAs instructions with refusals to train on.
    #[arg(long)]
    pub harmful_train: Option<usize>,
    /// BeaverTails questions (disjoint set) to train on with a refusal.
    #[arg(long)]
    pub beavertails_train: Option<usize>,
    /// ARC-Easy quiz questions trained on, answered as --benign-source says (absent: the
    /// config's).
    #[arg(long)]
    pub benign_train: Option<usize>,
    /// TruthfulQA questions trained on, answered as --benign-source says (absent: the
    /// config's).
    #[arg(long)]
    pub benign_train_truthfulqa: Option<usize>,
    /// self, data or both.
    #[arg(long)]
    pub benign_source: Option<String>,
    /// Held-out prompts per evaluation set.
    #[arg(long)]
    pub eval_per_set: Option<usize>,
    /// Tokens kept per training sequence (absent: the config's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
    /// built-in list.
    #[arg(long)]
    pub refusal_phrases: Option<PathBuf>,
    /// Directory of the shipped data sets (default: $REPNOISE_DATA, else ./data, else the
    /// source tree's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Skip the evaluation of the model before alignment (its columns in the report show
    /// "-", and targets relative to it are not checked).
    #[arg(long)]
    pub skip_eval_before: bool,
    /// Everyday requests to train on (`data/everyday/`, answered by the model itself).
    #[arg(long)]
    pub everyday_train: Option<usize>,
    /// Further everyday requests, only ever trained on
    /// (`data/everyday/everyday_train_extra.jsonl`).
    #[arg(long)]
    pub everyday_extra_train: Option<usize>,
    /// XSTest safe prompts to train on (answered by the model itself).
    #[arg(long)]
    pub xstest_train: Option<usize>,
    /// Weight of the refusal-opening unlikelihood term on benign prompts (0: none).
    #[arg(long)]
    pub unlikelihood_weight: Option<f64>,
    /// Evaluate only the validation sets (a run that chooses settings).
    #[arg(long)]
    pub validation_only: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
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
    } = a;
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
    Ok(())
}
