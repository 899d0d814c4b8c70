//! Trainability: does benign fine-tuning still work? Generate descriptions for a data-to-text
//! task's held-out inputs before and after `repnoise finetune`, and score ROUGE-1 F against the
//! references (the best reference when there are several).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::rouge::rouge1_multi;
use super::stats::{bootstrap_ci, mean_se, MeanSe};
use crate::eval::answer::generate_batched;
use crate::model::generate::SamplingConfig;
use crate::model::llama::Llama;
use crate::model::load::LoadedModel;
use crate::train::finetune::{finetune, FinetuneConfig};
use crate::train::Interrupt;
use crate::{Error, Result};

/// A test input: its prompt and references (`test.jsonl` of a finetune run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestInput {
    pub input: String,
    pub prompt: String,
    pub references: Vec<String>,
}

pub fn read_test_inputs(path: &Path) -> Result<Vec<TestInput>> {
    let text = crate::util::io::read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Greedy continuations of raw prompts (no chat template), cut at the first newline: the
/// descriptions are one line, and an untuned model runs on past it.
pub fn describe(
    model: &LoadedModel,
    prompts: &[String],
    max_new_tokens: usize,
    batch: usize,
) -> Result<Vec<String>> {
    let net = Llama::frozen(&model.config, &model.params)?;
    let enc: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.tok.encode_text(p))
        .collect::<Result<_>>()?;
    // Greedy: the batches' sampling streams draw nothing.
    let cfg = SamplingConfig {
        max_new_tokens,
        ..SamplingConfig::default()
    };
    let out = generate_batched(&net, &model.tok, &enc, &cfg, batch, "descriptions")?;
    Ok(out
        .iter()
        .map(|text| {
            text.trim_start()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .collect())
}

/// ROUGE-1 F over test inputs, with a 95% bootstrap interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RougeFigure {
    pub rouge1_f: MeanSe,
    pub ci95: (f64, f64),
}

/// ROUGE-1 F of `outputs` against the tests' references (Porter-stemmed when `stem`).
pub fn rouge_figure(tests: &[TestInput], outputs: &[String], stem: bool, seed: u64) -> RougeFigure {
    let f: Vec<f64> = tests
        .iter()
        .zip(outputs)
        .map(|(t, o)| rouge1_multi(&t.references, o, stem).f)
        .collect();
    RougeFigure {
        rouge1_f: mean_se(&f),
        ci95: bootstrap_ci(&f, 1000, seed),
    }
}

/// Before and after fine-tuning one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainabilityReport {
    pub model: String,
    pub task: String,
    /// ROUGE-1 without a stemmer (`rouge_score`'s and `evaluate`'s default).
    pub before: RougeFigure,
    pub after: RougeFigure,
    /// The same with `use_stemmer=True` (NLTK's Porter stemmer), as GEM-style reports give it.
    #[serde(default)]
    pub before_stemmed: Option<RougeFigure>,
    #[serde(default)]
    pub after_stemmed: Option<RougeFigure>,
    pub train_examples: usize,
    pub final_loss: Option<f64>,
    pub seconds: f64,
}

/// Fine-tune `model` on `task` in `out/finetune`, scoring ROUGE-1 on the held-out inputs before
/// and after; writes `outputs-before.jsonl`, `outputs-after.jsonl` and `trainability.json`.
pub fn trainability(
    model: &mut LoadedModel,
    task: &str,
    cfg: &FinetuneConfig,
    max_new_tokens: usize,
    out: &Path,
    interrupt: Interrupt,
) -> Result<TrainabilityReport> {
    let t0 = std::time::Instant::now();
    let source = model.source.clone();
    let ft_dir = out.join("finetune");
    let data = crate::train::finetune::task_data(task, cfg.test, cfg.train.seed)?;
    let tests: Vec<TestInput> = data
        .test
        .iter()
        .map(|(i, r)| TestInput {
            input: i.clone(),
            prompt: crate::train::finetune::render(&cfg.template, i),
            references: r.clone(),
        })
        .collect();
    let prompts: Vec<String> = tests.iter().map(|t| t.prompt.clone()).collect();
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create directory: {e}")))?;
    // The untuned model's outputs are kept, so a resumed run does not generate them again.
    let key = json!({"model": source, "weights": crate::model::load::weights_fingerprint(model),
                     "prompts": prompts, "max_new_tokens": max_new_tokens});
    let before_path = out.join("outputs-before.json");
    let cached: Option<Vec<String>> = std::fs::read_to_string(&before_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|v| v["key"] == key)
        .and_then(|v| serde_json::from_value(v["outputs"].clone()).ok());
    let before_out = match cached {
        Some(o) => o,
        None => {
            let o = describe(model, &prompts, max_new_tokens, 16)?;
            crate::util::io::write_json_atomic(&before_path, &json!({"key": key, "outputs": o}))?;
            o
        }
    };
    let rep = finetune(model, task, cfg, &ft_dir, interrupt)?;
    let after_out = describe(model, &prompts, max_new_tokens, 16)?;
    let lines = |outs: &[String]| -> String {
        tests
            .iter()
            .zip(outs)
            .map(|(t, o)| {
                let r = rouge1_multi(&t.references, o, false);
                let stemmed = rouge1_multi(&t.references, o, true);
                format!(
                    "{}\n",
                    json!({"input": t.input, "output": o, "references": t.references,
                           "rouge1_f": r.f, "rouge1_f_stemmed": stemmed.f})
                )
            })
            .collect()
    };
    crate::util::io::write_atomic(
        &out.join("outputs-before.jsonl"),
        lines(&before_out).as_bytes(),
    )?;
    crate::util::io::write_atomic(
        &out.join("outputs-after.jsonl"),
        lines(&after_out).as_bytes(),
    )?;
    let report = TrainabilityReport {
        model: source,
        task: task.to_string(),
        before: rouge_figure(&tests, &before_out, false, cfg.train.seed),
        after: rouge_figure(&tests, &after_out, false, cfg.train.seed),
        before_stemmed: Some(rouge_figure(&tests, &before_out, true, cfg.train.seed)),
        after_stemmed: Some(rouge_figure(&tests, &after_out, true, cfg.train.seed)),
        train_examples: rep.train_examples,
        final_loss: rep.summary.final_terms.get("loss").copied(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    crate::util::io::write_json_atomic(&out.join("trainability.json"), &report)?;
    Ok(report)
}
