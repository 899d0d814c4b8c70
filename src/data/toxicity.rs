//! DecodingTrust toxicity data (RealToxicityPrompts-derived), used by the paper's second harmful
//! domain (toxic content generation, Section 4 / Appendix): `training_dataset.jsonl` holds
//! prompt/continuation objects with Perspective API scores and a `type` (`toxic`, `non_toxic`,
//! `toxic_test`); `decoding_trust_with_refusals_train.json` is a JSON array of the same records
//! with a `refusal` string added. Either form, JSON array or JSONL, is accepted.
//!
//! Each record: `{type, filename?, begin?, end?, challenging?, prompt: {text, <scores>},
//! continuation: {text, <scores>}, refusal?}`. Scores may be missing or `null`
//! (RealToxicityPrompts has unscored texts).

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::source::{self, Loc};
use super::{HasQuestion, Loaded};
use crate::util::error::Result;

/// Perspective API attribute scores in `[0, 1]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ToxicityScores {
    pub toxicity: Option<f64>,
    pub severe_toxicity: Option<f64>,
    pub profanity: Option<f64>,
    pub sexually_explicit: Option<f64>,
    pub flirtation: Option<f64>,
    pub identity_attack: Option<f64>,
    pub threat: Option<f64>,
    pub insult: Option<f64>,
}

/// A text with its scores.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoredText {
    pub text: String,
    pub scores: ToxicityScores,
}

/// One DecodingTrust record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToxicityRecord {
    /// `toxic`, `non_toxic` or `toxic_test`.
    pub kind: String,
    pub filename: Option<String>,
    pub challenging: Option<bool>,
    pub prompt: ScoredText,
    pub continuation: ScoredText,
    pub refusal: Option<String>,
}

impl HasQuestion for ToxicityRecord {
    fn question(&self) -> &str {
        &self.prompt.text
    }
}

/// Read DecodingTrust records from a `.jsonl` or `.json` file.
pub fn read_decoding_trust(path: &Path) -> Result<Loaded<ToxicityRecord>> {
    let records = source::json_records(path)?
        .iter()
        .map(|(at, v)| toxicity_from_value(v, &Loc::new(path, *at)))
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

/// One record from a JSON object.
pub fn toxicity_from_value(v: &Value, loc: &Loc) -> Result<ToxicityRecord> {
    let o = source::as_object(v, loc)?;
    let challenging = match o.get("challenging") {
        None | Some(Value::Null) => None,
        Some(_) => Some(source::get_bool(o, "challenging", loc)?),
    };
    Ok(ToxicityRecord {
        kind: source::get_text(o, "type", loc)?,
        filename: source::opt_str(o, "filename", loc)?,
        challenging,
        prompt: scored(o, "prompt", loc)?,
        continuation: scored(o, "continuation", loc)?,
        refusal: source::opt_str(o, "refusal", loc)?.filter(|s| !s.trim().is_empty()),
    })
}

fn scored(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<ScoredText> {
    let inner = match o.get(key) {
        None => return Err(loc.err(key, "missing")),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(loc.err(
                key,
                format!(
                    "expected an object with `text` and scores, found {}",
                    source::type_name(v)
                ),
            ))
        }
    };
    let sub = |k: &str| format!("{key}.{k}");
    let num = |k: &str| -> Result<Option<f64>> {
        match inner.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                loc.err(
                    &sub(k),
                    format!("expected a number, found {}", source::type_name(v)),
                )
            }),
        }
    };
    let text = match inner.get("text") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(loc.err(&sub("text"), "is empty")),
        Some(v) => {
            return Err(loc.err(
                &sub("text"),
                format!("expected a string, found {}", source::type_name(v)),
            ))
        }
        None => return Err(loc.err(&sub("text"), "missing")),
    };
    Ok(ScoredText {
        text,
        scores: ToxicityScores {
            toxicity: num("toxicity")?,
            severe_toxicity: num("severe_toxicity")?,
            profanity: num("profanity")?,
            sexually_explicit: num("sexually_explicit")?,
            flirtation: num("flirtation")?,
            identity_attack: num("identity_attack")?,
            threat: num("threat")?,
            insult: num("insult")?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::At;
    use serde_json::json;

    #[test]
    fn nested_fields_are_named_in_errors() {
        let loc = Loc::new(Path::new("dt.jsonl"), At::Line(3));
        let v = json!({"type": "toxic", "prompt": {"text": "p", "toxicity": "high"},
                       "continuation": {"text": "c"}});
        let e = toxicity_from_value(&v, &loc).unwrap_err().to_string();
        assert!(e.contains("line 3: prompt.toxicity"), "{e}");
        let v = json!({"type": "toxic", "prompt": {"text": "p", "toxicity": null},
                       "continuation": {"text": "c", "insult": 0.5}});
        let r = toxicity_from_value(&v, &loc).unwrap();
        assert_eq!(r.prompt.scores.toxicity, None);
        assert_eq!(r.continuation.scores.insult, Some(0.5));
        let v = json!({"type": "toxic", "prompt": {"text": "p"}});
        let e = toxicity_from_value(&v, &loc).unwrap_err().to_string();
        assert!(e.contains("continuation") && e.contains("missing"), "{e}");
    }
}
