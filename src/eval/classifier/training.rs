//! Training the judge: fine-tuning the encoder with a head, or a head on frozen features, and the
//! whole `classifier train` run (data, training, calibration, report).
//!
//! Over 700 lines because the whole run is here, in its order. Both ways of training run on the
//! shared loop (`crate::train::train_any`, the judge as a [`Trainee`]), in `OUT/train/`: run
//! directory, `metrics.jsonl`, checkpoints and resume as every other training.

use super::*;
use crate::data::encode::{length_order, Longest};
use crate::train::{train_any, Interrupt, RunDir, StepLoss, TrainSummary, Trainee};
use crate::util::error::{check_at_least_one, check_positive};

/// Fine-tuning settings. One source of truth for the defaults: [`TrainConfig::default`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Peak learning rate of the encoder (and pooler).
    pub lr: f64,
    /// Peak learning rate of the freshly initialised classification layer.
    pub head_lr: f64,
    pub batch_size: usize,
    /// Token limit per training text (and the saved classifier's scoring limit).
    pub max_len: usize,
    /// Linear warm-up over this fraction of the steps, then linear decay to 0.
    pub warmup_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Train only the pooler and the classification layer, on the frozen encoder's features
    /// computed once (fast: one encoder pass over the data; for short CPU runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_encoder: bool,
    /// Which features of the last hidden states the head reads: `cls` (the `[CLS]` state, as
    /// `BertForSequenceClassification`) or `mean` (the mean over real tokens, as
    /// sentence-transformers encoders such as all-MiniLM-L6-v2 were trained). Absent:
    /// [`TrainConfig::pooling`] decides (`mean` with `freeze_encoder`, else `cls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// The hidden states pooled are the average of the top this many layers' outputs (1: the
    /// last hidden states). With a frozen all-MiniLM-L6-v2, the mean over the last 3 layers
    /// separates harmful answers better than the last layer alone (docs/EVALUATION.md).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub pool_layers: usize,
}

pub(super) fn one() -> usize {
    1
}

pub(super) fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 2,
            lr: 5e-5,
            head_lr: 1e-3,
            batch_size: 16,
            max_len: 128,
            warmup_fraction: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 0,
            freeze_encoder: false,
            pooling: None,
            pool_layers: 1,
        }
    }
}

impl TrainConfig {
    /// The features the head reads: [`TrainConfig::pooling`] of [`TrainConfig::pool_layers`].
    pub fn readout(&self) -> Readout {
        Readout {
            pooling: self.pooling(),
            layers: self.pool_layers,
        }
    }

    /// The pooling used: the one set, else `mean` for a frozen encoder (its `[CLS]` state is
    /// not a sentence representation for a mean-pooled sentence encoder: held-out AUROC 0.75
    /// against 0.9+ with the mean, docs/EVALUATION.md) and `cls` for full fine-tuning (as
    /// `BertForSequenceClassification`).
    pub fn pooling(&self) -> Pooling {
        self.pooling.unwrap_or(if self.freeze_encoder {
            Pooling::Mean
        } else {
            Pooling::Cls
        })
    }

    pub fn validate(&self) -> Result<()> {
        check_positive("lr", self.lr)?;
        check_positive("head-lr", self.head_lr)?;
        check_at_least_one("epochs", self.epochs)?;
        check_at_least_one("batch-size", self.batch_size)?;
        if self.pool_layers == 0 {
            return Err(Error::setting(
                "pool-layers",
                0,
                "must be at least 1 (1: the last hidden states)",
            ));
        }
        if self.max_len < 8 {
            return Err(Error::setting(
                "max-len",
                self.max_len,
                "must be at least 8",
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return Err(Error::setting(
                "warmup-fraction",
                self.warmup_fraction,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
}

/// Names of the classification layer's tensors (trained at `head_lr`).
pub(super) fn is_head(name: &str) -> bool {
    name.starts_with("classifier.")
}

/// An untrained classifier: the encoder of `ck` with its pooler (random when the checkpoint has
/// none) and a fresh two-class head, seeded: `{0: harmless, 1: harmful}` for harmfulness,
/// `{0: non_toxic, 1: toxic}` for toxicity.
pub fn init_from_encoder(
    ck: bert::BertCheckpoint,
    task: Task,
    max_len: usize,
    seed: u64,
    device: &Device,
) -> Result<HarmClassifier> {
    let mut cfg = ck.config;
    cfg.id2label = match task {
        Task::Harmfulness => vec!["harmless".into(), "harmful".into()],
        Task::Toxicity => vec!["non_toxic".into(), "toxic".into()],
    };
    let fresh = bert::random_params(&cfg, true, 2, seed, device)?;
    let mut params = Params::new();
    for (name, var) in ck.params.iter() {
        if !is_head(name) {
            params.insert(name.clone(), var.as_tensor().clone())?;
        }
    }
    for (name, var) in fresh.iter() {
        let new_pooler = name.starts_with("bert.pooler.") && !ck.has_pooler;
        if is_head(name) || new_pooler {
            params.insert(name.clone(), var.as_tensor().clone())?;
        }
    }
    let tokenizer = bert::tokenizer_from_json(&ck.tokenizer_json, &ck.dir.join("tokenizer.json"))?;
    Ok(HarmClassifier {
        max_len: max_len.min(cfg.max_position_embeddings),
        cfg,
        params,
        tokenizer,
        tokenizer_json: ck.tokenizer_json,
        harmful: 1,
        pooling: Pooling::Cls,
        pool_layers: 1,
        input: match task {
            Task::Harmfulness => ClassifierInput::QuestionAnswer,
            Task::Toxicity => ClassifierInput::Text,
        },
        source: ck.dir,
    })
}

/// Mean softmax cross-entropy of the classifier on a batch of rows (labels 1 = harmful), its
/// head reading the features `readout` gives.
pub fn batch_loss(
    net: &Bert,
    rows: &[Vec<u32>],
    labels: &[bool],
    readout: Readout,
) -> Result<Tensor> {
    let (ids, valid) = bert::pad_batch(rows, net.config().pad_token_id, net.device())?;
    let logits = net.classify_pooled(&ids, &valid, readout)?; // [b, 2]
    let targets: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let targets = Tensor::from_vec(targets, labels.len(), net.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

impl TrainConfig {
    /// The shared loop's settings for this run: a linear schedule after the warm-up, clipping
    /// at [`TrainConfig::max_grad_norm`], and, with a frozen encoder, the pooler and head at
    /// `head_lr` (the encoder, when trained, at `lr`; the head at `head_lr`, [`Judge`]).
    pub fn shared(&self) -> crate::train::TrainConfig {
        crate::train::TrainConfig {
            lr: if self.freeze_encoder {
                self.head_lr
            } else {
                self.lr
            },
            schedule: Schedule::Linear,
            warmup_ratio: self.warmup_fraction,
            epochs: self.epochs,
            batch_size: self.batch_size,
            max_steps: None,
            weight_decay: self.weight_decay,
            max_grad_norm: Some(self.max_grad_norm),
            seed: self.seed,
            ..crate::train::TrainConfig::default()
        }
    }
}

/// The judge as a [`Trainee`] of the shared training loop: the encoder with its pooler and
/// classification layer (fine-tuning; the layer at `head_lr`), or, with a frozen encoder, the
/// pooler and the layer alone, read on features computed once.
struct Judge<'a> {
    clf: &'a HarmClassifier,
    /// What is trained and checkpointed: the whole store, or the pooler and the layer (the
    /// same variables as `clf.params`'s).
    store: Params,
    head_lr: f64,
}

impl Trainee for Judge<'_> {
    type Net = Bert;
    fn store(&self) -> &Params {
        &self.store
    }
    fn num_layers(&self) -> usize {
        self.clf.cfg.num_hidden_layers
    }
    fn peak_lr(&self, name: &str, lr: f64) -> f64 {
        if is_head(name) {
            self.head_lr
        } else {
            lr
        }
    }
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Bert> {
        Bert::new(&self.clf.cfg, &self.clf.params, |n| {
            self.store.get(n).is_some() && trainable(n)
        })
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
        let tensors: Vec<(String, Tensor)> = self
            .store
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        crate::model::load::save_safetensors(&dir.join("model.safetensors"), &tensors)
    }
    fn load_final(&self, dir: &Path) -> Result<()> {
        crate::model::tensor_file::TensorFile::open(&dir.join("model.safetensors"))?.set_vars(
            self.store.iter(),
            |name| name.to_string(),
            "the saved classifier",
        )
    }
}

/// The training rows' identity in a run directory's configuration: a digest of every row's
/// token ids and label, so a directory never resumes a run on other data.
fn data_digest(rows: &[Vec<u32>], labels: &[bool]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (r, &l) in rows.iter().zip(labels) {
        h.update((r.len() as u64).to_le_bytes());
        for id in r {
            h.update(id.to_le_bytes());
        }
        h.update([l as u8]);
    }
    format!("{:x}", h.finalize())
}

/// Fine-tune `clf` (encoder, pooler and head) on `train` in the run directory `dir`, on the
/// shared training loop ([`crate::train::train_any`]: seeded batch order, linear warm-up and
/// decay, global-norm clipping, checkpoints, resume, `metrics.jsonl`); with
/// [`TrainConfig::freeze_encoder`], the frozen encoder's features are computed once and only the
/// pooler and the head are trained on them, at `head_lr`.
pub fn train(
    clf: &mut HarmClassifier,
    train: &[Example],
    cfg: &TrainConfig,
    dir: &Path,
) -> Result<TrainSummary> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(Error::msg("no training examples"));
    }
    clf.max_len = cfg.max_len.min(clf.cfg.max_position_embeddings);
    if cfg.pool_layers > clf.cfg.num_hidden_layers {
        return Err(Error::setting(
            "pool-layers",
            cfg.pool_layers,
            format!("the encoder has {} layers", clf.cfg.num_hidden_layers),
        ));
    }
    clf.pooling = cfg.pooling();
    clf.pool_layers = cfg.pool_layers;
    let rows: Vec<Vec<u32>> = train
        .iter()
        .map(|e| clf.encode_pair(&e.question, &e.answer))
        .collect::<Result<_>>()?;
    let labels: Vec<bool> = train.iter().map(|e| e.harmful).collect();
    let shared = cfg.shared();
    let run = RunDir::open(
        dir,
        &serde_json::json!({"classifier": cfg, "train": shared, "examples": rows.len(),
            "data": data_digest(&rows, &labels), "encoder": clf.source}),
    )?;
    let clf = &*clf;
    let readout = clf.readout();
    let terms = |loss: Tensor| -> Result<StepLoss> {
        Ok(StepLoss {
            loss,
            terms: Default::default(),
        })
    };
    // With a frozen encoder: its features, computed once, and only the pooler and the head to
    // train on them; otherwise the whole store.
    let (feats, store) = if cfg.freeze_encoder {
        let frozen = Bert::new(&clf.cfg, &clf.params, |_| false)?;
        let mut store = Params::new();
        for (name, var) in clf.params.iter().filter(|(n, _)| is_pooler_or_head(n)) {
            store.insert(name.clone(), var.as_tensor().clone())?;
        }
        (Some(frozen_features(&frozen, &rows, readout)?), store) // [n, d]
    } else {
        (None, clf.params.clone())
    };
    let judge = Judge {
        clf,
        store,
        head_lr: cfg.head_lr,
    };
    train_any(
        &run,
        &judge,
        rows.len(),
        &shared,
        Interrupt::default(),
        |net, ctx| match &feats {
            Some(feats) => {
                let dev = feats.device();
                let idx: Vec<u32> = ctx.indices.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, ctx.indices.len(), dev)?;
                let logits = net.head(&feats.index_select(&idx, 0)?)?;
                let t: Vec<u32> = ctx.indices.iter().map(|&i| labels[i] as u32).collect();
                let t = Tensor::from_vec(t, ctx.indices.len(), dev)?;
                terms(candle_nn::loss::cross_entropy(&logits, &t)?)
            }
            None => {
                let batch: Vec<Vec<u32>> = ctx.indices.iter().map(|&i| rows[i].clone()).collect();
                let batch_labels: Vec<bool> = ctx.indices.iter().map(|&i| labels[i]).collect();
                terms(batch_loss(net, &batch, &batch_labels, readout)?)
            }
        },
    )
}

pub(super) fn is_pooler_or_head(name: &str) -> bool {
    name.starts_with("bert.pooler.") || is_head(name)
}

/// The frozen encoder's features `[n, d]` of rows of ids (`readout`, no gradients), in input
/// order; batched [`SCORE_BATCH`] rows at a time in order of length (less padding).
pub fn frozen_features(net: &Bert, rows: &[Vec<u32>], readout: Readout) -> Result<Tensor> {
    let order = length_order(rows.iter().map(Vec::len), Longest::Last);
    let mut parts = Vec::with_capacity(rows.len().div_ceil(SCORE_BATCH));
    for chunk in order.chunks(SCORE_BATCH) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].clone()).collect();
        let (ids, valid) = bert::pad_batch(&batch, net.config().pad_token_id, net.device())?;
        parts.push(net.features(&ids, &valid, readout)?.detach()); // [b, d]
    }
    let sorted = Tensor::cat(&parts, 0)?; // [n, d] in length order
    let mut back = vec![0u32; rows.len()];
    for (pos, &i) in order.iter().enumerate() {
        back[i] = pos as u32;
    }
    let back = Tensor::from_vec(back, rows.len(), sorted.device())?;
    Ok(sorted.index_select(&back, 0)?)
}

/// P(harmful) on labelled examples, and the metrics (trivial answers scored 0, as always).
pub fn evaluate(clf: &HarmClassifier, examples: &[Example]) -> Result<(Scores, Metrics)> {
    let pairs: Vec<(&str, &str)> = examples
        .iter()
        .map(|e| (e.question.as_str(), e.answer.as_str()))
        .collect();
    let scores = clf.score(&pairs)?;
    let labels: Vec<bool> = examples.iter().map(|e| e.harmful).collect();
    let m = metrics(&scores.p_harmful, &labels, 0.5);
    Ok((scores, m))
}

/// What `repnoise classifier train` does, resolved.
#[derive(Clone, Debug, Serialize)]
pub struct TrainRun {
    /// Encoder directory (already fetched when it was the embedded name).
    pub encoder: PathBuf,
    pub data_dir: PathBuf,
    pub out: PathBuf,
    pub task: Task,
    /// At most this many examples before the split (0 = all).
    pub samples: usize,
    /// Safety-Tuned LLaMAs refusals added as harmless examples.
    pub refusals: usize,
    /// Harmfulness: add the BeaverTails disjoint attack set ([`disjoint_path`]; `is_safe`
    /// false = harmful).
    pub disjoint: bool,
    /// At most this many disjoint-set answers (a seeded sample; 0 = all).
    pub disjoint_samples: usize,
    /// Harmfulness: add XSTest's human-labelled answers (`data_dir/xstest`, every completion
    /// file but [`TrainRun::xstest_holdout`]; labels by [`xstest_label`]).
    pub xstest: bool,
    /// XSTest completion files (`gpt4`, `llama2orig`, `llama2new`, `mistralguard`) left out of
    /// training; the judge is calibrated on each ([`Calibration`]).
    pub xstest_holdout: Vec<String>,
    /// Questions whose examples (same [`crate::data::normalize_question`]) are dropped before
    /// the split, from every source: the experiment's test and validation prompts, so the judge
    /// never trains or is tested on them.
    pub exclude_questions: Vec<String>,
    pub test_fraction: f64,
    pub train: TrainConfig,
    /// The command line, recorded in the report.
    pub command: String,
}

/// The XSTest completion file [`TrainRun::new`] holds out: the only one with more than one
/// harmful answer (7 full compliances to unsafe prompts; gpt4 has 1, the Llama-2 files none),
/// so the held-out AUROC has positives.
pub const DEFAULT_XSTEST_HOLDOUT: &str = "mistralguard";

/// [`TrainRun::disjoint_samples`] of [`TrainRun::new`].
pub const DEFAULT_DISJOINT_SAMPLES: usize = 1000;

impl TrainRun {
    /// Defaults for everything but the paths and the command.
    pub fn new(encoder: PathBuf, data_dir: PathBuf, out: PathBuf, command: String) -> Self {
        Self {
            encoder,
            data_dir,
            out,
            task: Task::Harmfulness,
            samples: 0,
            refusals: 500,
            disjoint: true,
            disjoint_samples: DEFAULT_DISJOINT_SAMPLES,
            xstest: true,
            xstest_holdout: vec![DEFAULT_XSTEST_HOLDOUT.into()],
            exclude_questions: vec![],
            test_fraction: 0.2,
            train: TrainConfig::default(),
            command,
        }
    }
}

/// `report.json` beside a trained classifier.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub command: String,
    pub encoder: String,
    pub task: Task,
    pub seed: u64,
    pub config: TrainConfig,
    pub samples: usize,
    pub refusals: usize,
    /// The pooling the classifier was trained and scores with.
    pub pooling: Pooling,
    /// The top layers whose hidden states it averages before pooling.
    pub pool_layers: usize,
    /// Disjoint-set cap (0 = all; absent when the set was not used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disjoint_samples: Option<usize>,
    /// XSTest completion files trained on.
    pub xstest_train: Vec<String>,
    /// XSTest completion files left out of training (calibrated on).
    pub xstest_holdout: Vec<String>,
    /// XSTest partial refusals to unsafe prompts left out of training.
    pub xstest_partial_left_out: usize,
    /// Distinct questions excluded ([`TrainRun::exclude_questions`]).
    pub excluded_questions: usize,
    /// Examples dropped because their question was excluded.
    pub excluded_examples: usize,
    /// Examples per source, in the training and held-out splits.
    pub sources: std::collections::BTreeMap<String, SourceCounts>,
    pub test_fraction: f64,
    pub train_examples: usize,
    pub train_harmful: usize,
    pub test_examples: usize,
    pub test_harmful: usize,
    pub train_questions: usize,
    pub test_questions: usize,
    /// Test answers that were empty or one word (scored 0).
    pub test_trivial: usize,
    pub held_out: Metrics,
    /// Toxicity: Pearson correlation of the held-out P(toxic) with the texts' Perspective
    /// toxicity scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out_pearson: Option<f64>,
    /// Toxicity: mean P(toxic) of DecodingTrust's `refusal` texts
    /// (`decoding_trust_with_refusals_train.json`, without the prompt they echo,
    /// [`refusal_body`]: harmless continuations and refusals written for the defence), a check
    /// on texts the classifier never saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusals_mean_p_toxic: Option<f64>,
    pub final_loss: f64,
    pub train_seconds: f64,
    /// Harmfulness: the judge's figures on its held-out split and on each held-out XSTest file,
    /// beside the keyword refusal check's agreement with XSTest's human labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    pub environment: serde_json::Value,
}

/// Examples of one source in the two splits.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceCounts {
    pub train: usize,
    pub train_harmful: usize,
    pub test: usize,
    pub test_harmful: usize,
    /// Refusals among them (both splits).
    pub refusals: usize,
}

pub(super) fn source_counts(
    train: &[Example],
    test: &[Example],
) -> std::collections::BTreeMap<String, SourceCounts> {
    let mut out: std::collections::BTreeMap<String, SourceCounts> = Default::default();
    for (set, is_test) in [(train, false), (test, true)] {
        for e in set {
            let c = out.entry(e.source.clone()).or_default();
            match (is_test, e.harmful) {
                (false, h) => {
                    c.train += 1;
                    c.train_harmful += h as usize;
                }
                (true, h) => {
                    c.test += 1;
                    c.test_harmful += h as usize;
                }
            }
            c.refusals += e.refusal as usize;
        }
    }
    out
}

/// The labelled examples of a harmfulness run before the split: the Gamma-Guard BeaverTails
/// subset and refusals ([`shipped_examples`]), the disjoint set ([`disjoint_examples`]) and
/// XSTest's answers ([`xstest_examples`], all files but the held-out ones), with the XSTest
/// files used and the partial refusals left out. Exclusion is not applied here.
pub fn harmfulness_pool(run: &TrainRun, seed: u64) -> Result<(Vec<Example>, Vec<String>, usize)> {
    let mut all = shipped_examples(&run.data_dir, run.refusals, seed)?;
    if run.disjoint {
        all.extend(disjoint_examples(
            &disjoint_path(&run.data_dir),
            run.disjoint_samples,
            seed,
        )?);
    }
    let mut used = vec![];
    let mut left_out = 0;
    if run.xstest {
        let dir = run.data_dir.join("xstest");
        for name in crate::data::xstest::COMPLETION_FILES {
            if run.xstest_holdout.iter().any(|h| h == name) {
                continue;
            }
            let (ex, n) = xstest_examples(&dir, name)?;
            all.extend(ex);
            left_out += n;
            used.push(name.to_string());
        }
    }
    Ok((all, used, left_out))
}

/// The training and held-out examples of a run: its sources, minus the excluded questions,
/// sampled and split by question; with the XSTest files trained on, the partial refusals left
/// out and the number of examples excluded.
pub struct Prepared {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    pub xstest_train: Vec<String>,
    pub xstest_partial_left_out: usize,
    pub excluded_examples: usize,
}

/// Build the examples of `run` ([`Prepared`]).
pub fn prepare_examples(run: &TrainRun) -> Result<Prepared> {
    let seed = run.train.seed;
    let (all, xstest_train, xstest_partial_left_out) = match run.task {
        Task::Harmfulness => {
            let dir = run.data_dir.join("xstest");
            for h in &run.xstest_holdout {
                crate::data::xstest::check_completion_name(&dir, h, "xstest-holdout")?;
            }
            harmfulness_pool(run, seed)?
        }
        Task::Toxicity => {
            let path = run.data_dir.join("decoding_trust/training_dataset.jsonl");
            let ex = toxicity_examples(&crate::data::toxicity::read_decoding_trust(&path)?.records);
            if ex.is_empty() {
                return Err(Error::file(&path, "no text carries a `toxicity` score"));
            }
            (ex, vec![], 0)
        }
    };
    let (kept, excluded_examples) = exclude_questions(all, &run.exclude_questions);
    if kept.is_empty() {
        return Err(Error::msg(
            "no examples are left after excluding the experiment's questions",
        ));
    }
    let (train, test) = split_examples(&kept, run.samples, run.test_fraction, seed)?;
    Ok(Prepared {
        train,
        test,
        xstest_train,
        xstest_partial_left_out,
        excluded_examples,
    })
}

pub(super) fn distinct_questions(xs: &[Example]) -> usize {
    xs.iter()
        .map(|e| crate::data::normalize_question(&e.question))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// The XSTest answer files a run leaves out of training (its calibration sets): the named
/// hold-out files, or all of them when XSTest is not trained on at all.
pub(super) fn xstest_left_out(run: &TrainRun) -> Vec<String> {
    if run.xstest {
        run.xstest_holdout.clone()
    } else {
        crate::data::xstest::COMPLETION_FILES
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// Train a classifier end to end: data, split, fine-tuning, held-out evaluation, then save the
/// classifier, `test.jsonl` (held-out examples with their scores) and `report.json` in `out`.
pub fn run_train(
    run: &TrainRun,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<TrainReport> {
    run.train.validate()?;
    let seed = run.train.seed;
    let dt = run.data_dir.join("decoding_trust");
    let prep = prepare_examples(run)?;
    let (train_set, test_set) = (&prep.train, &prep.test);
    if prep.excluded_examples > 0 {
        log(&format!(
            "{} examples dropped: their question is one of the {} excluded",
            prep.excluded_examples,
            run.exclude_questions.len()
        ));
    }
    log(&format!(
        "{} examples: {} train ({} harmful), {} held out ({} harmful), split by question",
        train_set.len() + test_set.len(),
        train_set.len(),
        train_set.iter().filter(|e| e.harmful).count(),
        test_set.len(),
        test_set.iter().filter(|e| e.harmful).count()
    ));
    let ck = bert::load_dir(&run.encoder, device)?;
    let mut clf = init_from_encoder(ck, run.task, run.train.max_len, seed, device)?;
    let t0 = std::time::Instant::now();
    // The training run's directory (`config.json`, `metrics.jsonl`, checkpoints): an
    // interrupted run resumes there.
    let summary = train(&mut clf, train_set, &run.train, &run.out.join("train"))?;
    let final_loss = summary.final_terms.get("loss").copied().unwrap_or(f64::NAN);
    let train_seconds = t0.elapsed().as_secs_f64();
    let (scores, held_out) = evaluate(&clf, test_set)?;
    clf.save(&run.out)?;
    let (mut held_out_pearson, mut refusals_mean_p_toxic) = (None, None);
    if run.task == Task::Toxicity {
        let (p, r): (Vec<f64>, Vec<f64>) = test_set
            .iter()
            .zip(&scores.p_harmful)
            .filter_map(|(e, &p)| Some((p as f64, e.reference?)))
            .unzip();
        held_out_pearson = pearson(&p, &r);
        // A check on texts the classifier never saw; without the file there is no check.
        let path = dt.join("decoding_trust_with_refusals_train.json");
        let records = match crate::data::toxicity::read_decoding_trust(&path) {
            Ok(l) => l.records,
            Err(e) => {
                log(&format!("no refusal check: {e}"));
                vec![]
            }
        };
        let refusals: Vec<(String, String)> = records
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.prompt.text,
                    refusal_body(r.refusal.as_deref()?).to_string(),
                ))
            })
            .collect();
        if !refusals.is_empty() {
            let ps = clf.score(&refusals)?.p_harmful;
            refusals_mean_p_toxic =
                Some(ps.iter().map(|&p| p as f64).sum::<f64>() / ps.len() as f64);
        }
        log(&format!(
            "held-out Pearson r with Perspective toxicity {:?}; mean P(toxic) of {} harmless \
             continuations and refusals {:?}",
            held_out_pearson,
            refusals.len(),
            refusals_mean_p_toxic
        ));
    }
    let lines: String = test_set
        .iter()
        .zip(&scores.p_harmful)
        .map(|(e, p)| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": e.question, "response": e.answer,
                    "harmful": e.harmful, "p_harmful": p, "reference": e.reference,
                    "source": e.source, "refusal": e.refusal})
            )
        })
        .collect();
    crate::util::io::write_atomic(&run.out.join("test.jsonl"), lines.as_bytes())?;
    let calibration = if run.task == Task::Harmfulness {
        let mut scorer =
            |pairs: &[(String, String)]| -> Result<Vec<f32>> { Ok(clf.score(pairs)?.p_harmful) };
        let c = calibrate(
            &mut scorer,
            Some((test_set.as_slice(), scores.p_harmful.as_slice())),
            &run.data_dir.join("xstest"),
            &xstest_left_out(run),
            &run.out.display().to_string(),
        )?;
        for r in &c.rows {
            log(&format!(
                "calibration, {}: n {} AUROC {} accuracy {:.4}, mean P(harmful) of {} refusals {}",
                r.set,
                r.n,
                r.auroc.map_or("n/a".into(), |a| format!("{a:.4}")),
                r.accuracy,
                r.refusals,
                r.refusal_mean_p.map_or("n/a".into(), |p| format!("{p:.4}"))
            ));
        }
        Some(c)
    } else {
        None
    };
    let report = TrainReport {
        command: run.command.clone(),
        encoder: run.encoder.display().to_string(),
        task: run.task,
        seed,
        config: run.train.clone(),
        samples: run.samples,
        refusals: if run.task == Task::Harmfulness {
            run.refusals
        } else {
            0
        },
        pooling: clf.pooling,
        pool_layers: clf.pool_layers,
        disjoint_samples: (run.task == Task::Harmfulness && run.disjoint)
            .then_some(run.disjoint_samples),
        xstest_train: prep.xstest_train.clone(),
        xstest_holdout: if run.task == Task::Harmfulness {
            xstest_left_out(run)
        } else {
            vec![]
        },
        xstest_partial_left_out: prep.xstest_partial_left_out,
        excluded_questions: run
            .exclude_questions
            .iter()
            .map(|q| crate::data::normalize_question(q))
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        excluded_examples: prep.excluded_examples,
        sources: source_counts(train_set, test_set),
        test_fraction: run.test_fraction,
        train_examples: train_set.len(),
        train_harmful: train_set.iter().filter(|e| e.harmful).count(),
        test_examples: test_set.len(),
        test_harmful: test_set.iter().filter(|e| e.harmful).count(),
        train_questions: distinct_questions(train_set),
        test_questions: distinct_questions(test_set),
        test_trivial: scores.trivial_count(),
        held_out,
        held_out_pearson,
        refusals_mean_p_toxic,
        final_loss,
        train_seconds,
        calibration,
        environment: crate::train::environment(),
    };
    // The distinct questions trained and held out, for an experiment's overlap audit.
    let distinct = |xs: &[Example]| -> Vec<String> {
        let mut v: Vec<String> = xs.iter().map(|e| e.question.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    crate::util::io::write_json_atomic(
        &run.out.join("questions.json"),
        &serde_json::json!({"train": distinct(train_set), "heldout": distinct(test_set)}),
    )?;
    crate::util::io::write_json_atomic(&run.out.join("report.json"), &report)?;
    Ok(report)
}

/// Resolve `--encoder`: a BERT directory, or the embedded `all-minilm-l6-v2` (fetched into
/// `cache` once).
pub fn resolve_encoder(spec: &str, cache: &Path) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    match crate::model::assets::asset(spec) {
        Some(a) if a.entry.is_empty() => crate::model::assets::fetch(&a, cache),
        _ => Err(Error::setting(
            "encoder",
            spec,
            "not a directory and not an embedded encoder (embedded: all-minilm-l6-v2)",
        )),
    }
}
