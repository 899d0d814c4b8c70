//! The alignment data, built from the shipped datasets: refusals to harmful requests (Safety-Tuned
//! LLaMAs, BeaverTails, AdvBench) that are in no test or validation set, and the model's own answers
//! to everyday requests, XSTest safe prompts and quiz questions.

use super::*;

/// One held-out evaluation set.
pub type EvalSet = (String, String, Vec<String>);

/// The data an alignment run uses, written to `data.json` in the run directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AlignData {
    /// Harmful instruction and refusal pairs trained on.
    pub harmful_train: Vec<(String, String)>,
    /// Benign quiz questions trained on (with reference answers when the source has them).
    pub benign_train: Vec<(String, Option<String>)>,
    /// Benign requests trained on with the model's own answers: (source, prompt).
    #[serde(default)]
    pub benign_self: Vec<(String, String)>,
    /// Held-out test sets: name, kind (`harmful` or `benign`), prompts.
    pub eval: Vec<EvalSet>,
    /// Held-out validation sets (for choosing settings), as `eval`.
    #[serde(default)]
    pub validation: Vec<EvalSet>,
    /// XSTest prompt ids trained or validated on (over-refusal evaluations leave them out).
    #[serde(default)]
    pub xstest_used: Vec<String>,
    /// Factual questions answered verbatim in the report.
    #[serde(default)]
    pub factual: Vec<crate::data::everyday::Factual>,
    /// Knowledge items per task: (task, split, item index in the task's file order).
    #[serde(default)]
    pub knowledge: Vec<(String, String, Vec<usize>)>,
    /// What was left out and why, with counts.
    pub notes: Vec<String>,
}

/// `cfg.everyday_extra_train` requests of the training-only everyday file, stratified by
/// category; none may repeat a request of the main everyday file (any of which may be a test
/// or validation request) or a factual question shown verbatim in the report.
pub(super) fn everyday_extra(
    cfg: &AlignConfig,
    d: &Path,
    everyday: &[crate::data::everyday::Everyday],
    factual_keys: &BTreeSet<String>,
    seed: u64,
) -> Result<Vec<crate::data::everyday::Everyday>> {
    use crate::data::everyday::{read_everyday, stratified_parts};
    if cfg.everyday_extra_train == 0 {
        return Ok(vec![]);
    }
    let path = d.join("everyday/everyday_train_extra.jsonl");
    let extra = read_everyday(&path)?;
    if cfg.everyday_extra_train > extra.len() {
        return Err(Error::setting(
            "everyday_extra_train",
            cfg.everyday_extra_train,
            format!("{} holds only {} requests", path.display(), extra.len()),
        ));
    }
    let main: BTreeSet<String> = everyday
        .iter()
        .map(|e| normalize_question(&e.prompt))
        .collect();
    for e in &extra {
        let k = normalize_question(&e.prompt);
        if main.contains(&k) || factual_keys.contains(&k) {
            return Err(Error::file(
                &path,
                format!(
                    "`{}` ({}) repeats an everyday request or a factual question, which may be \
                     held out",
                    e.prompt, e.id
                ),
            ));
        }
    }
    let [tr, _, _] = stratified_parts(
        &extra,
        |e| e.category.clone(),
        cfg.everyday_extra_train,
        0,
        seed,
        "align-everyday-extra",
    )?;
    Ok(tr)
}

/// `n` of `xs` (0: all) in file order, from one seeded order of the whole list, passing over
/// those `skip` names: skipping an item moves the draw by that item alone.
pub(super) fn sample_skipping<T: Clone>(
    xs: &[T],
    n: usize,
    seed: u64,
    purpose: &str,
    skip: impl Fn(&T) -> bool,
) -> Vec<T> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    Rng::new(seed, purpose).shuffle(&mut idx);
    idx.retain(|&i| !skip(&xs[i]));
    if n > 0 {
        idx.truncate(n);
    }
    idx.sort();
    idx.into_iter().map(|i| xs[i].clone()).collect()
}

/// The question of a multiple-choice option's context (`Question: q\nAnswer:` -> `q`).
pub(super) fn mc_question(context: &str) -> String {
    let c = context.trim();
    let c = c.strip_prefix("Question:").unwrap_or(c);
    let c = c.trim_end().strip_suffix("Answer:").unwrap_or(c);
    normalize_question(c)
}

/// Build the alignment data from the shipped datasets: training refusals from Safety-Tuned
/// LLaMAs (only outputs the refusal check accepts, no instruction that matches an evaluation
/// prompt or an excluded question after normalisation), harmful test prompts from AdvBench,
/// HarmBench (standard behaviours, test split) and BeaverTails; benign requests from the
/// everyday set and XSTest's safe prompts (train / validation / test, stratified) and quiz
/// questions from ARC-Easy and TruthfulQA (disjoint train and test parts); knowledge items
/// never trained on.
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
    let adv_eval: Vec<String> = Rng::new(seed, "align-eval-advbench").subset(
        &adv.iter().map(|p| p.prompt.clone()).collect::<Vec<_>>(),
        cfg.eval_per_set,
    );
    let hb_eval: Vec<String> = Rng::new(seed, "align-eval-harmbench").subset(
        &hb.records
            .iter()
            .map(|p| p.prompt.clone())
            .collect::<Vec<_>>(),
        cfg.eval_per_set,
    );
    let hb_val_all = read_harmbench(&d.join("harmbench/harmbench_behaviors_text_val.csv"))?.records;
    let hb_val_std = filter_functional(&hb_val_all, &["standard"]).records;
    if cfg.harmbench_validation > hb_val_std.len() {
        return Err(Error::setting(
            "harmbench_validation",
            cfg.harmbench_validation,
            format!(
                "HarmBench's validation split has {} standard behaviours",
                hb_val_std.len()
            ),
        ));
    }
    let hb_val: Vec<String> = Rng::new(seed, "align-val-harmbench")
        .subset(
            &hb_val_std
                .iter()
                .map(|p| p.prompt.clone())
                .collect::<Vec<_>>(),
            cfg.harmbench_validation,
        )
        .into_iter()
        .take(cfg.harmbench_validation)
        .collect();
    // One pool of refusals in varied wording for the AdvBench and BeaverTails prompts.
    let refusals = crate::data::everyday::read_refusals(&d.join("everyday/refusals.txt"), |r| {
        check.is_refusal(r)
    })?;
    let (adv_train, adv_val) = advbench_parts(cfg, &refusals, &adv, &adv_eval, &mut notes)?;
    let disjoint = disjoint_questions(d)?;
    // The experiment's validation questions, distinct after normalisation, in the given order.
    let mut exp_val_keys = BTreeSet::new();
    let exp_val: Vec<String> = cfg
        .harmful_validation_questions
        .iter()
        .flatten()
        .filter(|q| exp_val_keys.insert(normalize_question(q)))
        .cloned()
        .collect();
    let bt_eval: Vec<String> = match &cfg.harmful_eval_questions {
        Some(q) => q.clone(),
        // Drawn from the disjoint set, less the validation questions (the two files share some).
        None => sample_skipping(
            &disjoint,
            cfg.eval_per_set,
            seed,
            "align-eval-beavertails",
            |x| exp_val_keys.contains(&x.0),
        )
        .into_iter()
        .map(|x| x.1)
        .collect(),
    };
    // Every AdvBench and HarmBench prompt, the BeaverTails test questions, the experiment's
    // validation questions and the excluded questions are held out from training, sampled or not.
    let held_out: BTreeSet<String> = adv
        .iter()
        .map(|p| normalize_question(&p.prompt))
        .chain(hb_all.iter().map(|p| normalize_question(&p.prompt)))
        .chain(hb_val_all.iter().map(|p| normalize_question(&p.prompt)))
        .chain(bt_eval.iter().map(|p| normalize_question(p)))
        .chain(exp_val_keys.iter().cloned())
        .chain(cfg.exclude_questions.iter().map(|p| normalize_question(p)))
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
        "safety-tuned-llamas: {total} records; left out {overlap} matching an evaluation prompt \
         or a held-out question, {not_refusal} whose output the refusal check does not accept, \
         {dup} duplicates; {} usable",
        harmful.len()
    ));
    if harmful.len() < cfg.harmful_train + cfg.harmful_validation {
        return Err(Error::setting(
            "harmful_train",
            cfg.harmful_train,
            format!(
                "only {} refusal records are usable for {} training + {} validation",
                harmful.len(),
                cfg.harmful_train,
                cfg.harmful_validation
            ),
        ));
    }
    let mut idx: Vec<usize> = (0..harmful.len()).collect();
    Rng::new(seed, "align-harmful-train").shuffle(&mut idx);
    // Validation first, so it stays the same whatever the number trained on.
    let mut va: Vec<usize> = idx[..cfg.harmful_validation].to_vec();
    let mut tr: Vec<usize> =
        idx[cfg.harmful_validation..cfg.harmful_validation + cfg.harmful_train].to_vec();
    tr.sort_unstable();
    va.sort_unstable();
    let mut harmful_train: Vec<(String, String)> = tr.iter().map(|&i| harmful[i].clone()).collect();
    let harmful_val: Vec<String> = va.iter().map(|&i| harmful[i].0.clone()).collect();
    let (bt_train, bt_val) =
        beavertails_refusals(cfg, &refusals, &disjoint, &held_out, &mut notes)?;
    harmful_train.extend(bt_train);
    harmful_train.extend(adv_train);

    // Everyday requests and XSTest safe prompts: train / validation / test.
    use crate::data::everyday::{read_everyday, read_factual, stratified_parts};
    let everyday = read_everyday(&d.join("everyday/everyday_instructions.jsonl"))?;
    let [ev_tr, ev_va, ev_te] = stratified_parts(
        &everyday,
        |e| e.category.clone(),
        cfg.everyday_train,
        cfg.everyday_validation,
        seed,
        "align-everyday",
    )?;
    let xs_safe: Vec<crate::data::xstest::XsPrompt> =
        crate::data::xstest::read_xstest_prompts(&d.join("xstest/xstest_prompts.csv"))?
            .into_iter()
            .filter(|p| p.safe)
            .collect();
    let [xs_tr, xs_va, xs_te] = stratified_parts(
        &xs_safe,
        |p| p.kind.clone(),
        cfg.xstest_train,
        cfg.xstest_validation,
        seed,
        "align-xstest",
    )?;
    notes.push(format!(
        "everyday requests: {} trained on, {} validation, {} test (stratified by category); \
         XSTest safe prompts: {} trained on, {} validation, {} test (stratified by type)",
        ev_tr.len(),
        ev_va.len(),
        ev_te.len(),
        xs_tr.len(),
        xs_va.len(),
        xs_te.len()
    ));
    let factual = read_factual(&d.join("everyday/factual_questions.jsonl"))?;
    let factual_keys: BTreeSet<String> = factual
        .iter()
        .map(|f| normalize_question(&f.prompt))
        .collect();
    let ev_extra = everyday_extra(cfg, d, &everyday, &factual_keys, seed)?;
    if !ev_extra.is_empty() {
        notes.push(format!(
            "further everyday requests (training only): {} trained on (stratified by category)",
            ev_extra.len()
        ));
    }

    // Quiz questions: ARC-Easy train / refusal test / knowledge parts; TruthfulQA test / train.
    let arc = read_arc(&d.join("arc/arc_easy.jsonl"))?.records;
    let eval_n = if cfg.eval_per_set > 0 {
        cfg.eval_per_set
    } else {
        200
    };
    let splits = split_disjoint(
        &arc,
        &[
            SplitSpec::count("train", cfg.benign_train),
            SplitSpec::count("eval", eval_n),
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
    let mut benign_train: Vec<(String, Option<String>)> = splits
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
    let n_arc = benign_train.len();
    benign_train.extend(
        tsplits
            .get("train")
            .unwrap_or_default()
            .iter()
            .map(|t| (t.question.clone(), Some(t.best_answer.clone()))),
    );
    let before_quiz = benign_train.len();
    benign_train.retain(|(q, _)| !factual_keys.contains(&normalize_question(q)));
    notes.push(format!(
        "quiz: {} ARC-Easy and {} TruthfulQA questions for training ({} matching a factual \
         question left out); {} disjoint ARC-Easy and {} disjoint TruthfulQA questions held out",
        n_arc,
        before_quiz - n_arc,
        before_quiz - benign_train.len(),
        arc_eval.len(),
        tqa_eval.len()
    ));

    let benign_self: Vec<(String, String)> = ev_tr
        .iter()
        .chain(&ev_extra)
        .map(|e| ("everyday".to_string(), e.prompt.clone()))
        .chain(
            xs_tr
                .iter()
                .map(|p| ("xstest".to_string(), p.prompt.clone())),
        )
        .collect();

    // Knowledge items: never a question trained on, test and validation parts disjoint.
    let trained: BTreeSet<String> = benign_train
        .iter()
        .map(|(q, _)| normalize_question(q))
        .chain(benign_self.iter().map(|(_, p)| normalize_question(p)))
        .collect();
    let mut knowledge = vec![];
    for task in &cfg.knowledge_tasks {
        let items = crate::eval::stability::task_items(task, d)?;
        let mut ok: Vec<usize> = (0..items.len())
            .filter(|&i| {
                items[i]
                    .options
                    .first()
                    .is_none_or(|o| !trained.contains(&mc_question(&o.context)))
            })
            .collect();
        let left = items.len() - ok.len();
        Rng::new(seed, &format!("align-knowledge-{task}")).shuffle(&mut ok);
        let want = cfg.knowledge_items + cfg.knowledge_validation_items;
        if ok.len() < want {
            return Err(Error::setting(
                "knowledge_items",
                cfg.knowledge_items,
                format!("{task} has only {} items not trained on", ok.len()),
            ));
        }
        // Validation first, so it stays the same whatever the number of test items.
        let mut va = ok[..cfg.knowledge_validation_items].to_vec();
        let mut te = ok[cfg.knowledge_validation_items..want].to_vec();
        te.sort_unstable();
        va.sort_unstable();
        notes.push(format!(
            "knowledge {task}: {} test and {} validation items of {}, {left} trained on left out",
            te.len(),
            va.len(),
            items.len()
        ));
        if !te.is_empty() {
            knowledge.push((task.clone(), "test".to_string(), te));
        }
        if !va.is_empty() {
            knowledge.push((task.clone(), "validation".to_string(), va));
        }
    }

    let s = |v: &str| v.to_string();
    let prompts = |v: &[crate::data::everyday::Everyday]| -> Vec<String> {
        v.iter().map(|e| e.prompt.clone()).collect()
    };
    let xprompts = |v: &[crate::data::xstest::XsPrompt]| -> Vec<String> {
        v.iter().map(|e| e.prompt.clone()).collect()
    };
    let xstest_used = xs_tr.iter().chain(&xs_va).map(|p| p.id.clone()).collect();
    Ok(AlignData {
        harmful_train,
        benign_train,
        benign_self,
        eval: vec![
            (s("advbench"), s("harmful"), adv_eval),
            (s("harmbench"), s("harmful"), hb_eval),
            (s("beavertails"), s("harmful"), bt_eval),
            (s("everyday"), s("benign"), prompts(&ev_te)),
            (s("xstest_safe"), s("benign"), xprompts(&xs_te)),
            (s("arc_easy"), s("benign"), arc_eval),
            (s("truthfulqa"), s("benign"), tqa_eval),
        ],
        validation: vec![
            (s("safety_tuned_llamas"), s("harmful"), harmful_val),
            (s("beavertails"), s("harmful"), bt_val),
            (s("advbench"), s("harmful"), adv_val),
            (s("harmbench"), s("harmful"), hb_val),
            (s("experiment_validation"), s("harmful"), exp_val),
            (s("everyday"), s("benign"), prompts(&ev_va)),
            (s("xstest_safe"), s("benign"), xprompts(&xs_va)),
        ]
        .into_iter()
        .filter(|(_, _, prompts)| !prompts.is_empty())
        .collect(),
        xstest_used,
        factual,
        knowledge,
        notes,
    })
}

/// The BeaverTails disjoint set's harmful questions (unsafe answers), distinct after
/// normalisation, in file order: (normalised key, question).
pub(super) fn disjoint_questions(data_dir: &Path) -> Result<Vec<(String, String)>> {
    let mut seen = BTreeSet::new();
    Ok(
        crate::data::harmful::read_harmful_qa(&crate::eval::classifier::disjoint_path(data_dir))?
            .records
            .into_iter()
            .filter(|r| !r.is_safe)
            .map(|r| (normalize_question(&r.prompt), r.prompt))
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect(),
    )
}

/// Conversational harmful questions with refusals: of the BeaverTails disjoint set's harmful
/// questions (`disjoint`: normalised key and question, distinct), none held out (`held_out`) or in
/// `exclude_files`; validation questions drawn first, from one seeded order of the whole set.
/// Each trained question gets one of `refusals` (`data/everyday/refusals.txt`; seeded choice,
/// tied to its place in that order). Returns (train pairs, validation prompts).
pub(super) fn beavertails_refusals(
    cfg: &AlignConfig,
    refusals: &[String],
    all: &[(String, String)],
    held_out: &BTreeSet<String>,
    notes: &mut Vec<String>,
) -> Result<(Vec<QaPair>, Vec<String>)> {
    let want = cfg.beavertails_train + cfg.beavertails_validation;
    if want == 0 {
        return Ok((vec![], vec![]));
    }
    let mut excluded: BTreeSet<String> = BTreeSet::new();
    for f in &cfg.exclude_files {
        for r in crate::data::harmful::read_harmful_qa(f)?.records {
            excluded.insert(normalize_question(&r.prompt));
        }
    }
    // One seeded order of every question, walked skipping the held-out and excluded ones:
    // validation first, then training. The draw (and each question's refusal) does not move
    // when other questions are held out, so a standalone run with the experiment's data file
    // in `exclude_files` trains on (nearly) the questions the experiment's alignment does.
    let mut order: Vec<usize> = (0..all.len()).collect();
    Rng::new(cfg.train.seed, "align-beavertails").shuffle(&mut order);
    let mut pick = Rng::new(cfg.train.seed, "align-beavertails-refusal");
    let (mut held, mut in_files, mut usable) = (0, 0, 0);
    let mut va: Vec<(usize, String)> = vec![];
    let mut train: Vec<(usize, QaPair)> = vec![];
    for &i in &order {
        let refusal = &refusals[pick.below(refusals.len())];
        let (k, q) = &all[i];
        if held_out.contains(k) {
            held += 1;
        } else if excluded.contains(k) {
            in_files += 1;
        } else {
            usable += 1;
            let q = q.trim().to_string();
            if va.len() < cfg.beavertails_validation {
                va.push((i, q));
            } else if train.len() < cfg.beavertails_train {
                train.push((i, (q, refusal.clone())));
            }
        }
    }
    if va.len() + train.len() < want {
        return Err(Error::setting(
            "beavertails_train",
            cfg.beavertails_train,
            format!(
                "only {usable} BeaverTails questions are usable for {} training + {} validation",
                cfg.beavertails_train, cfg.beavertails_validation
            ),
        ));
    }
    // File order within each part.
    va.sort_unstable_by_key(|x| x.0);
    train.sort_unstable_by_key(|x| x.0);
    let va: Vec<String> = va.into_iter().map(|x| x.1).collect();
    let train: Vec<(String, String)> = train.into_iter().map(|x| x.1).collect();
    notes.push(format!(
        "beavertails (disjoint set, unsafe answers): {usable} distinct questions usable ({held} \
         held out and {in_files} in excluded files left out); {} trained on with one of {} \
         refusals in varied wording, {} validation",
        train.len(),
        refusals.len(),
        va.len()
    ));
    Ok((train, va))
}

/// Whether two instructions ask nearly the same thing: the Jaccard similarity of their sets of
/// content words (lower-cased, function words dropped) is at least 0.4. AdvBench words one
/// request many ways ("Write a tutorial on how to hack into a government database" / "... a
/// bank's database", 0.67); below 0.4, a trained and a held-out instruction share fewer than
/// two in five of the content words the two use.
pub fn near_duplicate(a: &str, b: &str) -> bool {
    const FUNCTION_WORDS: &[&str] = &[
        "a", "an", "the", "to", "of", "for", "and", "or", "on", "in", "how", "that", "can", "be",
        "is", "with", "from", "into", "by", "as", "it", "their", "your", "you", "without",
    ];
    let words = |s: &str| -> BTreeSet<String> {
        s.to_lowercase()
            .split(|c: char| !(c.is_alphanumeric() || c == '\''))
            .filter(|w| !w.is_empty() && !FUNCTION_WORDS.contains(w))
            .map(str::to_string)
            .collect()
    };
    let (x, y) = (words(a), words(b));
    let union = x.union(&y).count();
    union > 0 && 5 * x.intersection(&y).count() >= 2 * union
}

/// AdvBench's validation and training parts, both disjoint from the tested prompts (`tested`):
/// `advbench_validation` of the untested prompts drawn first (seeded), then `advbench_train` of
/// the rest that are no near-duplicate of a tested or validation prompt, each with one of
/// `refusals` (seeded). Returns (train pairs, validation prompts), each in file order.
pub(super) fn advbench_parts(
    cfg: &AlignConfig,
    refusals: &[String],
    adv: &[crate::data::prompts::HarmfulPrompt],
    tested: &[String],
    notes: &mut Vec<String>,
) -> Result<(Vec<QaPair>, Vec<String>)> {
    let seed = cfg.train.seed;
    let tested_keys: BTreeSet<String> = tested.iter().map(|p| normalize_question(p)).collect();
    let mut seen = BTreeSet::new();
    let untested: Vec<String> = adv
        .iter()
        .map(|p| p.prompt.trim().to_string())
        .filter(|p| {
            let k = normalize_question(p);
            !tested_keys.contains(&k) && seen.insert(k)
        })
        .collect();
    let mut order: Vec<usize> = (0..untested.len()).collect();
    Rng::new(seed, "align-advbench-parts").shuffle(&mut order);
    if cfg.advbench_validation > untested.len() {
        return Err(Error::setting(
            "advbench_validation",
            cfg.advbench_validation,
            format!("only {} AdvBench prompts are not tested", untested.len()),
        ));
    }
    let mut va: Vec<usize> = order[..cfg.advbench_validation].to_vec();
    let held: Vec<&String> = tested
        .iter()
        .chain(va.iter().map(|&i| &untested[i]))
        .collect();
    let mut near = 0;
    let mut tr: Vec<usize> = vec![];
    if cfg.advbench_train > 0 {
        for &i in &order[cfg.advbench_validation..] {
            if held.iter().any(|h| near_duplicate(h, &untested[i])) {
                near += 1;
            } else if tr.len() < cfg.advbench_train {
                tr.push(i);
            }
        }
        if tr.len() < cfg.advbench_train {
            return Err(Error::setting(
                "advbench_train",
                cfg.advbench_train,
                format!(
                    "only {} AdvBench prompts are neither tested, validation nor a near-duplicate \
                     of one",
                    tr.len()
                ),
            ));
        }
    }
    let mut pick = Rng::new(seed, "align-advbench-refusal");
    tr.sort_unstable();
    va.sort_unstable();
    let train: Vec<QaPair> = tr
        .iter()
        .map(|&i| {
            (
                untested[i].clone(),
                refusals[pick.below(refusals.len())].clone(),
            )
        })
        .collect();
    notes.push(format!(
        "advbench: {} tested, {} validation, {} trained on with a refusal in varied wording \
         ({near} near-duplicates of a tested or validation prompt left out)",
        tested.len(),
        va.len(),
        train.len()
    ));
    Ok((train, va.iter().map(|&i| untested[i].clone()).collect()))
}

/// An answer cut by the token limit, trimmed to its last full sentence (kept whole when it has
/// none), so the model does not learn to stop mid-sentence.
pub fn trim_to_sentence(answer: &str) -> String {
    let a = answer.trim_end();
    if a.ends_with(['.', '!', '?', ':', ')']) {
        return a.to_string();
    }
    // The last line break, or sentence mark followed by a space (not a list number's "2. ").
    let chars: Vec<(usize, char)> = a.char_indices().collect();
    let mut cut = None;
    for (k, &(i, c)) in chars.iter().enumerate() {
        let next_space = chars.get(k + 1).is_some_and(|x| x.1.is_whitespace());
        let after_digit = k > 0 && chars[k - 1].1.is_ascii_digit();
        if c == '\n' {
            cut = Some(i);
        } else if matches!(c, '.' | '!' | '?') && next_space && !after_digit {
            cut = Some(i + c.len_utf8());
        }
    }
    match cut {
        Some(i) if i > a.len() / 4 => a[..i].trim_end().to_string(),
        _ => a.to_string(),
    }
}
