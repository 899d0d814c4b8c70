//! The judge's training and test examples: BeaverTails, the disjoint BeaverTails set, refusals and
//! XSTest's human-labelled answers, with their sources, exclusions and splits.

use super::*;

/// One labelled training or test example.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Example {
    pub question: String,
    pub answer: String,
    pub harmful: bool,
    /// A graded score the label was cut from (the Perspective toxicity of a DecodingTrust text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<f64>,
    /// Where it comes from ([`SOURCE_BEAVERTAILS`], [`SOURCE_DISJOINT`], [`SOURCE_REFUSALS`],
    /// `xstest-{file}`; empty when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// The answer is a refusal (a Safety-Tuned LLaMAs refusal, an XSTest full refusal).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refusal: bool,
}

/// [`Example::source`] of the Gamma-Guard BeaverTails subset's answers.
pub const SOURCE_BEAVERTAILS: &str = "beavertails";
/// [`Example::source`] of the BeaverTails disjoint attack set's answers.
pub const SOURCE_DISJOINT: &str = "beavertails-disjoint";
/// [`Example::source`] of the Safety-Tuned LLaMAs refusals.
pub const SOURCE_REFUSALS: &str = "refusals";

/// The BeaverTails disjoint attack set under a data directory.
pub fn disjoint_path(data_dir: &Path) -> PathBuf {
    data_dir.join("beavertails_disjoint_attack/beavertails_disjoint_attack.jsonl")
}

impl HasQuestion for Example {
    fn question(&self) -> &str {
        &self.question
    }
}

/// The shipped training data: BeaverTails (Gamma-Guard subset) answers with their safe/unsafe
/// labels, plus up to `refusals` Safety-Tuned LLaMAs instruction/refusal records as harmless
/// examples (a seeded sample).
pub fn shipped_examples(data_dir: &Path, refusals: usize, seed: u64) -> Result<Vec<Example>> {
    let bt = data_dir.join("beavertails_subset_gammaguard/prompt_response_classified.csv");
    let mut out: Vec<Example> = crate::data::read_harmful_qa(&bt)?
        .records
        .into_iter()
        .map(|r| Example {
            question: r.prompt,
            answer: r.response,
            harmful: !r.is_safe,
            source: SOURCE_BEAVERTAILS.into(),
            ..Example::default()
        })
        .collect();
    if refusals > 0 {
        let stl = data_dir.join("safety_tuned_llamas/safety_only_data_Instructions.json");
        let mut rs = crate::data::prompts::read_instructions(&stl)?.records;
        Rng::new(seed, "classifier-refusals").shuffle(&mut rs);
        rs.truncate(refusals);
        out.extend(rs.into_iter().map(|r| Example {
            question: r.prompt(),
            answer: r.output,
            harmful: false,
            source: SOURCE_REFUSALS.into(),
            refusal: true,
            ..Example::default()
        }));
    }
    Ok(out)
}

/// The BeaverTails disjoint attack set (`beavertails_disjoint_attack.jsonl`: BeaverTails'
/// own `is_safe`, false = harmful), a seeded sample of at most `samples` (0 = all).
pub fn disjoint_examples(path: &Path, samples: usize, seed: u64) -> Result<Vec<Example>> {
    let mut rs = crate::data::read_harmful_qa(path)?.records;
    if samples > 0 && rs.len() > samples {
        Rng::new(seed, "classifier-disjoint").shuffle(&mut rs);
        rs.truncate(samples);
    }
    Ok(rs
        .into_iter()
        .map(|r| Example {
            question: r.prompt,
            answer: r.response,
            harmful: !r.is_safe,
            source: SOURCE_DISJOINT.into(),
            ..Example::default()
        })
        .collect())
}

/// How an XSTest answer is labelled for the judge: harmful when its prompt is unsafe and it
/// fully complies; harmless when it fully refuses or its prompt is safe; `None` (left out) for
/// a partial refusal to an unsafe prompt, which often still carries the harmful content (see
/// docs/EVALUATION.md). A partial refusal to a safe prompt is harmless.
pub fn xstest_label(
    final_label: crate::data::xstest::FinalLabel,
    prompt_unsafe: bool,
) -> Option<bool> {
    use crate::data::xstest::FinalLabel as L;
    match (final_label, prompt_unsafe) {
        (L::FullCompliance, u) => Some(u),
        (L::FullRefusal, _) => Some(false),
        (L::PartialRefusal, false) => Some(false),
        (L::PartialRefusal, true) => None,
    }
}

/// The human-labelled answers of XSTest completion file `name` in `dir` as examples
/// ([`xstest_label`]; source `xstest-{name}`), and how many partial refusals to unsafe prompts
/// were left out.
pub fn xstest_examples(dir: &Path, name: &str) -> Result<(Vec<Example>, usize)> {
    use crate::data::xstest::FinalLabel;
    let mut out = vec![];
    let mut left_out = 0;
    for (a, prompt_unsafe) in crate::data::xstest::load_labelled_answers(dir, name)? {
        match xstest_label(a.final_label, prompt_unsafe) {
            Some(harmful) => out.push(Example {
                question: a.prompt,
                answer: a.completion,
                harmful,
                source: format!("xstest-{name}"),
                refusal: a.final_label == FinalLabel::FullRefusal,
                ..Example::default()
            }),
            None => left_out += 1,
        }
    }
    Ok((out, left_out))
}

/// Drop every example whose question, normalised ([`crate::data::normalize_question`]), is one
/// of `excluded`'s; returns the kept examples and how many were dropped.
pub fn exclude_questions(examples: Vec<Example>, excluded: &[String]) -> (Vec<Example>, usize) {
    if excluded.is_empty() {
        return (examples, 0);
    }
    let banned: std::collections::HashSet<String> = excluded
        .iter()
        .map(|q| crate::data::normalize_question(q))
        .collect();
    let n = examples.len();
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|e| !banned.contains(&crate::data::normalize_question(&e.question)))
        .collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

/// Perspective toxicity at or above which a DecodingTrust text counts as toxic (the usual cut
/// of RealToxicityPrompts and DecodingTrust).
pub const TOXIC_AT: f64 = 0.5;

/// Toxicity examples from DecodingTrust records (`training_dataset.jsonl`): each continuation
/// and each prompt with a Perspective toxicity score is one text, toxic at [`TOXIC_AT`]. The
/// record's prompt is the example's question, so a split by question keeps a prompt and its
/// continuation on the same side. Texts without a score are skipped, and so are the records of
/// type `toxic_test`: their prompts are the evaluation's (`--prompts decoding-trust`).
pub fn toxicity_examples(records: &[crate::data::toxicity::ToxicityRecord]) -> Vec<Example> {
    let mut out = vec![];
    for r in records.iter().filter(|r| r.kind != "toxic_test") {
        for t in [&r.continuation, &r.prompt] {
            if let Some(tox) = t.scores.toxicity {
                out.push(Example {
                    question: r.prompt.text.clone(),
                    answer: t.text.clone(),
                    harmful: tox >= TOXIC_AT,
                    reference: Some(tox),
                    source: "decoding-trust".into(),
                    ..Example::default()
                });
            }
        }
    }
    out
}

/// What a classifier is trained to tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Harmful answers against safe answers and refusals (BeaverTails, Safety-Tuned LLaMAs);
    /// scores `Question: {q}\nAnswer: {a}`.
    #[default]
    Harmfulness,
    /// Toxic texts against the rest by DecodingTrust's Perspective labels; scores the text alone.
    Toxicity,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "harmfulness" => Ok(Task::Harmfulness),
            "toxicity" => Ok(Task::Toxicity),
            _ => Err(Error::setting(
                "task",
                s,
                "expected harmfulness or toxicity",
            )),
        }
    }
}

/// Pearson correlation of two equally long series (`None` when their lengths differ, when
/// shorter than 2, or when either is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || y.len() != n {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Split examples into train and test by distinct question (no question in both), after
/// keeping a seeded sample of at most `samples` examples (0 = all).
pub fn split_examples(
    examples: &[Example],
    samples: usize,
    test_fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::setting(
            "test-fraction",
            test_fraction,
            "must be strictly between 0 and 1",
        ));
    }
    let mut pool = examples.to_vec();
    if samples > 0 && pool.len() > samples {
        Rng::new(seed, "classifier-samples").shuffle(&mut pool);
        pool.truncate(samples);
    }
    let splits = split_disjoint(
        &pool,
        &[
            SplitSpec::fraction("test", test_fraction),
            SplitSpec::rest("train"),
        ],
        Duplicates::KeepTogether,
        seed,
    )?;
    let get = |n: &str| splits.get(n).map(<[Example]>::to_vec).unwrap_or_default();
    Ok((get("train"), get("test")))
}

/// The text of a DecodingTrust `refusal` field without the prompt it echoes: the field is
/// `Prompt: {prompt}\nContinuation: {text}`, where the text is a model's harmless continuation
/// or refusal (a few continue first, then refuse after a blank line). Anything else is returned
/// whole.
pub fn refusal_body(refusal: &str) -> &str {
    match refusal
        .strip_prefix("Prompt:")
        .and_then(|r| r.split_once("\nContinuation:"))
    {
        Some((_, rest)) if !rest.trim().is_empty() => rest.trim_start(),
        _ => refusal,
    }
}

/// Question/answer pairs from a JSONL file of `{"prompt": .., "response": ..}` objects
/// (`question`/`answer` are accepted too). Blank lines are skipped; errors name the line.
pub fn read_pairs_jsonl(path: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::util::io::read_text(path)?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let field = |names: [&str; 2]| -> Result<String> {
            for n in names {
                match v.get(n) {
                    Some(serde_json::Value::String(s)) => return Ok(s.clone()),
                    Some(serde_json::Value::Null) | None => {}
                    Some(other) => {
                        return Err(Error::field(
                            path,
                            n,
                            format!("line {}: expected a string, got {other}", i + 1),
                        ))
                    }
                }
            }
            Err(Error::field(
                path,
                names[0],
                format!("line {}: missing (also accepted: `{}`)", i + 1, names[1]),
            ))
        };
        out.push((
            field(["prompt", "question"])?,
            field(["response", "answer"])?,
        ));
    }
    if out.is_empty() {
        return Err(Error::file(path, "no records"));
    }
    Ok(out)
}
