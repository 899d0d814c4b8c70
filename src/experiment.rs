//! `repnoise run EXPERIMENT.toml` and `repnoise demo`: a grid of defences x attacks x seeds on
//! one model, with the evaluations, run as stages that are cached on disk and resumed.
//!
//! Layout of an experiment directory:
//!
//! ```text
//! OUT/experiment.toml          the resolved experiment, as run
//! OUT/split-<key>.json         held-out test prompts, defence and attack questions (disjoint)
//! OUT/data/attack-<key>.jsonl  the attack's records
//! OUT/align-<key>/             the aligned model (an `align` run directory)
//! OUT/classifier-<key>/        the harmfulness classifier (a `classifier train` directory)
//! OUT/pairs-<key>.jsonl        defence pairs: harmful answers + the aligned model's refusals
//! OUT/defences/<name>-<key>/   each defence's run directory (the model in `model/`)
//! OUT/eval/<defence>/          pre-attack evaluations (harmfulness, stability, trainability)
//! OUT/attacks/<defence>/<attack>-<key>/lr<lr>-n<samples>-s<seed>/  one attack and its scores
//! OUT/stages.jsonl             wall time of every stage of every invocation
//! OUT/results.json, report.md, report.html
//! ```
//!
//! Every stage directory is named by a key (a hash of everything that determines its result),
//! so editing one setting reruns only the stages it touches, and a rerun skips finished stages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::align::{read_json, AlignConfig};
use crate::attack::AttackConfig;
use crate::classifier::{Classifier, HarmfulLabel};
use crate::data::encode::PromptFormat;
use crate::data::harmful::{read_harmful_qa, HarmfulQa};
use crate::data::split::{split_disjoint, Duplicates, SplitSpec};
use crate::defend::DefendConfig;
use crate::error::{Error, Result};
use crate::eval::harmfulness::{EvalPrompt, HarmFigures, HarmReport, HarmfulnessConfig};
use crate::eval::stability::TaskResult;
use crate::eval::trainability::TrainabilityReport;
use crate::finetune::FinetuneConfig;
use crate::io::{write_atomic, write_json_atomic};
use crate::modelio::LoadedModel;
use crate::refusal::RefusalCheck;
use crate::train::Interrupt;

/// The demo experiment shipped with the binary (`configs/demo.toml`).
pub const DEMO_TOML: &str = include_str!("../configs/demo.toml");

/// An experiment: one model, aligned (optionally), defended several ways, each defence attacked
/// over a grid of learning rates x sample counts x seeds, everything evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    pub name: String,
    /// The starting model (a directory, GGUF file or embedded name).
    pub model: String,
    /// Harmful QA data (BeaverTails formats; default: the shipped subset) for the defence pairs,
    /// the attacks and the held-out test prompts.
    pub data: Option<PathBuf>,
    /// Seed of the split into test prompts, defence questions and attack questions.
    pub split_seed: u64,
    /// Harmful prompts held out for the harmfulness evaluation (never trained on).
    pub test_prompts: usize,
    /// Attack seeds (data sample and order); one attack per seed in every cell.
    pub seeds: Vec<u64>,
    /// Keep every attacked model on disk (by default each is deleted once scored).
    pub keep_attacked_models: bool,
    /// Align the starting model first (absent: the model is taken as already aligned).
    pub align: Option<AlignConfig>,
    pub pairs: PairsSpec,
    pub classifier: ClassifierSpec,
    /// The defences; the undefended (aligned) model is always included as `none`.
    pub defences: Vec<DefenceSpec>,
    pub attacks: Vec<AttackSpec>,
    pub eval: EvalSpec,
    pub analysis: AnalysisSpec,
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            model: "smollm2-135m-instruct".into(),
            data: None,
            split_seed: 0,
            test_prompts: 100,
            seeds: vec![1, 2, 3],
            keep_attacked_models: false,
            align: None,
            pairs: PairsSpec::default(),
            classifier: ClassifierSpec::default(),
            defences: vec![],
            attacks: vec![],
            eval: EvalSpec::default(),
            analysis: AnalysisSpec::default(),
        }
    }
}

/// The paper's analyses on the defended models (and weight distances to the attacked ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisSpec {
    pub enabled: bool,
    /// Defences analysed (empty: all, `none` included).
    pub on: Vec<String>,
    /// Defence pairs used (0: all), chosen with `seed`.
    pub pairs: usize,
    pub max_len: usize,
    pub format: PromptFormat,
    /// Probe seeds (train/test splits).
    pub probe_seeds: Vec<u64>,
    pub seed: u64,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            on: vec![],
            pairs: 64,
            max_len: 128,
            format: PromptFormat::Chat,
            probe_seeds: vec![1, 2, 3],
            seed: 0,
        }
    }
}

/// One model's analyses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelAnalysis {
    pub defence: String,
    /// Weight distance by layer from the aligned model (absent for `none`).
    pub l2_from_aligned: Option<Vec<crate::analysis::LayerDistance>>,
    /// Mean log-probability of the harmful answers read out at every layer.
    pub logit_lens: Vec<f64>,
    /// PCA of the last layer's mean answer activations: harmful rows first.
    pub pca: crate::analysis::Pca,
    pub pca_harmful: usize,
    pub probes: Vec<crate::analysis::LayerProbe>,
}

/// Defence pairs: harmful questions with their harmful answers, and the aligned model's own
/// refusals as the harmless answers (those the refusal check accepts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsSpec {
    /// Use this pairs file (`prompt`, `harmful`, `harmless`) instead of making pairs.
    pub file: Option<PathBuf>,
    /// Harmful questions set aside for the defences (disjoint from attacks and tests).
    pub questions: usize,
    /// Keep only defence questions of this harm-category group (primary category), for the
    /// generalisation study: defend on one group, attack with another.
    pub group: Option<String>,
    pub tokens: usize,
    pub format: PromptFormat,
}

impl Default for PairsSpec {
    fn default() -> Self {
        Self {
            file: None,
            questions: 120,
            group: None,
            tokens: 48,
            format: PromptFormat::Chat,
        }
    }
}

/// The harmfulness classifier: an existing one (`path`), or one trained in the experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierSpec {
    pub path: Option<PathBuf>,
    pub harmful_label: Option<String>,
    pub encoder: String,
    /// Labelled examples before the split (0: all).
    pub samples: usize,
    pub refusals: usize,
    pub test_fraction: f64,
    pub train: crate::classifier::TrainConfig,
}

impl Default for ClassifierSpec {
    fn default() -> Self {
        let d = crate::classifier::TrainRun::new(
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            String::new(),
        );
        Self {
            path: None,
            harmful_label: None,
            encoder: "all-minilm-l6-v2".into(),
            samples: d.samples,
            refusals: d.refusals,
            test_fraction: d.test_fraction,
            train: d.train,
        }
    }
}

/// One defence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenceSpec {
    pub name: String,
    #[serde(default)]
    pub config: DefendConfig,
}

/// One attack, run at every learning rate x sample count x seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSpec {
    pub name: String,
    pub lrs: Vec<f64>,
    pub samples: Vec<usize>,
    #[serde(default)]
    pub config: AttackConfig,
}

/// What is evaluated, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    pub harmfulness: HarmfulnessConfig,
    /// Stability tasks (empty: none), `stability_limit` items each.
    pub stability_tasks: Vec<String>,
    pub stability_limit: usize,
    pub stability_max_len: usize,
    /// Defences whose stability is measured (empty: all, `none` included).
    pub stability_on: Vec<String>,
    /// Trainability task (viggo, e2e, dart, conv_weather), if any.
    pub trainability_task: Option<String>,
    pub trainability: FinetuneConfig,
    pub trainability_tokens: usize,
    /// Defences whose trainability is measured (empty: all).
    pub trainability_on: Vec<String>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            harmfulness: HarmfulnessConfig::default(),
            stability_tasks: vec![],
            stability_limit: 100,
            stability_max_len: 512,
            stability_on: vec![],
            trainability_task: None,
            trainability: FinetuneConfig::default(),
            trainability_tokens: 64,
            trainability_on: vec![],
        }
    }
}

impl Experiment {
    /// Read and check an experiment file.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let e: Self = crate::io::read_toml(path, "experiment")?;
        e.validate().map_err(|m| Error::file(path, m))?;
        Ok(e)
    }

    /// Parse experiment TOML text (`what` names it in errors).
    pub fn from_toml_str(text: &str, what: &str) -> Result<Self> {
        let e: Self = toml::from_str(text)
            .map_err(|err| Error::file(Path::new(what), format!("invalid experiment: {err}")))?;
        e.validate().map_err(|m| Error::file(Path::new(what), m))?;
        Ok(e)
    }

    /// The settings that cannot work, named.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.seeds.is_empty() {
            return Err("`seeds` is empty: at least one attack seed is needed".into());
        }
        let mut names = std::collections::BTreeSet::new();
        names.insert("none".to_string());
        for d in &self.defences {
            if !valid_name(&d.name) {
                return Err(format!(
                    "defence name {:?}: use letters, digits, '-' and '_'",
                    d.name
                ));
            }
            if !names.insert(d.name.clone()) {
                return Err(format!(
                    "defence name {:?} used twice (`none` is the undefended model)",
                    d.name
                ));
            }
            d.config
                .train
                .validate()
                .map_err(|e| format!("defence {}: {e}", d.name))?;
        }
        let mut anames = std::collections::BTreeSet::new();
        for a in &self.attacks {
            if !valid_name(&a.name) || !anames.insert(a.name.clone()) {
                return Err(format!(
                    "attack name {:?}: must be unique, letters, digits, '-' and '_'",
                    a.name
                ));
            }
            if a.config.method != crate::attack::AttackMethod::Abliterate
                && (a.lrs.is_empty() || a.samples.is_empty())
            {
                return Err(format!(
                    "attack {}: `lrs` and `samples` need at least one value each",
                    a.name
                ));
            }
            if a.lrs.iter().any(|&l| !(l > 0.0 && l.is_finite())) {
                return Err(format!("attack {}: every lr must be positive", a.name));
            }
            if a.samples.contains(&0) {
                return Err(format!(
                    "attack {}: every value of `samples` must be positive",
                    a.name
                ));
            }
        }
        for (what, list) in [
            ("eval.stability_on", &self.eval.stability_on),
            ("eval.trainability_on", &self.eval.trainability_on),
            ("analysis.on", &self.analysis.on),
        ] {
            for n in list {
                if !names.contains(n) {
                    return Err(format!("{what}: no defence named {n:?}"));
                }
            }
        }
        for t in &self.eval.stability_tasks {
            if !crate::eval::stability::TASKS.iter().any(|k| k.0 == t) {
                let known: Vec<&str> = crate::eval::stability::TASKS.iter().map(|k| k.0).collect();
                return Err(format!(
                    "eval.stability_tasks: unknown task {t:?} (known: {})",
                    known.join(", ")
                ));
            }
        }
        if self.test_prompts == 0 {
            return Err("`test_prompts` must be at least 1".into());
        }
        Ok(())
    }

    fn defence_names(&self) -> Vec<String> {
        std::iter::once("none".to_string())
            .chain(self.defences.iter().map(|d| d.name.clone()))
            .collect()
    }

    /// Every attack cell: (attack, lr, samples); abliteration has a single cell.
    pub fn cells(&self) -> Vec<Cell> {
        let mut out = vec![];
        for a in &self.attacks {
            if a.config.method == crate::attack::AttackMethod::Abliterate {
                out.push(Cell {
                    attack: a.name.clone(),
                    lr: 0.0,
                    samples: 0,
                });
                continue;
            }
            for &n in &a.samples {
                for &lr in &a.lrs {
                    out.push(Cell {
                        attack: a.name.clone(),
                        lr,
                        samples: n,
                    });
                }
            }
        }
        out
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// One cell of the attack grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub attack: String,
    pub lr: f64,
    pub samples: usize,
}

impl Cell {
    pub fn label(&self) -> String {
        if self.samples == 0 {
            self.attack.clone()
        } else {
            format!("{} lr {:e} n {}", self.attack, self.lr, self.samples)
        }
    }
    fn dir_name(&self, seed: u64) -> String {
        if self.samples == 0 {
            format!("s{seed}")
        } else {
            format!("lr{:e}-n{}-s{seed}", self.lr, self.samples)
        }
    }
}

/// A short key for a JSON value (first 10 hex digits of its SHA-256).
pub fn key_of(v: &Value) -> String {
    let h = Sha256::digest(v.to_string().as_bytes());
    h.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

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
    pub defence: Vec<(String, String)>,
    pub attack_file: PathBuf,
    pub attack_records: usize,
    pub notes: Vec<String>,
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
    pub cell: Cell,
    pub seed: u64,
    pub harm: HarmFigures,
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
    pub method: String,
    pub model_dir: PathBuf,
    pub train_seconds: Option<f64>,
    pub harm: HarmFigures,
    pub agreement: Option<crate::eval::harmfulness::Agreement>,
    pub stability: Vec<TaskResult>,
    pub trainability: Option<TrainabilityReport>,
}

/// Options of one invocation.
pub struct RunOptions {
    pub cache: PathBuf,
    pub device: Device,
    pub command: String,
}

struct Stages {
    path: PathBuf,
    list: Vec<StageTime>,
    total: usize,
    done: usize,
    t0: Instant,
}

impl Stages {
    fn run<T>(&mut self, name: &str, cached: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.done += 1;
        let t = Instant::now();
        if !cached {
            eprintln!(
                "[{}/{} {:>5.0}s] {name}",
                self.done,
                self.total,
                self.t0.elapsed().as_secs_f64()
            );
        }
        let v = f()?;
        let st = StageTime {
            stage: name.to_string(),
            seconds: t.elapsed().as_secs_f64(),
            cached,
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            use std::io::Write;
            let _ = writeln!(f, "{}", serde_json::to_string(&st).unwrap_or_default());
        }
        self.list.push(st);
        Ok(v)
    }
}

fn load(spec: &str, opts: &RunOptions) -> Result<LoadedModel> {
    crate::modelio::load(spec, &opts.cache, &opts.device)
}

/// The split of the harmful data into test prompts, defence questions and attack questions,
/// disjoint by normalised question; the attack's records are written to a file of their own.
/// `key` names the attack file (`OUT/data/attack-<key>.jsonl`), so splits of other settings
/// never share it.
pub fn split_data(exp: &Experiment, out: &Path, key: &str) -> Result<DataSplit> {
    let path = exp
        .data
        .clone()
        .unwrap_or_else(crate::attack::default_attack_data);
    let loaded = read_harmful_qa(&path)?;
    let mut notes = vec![];
    let total = loaded.records.len();
    let harmful: Vec<HarmfulQa> = loaded.records.into_iter().filter(|r| !r.is_safe).collect();
    notes.push(format!(
        "{}: {total} records ({} skipped), {} with unsafe answers",
        path.display(),
        loaded.skipped.len(),
        harmful.len()
    ));
    let splits = split_disjoint(
        &harmful,
        &[
            SplitSpec::count("test", exp.test_prompts),
            SplitSpec::count("defence", exp.pairs.questions),
            SplitSpec::rest("attack"),
        ],
        Duplicates::KeepFirst,
        exp.split_seed,
    )?;
    let get = |n: &str| splits.get(n).unwrap_or_default().to_vec();
    let (test, mut defence, attack) = (get("test"), get("defence"), get("attack"));
    if let Some(g) = &exp.pairs.group {
        let group: crate::data::HarmGroup = g.parse()?;
        let f = crate::data::filter_group(&defence, group, crate::data::GroupMatch::Primary)?;
        notes.push(format!(
            "defence questions of group {g}: {} kept, {} in other categories left out",
            f.records.len(),
            f.skipped.len()
        ));
        defence = f.records;
    }
    if test.len() < exp.test_prompts
        || (exp.pairs.group.is_none() && defence.len() < exp.pairs.questions)
    {
        return Err(Error::file(
            &path,
            format!(
                "too few distinct harmful questions: {} test and {} defence asked, {} and {} \
                 available",
                exp.test_prompts,
                exp.pairs.questions,
                test.len(),
                defence.len()
            ),
        ));
    }
    let need = exp
        .attacks
        .iter()
        .flat_map(|a| a.samples.iter().copied())
        .max()
        .unwrap_or(0);
    if attack.len() < need {
        notes.push(format!(
            "{} attack questions left for up to {need} samples: the larger attacks use all",
            attack.len()
        ));
    }
    notes.push(format!(
        "{} held-out test prompts, {} defence questions, {} attack questions (disjoint by \
         question; {} repeated questions dropped)",
        test.len(),
        defence.len(),
        attack.len(),
        splits.duplicates_dropped
    ));
    let attack_file = out.join("data").join(format!("attack-{key}.jsonl"));
    std::fs::create_dir_all(out.join("data"))
        .map_err(|e| Error::file(out, format!("cannot create data directory: {e}")))?;
    let lines: String = attack
        .iter()
        .map(|r| {
            format!(
                "{}\n",
                json!({"prompt": r.prompt, "response": r.response, "is_safe": false})
            )
        })
        .collect();
    write_atomic(&attack_file, lines.as_bytes())?;
    let cats = |r: &HarmfulQa| -> Vec<String> {
        r.categories
            .map(|c| c.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default()
    };
    Ok(DataSplit {
        test: test
            .iter()
            .map(|r| EvalPrompt {
                prompt: r.prompt.clone(),
                categories: cats(r),
            })
            .collect(),
        defence: defence
            .iter()
            .map(|r| (r.prompt.clone(), r.response.clone()))
            .collect(),
        attack_file,
        attack_records: attack.len(),
        notes,
    })
}

/// Run (or resume) an experiment in `out`.
pub fn run(exp: &Experiment, out: &Path, opts: &RunOptions) -> Result<Results> {
    exp.validate().map_err(Error::msg)?;
    let t0 = Instant::now();
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create experiment directory: {e}")))?;
    let toml_text = toml::to_string(exp)
        .map_err(|e| Error::msg(format!("cannot write the experiment as TOML: {e}")))?;
    write_atomic(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let names = exp.defence_names();
    let cells = exp.cells();
    let n_attacks = names.len() * cells.len() * exp.seeds.len();
    let mut st = Stages {
        path: out.join("stages.jsonl"),
        list: vec![],
        total: 5 + 4 * names.len() + n_attacks,
        done: 0,
        t0,
    };
    let check = RefusalCheck::load(None)?;

    // 1. The split.
    let split_key = key_of(&json!({"data": exp.data, "seed": exp.split_seed,
        "test": exp.test_prompts, "defence": exp.pairs.questions, "group": exp.pairs.group}));
    let split_path = out.join(format!("split-{split_key}.json"));
    let split: DataSplit = {
        let cached = read_json::<DataSplit>(&split_path).filter(|s| s.attack_file.exists());
        let is_cached = cached.is_some();
        st.run("split the harmful data", is_cached, || match cached {
            Some(s) => Ok(s),
            None => {
                let s = split_data(exp, out, &split_key)?;
                write_json_atomic(&split_path, &s)?;
                Ok(s)
            }
        })?
    };

    // 2. The aligned model.
    let (aligned_dir, align_report) = match &exp.align {
        None => (exp.model.clone(), None),
        Some(cfg) => {
            let key = key_of(&json!({"model": exp.model, "align": cfg}));
            let dir = out.join(format!("align-{key}"));
            let done = dir.join("report.json").exists() && dir.join("DONE").exists();
            let rep = st.run("align the model", done, || {
                if done {
                    return Ok(read_json::<Value>(&dir.join("report.json")));
                }
                let mut m = load(&exp.model, opts)?;
                let r = crate::align::align(&mut m, cfg, &dir, Interrupt::default())?;
                Ok(Some(serde_json::to_value(&r).unwrap_or(Value::Null)))
            })?;
            (dir.join("model").display().to_string(), rep)
        }
    };

    // 3. The classifier.
    let (clf_dir, clf_report) = match &exp.classifier.path {
        Some(p) => (p.clone(), read_json::<Value>(&p.join("report.json"))),
        None => {
            let c = &exp.classifier;
            let key = key_of(&json!({"encoder": c.encoder, "samples": c.samples,
                "refusals": c.refusals, "test_fraction": c.test_fraction, "train": c.train}));
            let dir = out.join(format!("classifier-{key}"));
            let done = dir.join("report.json").exists();
            st.run("train the harmfulness classifier", done, || {
                if !done {
                    let enc = crate::classifier::resolve_encoder(&c.encoder, &opts.cache)?;
                    let mut run = crate::classifier::TrainRun::new(
                        enc,
                        crate::align::default_data_dir(),
                        dir.clone(),
                        opts.command.clone(),
                    );
                    run.samples = c.samples;
                    run.refusals = c.refusals;
                    run.test_fraction = c.test_fraction;
                    run.train = c.train.clone();
                    crate::classifier::run_train(&run, &opts.device, &mut |l| eprintln!("  {l}"))?;
                }
                Ok(())
            })?;
            let rep = read_json::<Value>(&dir.join("report.json"));
            (dir, rep)
        }
    };
    let label: HarmfulLabel = exp
        .classifier
        .harmful_label
        .as_deref()
        .unwrap_or("auto")
        .parse()?;
    let clf = load_classifier(&clf_dir, &label, &opts.device)?;

    // 4. Defence pairs: given, or made from the aligned model's refusals.
    let (pairs_path, pairs_key) = match &exp.pairs.file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::file(p, format!("cannot read pairs: {e}")))?;
            (p.clone(), key_of(&json!({"file": p, "text": text})))
        }
        None => {
            let key = key_of(&json!({"model": aligned_dir, "split": split_key,
                "pairs": exp.pairs}));
            (out.join(format!("pairs-{key}.jsonl")), key)
        }
    };
    let n_pairs = {
        let done = pairs_path.exists();
        st.run("defence pairs (the aligned model's refusals)", done, || {
            if !done {
                let m = load(&aligned_dir, opts)?;
                let recs: Vec<HarmfulQa> = split
                    .defence
                    .iter()
                    .map(|(p, r)| HarmfulQa {
                        prompt: p.clone(),
                        response: r.clone(),
                        categories: None,
                        is_safe: false,
                        refusal: None,
                    })
                    .collect();
                let (pairs, rejected) = crate::align::make_refusal_pairs(
                    &m,
                    &recs,
                    &check,
                    exp.pairs.format,
                    exp.pairs.tokens,
                    16,
                )?;
                eprintln!(
                    "  {} pairs; {rejected} answers the refusal check did not accept left out",
                    pairs.len()
                );
                if pairs.is_empty() {
                    return Err(Error::msg(
                        "the aligned model refused none of the defence questions: no pairs \
                         (is the model aligned?)",
                    ));
                }
                let text: String = pairs.iter().map(|p| format!("{p}\n")).collect();
                write_atomic(&pairs_path, text.as_bytes())?;
            }
            Ok(())
        })?;
        std::fs::read_to_string(&pairs_path)
            .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    };

    // 5. Defences.
    let mut model_dirs: BTreeMap<String, (String, String, Option<f64>)> = BTreeMap::new();
    model_dirs.insert("none".into(), (aligned_dir.clone(), "none".into(), None));
    for d in &exp.defences {
        let key = key_of(&json!({"model": aligned_dir, "pairs": pairs_key, "defend": d.config}));
        let dir = out.join("defences").join(format!("{}-{key}", d.name));
        let done = dir.join("DONE").exists();
        st.run(&format!("defence {}", d.name), done, || {
            if !done {
                let mut m = load(&aligned_dir, opts)?;
                crate::defend::defend(&mut m, &pairs_path, &d.config, &dir, Interrupt::default())?;
            }
            Ok(())
        })?;
        let secs = read_json::<Value>(&dir.join("DONE")).and_then(|v| v["seconds"].as_f64());
        model_dirs.insert(
            d.name.clone(),
            (
                dir.join("model").display().to_string(),
                d.config.method.to_string(),
                secs,
            ),
        );
    }

    // 6. Pre-attack evaluations.
    let harm_cfg = &exp.eval.harmfulness;
    let mut defence_results = vec![];
    for name in &names {
        let (mdir, method, secs) = model_dirs[name].clone();
        let edir = out.join("eval").join(name);
        let hkey = key_of(&json!({"model": mdir, "split": split_key, "eval": harm_cfg,
            "classifier": clf_dir}));
        let hdir = edir.join(format!("harm-{hkey}"));
        let harm: HarmReport = {
            let cached = read_json::<HarmReport>(&hdir.join("harmfulness.json"));
            let c = cached.is_some();
            st.run(&format!("harmfulness of {name}"), c, || match cached {
                Some(r) => Ok(r),
                None => {
                    let m = load(&mdir, opts)?;
                    crate::eval::harmfulness::evaluate(
                        &m,
                        &split.test,
                        "held-out test prompts",
                        harm_cfg,
                        &check,
                        Some(&clf),
                        &hdir,
                    )
                }
            })?
        };
        let mut stability = vec![];
        let wants = |list: &Vec<String>| list.is_empty() || list.contains(name);
        if !exp.eval.stability_tasks.is_empty() && wants(&exp.eval.stability_on) {
            let skey = key_of(&json!({"model": mdir, "tasks": exp.eval.stability_tasks,
                "limit": exp.eval.stability_limit, "max_len": exp.eval.stability_max_len,
                "seed": exp.split_seed}));
            let sdir = edir.join(format!("stability-{skey}"));
            let cached = read_json::<Value>(&sdir.join("stability.json"))
                .and_then(|v| serde_json::from_value::<Vec<TaskResult>>(v["tasks"].clone()).ok());
            let c = cached.is_some();
            stability = st.run(&format!("stability of {name}"), c, || match cached {
                Some(r) => Ok(r),
                None => {
                    let m = load(&mdir, opts)?;
                    crate::eval::run_stability(
                        &m,
                        &exp.eval.stability_tasks,
                        exp.eval.stability_limit,
                        exp.split_seed,
                        exp.eval.stability_max_len,
                        8,
                        &sdir,
                    )
                }
            })?;
        }
        let mut trainability = None;
        if let Some(task) = &exp.eval.trainability_task {
            if wants(&exp.eval.trainability_on) {
                let ft = &exp.eval.trainability;
                let key = key_of(&json!({"model": mdir, "task": task, "ft": ft,
                    "tokens": exp.eval.trainability_tokens}));
                let tdir = edir.join(format!("trainability-{key}"));
                let tpath = tdir.join("trainability.json");
                let cached = read_json::<TrainabilityReport>(&tpath);
                let c = cached.is_some();
                trainability = Some(st.run(&format!("trainability of {name}"), c, || {
                    match cached {
                        Some(r) => Ok(r),
                        None => {
                            let mut m = load(&mdir, opts)?;
                            let r = crate::eval::trainability::trainability(
                                &mut m,
                                task,
                                ft,
                                exp.eval.trainability_tokens,
                                &tdir,
                                Interrupt::default(),
                            )?;
                            // The fine-tuned model is not needed again.
                            let _ = std::fs::remove_dir_all(tdir.join("finetune").join("model"));
                            Ok(r)
                        }
                    }
                })?);
            }
        }
        defence_results.push(DefenceResult {
            name: name.clone(),
            method,
            model_dir: PathBuf::from(&mdir),
            train_seconds: secs,
            harm: harm.overall.clone(),
            agreement: harm.agreement.clone(),
            stability,
            trainability,
        });
    }

    // 7. Analyses of the defended models.
    let mut analyses = vec![];
    if exp.analysis.enabled {
        let an = &exp.analysis;
        let pairs = crate::data::pairs::load_pairs_any(&pairs_path)?.records;
        let pairs = crate::analysis::select_pairs(&pairs, an.pairs, an.seed);
        let aligned = load(&aligned_dir, opts)?;
        for name in names
            .iter()
            .filter(|n| an.on.is_empty() || an.on.contains(n))
        {
            let (mdir, _, _) = model_dirs[name].clone();
            let key = key_of(
                &json!({"model": mdir, "aligned": aligned_dir, "pairs": pairs_key,
                "analysis": an}),
            );
            let path = out.join("analysis").join(format!("{name}-{key}.json"));
            let cached = read_json::<ModelAnalysis>(&path);
            let c = cached.is_some();
            let a = st.run(&format!("analyses of {name}"), c, || match cached {
                Some(a) => Ok(a),
                None => {
                    let m = load(&mdir, opts)?;
                    let a = analyse(name, &m, &aligned, &pairs, an)?;
                    write_json_atomic(&path, &a)?;
                    Ok(a)
                }
            })?;
            analyses.push(a);
        }
    }

    // 8. Attacks.
    let mut attack_results = vec![];
    for name in &names {
        let (mdir, _, _) = model_dirs[name].clone();
        // Loaded once, when the first attack on it runs; each attack trains a copy.
        let mut defended: Option<LoadedModel> = None;
        for a in &exp.attacks {
            let akey = key_of(
                &json!({"model": mdir, "data": split_key, "attack": a.config,
                "eval": harm_cfg, "classifier": clf_dir}),
            );
            for cell in cells.iter().filter(|c| c.attack == a.name) {
                for &seed in &exp.seeds {
                    let dir = out
                        .join("attacks")
                        .join(name)
                        .join(format!("{}-{akey}", a.name))
                        .join(cell.dir_name(seed));
                    let rpath = dir.join("result.json");
                    let cached = read_json::<AttackResult>(&rpath);
                    let c = cached.is_some();
                    let label = format!("attack {name} with {} seed {seed}", cell.label());
                    let r = st.run(&label, c, || match cached {
                        Some(r) => Ok(r),
                        None => {
                            if defended.is_none() {
                                defended = Some(load(&mdir, opts)?);
                            }
                            let base = defended.as_ref().expect("loaded above");
                            let r = attack_one(
                                name, base, a, cell, seed, &split, exp, &check, &clf, &dir,
                            )?;
                            write_json_atomic(&rpath, &r)?;
                            if !exp.keep_attacked_models {
                                let _ = std::fs::remove_dir_all(dir.join("model"));
                                let _ = std::fs::remove_dir_all(dir.join("adapter"));
                            }
                            Ok(r)
                        }
                    })?;
                    attack_results.push(r);
                }
            }
        }
    }

    let cell_summaries = summarise_cells(&names, &cells, &attack_results);
    let results = Results {
        experiment: exp.clone(),
        out: out.to_path_buf(),
        split_notes: split.notes.clone(),
        align: align_report,
        classifier: clf_report,
        pairs: n_pairs,
        defences: defence_results,
        attacks: attack_results,
        cells: cell_summaries,
        analyses,
        stages: st.list.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        all_stages: std::fs::read_to_string(&st.path)
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str::<StageTime>(l).ok())
                    .collect()
            })
            .unwrap_or_default(),
        environment: crate::train::environment(),
        command: opts.command.clone(),
    };
    write_json_atomic(&out.join("results.json"), &results)?;
    crate::report::write_report(&results, out)?;
    Ok(results)
}

fn load_classifier(dir: &Path, label: &HarmfulLabel, device: &Device) -> Result<Classifier> {
    Classifier::load(dir, label, device)
}

#[allow(clippy::too_many_arguments)]
fn attack_one(
    defence: &str,
    defended: &LoadedModel,
    spec: &AttackSpec,
    cell: &Cell,
    seed: u64,
    split: &DataSplit,
    exp: &Experiment,
    check: &RefusalCheck,
    clf: &Classifier,
    dir: &Path,
) -> Result<AttackResult> {
    let t0 = Instant::now();
    let mut cfg = spec.config.clone();
    cfg.test_prompts = 0; // the experiment's own held-out prompts are used
    cfg.train.seed = seed;
    // Scored in memory; written only when the experiment keeps attacked models.
    cfg.train.save_model = exp.keep_attacked_models;
    if cell.samples > 0 {
        cfg.train.lr = cell.lr;
        cfg.samples = cell.samples;
    }
    let mut m = defended.deep_clone()?;
    let rep = crate::attack::attack(
        &mut m,
        &split.attack_file,
        &cfg,
        dir,
        0,
        Interrupt::default(),
    )?;
    let harm = crate::eval::harmfulness::evaluate(
        &m,
        &split.test,
        "held-out test prompts",
        &exp.eval.harmfulness,
        check,
        Some(clf),
        &dir.join("harm"),
    )?;
    let l2_from_defended = if Some(&seed) == exp.seeds.first() {
        Some(crate::analysis::l2_by_layer(
            &defended.params,
            &m.params,
            m.config.num_layers,
        )?)
    } else {
        None
    };
    Ok(AttackResult {
        defence: defence.to_string(),
        cell: cell.clone(),
        seed,
        harm: harm.overall,
        l2_from_defended,
        final_loss: rep
            .train
            .as_ref()
            .and_then(|t| t.final_terms.get("loss").copied()),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// L2 distance from the aligned model, logit lens, PCA and probes of one model.
pub fn analyse(
    name: &str,
    m: &LoadedModel,
    aligned: &LoadedModel,
    pairs: &[crate::data::pairs::Pair],
    an: &AnalysisSpec,
) -> Result<ModelAnalysis> {
    use crate::analysis::{self, Pool};
    let l2 = if name == "none" {
        None
    } else {
        Some(analysis::l2_by_layer(
            &aligned.params,
            &m.params,
            m.config.num_layers,
        )?)
    };
    let samples = analysis::encode_samples(m, pairs, an.format, an.max_len)?;
    let lens = analysis::logit_lens(m, &samples.harmful, 8)?;
    let acts_h = analysis::mean_activations(m, &samples.harmful, None, Pool::Answer, 8)?;
    let acts_s = analysis::mean_activations(m, &samples.harmless, None, Pool::Answer, 8)?;
    let last = acts_h.len() - 1;
    let mut rows = acts_h[last].clone();
    rows.extend(acts_s[last].iter().cloned());
    let pca = analysis::pca(&rows, 2)?;
    let probes = analysis::probes_by_layer(&acts_h, &acts_s, &an.probe_seeds)?;
    Ok(ModelAnalysis {
        defence: name.to_string(),
        l2_from_aligned: l2,
        logit_lens: lens,
        pca,
        pca_harmful: acts_h[last].len(),
        probes,
    })
}

/// Per (defence, cell): the per-seed figures' mean and 95% interval.
pub fn summarise_cells(
    defences: &[String],
    cells: &[Cell],
    results: &[AttackResult],
) -> Vec<CellSummary> {
    let mut out = vec![];
    for d in defences {
        for c in cells {
            let rs: Vec<&AttackResult> = results
                .iter()
                .filter(|r| &r.defence == d && &r.cell == c)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let pick = |f: &dyn Fn(&HarmFigures) -> Option<f64>| -> Option<SeedMean> {
                let xs: Option<Vec<f64>> = rs.iter().map(|r| f(&r.harm)).collect();
                xs.map(|x| seed_mean(&x))
            };
            out.push(CellSummary {
                defence: d.clone(),
                cell: c.clone(),
                harm: pick(&|h| h.mean_score.map(|e| e.mean)),
                harmful_rate: pick(&|h| h.harmful_rate.map(|e| e.mean)),
                refusal: seed_mean(
                    &rs.iter()
                        .map(|r| r.harm.refusal_rate.mean)
                        .collect::<Vec<_>>(),
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_mean_uses_student_t() {
        let m = seed_mean(&[0.2, 0.4, 0.6]);
        assert!((m.mean - 0.4).abs() < 1e-12);
        // sd 0.2, se 0.2/sqrt(3), t(2) = 4.303
        let half = 4.303 * 0.2 / 3f64.sqrt();
        assert!((m.ci95.0 - (0.4 - half)).abs() < 1e-9);
        assert!((m.ci95.1 - (0.4 + half)).abs() < 1e-9);
        let one = seed_mean(&[0.5]);
        assert_eq!(one.ci95, (0.5, 0.5));
        assert!(seed_mean(&[]).mean.is_nan());
    }

    #[test]
    fn demo_config_parses_and_validates() {
        let e = Experiment::from_toml_str(DEMO_TOML, "configs/demo.toml").unwrap();
        assert!(e.seeds.len() >= 3, "the demo runs at least 3 seeds");
        assert!(e.defences.len() >= 3, "RepNoise and at least two baselines");
        let cells = e.cells();
        let lrs: std::collections::BTreeSet<String> =
            cells.iter().map(|c| format!("{:e}", c.lr)).collect();
        let ns: std::collections::BTreeSet<usize> = cells.iter().map(|c| c.samples).collect();
        assert!(lrs.len() >= 2 && ns.len() >= 2);
    }

    #[test]
    fn shipped_experiment_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("paper") || name == "demo.toml" {
                Experiment::from_toml(&e.path()).unwrap_or_else(|err| panic!("{name}: {err}"));
                n += 1;
            }
        }
        assert!(n >= 6, "{n} experiment configs");
    }

    #[test]
    fn bad_experiments_are_named() {
        let e = Experiment::from_toml_str("seeds = []", "x.toml").unwrap_err();
        assert!(e.to_string().contains("seeds"), "{e}");
        let e = Experiment::from_toml_str("[[defences]]\nname = \"none\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        let e = Experiment::from_toml_str("colour = 1", "x.toml").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Experiment::from_toml_str(
            "[[attacks]]\nname = \"a\"\nlrs = [1e-4]\nsamples = [0]\n",
            "x.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("samples"), "{e}");
    }

    #[test]
    fn keys_change_with_any_setting() {
        let a = key_of(&json!({"lr": 1e-4, "n": 8}));
        let b = key_of(&json!({"lr": 1e-4, "n": 16}));
        assert_ne!(a, b);
        assert_eq!(a, key_of(&json!({"lr": 1e-4, "n": 8})));
        assert_eq!(a.len(), 10);
    }
}
