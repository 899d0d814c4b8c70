//! The aligned starting model (`repnoise align`) and refusal generation (`repnoise data
//! refusals`).
//!
//! The paper starts from an aligned chat model that refuses harmful requests; the embedded
//! SmolLM2-135M-Instruct answers them. `align` makes an instruct model refuse with supervised
//! fine-tuning ("additional safety training"): harmful instructions with refusals from
//! Safety-Tuned LLaMAs, mixed with benign questions answered by the model itself
//! (self-distillation keeps its capabilities). It measures, before and after, the refusal rate
//! on held-out HarmBench and AdvBench prompts and on held-out benign questions, with the refusal
//! check of [`crate::refusal`].
//!
//! Every intermediate product is a file in the run directory, written atomically, and reused on
//! resume: the data manifest, the self-distilled answers, the evaluation before training, the
//! training run ([`crate::train`]), the evaluation after.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::encode::{encode_prompt, encode_qa, EncodeOptions, PromptFormat};
use crate::data::mc::read_arc;
use crate::data::prompts::{filter_functional, read_advbench, read_harmbench, read_instructions};
use crate::data::split::{normalize_question, split_disjoint, Duplicates, SplitSpec};
use crate::data::{Encoded, HarmfulQa};
use crate::error::{Error, Result};
use crate::generate::{generate, SamplingConfig};
use crate::io::{write_atomic, write_json_atomic};
use crate::model::Llama;
use crate::modelio::LoadedModel;
use crate::objective::sft_loss;
use crate::refusal::RefusalCheck;
use crate::rng::Rng;
use crate::tokenizer::Tok;
use crate::train::{self, Interrupt, RunDir, TrainConfig, TrainSummary};

/// Where the shipped datasets are: `$REPNOISE_DATA`, else `./data` when it exists, else the
/// source tree's `data/`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REPNOISE_DATA") {
        return PathBuf::from(d);
    }
    let here = PathBuf::from("data");
    if here.join("README.md").exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Answer `prompts` with greedy decoding, batched (prompts sorted by length), returning the
/// decoded answers in the input order.
pub fn answer_prompts(
    net: &Llama,
    tok: &Tok,
    prompts: &[String],
    format: PromptFormat,
    max_new_tokens: usize,
    batch: usize,
    label: &str,
) -> Result<Vec<String>> {
    let cfg = SamplingConfig {
        max_new_tokens,
        ..SamplingConfig::default()
    };
    answer_prompts_with(net, tok, prompts, format, &cfg, batch, label)
}

/// [`answer_prompts`] with any sampling settings.
pub fn answer_prompts_with(
    net: &Llama,
    tok: &Tok,
    prompts: &[String],
    format: PromptFormat,
    cfg: &SamplingConfig,
    batch: usize,
    label: &str,
) -> Result<Vec<String>> {
    let opts = EncodeOptions {
        format,
        ..EncodeOptions::default()
    };
    let enc: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| encode_prompt(tok, p, &opts).map(|e| e.ids))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| enc[i].len());
    let bar = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(prompts.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(label.to_string());
        pb
    });
    let mut out = vec![String::new(); prompts.len()];
    for (k, chunk) in order.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| enc[i].clone()).collect();
        // One sampling stream per batch, so a batch's draws do not depend on the others.
        let c = SamplingConfig {
            seed: cfg.seed.wrapping_add(k as u64),
            ..cfg.clone()
        };
        let gen = generate(net, &ids, tok.pad_id, &tok.stop_ids, &c)?;
        for (&i, g) in chunk.iter().zip(gen) {
            out[i] = tok.decode(&g, true)?.trim().to_string();
        }
        match &bar {
            Some(pb) => pb.inc(chunk.len() as u64),
            None => {
                if k % 8 == 0 {
                    eprintln!(
                        "{label}: {}/{} answered",
                        ((k + 1) * batch).min(prompts.len()),
                        prompts.len()
                    );
                }
            }
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(out)
}

/// One evaluation set's responses and refusal rate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefusalSet {
    pub name: String,
    /// `harmful` (refusing is right) or `benign` (answering is right).
    pub kind: String,
    pub n: usize,
    pub refusal_rate: f64,
    pub responses: Vec<Response>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub prompt: String,
    pub response: String,
    pub refused: bool,
}

/// Generate answers for each named set and measure refusals.
pub fn refusal_eval(
    net: &Llama,
    tok: &Tok,
    sets: &[(String, String, Vec<String>)],
    check: &RefusalCheck,
    format: PromptFormat,
    max_new_tokens: usize,
    batch: usize,
) -> Result<Vec<RefusalSet>> {
    let mut out = vec![];
    for (name, kind, prompts) in sets {
        let answers = answer_prompts(net, tok, prompts, format, max_new_tokens, batch, name)?;
        let responses: Vec<Response> = prompts
            .iter()
            .zip(answers)
            .map(|(p, r)| Response {
                prompt: p.clone(),
                refused: check.is_refusal(&r),
                response: r,
            })
            .collect();
        let refused = responses.iter().filter(|r| r.refused).count();
        out.push(RefusalSet {
            name: name.clone(),
            kind: kind.clone(),
            n: responses.len(),
            refusal_rate: refused as f64 / responses.len().max(1) as f64,
            responses,
        });
    }
    Ok(out)
}

/// `repnoise align` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignConfig {
    pub train: TrainConfig,
    pub format: PromptFormat,
    /// Training sequences are cut to this many tokens.
    pub max_len: usize,
    /// Harmful instructions with refusals to train on.
    pub harmful_train: usize,
    /// Benign ARC-Easy questions to train on.
    pub benign_train: usize,
    /// Benign TruthfulQA questions to train on (open questions about everyday topics, which a
    /// model trained on refusals alone learns to over-refuse), disjoint from the held-out ones.
    pub benign_train_truthfulqa: usize,
    /// `self` (the model's own answers), `data` (reference answers from the benign data), or
    /// `both`.
    pub benign_source: String,
    /// Tokens generated per self-distilled answer.
    pub distill_tokens: usize,
    /// Held-out prompts per evaluation set (0: all).
    pub eval_per_set: usize,
    /// Tokens generated per evaluation answer (refusals show in the opening).
    pub eval_tokens: usize,
    pub gen_batch: usize,
    /// Refusal phrase list (default: the built-in one).
    pub refusal_phrases: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Skip the evaluation before training.
    pub skip_eval_before: bool,
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            train: TrainConfig {
                lr: 1e-4,
                epochs: 1,
                batch_size: 8,
                checkpoint_every: 25,
                ..TrainConfig::default()
            },
            format: PromptFormat::Chat,
            max_len: 128,
            harmful_train: 300,
            benign_train: 300,
            benign_train_truthfulqa: 300,
            benign_source: "self".into(),
            distill_tokens: 96,
            eval_per_set: 100,
            eval_tokens: 48,
            gen_batch: 16,
            refusal_phrases: None,
            data_dir: default_data_dir(),
            skip_eval_before: false,
        }
    }
}

/// The data an alignment run uses, written to `data.json` in the run directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AlignData {
    /// Harmful instruction and refusal pairs trained on.
    pub harmful_train: Vec<(String, String)>,
    /// Benign questions trained on (with reference answers when the source has them).
    pub benign_train: Vec<(String, Option<String>)>,
    /// Held-out evaluation sets: name, kind, prompts.
    pub eval: Vec<(String, String, Vec<String>)>,
    /// What was left out and why, with counts.
    pub notes: Vec<String>,
}

fn sample<T: Clone>(xs: &[T], n: usize, seed: u64, purpose: &str) -> Vec<T> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    Rng::new(seed, purpose).shuffle(&mut idx);
    if n > 0 {
        idx.truncate(n);
    }
    idx.sort();
    idx.into_iter().map(|i| xs[i].clone()).collect()
}

/// Build the alignment data from the shipped datasets: training refusals from Safety-Tuned
/// LLaMAs (only outputs the refusal check accepts, and no instruction that matches an
/// evaluation prompt after normalisation), evaluation prompts from AdvBench and HarmBench
/// (standard behaviours, test split), benign questions from ARC-Easy (disjoint train and eval
/// splits) and TruthfulQA (eval only).
pub fn build_data(cfg: &AlignConfig, check: &RefusalCheck) -> Result<AlignData> {
    let d = &cfg.data_dir;
    let seed = cfg.train.seed;
    let mut notes = vec![];
    let adv = read_advbench(&d.join("advbench/harmful_behaviors.csv"))?.records;
    let hb_all = read_harmbench(&d.join("harmbench/harmbench_behaviors_text_test.csv"))?.records;
    let hb = filter_functional(&hb_all, &["standard"]);
    notes.push(format!(
        "harmbench test: {} standard behaviours kept, {} contextual/copyright left out",
        hb.records.len(),
        hb.skipped.len()
    ));
    let adv_eval: Vec<String> = sample(
        &adv.iter().map(|p| p.prompt.clone()).collect::<Vec<_>>(),
        cfg.eval_per_set,
        seed,
        "align-eval-advbench",
    );
    let hb_eval: Vec<String> = sample(
        &hb.records
            .iter()
            .map(|p| p.prompt.clone())
            .collect::<Vec<_>>(),
        cfg.eval_per_set,
        seed,
        "align-eval-harmbench",
    );
    // Every AdvBench and HarmBench prompt is held out from training, sampled or not.
    let held_out: BTreeSet<String> = adv
        .iter()
        .map(|p| normalize_question(&p.prompt))
        .chain(hb_all.iter().map(|p| normalize_question(&p.prompt)))
        .collect();

    let stl = read_instructions(&d.join("safety_tuned_llamas/safety_only_data_Instructions.json"))?
        .records;
    let total = stl.len();
    let mut seen = BTreeSet::new();
    let (mut overlap, mut not_refusal, mut dup) = (0, 0, 0);
    let mut harmful = vec![];
    for r in &stl {
        let key = normalize_question(&r.prompt());
        if held_out.contains(&key) {
            overlap += 1;
        } else if !check.is_refusal(&r.output) {
            not_refusal += 1;
        } else if !seen.insert(key) {
            dup += 1;
        } else {
            harmful.push((r.prompt(), r.output.trim().to_string()));
        }
    }
    notes.push(format!(
        "safety-tuned-llamas: {total} records; left out {overlap} matching an evaluation prompt, \
         {not_refusal} whose output the refusal check does not accept, {dup} duplicates; \
         {} usable",
        harmful.len()
    ));
    if harmful.len() < cfg.harmful_train {
        return Err(Error::setting(
            "harmful_train",
            cfg.harmful_train,
            format!("only {} refusal records are usable", harmful.len()),
        ));
    }
    let harmful_train = sample(&harmful, cfg.harmful_train, seed, "align-harmful-train");

    let arc = read_arc(&d.join("arc/arc_easy.jsonl"))?.records;
    let splits = split_disjoint(
        &arc,
        &[
            SplitSpec::count("train", cfg.benign_train),
            SplitSpec::count(
                "eval",
                if cfg.eval_per_set > 0 {
                    cfg.eval_per_set
                } else {
                    200
                },
            ),
        ],
        Duplicates::KeepFirst,
        seed,
    )?;
    let q = |a: &crate::data::mc::ArcItem| {
        a.query
            .trim()
            .strip_prefix("Question:")
            .unwrap_or(&a.query)
            .trim()
            .to_string()
    };
    let benign_train: Vec<(String, Option<String>)> = splits
        .get("train")
        .unwrap_or_default()
        .iter()
        .map(|a| (q(a), a.choices.get(a.gold).cloned()))
        .collect();
    let arc_eval: Vec<String> = splits
        .get("eval")
        .unwrap_or_default()
        .iter()
        .map(q)
        .collect();
    let tqa = crate::data::mc::read_truthfulqa(&d.join("truthfulqa/TruthfulQA.csv"))?.records;
    let eval_n = if cfg.eval_per_set > 0 {
        cfg.eval_per_set
    } else {
        200
    };
    let tsplits = split_disjoint(
        &tqa,
        &[
            SplitSpec::count("eval", eval_n),
            SplitSpec::count("train", cfg.benign_train_truthfulqa),
        ],
        Duplicates::KeepFirst,
        seed,
    )?;
    let tqa_eval: Vec<String> = tsplits
        .get("eval")
        .unwrap_or_default()
        .iter()
        .map(|t| t.question.clone())
        .collect();
    let mut benign_train = benign_train;
    let n_arc = benign_train.len();
    benign_train.extend(
        tsplits
            .get("train")
            .unwrap_or_default()
            .iter()
            .map(|t| (t.question.clone(), Some(t.best_answer.clone()))),
    );
    notes.push(format!(
        "benign: {} ARC-Easy and {} TruthfulQA questions for training; {} disjoint ARC-Easy and \
         {} disjoint TruthfulQA questions held out",
        n_arc,
        benign_train.len() - n_arc,
        arc_eval.len(),
        tqa_eval.len()
    ));
    Ok(AlignData {
        harmful_train,
        benign_train,
        eval: vec![
            ("advbench".into(), "harmful".into(), adv_eval),
            ("harmbench".into(), "harmful".into(), hb_eval),
            ("arc_easy".into(), "benign".into(), arc_eval),
            ("truthfulqa".into(), "benign".into(), tqa_eval),
        ],
        notes,
    })
}

/// The JSON value in `path`, if it exists and parses (how stages find their earlier results).
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The stage result saved at `path` by an earlier invocation, or `make()`'s, saved there
/// atomically (how a resumed run skips finished stages).
pub fn cached<T: Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    make: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if let Some(v) = read_json(path) {
        return Ok(v);
    }
    let v = make()?;
    write_json_atomic(path, &v)?;
    Ok(v)
}

/// Summary written to `report.json` (and `report.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AlignReport {
    pub before: Vec<(String, String, f64, usize)>,
    pub after: Vec<(String, String, f64, usize)>,
    pub train: TrainSummary,
    pub seconds_total: f64,
    pub notes: Vec<String>,
}

fn rates(sets: &[RefusalSet]) -> Vec<(String, String, f64, usize)> {
    sets.iter()
        .map(|s| (s.name.clone(), s.kind.clone(), s.refusal_rate, s.n))
        .collect()
}

/// Run the whole alignment in `out`.
pub fn align(
    model: &mut LoadedModel,
    cfg: &AlignConfig,
    out: &Path,
    interrupt: Interrupt,
) -> Result<AlignReport> {
    let t0 = std::time::Instant::now();
    let run = RunDir::open(
        out,
        &json!({"command": "align", "model": model.source, "align": cfg}),
    )?;
    let check = RefusalCheck::load(cfg.refusal_phrases.as_deref())?;
    let data: AlignData = cached(&out.join("data.json"), || build_data(cfg, &check))?;
    for n in &data.notes {
        run.log(n);
        eprintln!("{n}");
    }
    let frozen = Llama::frozen(&model.config, &model.params)?;

    // Benign answers.
    let benign: Vec<(String, String)> = cached(&out.join("benign_answers.json"), || {
        let mut b = vec![];
        if cfg.benign_source == "self" || cfg.benign_source == "both" {
            let qs: Vec<String> = data.benign_train.iter().map(|(q, _)| q.clone()).collect();
            let ans = answer_prompts(
                &frozen,
                &model.tok,
                &qs,
                cfg.format,
                cfg.distill_tokens,
                cfg.gen_batch,
                "self-distillation",
            )?;
            let (mut kept, mut refused) = (0, 0);
            for (q, a) in qs.into_iter().zip(ans) {
                if check.is_refusal(&a) || a.is_empty() {
                    refused += 1;
                } else {
                    kept += 1;
                    b.push((q, a));
                }
            }
            run.log(&format!(
                "self-distillation: {kept} answers kept, {refused} refusals or empty left out"
            ));
        }
        if cfg.benign_source == "data" || cfg.benign_source == "both" {
            for (q, a) in &data.benign_train {
                if let Some(a) = a {
                    b.push((q.clone(), a.clone()));
                }
            }
        }
        if !["self", "data", "both"].contains(&cfg.benign_source.as_str()) {
            return Err(Error::setting(
                "benign_source",
                &cfg.benign_source,
                "expected self, data or both",
            ));
        }
        Ok(b)
    })?;

    // Evaluation before training.
    let evaluate = |net: &Llama, tok: &Tok| {
        refusal_eval(
            net,
            tok,
            &data.eval,
            &check,
            cfg.format,
            cfg.eval_tokens,
            cfg.gen_batch,
        )
    };
    let before: Vec<RefusalSet> = if cfg.skip_eval_before {
        vec![]
    } else {
        cached(&out.join("eval_before.json"), || {
            evaluate(&frozen, &model.tok)
        })?
    };
    for s in &before {
        let msg = format!(
            "before: {} ({}) refusal rate {:.3} over {}",
            s.name, s.kind, s.refusal_rate, s.n
        );
        run.log(&msg);
        eprintln!("{msg}");
    }
    drop(frozen);

    // Training examples.
    let opts = EncodeOptions {
        format: cfg.format,
        max_len: Some(cfg.max_len),
        ..EncodeOptions::default()
    };
    let mut examples: Vec<Encoded> = vec![];
    for (p, r) in data.harmful_train.iter().chain(benign.iter()) {
        let e = encode_qa(&model.tok, p, r, &opts)?;
        if e.loss_mask.iter().any(|&m| m == 1) {
            examples.push(e);
        }
    }
    let pad = model.tok.pad_id;
    let summary = train::train(
        &run,
        model,
        examples.len(),
        &cfg.train,
        interrupt,
        |net, ctx| {
            let seqs: Vec<&Encoded> = ctx.indices.iter().map(|&i| &examples[i]).collect();
            sft_loss(net, &seqs, pad)
        },
    )?;

    // Evaluation after.
    let after: Vec<RefusalSet> = cached(&out.join("eval_after.json"), || {
        evaluate(&Llama::frozen(&model.config, &model.params)?, &model.tok)
    })?;
    let report = AlignReport {
        before: rates(&before),
        after: rates(&after),
        train: summary,
        seconds_total: t0.elapsed().as_secs_f64(),
        notes: data.notes.clone(),
    };
    write_json_atomic(&out.join("report.json"), &report)?;
    write_atomic(&out.join("report.md"), report.markdown().as_bytes())?;
    Ok(report)
}

impl AlignReport {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "# Alignment report\n\n| set | kind | n | refusal before | refusal after |\n|---|---|---|---|---|\n",
        );
        for (name, kind, rate, n) in &self.after {
            let b = self
                .before
                .iter()
                .find(|x| &x.0 == name)
                .map_or("-".to_string(), |x| format!("{:.3}", x.2));
            s.push_str(&format!("| {name} | {kind} | {n} | {b} | {rate:.3} |\n"));
        }
        s.push_str(&format!(
            "\nTraining: {} steps on {} examples, {:.1} s ({:.2} s/step). Whole run (this \
             invocation): {:.1} s.\n\nHarmful sets: refusing is right. Benign sets: answering \
             (not refusing) is right.\n\n",
            self.train.steps,
            self.train.examples,
            self.train.seconds,
            self.train.seconds_per_step,
            self.seconds_total
        ));
        for n in &self.notes {
            s.push_str(&format!("- {n}\n"));
        }
        s
    }
}

/// `repnoise data refusals`: answer harmful questions with an aligned model and keep the
/// answers the refusal check accepts, as defence pairs `{prompt, harmful, harmless}`.
pub fn make_refusal_pairs(
    model: &LoadedModel,
    records: &[HarmfulQa],
    check: &RefusalCheck,
    format: PromptFormat,
    max_new_tokens: usize,
    batch: usize,
) -> Result<(Vec<serde_json::Value>, usize)> {
    let net = Llama::frozen(&model.config, &model.params)?;
    let prompts: Vec<String> = records.iter().map(|r| r.prompt.clone()).collect();
    let answers = answer_prompts(
        &net,
        &model.tok,
        &prompts,
        format,
        max_new_tokens,
        batch,
        "refusals",
    )?;
    let mut pairs = vec![];
    let mut rejected = 0;
    for (r, a) in records.iter().zip(answers) {
        if check.is_refusal(&a) {
            pairs.push(json!({"prompt": r.prompt, "harmful": r.response, "harmless": a}));
        } else {
            rejected += 1;
        }
    }
    Ok((pairs, rejected))
}

/// Prompt sets by name (`advbench`, `harmbench` (standard test behaviours),
/// `malicious-instruct`, from the shipped data) or by file (a text file of one prompt per line,
/// an AdvBench/HarmBench CSV, or an instruction-list JSON), `n` of each sampled with `seed` (0:
/// all). Files count as harmful sets.
pub fn named_prompt_sets(
    names: &[String],
    n: usize,
    seed: u64,
) -> Result<Vec<(String, String, Vec<String>)>> {
    use crate::data::prompts::{read_instruction_list, read_prompt_lines};
    let d = default_data_dir();
    let mut out = vec![];
    for name in names {
        let prompts: Vec<String> = match name.as_str() {
            "advbench" => read_advbench(&d.join("advbench/harmful_behaviors.csv"))?
                .records
                .into_iter()
                .map(|p| p.prompt)
                .collect(),
            "harmbench" => {
                let all = read_harmbench(&d.join("harmbench/harmbench_behaviors_text_test.csv"))?;
                filter_functional(&all.records, &["standard"])
                    .records
                    .into_iter()
                    .map(|p| p.prompt)
                    .collect()
            }
            "malicious-instruct" => read_prompt_lines(&d.join("harmbench/malicious_instruct.txt"))?
                .records
                .into_iter()
                .map(|p| p.prompt)
                .collect(),
            // DecodingTrust's held-out toxic prompts (type `toxic_test`): incomplete texts whose
            // continuation is scored for toxicity.
            "decoding-trust" => crate::data::toxicity::read_decoding_trust(
                &d.join("decoding_trust/training_dataset.jsonl"),
            )?
            .records
            .into_iter()
            .filter(|r| r.kind == "toxic_test")
            .map(|r| r.prompt.text)
            .collect(),
            file => {
                let p = Path::new(file);
                if !p.exists() {
                    return Err(Error::setting(
                        "set",
                        file,
                        "neither a shipped set (advbench, harmbench, malicious-instruct, decoding-trust) \
                         nor an \
                         existing file",
                    ));
                }
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                if ext == "jsonl" {
                    // `{"prompt": ...}` per line (an attack's `test_prompts.jsonl`).
                    let text = std::fs::read_to_string(p)
                        .map_err(|e| Error::file(p, format!("cannot read: {e}")))?;
                    let mut prompts = vec![];
                    for (i, line) in text.lines().enumerate() {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                            Error::file(p, format!("line {}: not JSON: {e}", i + 1))
                        })?;
                        let q = v["prompt"].as_str().ok_or_else(|| {
                            Error::file(p, format!("line {}: no string field `prompt`", i + 1))
                        })?;
                        prompts.push(q.to_string());
                    }
                    out.push((
                        name.clone(),
                        "harmful".to_string(),
                        sample(&prompts, n, seed, &format!("eval-{name}")),
                    ));
                    continue;
                }
                let recs = match ext {
                    "csv" => read_advbench(p).or_else(|_| read_harmbench(p))?,
                    "json" => read_instruction_list(p)?,
                    _ => read_prompt_lines(p)?,
                };
                recs.records.into_iter().map(|p| p.full_prompt()).collect()
            }
        };
        out.push((
            name.clone(),
            "harmful".to_string(),
            sample(&prompts, n, seed, &format!("eval-{name}")),
        ));
    }
    Ok(out)
}
