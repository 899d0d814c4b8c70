//! Attacks: harmful fine-tuning as the paper ran it (full fine-tuning on harmful answers), LoRA,
//! a benign retain set mixed in, harm-category restricted data, and refusal-direction ablation.
//! Every attack runs in a run directory (`crate::train`) and writes the attacked model to
//! `model/` (plus `adapter/` for LoRA), the held-out harmful test prompts to
//! `test_prompts.jsonl` (never trained on), and `report.json`.
//!
//! The loss covers the answer tokens only; `faithful_loss` reproduces the reference attack, whose
//! loss also covered the prompt and the padding (every sequence padded to `max_len`).

pub mod abliterate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::attack::abliterate::{abliterate, AbliterateConfig, AbliterateReport};
use crate::data::categories::{GroupMatch, HarmGroup};
use crate::data::default_data_dir;
use crate::data::encode::{encode_qa, pad_to, EncodeOptions, Encoded, PadSide, PromptFormat};
use crate::data::split::{normalize_question, split_disjoint, Duplicates, SplitSpec};
use crate::data::{filter_group, read_harmful_qa};
use crate::eval::answer::answer_prompts;
use crate::eval::refusal::RefusalCheck;
use crate::model::llama::Llama;
use crate::model::load::{save_hf_dir, LoadedModel};
use crate::train::lora::{Lora, LoraConfig};
use crate::train::objective::sft_loss_with;
use crate::train::{self, Interrupt, RunDir, TrainConfig, TrainSummary};
use crate::util::io::write_json_atomic;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// How the attacker changes the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttackMethod {
    /// Full fine-tuning on harmful answers (the paper's attack).
    #[default]
    Full,
    /// LoRA fine-tuning on harmful answers.
    Lora,
    /// Refusal-direction ablation (no gradient steps).
    Abliterate,
}

impl std::fmt::Display for AttackMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Lora => "lora",
            Self::Abliterate => "abliterate",
        })
    }
}

/// Attack settings (TOML: these fields; `[train]`, `[lora]`, `[abliterate]` tables).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackConfig {
    pub method: AttackMethod,
    pub train: TrainConfig,
    /// Harmful training samples (capped by the data available, with a note).
    pub samples: usize,
    /// Harmful prompts held out for evaluation (`test_prompts.jsonl`); never trained on.
    pub test_prompts: usize,
    pub format: PromptFormat,
    pub max_len: usize,
    /// The reference attack's loss: prompt and padding tokens too (sequences padded to max_len).
    pub faithful_loss: bool,
    /// Train only on this harm-category group (primary category), e.g. for generalisation runs.
    pub group: Option<String>,
    /// Benign QA file (prompt/response; safe records only) mixed into the training data.
    pub retain: Option<PathBuf>,
    /// Benign samples taken from `retain`.
    pub retain_samples: usize,
    pub lora: LoraConfig,
    pub abliterate: AbliterateConfig,
    /// Refusal phrases file for abliteration's layer choice and the evaluation (default list
    /// otherwise).
    pub refusal_phrases: Option<PathBuf>,
    /// Fine-tune without the model's security vector (by default it stays active and frozen).
    /// Left out of a saved config when false, so run directories from before it existed reopen.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_security_vector: bool,
}

impl Default for AttackConfig {
    fn default() -> Self {
        Self {
            method: AttackMethod::Full,
            train: TrainConfig {
                lr: 8e-5,
                epochs: 1,
                batch_size: 4,
                weight_decay: 0.0,
                checkpoint_every: 25,
                ..TrainConfig::default()
            },
            samples: 1000,
            test_prompts: 100,
            format: PromptFormat::Chat,
            max_len: 128,
            faithful_loss: false,
            group: None,
            retain: None,
            retain_samples: 0,
            lora: LoraConfig::default(),
            abliterate: AbliterateConfig::default(),
            refusal_phrases: None,
            ignore_security_vector: false,
        }
    }
}

impl AttackConfig {
    pub fn from_toml(path: &Path) -> Result<Self> {
        crate::util::io::read_toml(path, "attack")
    }
}

/// The default attack data: the shipped BeaverTails subset.
pub fn default_attack_data() -> PathBuf {
    default_data_dir().join("beavertails_subset_gammaguard/prompt_response_classified.csv")
}

/// The attack's data after filtering and splitting.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackData {
    pub train: Vec<(String, String)>,
    pub retain: Vec<(String, String)>,
    pub test_prompts: Vec<String>,
    pub notes: Vec<String>,
}

/// Read, filter (unsafe answers; the group if set), and split into held-out test prompts and a
/// seeded sample of training pairs, disjoint by normalised question.
pub fn attack_data(path: &Path, cfg: &AttackConfig) -> Result<AttackData> {
    let mut notes = vec![];
    let loaded = read_harmful_qa(path)?;
    if !loaded.skipped.is_empty() {
        notes.push(format!(
            "{}: {} records skipped while reading",
            path.display(),
            loaded.skipped.len()
        ));
    }
    let total = loaded.records.len();
    let mut harmful: Vec<_> = loaded.records.into_iter().filter(|r| !r.is_safe).collect();
    notes.push(format!(
        "{}: {total} records, {} with unsafe answers (safe ones left out)",
        path.display(),
        harmful.len()
    ));
    if let Some(g) = &cfg.group {
        let group: HarmGroup = g.parse()?;
        let f = filter_group(&harmful, group, GroupMatch::Primary)?;
        notes.push(format!(
            "group {g}: {} records kept, {} in other categories left out",
            f.records.len(),
            f.skipped.len()
        ));
        harmful = f.records;
    }
    if harmful.len() < 2 {
        return Err(Error::file(
            path,
            "fewer than two records with unsafe answers to attack with",
        ));
    }
    let distinct: std::collections::BTreeSet<String> = harmful
        .iter()
        .map(|r| normalize_question(&r.prompt))
        .collect();
    let test_n = cfg.test_prompts.min(distinct.len() / 2);
    if test_n < cfg.test_prompts {
        notes.push(format!(
            "only {test_n} test prompts held out (asked {}): half the {} distinct questions at most",
            cfg.test_prompts,
            distinct.len()
        ));
    }
    let splits = split_disjoint(
        &harmful,
        &[SplitSpec::count("test", test_n), SplitSpec::rest("pool")],
        Duplicates::KeepFirst,
        cfg.train.seed,
    )?;
    let test_prompts: Vec<String> = splits
        .get("test")
        .unwrap_or_default()
        .iter()
        .map(|r| r.prompt.clone())
        .collect();
    if splits.duplicates_dropped > 0 {
        notes.push(format!(
            "{} records repeating a question left out (one answer per question)",
            splits.duplicates_dropped
        ));
    }
    let pool = splits.get("pool").unwrap_or_default();
    let mut train: Vec<(String, String)> = pool
        .iter()
        .map(|r| (r.prompt.clone(), r.response.clone()))
        .collect();
    if cfg.samples > train.len() {
        notes.push(format!(
            "{} training samples asked, {} available: using all",
            cfg.samples,
            train.len()
        ));
    }
    Rng::new(cfg.train.seed, "attack-samples").shuffle(&mut train);
    train.truncate(cfg.samples);
    let mut retain = vec![];
    if let Some(rp) = &cfg.retain {
        let r = read_harmful_qa(rp)?;
        let held_out: std::collections::BTreeSet<String> =
            test_prompts.iter().map(|p| normalize_question(p)).collect();
        let safe_all: Vec<(String, String)> = r
            .records
            .into_iter()
            .filter(|x| x.is_safe)
            .map(|x| (x.prompt, x.response))
            .collect();
        let n_safe = safe_all.len();
        // A retain record must not teach a held-out test question.
        let mut safe: Vec<(String, String)> = safe_all
            .into_iter()
            .filter(|(p, _)| !held_out.contains(&normalize_question(p)))
            .collect();
        if safe.len() < n_safe {
            notes.push(format!(
                "{} retain records asking a held-out test question left out",
                n_safe - safe.len()
            ));
        }
        if safe.is_empty() {
            return Err(Error::file(rp, "no safe records to use as the retain set"));
        }
        if cfg.retain_samples > safe.len() {
            notes.push(format!(
                "{} retain samples asked, {} available: using all",
                cfg.retain_samples,
                safe.len()
            ));
        }
        Rng::new(cfg.train.seed, "attack-retain").shuffle(&mut safe);
        safe.truncate(cfg.retain_samples);
        retain = safe;
    } else if cfg.retain_samples > 0 {
        return Err(Error::setting(
            "retain_samples",
            cfg.retain_samples,
            "needs a retain file (`retain`)",
        ));
    }
    notes.push(format!(
        "{} harmful training samples, {} benign retain samples, {} held-out test prompts",
        train.len(),
        retain.len(),
        test_prompts.len()
    ));
    Ok(AttackData {
        train,
        retain,
        test_prompts,
        notes,
    })
}

/// Tokenise training pairs; with `faithful` every position (prompt and padding up to `max_len`)
/// is a loss position, as in the reference attack.
pub fn encode_sft(
    model: &LoadedModel,
    pairs: &[(String, String)],
    format: PromptFormat,
    max_len: usize,
    faithful: bool,
) -> Result<Vec<Encoded>> {
    let opts = EncodeOptions {
        format,
        max_len: Some(max_len),
        add_eos: format == PromptFormat::Plain,
        reference_join: faithful,
        ..EncodeOptions::default()
    };
    let mut out = vec![];
    for (p, r) in pairs {
        let mut e = encode_qa(&model.tok, p, r, &opts)?;
        if !e.loss_mask.contains(&1) {
            continue; // the answer was cut off entirely
        }
        if faithful {
            pad_to(&mut e, max_len, PadSide::Right, model.tok.pad_id)?;
            e.loss_mask = vec![1; e.len()];
        }
        out.push(e);
    }
    if out.is_empty() {
        return Err(Error::msg(
            "no training sequence has an answer token within max_len",
        ));
    }
    Ok(out)
}

/// What an attack did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackReport {
    pub method: AttackMethod,
    pub model_dir: PathBuf,
    pub notes: Vec<String>,
    pub train: Option<TrainSummary>,
    pub trainable_parameters: usize,
    pub abliterate: Option<AbliterateReport>,
    /// Refusal rate on the held-out test prompts after the attack (when evaluated).
    pub test_refusal_rate: Option<f64>,
    /// The security vector kept active and frozen during the fine-tuning, if any.
    pub security_vector: Option<PathBuf>,
    pub seconds: f64,
}

/// Attack `model` (in place) with the data in `data_path`, in the run directory `out`.
/// `eval_tokens > 0` also measures the refusal rate on the held-out test prompts afterwards.
pub fn attack(
    model: &mut LoadedModel,
    data_path: &Path,
    cfg: &AttackConfig,
    out: &Path,
    eval_tokens: usize,
    interrupt: Interrupt,
) -> Result<AttackReport> {
    attack_with_probe(model, data_path, cfg, out, eval_tokens, interrupt, None)
}

/// Something measured on the model being attacked at chosen optimizer steps (a durability
/// curve): `(steps, f)` calls `f(step, net)` with the network after `step` updates, for every
/// listed step up to the attack's last (the last itself after training, on the final weights;
/// step 0 is the model before any update; [`LAST_STEP`] stands for the last step, whatever
/// the attack's length). Listed steps past the end are skipped. A fine-tuning attack only; it
/// changes nothing the attack computes (no random draw, no weight).
pub type Probe<'a> = (&'a [usize], &'a mut dyn FnMut(usize, &Llama) -> Result<()>);

/// In a [`Probe`]'s steps: the attack's last step.
pub const LAST_STEP: usize = usize::MAX;

/// [`attack`] with a [`Probe`].
pub fn attack_with_probe(
    model: &mut LoadedModel,
    data_path: &Path,
    cfg: &AttackConfig,
    out: &Path,
    eval_tokens: usize,
    interrupt: Interrupt,
    probe: Option<Probe>,
) -> Result<AttackReport> {
    let mut probe = probe;
    let t0 = std::time::Instant::now();
    let run = RunDir::open(
        out,
        &json!({"command": "attack", "model": model.source, "data": data_path, "attack": cfg}),
    )?;
    let data: AttackData =
        crate::util::io::cached(&out.join("data.json"), || attack_data(data_path, cfg))?;
    for n in &data.notes {
        run.log(n);
        eprintln!("{n}");
    }
    let test_prompts: Vec<serde_json::Value> = data
        .test_prompts
        .iter()
        .map(|p| json!({"prompt": p}))
        .collect();
    crate::util::io::write_jsonl_atomic(&out.join("test_prompts.jsonl"), &test_prompts)?;
    let check = RefusalCheck::load(cfg.refusal_phrases.as_deref())?;
    let sv = if cfg.method == AttackMethod::Abliterate {
        None // no fine-tuning: the attacker works on the published weights
    } else {
        crate::train::lora::load_security_vector(model, cfg.ignore_security_vector)?
    };
    let sv_dir = sv.as_ref().map(|(d, _)| d.clone());
    if let Some(d) = &sv_dir {
        let msg = format!(
            "fine-tuning under the security vector {} (active, frozen, dropped from the result)",
            d.display()
        );
        run.log(&msg);
        eprintln!("{msg}");
    }
    let frozen = sv.map(|(_, a)| a);

    let mut train_summary = None;
    let mut abl = None;
    let trainable_parameters;
    let model_dir = run.model_dir();
    match cfg.method {
        AttackMethod::Abliterate => {
            trainable_parameters = 0;
            if out.join("DONE").exists() {
                let dev = model
                    .params
                    .tensor("model.embed_tokens.weight")?
                    .device()
                    .clone();
                let done = crate::model::load::load_hf_dir(&model_dir, &dev)?;
                model.params = done.params;
                abl = serde_json::from_str(
                    &std::fs::read_to_string(out.join("abliteration.json")).unwrap_or_default(),
                )
                .ok();
            } else {
                let harmful: Vec<String> = data.train.iter().map(|(p, _)| p.clone()).collect();
                let harmless = harmless_prompts(cfg.abliterate.prompts, cfg.train.seed)?;
                let (rep, dir) = abliterate(
                    model,
                    &harmful,
                    &harmless,
                    cfg.format,
                    &check,
                    &cfg.abliterate,
                )?;
                crate::model::load::save_safetensors(
                    &out.join("direction.safetensors"),
                    &[("direction".to_string(), dir)],
                )?;
                write_json_atomic(&out.join("abliteration.json"), &rep)?;
                save_hf_dir(&model_dir, &model.config, &model.params, &model.tok)?;
                write_json_atomic(&out.join("DONE"), &json!({"method": "abliterate"}))?;
                run.log(&format!("abliterated layer {}", rep.layer));
                abl = Some(rep);
            }
        }
        AttackMethod::Full | AttackMethod::Lora => {
            let mut pairs = data.train.clone();
            pairs.extend(data.retain.iter().cloned());
            let enc = encode_sft(model, &pairs, cfg.format, cfg.max_len, cfg.faithful_loss)?;
            if enc.len() < pairs.len() {
                let msg = format!(
                    "{} of {} training pairs left out: no answer token within max_len {}",
                    pairs.len() - enc.len(),
                    pairs.len(),
                    cfg.max_len
                );
                run.log(&msg);
                eprintln!("{msg}");
            }
            let pad = model.tok.pad_id;
            let faithful = cfg.faithful_loss;
            let total = cfg.train.total_steps(enc.len());
            let probe_ref = &mut probe;
            let loss = |net: &crate::model::llama::Llama, ctx: &mut train::StepCtx| {
                if let Some((steps, f)) = probe_ref.as_mut() {
                    if ctx.step < total && steps.contains(&ctx.step) {
                        f(ctx.step, net)?;
                    }
                }
                let seqs: Vec<&Encoded> = ctx.indices.iter().map(|&i| &enc[i]).collect();
                sft_loss_with(net, &seqs, pad, faithful)
            };
            if cfg.method == AttackMethod::Full {
                trainable_parameters = model.params.num_elements();
                train_summary = Some(crate::train::lora::train_under(
                    &run,
                    &*model,
                    frozen,
                    enc.len(),
                    &cfg.train,
                    interrupt,
                    loss,
                )?);
            } else {
                let lora = Lora::new(model, &cfg.lora, cfg.train.seed)?;
                trainable_parameters = lora.num_elements();
                run.log(&format!(
                    "LoRA: {trainable_parameters} trainable parameters"
                ));
                train_summary = Some(crate::train::lora::train_under(
                    &run,
                    &lora,
                    frozen,
                    enc.len(),
                    &cfg.train,
                    interrupt,
                    loss,
                )?);
                let merged = lora.merged()?;
                drop(lora);
                model.params = merged;
            }
            if let Some((steps, f)) = probe.as_mut() {
                if steps.contains(&total) || steps.contains(&LAST_STEP) {
                    let net = Llama::frozen(&model.config, &model.params)?;
                    f(total, &net)?;
                }
            }
        }
    }

    let test_refusal_rate = if eval_tokens > 0 && !data.test_prompts.is_empty() {
        let name = format!("test_refusal_rate-{eval_tokens}tok.json");
        let r: f64 = crate::util::io::cached(&out.join(name), || {
            let net = crate::model::llama::Llama::frozen(&model.config, &model.params)?;
            let ans = answer_prompts(
                &net,
                &model.tok,
                &data.test_prompts,
                cfg.format,
                eval_tokens,
                16,
                "attacked model on the test prompts",
            )?;
            Ok(check.rate(&ans))
        })?;
        Some(r)
    } else {
        None
    };
    let model_dir = if cfg.method == AttackMethod::Lora && !cfg.lora.merge {
        out.join("adapter")
    } else {
        model_dir
    };
    let report = AttackReport {
        method: cfg.method,
        model_dir,
        notes: data.notes.clone(),
        train: train_summary,
        trainable_parameters,
        abliterate: abl,
        test_refusal_rate,
        security_vector: sv_dir,
        seconds: t0.elapsed().as_secs_f64(),
    };
    write_json_atomic(&out.join("report.json"), &report)?;
    Ok(report)
}

/// Harmless prompts for abliteration's means: ARC-Easy questions from the shipped data.
pub fn harmless_prompts(n: usize, seed: u64) -> Result<Vec<String>> {
    let d = default_data_dir();
    let arc = crate::data::mc::read_arc(&d.join("arc/arc_easy.jsonl"))?.records;
    // ARC queries carry their own `Question: ` prefix; the harmful prompts do not.
    let mut q: Vec<String> = arc
        .into_iter()
        .map(|a| {
            a.query
                .strip_prefix("Question: ")
                .unwrap_or(&a.query)
                .to_string()
        })
        .collect();
    Rng::new(seed, "abliterate-harmless").shuffle(&mut q);
    q.truncate(n);
    Ok(q)
}

/// The paper's grid (learning rate x samples, 1 epoch, batch 4) and the embedded model's preset.
pub fn grid(name: &str) -> Result<Vec<(f64, usize)>> {
    let (lrs, ns): (&[f64], &[usize]) = match name {
        "paper" => (&[3e-5, 6e-5, 8e-5], &[1000, 10000]),
        // The shipped BeaverTails subset has 465 unsafe answers (347 distinct questions left
        // after the 100 held-out test prompts), and a 135M model on two CPU cores trains about
        // one step per 5-10 s at batch 4: 100 and 300 samples (25 and 75 steps) keep the grid
        // near an hour while spanning a 3x budget, as 1k vs 10k spans 10x.
        "embedded" => (&[3e-5, 6e-5, 8e-5], &[100, 300]),
        other => return Err(Error::setting("grid", other, "expected paper or embedded")),
    };
    Ok(lrs
        .iter()
        .flat_map(|&lr| ns.iter().map(move |&n| (lr, n)))
        .collect())
}

/// Directory name of a grid cell, e.g. `lr8e-5-n1000`.
pub fn grid_cell_name(lr: f64, n: usize) -> String {
    format!("lr{lr:e}-n{n}")
}
