//! Benign fine-tuning for the trainability condition (paper Section 4.4): fine-tune on a GEM
//! data-to-text task (ViGGO, E2E NLG, DART, ConvWeather, or a user's file) and keep a held-out
//! test split, never trained on, for the ROUGE-1 evaluation.
//!
//! Prompts use a plain template, by default `Meaning Representation: {input}\nDescription:`
//! followed by the reference text: the structured input, then the text the task asks for (the
//! GEM direction). The loss covers the text only.
//!
//! Training and test data per task, from the shipped files (`data/README.md`):
//! - `viggo`: `train.csv` / `test.csv`;
//! - `e2e`: `devset.csv` (the training set is not shipped) / `testset_w_refs.csv`;
//! - `dart` and `conv_weather` (one file shipped each): a seeded split disjoint by input;
//! - a file path: any data-to-text file `repnoise data stats` recognises, split the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::default_data_dir;
use crate::data::encode::{encode_prefixed, EncodeOptions, Encoded};
use crate::data::nlg::{self, group_references, DataToText};
use crate::data::split::{split_disjoint, Duplicates, SplitSpec};
use crate::model::load::LoadedModel;
use crate::train::objective::sft_loss;
use crate::train::{Interrupt, RunDir, TrainConfig, TrainSummary};
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Fine-tuning settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub train: TrainConfig,
    /// Training examples (0: all).
    pub samples: usize,
    /// Test inputs kept for the evaluation (0: all of the test file).
    pub test: usize,
    pub max_len: usize,
    /// The prompt; `{input}` is replaced by the structured input.
    pub template: String,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            train: TrainConfig {
                lr: 8e-5,
                epochs: 1,
                batch_size: 4,
                weight_decay: 0.0,
                checkpoint_every: 50,
                ..TrainConfig::default()
            },
            samples: 1000,
            test: 100,
            max_len: 192,
            template: "Meaning Representation: {input}\nDescription:".into(),
        }
    }
}

/// The prompt for one input.
pub fn render(template: &str, input: &str) -> String {
    template.replace("{input}", input)
}

/// A task's training examples and test inputs with their references.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskData {
    pub train: Vec<DataToText>,
    pub test: Vec<(String, Vec<String>)>,
    pub notes: Vec<String>,
}

fn split_one(
    all: Vec<DataToText>,
    test_n: usize,
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<TaskData> {
    let inputs = group_references(&all).len();
    let n = if test_n == 0 {
        inputs / 5
    } else {
        test_n.min(inputs / 2)
    };
    // Split by input, so no test input (with any of its references) is trained on.
    let groups = group_references(&all);
    let s = split_disjoint(
        &groups
            .iter()
            .map(|(i, r)| DataToText {
                input: i.clone(),
                target: r.join("\u{1f}"),
                domain: None,
            })
            .collect::<Vec<_>>(),
        &[SplitSpec::count("test", n), SplitSpec::rest("train")],
        Duplicates::KeepTogether,
        seed,
    )?;
    let test: Vec<(String, Vec<String>)> = s
        .get("test")
        .unwrap_or_default()
        .iter()
        .map(|d| {
            (
                d.input.clone(),
                d.target.split('\u{1f}').map(String::from).collect(),
            )
        })
        .collect();
    let train: Vec<DataToText> = s
        .get("train")
        .unwrap_or_default()
        .iter()
        .flat_map(|d| {
            d.target.split('\u{1f}').map(|t| DataToText {
                input: d.input.clone(),
                target: t.to_string(),
                domain: None,
            })
        })
        .collect();
    notes.push(format!(
        "{} inputs split into {} test and {} training inputs",
        inputs,
        test.len(),
        s.get("train").unwrap_or_default().len()
    ));
    Ok(TaskData {
        train,
        test,
        notes: std::mem::take(notes),
    })
}

/// Read a task's data (see the module docs).
pub fn task_data(task: &str, test_n: usize, seed: u64) -> Result<TaskData> {
    let d = default_data_dir();
    let mut notes = vec![];
    let from_files = |train: PathBuf, test: PathBuf, notes: &mut Vec<String>| -> Result<TaskData> {
        let tr = nlg::read_mr_csv(&train)?.records;
        let mut te = group_references(&nlg::read_mr_csv(&test)?.records);
        if test_n > 0 && te.len() > test_n {
            Rng::new(seed, "finetune-test").shuffle(&mut te);
            te.truncate(test_n);
        }
        // A test input that also appears in training is dropped from training.
        let test_inputs: std::collections::BTreeSet<&str> =
            te.iter().map(|(i, _)| i.as_str()).collect();
        let before = tr.len();
        let tr: Vec<DataToText> = tr
            .into_iter()
            .filter(|x| !test_inputs.contains(x.input.as_str()))
            .collect();
        notes.push(format!(
            "{}: {} training examples ({} sharing a test input left out); {}: {} test inputs",
            train.display(),
            tr.len(),
            before - tr.len(),
            test.display(),
            te.len()
        ));
        Ok(TaskData {
            train: tr,
            test: te,
            notes: std::mem::take(notes),
        })
    };
    match task {
        "viggo" => from_files(
            d.join("viggo/train.csv"),
            d.join("viggo/test.csv"),
            &mut notes,
        ),
        "e2e" => from_files(
            d.join("e2e_nlg/devset.csv"),
            d.join("e2e_nlg/testset_w_refs.csv"),
            &mut notes,
        ),
        "dart" => {
            let e = nlg::read_dart_json(&d.join("dart/dart-v1.1.1-full-dev.json"))?.records;
            split_one(nlg::triple_examples(&e), test_n, seed, &mut notes)
        }
        "conv_weather" => {
            let e = nlg::read_conv_weather(&d.join("conv_weather/test.tsv"))?.records;
            split_one(
                e.iter().map(|w| w.to_data_to_text()).collect(),
                test_n,
                seed,
                &mut notes,
            )
        }
        file => {
            let p = Path::new(file);
            if !p.exists() {
                return Err(Error::setting(
                    "task",
                    file,
                    "neither viggo, e2e, dart, conv_weather nor an existing file",
                ));
            }
            let (kind, any) = crate::data::load_any(p)?;
            let all = match any {
                crate::data::AnyDataset::DataToText(l) => l.records,
                crate::data::AnyDataset::ConvWeather(l) => {
                    l.records.iter().map(|w| w.to_data_to_text()).collect()
                }
                _ => {
                    return Err(Error::file(
                        p,
                        format!("not a data-to-text file (read as {})", kind.name()),
                    ))
                }
            };
            split_one(all, test_n, seed, &mut notes)
        }
    }
}

/// What [`finetune`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub task: String,
    pub train_examples: usize,
    pub test_inputs: usize,
    pub summary: TrainSummary,
    pub notes: Vec<String>,
}

/// Fine-tune `model` in place on `task` in the run directory `out`; writes `test.jsonl`
/// (`{input, prompt, references}` per line) for the evaluation.
pub fn finetune(
    model: &mut LoadedModel,
    task: &str,
    cfg: &FinetuneConfig,
    out: &Path,
    interrupt: Interrupt,
) -> Result<FinetuneReport> {
    if !cfg.template.contains("{input}") {
        return Err(Error::setting(
            "template",
            &cfg.template,
            "must contain {input}",
        ));
    }
    let run = RunDir::open(
        out,
        &json!({"command": "finetune", "model": model.source, "task": task, "finetune": cfg}),
    )?;
    let mut data = crate::util::io::cached(&out.join("data.json"), || {
        task_data(task, cfg.test, cfg.train.seed)
    })?;
    if cfg.samples > 0 && data.train.len() > cfg.samples {
        Rng::new(cfg.train.seed, "finetune-samples").shuffle(&mut data.train);
        data.train.truncate(cfg.samples);
    }
    for n in &data.notes {
        run.log(n);
        eprintln!("{n}");
    }
    let lines: String = data
        .test
        .iter()
        .map(|(i, r)| {
            format!(
                "{}\n",
                json!({"input": i, "prompt": render(&cfg.template, i), "references": r})
            )
        })
        .collect();
    crate::util::io::write_atomic(&out.join("test.jsonl"), lines.as_bytes())?;
    let opts = EncodeOptions {
        add_eos: true,
        max_len: Some(cfg.max_len),
        ..EncodeOptions::default()
    };
    let mut enc: Vec<Encoded> = vec![];
    for x in &data.train {
        let prompt = render(&cfg.template, &x.input);
        let e = encode_prefixed(&model.tok, &prompt, &format!(" {}", x.target), &opts)?;
        if e.loss_mask.contains(&1) {
            enc.push(e);
        }
    }
    let pad = model.tok.pad_id;
    let sv = crate::train::lora::load_security_vector(model, false)?;
    if let Some((d, _)) = &sv {
        run.log(&format!(
            "fine-tuning under the security vector {} (active, frozen, dropped from the result)",
            d.display()
        ));
    }
    let frozen = sv.map(|(_, a)| a);
    let summary = crate::train::lora::train_under(
        &run,
        &*model,
        frozen,
        enc.len(),
        &cfg.train,
        interrupt,
        |net, ctx| {
            let seqs: Vec<&Encoded> = ctx.indices.iter().map(|&i| &enc[i]).collect();
            sft_loss(net, &seqs, pad)
        },
    )?;
    let report = FinetuneReport {
        task: task.to_string(),
        train_examples: enc.len(),
        test_inputs: data.test.len(),
        summary,
        notes: data.notes,
    };
    crate::util::io::write_json_atomic(&out.join("report.json"), &report)?;
    Ok(report)
}
