//! What an experiment writes in `results.json`: the per-stage times, every attack's result, and the
//! summaries (seed means, cells, durability curves, paired comparisons, the overlap audit).

use super::*;

/// Mean of per-seed values with a 95% Student-t interval (the interval is the mean itself for
/// a single seed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedMean {
    pub mean: f64,
    pub ci95: (f64, f64),
    pub n: usize,
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

pub fn seed_mean(xs: &[f64]) -> SeedMean {
    let n = xs.len();
    if n == 0 {
        return SeedMean {
            mean: f64::NAN,
            ci95: (f64::NAN, f64::NAN),
            n,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return SeedMean {
            mean,
            ci95: (mean, mean),
            n,
        };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t95(n - 1) * (var / n as f64).sqrt();
    SeedMean {
        mean,
        ci95: (mean - half, mean + half),
        n,
    }
}

/// The held-out split of the harmful data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataSplit {
    pub test: Vec<EvalPrompt>,
    /// The data set's harmful answer of each test prompt (the held-out metric's reference).
    #[serde(default)]
    pub test_answers: Vec<String>,
    #[serde(default)]
    pub validation: Vec<EvalPrompt>,
    #[serde(default)]
    pub validation_answers: Vec<String>,
    pub defence: Vec<(String, String)>,
    pub attack_file: PathBuf,
    pub attack_records: usize,
    pub notes: Vec<String>,
}

impl DataSplit {
    /// The prompts (and their reference harmful answers) of the partition evaluated on.
    pub fn held_out(&self, p: Partition) -> (&[EvalPrompt], &[String]) {
        match p {
            Partition::Test => (&self.test, &self.test_answers),
            Partition::Validation => (&self.validation, &self.validation_answers),
        }
    }
}

/// What happened to one stage in this invocation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
    pub cached: bool,
}

/// One attacked model's scores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackResult {
    pub defence: String,
    /// The defence's training seed, when the experiment varies defence seeds.
    #[serde(default)]
    pub defence_seed: Option<u64>,
    pub cell: Cell,
    pub seed: u64,
    pub harm: HarmFigures,
    /// Per judged prompt: the judge's P(harmful), and whether the keyword check saw a refusal.
    #[serde(default)]
    pub judge: Vec<Option<f32>>,
    #[serde(default)]
    pub refused: Vec<bool>,
    /// Optimizer steps the attack took (fine-tuning attacks).
    #[serde(default)]
    pub steps: Option<usize>,
    /// The held-out scores at each evaluated step (0: the defended model before the attack).
    #[serde(default)]
    pub curve: Vec<CurvePoint>,
    pub final_loss: Option<f64>,
    /// Weight distance by layer from the defended model (first seed of each cell only).
    #[serde(default)]
    pub l2_from_defended: Option<Vec<crate::analysis::LayerDistance>>,
    pub seconds: f64,
}

/// A cell's figures over seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellSummary {
    pub defence: String,
    pub cell: Cell,
    /// Mean P(harmful) over seeds (each seed's figure is the mean over the test prompts).
    pub harm: Option<SeedMean>,
    pub harmful_rate: Option<SeedMean>,
    pub refusal: SeedMean,
}

/// Everything the report shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// Every pair of data partitions and the normalised questions they share.
    #[serde(default)]
    pub audit: Vec<AuditRow>,
    /// Held-out curves, steps to break and paired comparisons.
    #[serde(default)]
    pub durability: Option<Durability>,
    pub experiment: Experiment,
    pub out: PathBuf,
    pub split_notes: Vec<String>,
    pub align: Option<Value>,
    pub classifier: Option<Value>,
    pub pairs: usize,
    pub defences: Vec<DefenceResult>,
    pub attacks: Vec<AttackResult>,
    pub cells: Vec<CellSummary>,
    pub analyses: Vec<ModelAnalysis>,
    pub stages: Vec<StageTime>,
    pub seconds: f64,
    /// Every invocation's stage times so far (`stages.jsonl`), this one included.
    #[serde(default)]
    pub all_stages: Vec<StageTime>,
    pub environment: Value,
    pub command: String,
}

/// One defence before any attack.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DefenceResult {
    pub name: String,
    #[serde(default)]
    pub seed: Option<u64>,
    pub method: String,
    pub model_dir: PathBuf,
    pub train_seconds: Option<f64>,
    pub harm: HarmFigures,
    pub agreement: Option<crate::eval::harmfulness::Agreement>,
    /// Per judged prompt, before any attack.
    #[serde(default)]
    pub judge: Vec<Option<f32>>,
    #[serde(default)]
    pub refused: Vec<bool>,
    /// Held-out scores before any attack.
    #[serde(default)]
    pub heldout: Option<HeldoutScores>,
    pub stability: Vec<TaskResult>,
    pub trainability: Option<TrainabilityReport>,
    /// XSTest over-refusal and degeneracy before any attack.
    #[serde(default)]
    pub overrefusal: Option<OverRefusal>,
    /// The safe-prompt refusal rate exceeds the aligned model's by more than
    /// `overrefusal.flag_margin`.
    #[serde(default)]
    pub over_refuses: bool,
}

/// Two data partitions and how many normalised questions they share (0 is the only good value
/// between a held-out partition and anything trained on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub a: String,
    pub b: String,
    pub a_questions: usize,
    pub b_questions: usize,
    pub shared: usize,
    /// Up to three shared questions.
    pub examples: Vec<String>,
}

/// Held-out curves of one defence in one cell, over every attacked copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurveSummary {
    pub defence: String,
    pub cell: Cell,
    pub step: usize,
    pub harmful_ce: SeedMean,
    pub margin: SeedMean,
}

/// "Steps to break" of one defence in one cell: per attacked copy, the first evaluated step at
/// which its held-out harmful CE is at or below the threshold (None: not within the attack).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakRow {
    pub defence: String,
    pub cell: Cell,
    pub threshold: f64,
    pub steps: Vec<Option<usize>>,
    /// The attack's last evaluated step (a censored run held at least this long).
    pub last_step: usize,
}

/// One paired comparison: `defence` minus `baseline` on `metric`, in an attack cell (None:
/// before any attack).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: Metric,
    pub cell: Option<Cell>,
    /// The harm-category group of the held-out questions compared (`heldout.groups`); none:
    /// every held-out question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub defence: String,
    pub baseline: String,
    pub diff: PairedDiff,
}

/// The primary metric's summaries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Durability {
    pub curves: Vec<CurveSummary>,
    pub breaks: Vec<BreakRow>,
    pub comparisons: Vec<Comparison>,
    pub notes: Vec<String>,
}
