//! Harmful question/answer data: the attack's training set and the source of the defence's
//! harmful answers (paper Section 4: BeaverTails).
//!
//! Accepted files:
//! - BeaverTails' published format as `.json` (array), `.jsonl` or `.parquet`: `prompt`,
//!   `response`, `category` (the 14 harm categories to booleans: an object, a Parquet struct of
//!   14 bool columns, or a Parquet map) and `is_safe`. A record may also carry `refusal` (the
//!   reference code's `beavertails_with_refusals` files), which makes it usable as a defence pair.
//! - Simpler labelled files: `.csv` with `prompt,response,label` (label 1 = unsafe, as in the
//!   Gamma-Guard BeaverTails subset), or JSON/JSONL objects with `label` instead of `is_safe`.
//!   `category` is optional there (absent means "no category information").
//!
//! `category` may also be a single category name or a list of names. Unknown names are errors;
//! categories absent from a boolean map count as false.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::categories::{HarmCategories, HarmCategory};
use super::source::{self, At, FileFormat, Loc, TableSpec};
use super::{HasCategories, HasQuestion, Loaded};
use crate::util::error::Result;

/// One harmful-QA record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HarmfulQa {
    pub prompt: String,
    pub response: String,
    /// BeaverTails categories; `None` when the file carries no category information.
    pub categories: Option<HarmCategories>,
    /// Whether the response is safe (BeaverTails `is_safe`; `label == 0` in labelled files).
    pub is_safe: bool,
    /// A paired refusal, when the file has one.
    pub refusal: Option<String>,
}

impl HasQuestion for HarmfulQa {
    fn question(&self) -> &str {
        &self.prompt
    }
}

impl HasCategories for HarmfulQa {
    fn harm_categories(&self) -> Option<HarmCategories> {
        self.categories
    }
}

/// Read harmful QA records from any accepted file (see the module docs).
pub fn read_harmful_qa(path: &Path) -> Result<Loaded<HarmfulQa>> {
    let records = match FileFormat::from_path(path)? {
        FileFormat::Csv => read_labelled_csv(path)?,
        _ => source::json_records(path)?
            .iter()
            .map(|(at, v)| harmful_from_value(v, &Loc::new(path, *at)))
            .collect::<Result<Vec<_>>>()?,
    };
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

fn read_labelled_csv(path: &Path) -> Result<Vec<HarmfulQa>> {
    let t = source::read_table(path, TableSpec::CSV)?;
    let [p, r] = t.columns(path, ["prompt", "response"])?;
    let safe_col = match (t.column("is_safe"), t.column("label")) {
        (Some(i), _) => SafeColumn::IsSafe(i),
        (None, Some(i)) => SafeColumn::Label(i),
        (None, None) => {
            return Err(crate::Error::field(
                path,
                "label",
                format!(
                    "missing column: need `label` (1 = unsafe) or `is_safe` (the header has: {})",
                    t.headers.join(", ")
                ),
            ))
        }
    };
    let category = t.column("category");
    t.rows
        .iter()
        .map(|(at, row)| {
            let loc = Loc::new(path, *at);
            let safe = match safe_col {
                SafeColumn::IsSafe(i) => source::cell_bool(row, i, &loc, "is_safe")?,
                SafeColumn::Label(i) => !source::cell_bool(row, i, &loc, "label")?,
            };
            let categories = match category {
                Some(i) => Some(parse_category_list(&row[i], &loc, "category")?),
                None => None,
            };
            Ok(HarmfulQa {
                prompt: source::cell_text(row, p, &loc, "prompt")?,
                response: source::cell_text(row, r, &loc, "response")?,
                categories,
                is_safe: safe,
                refusal: None,
            })
        })
        .collect()
}

/// Which column of a labelled CSV says whether the response is safe.
#[derive(Clone, Copy)]
enum SafeColumn {
    IsSafe(usize),
    /// 1 = unsafe.
    Label(usize),
}

/// One record from a JSON object.
pub fn harmful_from_value(v: &Value, loc: &Loc) -> Result<HarmfulQa> {
    let o = source::as_object(v, loc)?;
    let categories = match o.get("category") {
        None | Some(Value::Null) => None,
        Some(c) => Some(parse_category_value(c, loc, "category")?),
    };
    let is_safe = if o.contains_key("is_safe") {
        source::get_bool(o, "is_safe", loc)?
    } else if o.contains_key("label") {
        !source::get_bool(o, "label", loc)?
    } else {
        return Err(loc.err("is_safe", "missing (and no `label` either)"));
    };
    Ok(HarmfulQa {
        prompt: source::get_text(o, "prompt", loc)?,
        response: source::get_text(o, "response", loc)?,
        categories,
        is_safe,
        refusal: opt_text(o, "refusal", loc)?,
    })
}

fn opt_text(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<Option<String>> {
    Ok(source::opt_str(o, key, loc)?.filter(|s| !s.trim().is_empty()))
}

/// A `category` value: an object of name -> boolean, a list of names, or one name.
pub fn parse_category_value(v: &Value, loc: &Loc, field: &str) -> Result<HarmCategories> {
    let mut set = HarmCategories::EMPTY;
    match v {
        Value::Object(m) => {
            for (name, flag) in m {
                let cat: HarmCategory = name
                    .parse()
                    .map_err(|e: String| loc.err(&format!("{field}.{name}"), e))?;
                let on = match flag {
                    Value::Null => false,
                    other => source::value_bool(other).ok_or_else(|| {
                        loc.err(
                            &format!("{field}.{name}"),
                            format!("expected a boolean, found {}", source::type_name(other)),
                        )
                    })?,
                };
                if on {
                    set.insert(cat);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name = item.as_str().ok_or_else(|| {
                    loc.err(
                        &format!("{field}[{i}]"),
                        format!(
                            "expected a category name, found {}",
                            source::type_name(item)
                        ),
                    )
                })?;
                set.insert(name.parse().map_err(|e: String| loc.err(field, e))?);
            }
        }
        Value::String(s) => return parse_category_list(s, loc, field),
        other => {
            return Err(loc.err(
                field,
                format!(
                    "expected an object of category -> boolean, a list or a name, found {}",
                    source::type_name(other)
                ),
            ))
        }
    }
    Ok(set)
}

/// A text cell holding one category name, or several separated by `;` (names themselves contain
/// commas); empty means none.
pub fn parse_category_list(s: &str, loc: &Loc, field: &str) -> Result<HarmCategories> {
    let mut set = HarmCategories::EMPTY;
    for name in s.split(';').map(str::trim).filter(|n| !n.is_empty()) {
        set.insert(name.parse().map_err(|e: String| loc.err(field, e))?);
    }
    Ok(set)
}

/// The unsafe records (`is_safe == false`), with the safe ones counted as skipped.
pub fn unsafe_only(records: &[HarmfulQa]) -> Loaded<HarmfulQa> {
    let mut out = Loaded::new(vec![]);
    for (i, r) in records.iter().enumerate() {
        if r.is_safe {
            out.skipped
                .push(super::Skipped::new(At::Record(i + 1), "safe response"));
        } else {
            out.records.push(r.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loc() -> Loc<'static> {
        Loc::new(Path::new("bt.jsonl"), At::Line(4))
    }

    #[test]
    fn beavertails_record_with_map_categories() {
        let v = json!({"prompt": "q", "response": "a", "is_safe": false,
            "category": {"animal_abuse": false, "self_harm": true, "privacy_violation": true}});
        let r = harmful_from_value(&v, &loc()).unwrap();
        let cats = r.categories.unwrap();
        assert_eq!(cats.len(), 2);
        assert_eq!(cats.primary(), Some(HarmCategory::PrivacyViolation));
        assert!(!r.is_safe);
    }

    #[test]
    fn unknown_category_and_bad_flag_are_errors() {
        let v =
            json!({"prompt": "q", "response": "a", "is_safe": false, "category": {"gore": true}});
        let e = harmful_from_value(&v, &loc()).unwrap_err().to_string();
        assert!(
            e.contains("line 4: category.gore") && e.contains("unknown harm category"),
            "{e}"
        );
        let v = json!({"prompt": "q", "response": "a", "is_safe": false, "category": {"self_harm": "yes"}});
        let e = harmful_from_value(&v, &loc()).unwrap_err().to_string();
        assert!(
            e.contains("category.self_harm") && e.contains("boolean"),
            "{e}"
        );
    }

    #[test]
    fn label_is_one_for_unsafe() {
        let v = json!({"prompt": "q", "response": "a", "label": 1});
        let r = harmful_from_value(&v, &loc()).unwrap();
        assert!(!r.is_safe);
        assert_eq!(r.categories, None);
        let v = json!({"prompt": "q", "response": "a"});
        let e = harmful_from_value(&v, &loc()).unwrap_err().to_string();
        assert!(e.contains("is_safe") && e.contains("label"), "{e}");
    }

    #[test]
    fn category_names_and_lists() {
        let c = parse_category_list("self_harm; terrorism,organized_crime", &loc(), "c").unwrap();
        assert_eq!(c.len(), 2);
        let c = parse_category_value(&json!(["self_harm"]), &loc(), "c").unwrap();
        assert!(c.contains(HarmCategory::SelfHarm));
        assert!(parse_category_value(&json!(3), &loc(), "c").is_err());
    }
}
