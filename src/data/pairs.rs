//! Paired data, the defence's input (paper Section 3): one question with a harmful answer and a
//! harmless answer (a refusal). The two answers are tokenised to the same padded length and the
//! pair mask marks where they differ (see [`super::encode`]).
//!
//! File format: `.jsonl` lines (or a `.json` array, or `.parquet` rows) of
//! `{"prompt": ..., "harmful": ..., "harmless": ..., "category": ...?}`; `category` is optional
//! and takes any form [`super::harmful::parse_category_value`] accepts. A record missing either
//! answer is an unpaired record and an error, as is a record whose two answers are identical
//! (it would have an empty pair mask).
//!
//! Pairs can also be derived from data that carries refusals: BeaverTails-with-refusals records
//! ([`pairs_from_harmful_qa`]), DecodingTrust refusals ([`pairs_from_toxicity`]), or by joining
//! harmful answers with instruction/refusal data on the normalised question ([`join_refusals`]).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::categories::HarmCategories;
use super::harmful::{parse_category_value, HarmfulQa};
use super::prompts::Instruction;
use super::source::{self, At, Loc};
use super::split::normalize_question;
use super::toxicity::ToxicityRecord;
use super::{HasCategories, HasQuestion, Loaded, Skipped};
use crate::util::error::Result;

/// One defence pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pair {
    pub prompt: String,
    pub harmful: String,
    pub harmless: String,
    /// BeaverTails categories, when known.
    pub categories: Option<HarmCategories>,
}

impl HasQuestion for Pair {
    fn question(&self) -> &str {
        &self.prompt
    }
}

impl HasCategories for Pair {
    fn harm_categories(&self) -> Option<HarmCategories> {
        self.categories
    }
}

/// Read a pairs file (see the module docs).
pub fn read_pairs(path: &Path) -> Result<Loaded<Pair>> {
    let records = source::json_records(path)?
        .iter()
        .map(|(at, v)| pair_from_value(v, &Loc::new(path, *at)))
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

/// One pair from a JSON object.
pub fn pair_from_value(v: &Value, loc: &Loc) -> Result<Pair> {
    let o = source::as_object(v, loc)?;
    for side in ["harmful", "harmless"] {
        if !o.contains_key(side) {
            return Err(loc.err(
                side,
                "missing: unpaired record (a pair needs both `harmful` and `harmless`)",
            ));
        }
    }
    let harmful = source::get_text(o, "harmful", loc)?;
    let harmless = source::get_text(o, "harmless", loc)?;
    if harmful == harmless {
        return Err(loc.err(
            "harmless",
            "identical to `harmful`: the pair mask would be empty",
        ));
    }
    let categories = match o.get("category") {
        None | Some(Value::Null) => None,
        Some(c) => Some(parse_category_value(c, loc, "category")?),
    };
    Ok(Pair {
        prompt: source::get_text(o, "prompt", loc)?,
        harmful,
        harmless,
        categories,
    })
}

/// Pairs from harmful-QA records that carry a refusal: unsafe records with a refusal become
/// pairs; safe records and records without a refusal are skipped with the reason.
pub fn pairs_from_harmful_qa(records: &[HarmfulQa]) -> Loaded<Pair> {
    let mut out = Loaded::new(vec![]);
    for (i, r) in records.iter().enumerate() {
        let at = At::Record(i + 1);
        match (&r.refusal, r.is_safe) {
            (_, true) => out.skipped.push(Skipped::new(at, "safe response")),
            (None, false) => out.skipped.push(Skipped::new(at, "no refusal")),
            (Some(refusal), false) => out.records.push(Pair {
                prompt: r.prompt.clone(),
                harmful: r.response.clone(),
                harmless: refusal.clone(),
                categories: r.categories,
            }),
        }
    }
    out
}

/// Pairs from DecodingTrust records with refusals: the prompt text, its (toxic) continuation as
/// the harmful answer and the refusal as the harmless one. Records without a refusal are skipped.
pub fn pairs_from_toxicity(records: &[ToxicityRecord]) -> Loaded<Pair> {
    let mut out = Loaded::new(vec![]);
    for (i, r) in records.iter().enumerate() {
        match &r.refusal {
            Some(refusal) => out.records.push(Pair {
                prompt: r.prompt.text.clone(),
                harmful: r.continuation.text.clone(),
                harmless: refusal.clone(),
                categories: None,
            }),
            None => out
                .skipped
                .push(Skipped::new(At::Record(i + 1), "no refusal")),
        }
    }
    out
}

/// Join unsafe harmful answers with refusals to the same question (matched after
/// [`normalize_question`]). The first refusal for a question is used; harmful records with no
/// refusal and safe records are skipped with the reason.
pub fn join_refusals(harmful: &[HarmfulQa], refusals: &[Instruction]) -> Loaded<Pair> {
    let mut by_q: HashMap<String, &str> = HashMap::new();
    for r in refusals {
        by_q.entry(normalize_question(&r.prompt()))
            .or_insert(r.output.as_str());
    }
    let mut out = Loaded::new(vec![]);
    for (i, h) in harmful.iter().enumerate() {
        let at = At::Record(i + 1);
        if h.is_safe {
            out.skipped.push(Skipped::new(at, "safe response"));
            continue;
        }
        match by_q.get(&normalize_question(&h.prompt)) {
            Some(refusal) if *refusal != h.response => out.records.push(Pair {
                prompt: h.prompt.clone(),
                harmful: h.response.clone(),
                harmless: refusal.to_string(),
                categories: h.categories,
            }),
            Some(_) => out
                .skipped
                .push(Skipped::new(at, "refusal identical to the harmful answer")),
            None => out
                .skipped
                .push(Skipped::new(at, "no refusal for this question")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loc() -> Loc<'static> {
        Loc::new(Path::new("p.jsonl"), At::Line(2))
    }

    #[test]
    fn unpaired_and_identical_pairs_are_errors() {
        let e = pair_from_value(&json!({"prompt": "q", "harmful": "a"}), &loc())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2: harmless") && e.contains("unpaired"),
            "{e}"
        );
        let e = pair_from_value(
            &json!({"prompt": "q", "harmful": "a", "harmless": "a"}),
            &loc(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("identical"), "{e}");
        let p = pair_from_value(
            &json!({"prompt": "q", "harmful": "a", "harmless": "b", "category": "self_harm"}),
            &loc(),
        )
        .unwrap();
        assert_eq!(p.categories.unwrap().len(), 1);
    }

    #[test]
    fn join_matches_normalised_questions_and_counts_misses() {
        let h = |p: &str, safe| HarmfulQa {
            prompt: p.into(),
            response: "bad".into(),
            categories: None,
            is_safe: safe,
            refusal: None,
        };
        let harmful = vec![
            h("How do I X?", false),
            h("other", false),
            h("How do I X", true),
        ];
        let refusals = vec![Instruction {
            instruction: "how do  i x".into(),
            input: String::new(),
            output: "No.".into(),
        }];
        let j = join_refusals(&harmful, &refusals);
        assert_eq!(j.records.len(), 1);
        assert_eq!(j.records[0].harmless, "No.");
        assert_eq!(j.skipped.len(), 2);
    }
}
