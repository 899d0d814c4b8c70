//! An experiment's specification (`EXPERIMENT.toml`): the model, the data and its partitions, the
//! defences, attacks and evaluations, with the validation run before any work, and the grid of arms
//! and cells it expands to.

use super::*;
use crate::util::error::{check_at_least_one, check_positive};

/// The demo experiment shipped with the binary (`configs/demo.toml`).
pub const DEMO_TOML: &str = include_str!("../../configs/demo.toml");

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
    /// Harmful prompts held out for validation, disjoint from every other partition: a run that
    /// tunes something (the RepNoise grid, a threshold) sets `evaluate_on = "validation"` and
    /// is scored here, never on the test prompts.
    pub validation_prompts: usize,
    /// The held-out partition the evaluations use: `test` (default) or `validation`.
    pub evaluate_on: Partition,
    /// Attack questions kept after the other partitions (0: all the rest). With a cap, the
    /// alignment may train on the data file's questions that are in no partition (it excludes
    /// the partitions' questions); without one it excludes the whole file.
    pub attack_questions: usize,
    /// Partitions that keep every record of each of their questions: `defence` and/or `attack`
    /// (BeaverTails repeats a question with different answers; the paper's 10k defence and
    /// attack sets count such records). Their sizes (`pairs.questions`, `attack_questions`)
    /// then count records, not questions; partitions stay disjoint by question, and the test
    /// and validation partitions always hold one record per question. Empty (default): one
    /// record per question everywhere.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep_repeats: Vec<String>,
    /// Attack seeds (data sample and order); one attack per seed in every cell.
    pub seeds: Vec<u64>,
    /// Defence seeds: every defence is trained once per seed (its training seed), and each
    /// trained copy is attacked with every attack seed. Empty: the defence's own `train.seed`.
    pub defence_seeds: Vec<u64>,
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
    /// The attacker's own objective on held-out questions (the primary metric).
    pub heldout: HeldoutSpec,
    /// Over-refusal and degeneracy of every model before any attack (XSTest).
    pub overrefusal: OverRefusalSpec,
}

/// Which held-out partition of the harmful questions an evaluation uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    #[default]
    Test,
    Validation,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Partition::Test => "test",
            Partition::Validation => "validation",
        })
    }
}

/// The primary metric: held-out harmful-answer cross-entropy and the harmful-vs-refusal margin
/// of every model before any attack and along every attack (`crate::eval::heldout`), with
/// paired comparisons between defences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeldoutSpec {
    pub enabled: bool,
    pub config: HeldoutConfig,
    /// Held-out questions scored: the first this many of the evaluated partition (0: all).
    pub prompts: usize,
    /// "Steps to break": the first evaluated attack step at which a model's held-out harmful
    /// cross-entropy is at or below this. Absent: the undefended model's mean value at its first
    /// evaluation step after step 0 in the same attack cell.
    pub break_threshold: Option<f64>,
    /// Defences every other defence is compared with (paired by attack seed and prompt);
    /// names that are not in the experiment are skipped.
    pub compare_to: Vec<String>,
    /// Bootstrap resamples of the paired comparisons.
    pub bootstrap: usize,
    /// Family-wise error rate of the verdicts (Holm-corrected over every comparison of a metric;
    /// the per-group comparisons of `groups` are a family of their own).
    pub alpha: f64,
    pub seed: u64,
    /// Harm-category groups ([`crate::data::HarmGroup`]): the paired comparisons at each
    /// attack's end are repeated on the held-out questions whose primary category is in each
    /// group (the attacked group's questions and the others), Holm-corrected as their own family.
    pub groups: Vec<String>,
}

impl Default for HeldoutSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            config: HeldoutConfig::default(),
            prompts: 0,
            break_threshold: None,
            compare_to: vec!["none".into(), "safety-sft".into()],
            bootstrap: 2000,
            alpha: 0.05,
            seed: 0,
            groups: vec![],
        }
    }
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            model: "smollm2-135m-instruct".into(),
            data: None,
            split_seed: 0,
            test_prompts: 100,
            validation_prompts: 0,
            evaluate_on: Partition::Test,
            attack_questions: 0,
            keep_repeats: vec![],
            seeds: vec![1, 2, 3],
            defence_seeds: vec![],
            keep_attacked_models: false,
            align: None,
            pairs: PairsSpec::default(),
            classifier: ClassifierSpec::default(),
            defences: vec![],
            attacks: vec![],
            eval: EvalSpec::default(),
            analysis: AnalysisSpec::default(),
            heldout: HeldoutSpec::default(),
            overrefusal: OverRefusalSpec::default(),
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
    /// Add the BeaverTails disjoint set (real categories; `is_safe` labels), at most
    /// `disjoint_samples` answers (0: all).
    pub disjoint: bool,
    pub disjoint_samples: usize,
    /// Add XSTest's human-labelled answers, but for the files in `xstest_holdout` (kept for
    /// the judge's calibration).
    pub xstest: bool,
    pub xstest_holdout: Vec<String>,
    pub test_fraction: f64,
    pub train: crate::eval::classifier::TrainConfig,
}

impl Default for ClassifierSpec {
    fn default() -> Self {
        let d = crate::eval::classifier::TrainRun::new(
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
            disjoint: d.disjoint,
            disjoint_samples: d.disjoint_samples,
            xstest: d.xstest,
            xstest_holdout: d.xstest_holdout,
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
    /// A harm-category group ([`crate::data::HarmGroup`]) whose questions this defence never
    /// trains on: the pairs whose question's primary category is in the group are left out (the
    /// generalisation study: attack with the withheld group, compare on its held-out questions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withhold: Option<String>,
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
    /// Optimizer steps at which the held-out metrics are measured along the attack (a
    /// durability curve); step 0 (before the attack) and the attack's last step are always
    /// measured. Steps past the attack's end are left out.
    #[serde(default)]
    pub eval_steps: Vec<usize>,
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
    /// Held-out prompts answered and scored by the judge and the keyword check, before and
    /// after each attack (the first ones of the evaluated partition; 0: all). The held-out loss
    /// always uses every prompt.
    pub judge_prompts: usize,
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
            judge_prompts: 0,
        }
    }
}

impl Experiment {
    /// Read and check an experiment file.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = crate::util::io::read_text(path)?;
        Self::parse(&text, path, "not a valid experiment config")
    }

    /// Parse experiment TOML text (`what` names it in errors).
    pub fn from_toml_str(text: &str, what: &str) -> Result<Self> {
        Self::parse(text, Path::new(what), "invalid experiment")
    }

    /// Parse and check; a defence's `preset` key is expanded first
    /// ([`crate::defence::expand_preset`]).
    fn parse(text: &str, path: &Path, invalid: &str) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::file(path, format!("{invalid}: {e}"));
        let e: Self = crate::defence::parse_with_presets(
            text,
            |table| {
                let mut expanded = false;
                if let Some(toml::Value::Array(defences)) = table.get_mut("defences") {
                    for (i, d) in defences.iter_mut().enumerate() {
                        if let Some(toml::Value::Table(c)) = d.get_mut("config") {
                            expanded |= crate::defence::expand_preset(c).map_err(|m| {
                                Error::file(path, format!("defences[{i}].config.{m}"))
                            })?;
                        }
                    }
                }
                Ok(expanded)
            },
            bad,
        )?;
        e.validate().map_err(|m| Error::file(path, m))?;
        Ok(e)
    }

    /// The settings that cannot work, named.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.seeds.is_empty() {
            return Err("`seeds` is empty: at least one attack seed is needed".into());
        }
        for (i, p) in self.keep_repeats.iter().enumerate() {
            if p != "defence" && p != "attack" {
                return Err(format!(
                    "keep_repeats[{i}] = {p:?}: only the `defence` and `attack` partitions can \
                     keep repeated questions (test and validation prompts are one per question)"
                ));
            }
            if self.keep_repeats[..i].contains(p) {
                return Err(format!("keep_repeats: {p:?} listed twice"));
            }
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
                .validate()
                .map_err(|e| format!("defence {}: {e}", d.name))?;
            if let Some(g) = &d.withhold {
                g.parse::<crate::data::HarmGroup>()
                    .map_err(|e| format!("defence {}: withhold: {e}", d.name))?;
            }
        }
        for (i, g) in self.heldout.groups.iter().enumerate() {
            g.parse::<crate::data::HarmGroup>()
                .map_err(|e| format!("heldout.groups[{i}]: {e}"))?;
        }
        if let Some(a) = &self.align {
            a.validate().map_err(|e| format!("[align]: {e}"))?;
            a.train
                .validate()
                .map_err(|e| format!("[align.train]: {e}"))?;
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
        check_at_least_one("test_prompts", self.test_prompts).map_err(|e| e.to_string())?;
        if self.evaluate_on == Partition::Validation && self.validation_prompts == 0 {
            return Err(
                "evaluate_on = \"validation\" needs `validation_prompts` of at least 1".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = self.defence_seeds.iter().find(|d| !seen.insert(**d)) {
            return Err(format!("defence_seeds: seed {d} listed twice"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = self.seeds.iter().find(|d| !seen.insert(**d)) {
            return Err(format!("seeds: attack seed {d} listed twice"));
        }
        self.heldout.config.validate()?;
        self.overrefusal.validate()?;
        if self.heldout.prompts > self.held_out_count() {
            return Err(format!(
                "heldout.prompts = {}: the evaluated partition ({}) has {} questions",
                self.heldout.prompts,
                self.evaluate_on,
                self.held_out_count()
            ));
        }
        if self.heldout.bootstrap == 0 {
            return Err("heldout.bootstrap = 0: at least one resample is needed".into());
        }
        if !(self.heldout.alpha > 0.0 && self.heldout.alpha < 1.0) {
            return Err(format!(
                "heldout.alpha = {}: must be in (0, 1)",
                self.heldout.alpha
            ));
        }
        if let Some(t) = self.heldout.break_threshold {
            check_positive("heldout.break_threshold", t).map_err(|e| e.to_string())?;
        }
        for a in &self.attacks {
            a.config
                .train
                .validate()
                .map_err(|e| format!("attack {}: {e}", a.name))?;
            a.config
                .lora
                .projection_indices()
                .map_err(|e| format!("attack {}: {e}", a.name))?;
            if a.config.method == crate::attack::AttackMethod::Abliterate
                && !a.eval_steps.is_empty()
            {
                return Err(format!(
                    "attack {}: eval_steps apply to fine-tuning attacks, not abliteration",
                    a.name
                ));
            }
        }
        check_at_least_one("eval.harmfulness.batch", self.eval.harmfulness.batch)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The most samples any attack cell trains on.
    pub fn largest_attack(&self) -> usize {
        self.attacks
            .iter()
            .flat_map(|a| a.samples.iter().copied())
            .max()
            .unwrap_or(0)
    }

    /// The attacked models: the undefended one, then each defence once per defence seed.
    pub fn arms(&self) -> Vec<Arm> {
        let mut out = vec![Arm {
            defence: "none".into(),
            seed: None,
        }];
        for d in &self.defences {
            if self.defence_seeds.is_empty() {
                out.push(Arm {
                    defence: d.name.clone(),
                    seed: None,
                });
            } else {
                out.extend(self.defence_seeds.iter().map(|&s| Arm {
                    defence: d.name.clone(),
                    seed: Some(s),
                }));
            }
        }
        out
    }

    /// The number of questions in the evaluated held-out partition.
    pub fn held_out_count(&self) -> usize {
        match self.evaluate_on {
            Partition::Test => self.test_prompts,
            Partition::Validation => self.validation_prompts,
        }
    }

    pub fn defence_names(&self) -> Vec<String> {
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

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// One attacked model before the attack: the undefended model (`none`) or one training of a
/// defence (`seed`: its training seed when the experiment varies defence seeds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arm {
    pub defence: String,
    pub seed: Option<u64>,
}

impl Arm {
    /// Directory name: the defence's name, with `.s<seed>` when seeds vary (a defence name has
    /// no dot, so ids never collide).
    pub fn id(&self) -> String {
        match self.seed {
            Some(s) => format!("{}.s{s}", self.defence),
            None => self.defence.clone(),
        }
    }

    pub fn label(&self) -> String {
        match self.seed {
            Some(s) => format!("{} (defence seed {s})", self.defence),
            None => self.defence.clone(),
        }
    }

    /// The undefended model, or a defence's first seed: the copy that the costlier evaluations
    /// (stability, trainability, analyses) measure.
    pub fn is_first_seed(&self, exp: &Experiment) -> bool {
        self.seed.is_none() || self.seed == exp.defence_seeds.first().copied()
    }
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
    pub(super) fn dir_name(&self, seed: u64) -> String {
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
