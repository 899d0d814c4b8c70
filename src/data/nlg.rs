//! The trainability tasks (paper Section 4.4, GEM data-to-text tasks): fine-tune on structured
//! input -> text, then score ROUGE-1 against the references.
//!
//! Accepted files:
//! - ViGGO and E2E NLG: CSV with header `mr,ref` (one row per reference; an MR repeats).
//! - DART: the dev/train JSON (an array of `{tripleset: [[s, p, o], ...], annotations:
//!   [{source, text}, ...]}`), and the test XML in WebNLG style (`<entry category eid>` with
//!   `<modifiedtripleset><mtriple>s | p | o</mtriple>...` and `<lex>` references).
//! - ConvWeather (TreeNLG weather): TSV without header, 4 columns: id, user query, tree MR,
//!   tree-annotated response. The plain text is the response with the bracket annotation tokens
//!   (`[__DG_INFORM__`, `]`, ...) removed; delexicalised placeholders such as `__ARG_CITY__`
//!   are kept, as in the published references.
//! - CACAPO (see [`read_cacapo`]): WebNLG-style `.xml` (the format of its release), or `.csv` /
//!   `.json` / `.jsonl` records with a meaning representation and a reference text.
//!
//! Triple sets are linearised as `<H> s <R> p <T> o` per triple, joined by spaces (the
//! linearisation of the DART paper's baselines).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::source::{self, At, FileFormat, Loc, TableSpec};
use super::{HasQuestion, Loaded, Skipped};
use crate::{Error, Result};

/// One input -> reference training or test example.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct DataToText {
    /// The structured input as text (MR, linearised triples, query + tree MR).
    pub input: String,
    /// One reference text.
    pub target: String,
    /// A domain or category label, when the source has one (DART/WebNLG category, CACAPO domain).
    pub domain: Option<String>,
}

impl HasQuestion for DataToText {
    fn question(&self) -> &str {
        &self.input
    }
}

/// A triple set with its references (DART, WebNLG-style XML).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TripleEntry {
    /// `eid` in XML files.
    pub id: Option<String>,
    /// `category` in XML files.
    pub category: Option<String>,
    pub triples: Vec<[String; 3]>,
    pub references: Vec<String>,
}

/// `<H> s <R> p <T> o` for each triple, space-separated.
pub fn linearize_triples(triples: &[[String; 3]]) -> String {
    triples
        .iter()
        .map(|[s, p, o]| format!("<H> {s} <R> {p} <T> {o}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One example per (entry, reference).
pub fn triple_examples(entries: &[TripleEntry]) -> Vec<DataToText> {
    let mut out = vec![];
    for e in entries {
        let input = linearize_triples(&e.triples);
        for r in &e.references {
            out.push(DataToText {
                input: input.clone(),
                target: r.clone(),
                domain: e.category.clone(),
            });
        }
    }
    out
}

/// Group examples by input, keeping first-seen order: `(input, references)` for multi-reference
/// scoring.
pub fn group_references(examples: &[DataToText]) -> Vec<(String, Vec<String>)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out: Vec<(String, Vec<String>)> = vec![];
    for ex in examples {
        match index.get(ex.input.as_str()) {
            Some(&i) => out[i].1.push(ex.target.clone()),
            None => {
                index.insert(&ex.input, out.len());
                out.push((ex.input.clone(), vec![ex.target.clone()]));
            }
        }
    }
    out
}

/// ViGGO / E2E NLG: a CSV with `mr,ref` columns.
pub fn read_mr_csv(path: &Path) -> Result<Loaded<DataToText>> {
    let t = source::read_table(path, TableSpec::CSV)?;
    let [mr, rf] = t.columns(path, ["mr", "ref"])?;
    let records = t
        .rows
        .iter()
        .map(|(at, row)| {
            let loc = Loc::new(path, *at);
            Ok(DataToText {
                input: source::cell_text(row, mr, &loc, "mr")?,
                target: source::cell_text(row, rf, &loc, "ref")?,
                domain: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

/// DART's JSON: entries with no annotation are skipped (and counted).
pub fn read_dart_json(path: &Path) -> Result<Loaded<TripleEntry>> {
    let mut out = Loaded::new(vec![]);
    for (at, v) in source::json_array(path)? {
        let loc = Loc::new(path, at);
        let o = source::as_object(&v, &loc)?;
        let triples = match o.get("tripleset") {
            Some(Value::Array(ts)) => ts
                .iter()
                .enumerate()
                .map(|(i, t)| json_triple(t, &loc, i))
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                return Err(loc.err(
                    "tripleset",
                    format!(
                        "expected an array of triples, found {}",
                        source::type_name(v)
                    ),
                ))
            }
            None => return Err(loc.err("tripleset", "missing")),
        };
        if triples.is_empty() {
            return Err(loc.err("tripleset", "is empty"));
        }
        let annotations = match o.get("annotations") {
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(loc.err(
                    "annotations",
                    format!("expected an array, found {}", source::type_name(v)),
                ))
            }
            None => return Err(loc.err("annotations", "missing")),
        };
        let mut references = vec![];
        for (i, a) in annotations.iter().enumerate() {
            let field = format!("annotations[{i}].text");
            match a.get("text") {
                Some(Value::String(s)) if !s.trim().is_empty() => references.push(s.clone()),
                Some(Value::String(_)) => out
                    .skipped
                    .push(Skipped::new(at, format!("{field} is empty"))),
                Some(v) => {
                    return Err(loc.err(
                        &field,
                        format!("expected a string, found {}", source::type_name(v)),
                    ))
                }
                None => return Err(loc.err(&field, "missing")),
            }
        }
        if references.is_empty() {
            out.skipped.push(Skipped::new(at, "no reference text"));
            continue;
        }
        out.records.push(TripleEntry {
            id: None,
            category: None,
            triples,
            references,
        });
    }
    if out.records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(out)
}

fn json_triple(t: &Value, loc: &Loc, i: usize) -> Result<[String; 3]> {
    let field = format!("tripleset[{i}]");
    let parts = t
        .as_array()
        .filter(|a| a.len() == 3)
        .ok_or_else(|| loc.err(&field, "expected [subject, predicate, object]"))?;
    let s = |j: usize| -> Result<String> {
        parts[j]
            .as_str()
            .map(String::from)
            .ok_or_else(|| loc.err(&format!("{field}[{j}]"), "expected a string"))
    };
    Ok([s(0)?, s(1)?, s(2)?])
}

/// Split `s | p | o` into a triple (the object keeps any further ` | `).
pub fn split_triple(s: &str) -> Option<[String; 3]> {
    let mut it = s.splitn(3, '|').map(|x| x.trim().to_string());
    let (a, b, c) = (it.next()?, it.next()?, it.next()?);
    Some([a, b, c])
}

/// WebNLG-style XML (DART test, CACAPO): entries without a reference are skipped and counted;
/// empty `<lex>` references are skipped and counted.
pub fn read_webnlg_xml(path: &Path) -> Result<Loaded<TripleEntry>> {
    use quick_xml::events::Event;
    let text = source::read_text(path)?;
    let mut reader = quick_xml::Reader::from_str(&text);
    let mut out = Loaded::new(vec![]);
    let mut entry: Option<(usize, TripleEntry)> = None;
    let mut in_modified = false;
    // The element whose text is being collected ("mtriple" or "lex") and the text so far.
    let mut collecting: Option<(&'static str, String)> = None;
    let xml_err = |pos: u64, msg: String| -> Error {
        Error::field(
            path,
            format!("line {}", source::line_of(&text, pos as usize)),
            msg,
        )
    };
    loop {
        let pos = reader.buffer_position();
        let ev = reader
            .read_event()
            .map_err(|e| xml_err(reader.error_position(), format!("invalid XML: {e}")))?;
        match ev {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) if e.local_name().as_ref() == "entry" => {
                let line = source::line_of(&text, pos as usize);
                let mut te = TripleEntry {
                    id: None,
                    category: None,
                    triples: vec![],
                    references: vec![],
                };
                for a in e.attributes() {
                    let a = a.map_err(|err| xml_err(pos, format!("bad attribute: {err}")))?;
                    let v = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|err| xml_err(pos, format!("bad attribute: {err}")))?
                        .into_owned();
                    match a.key.as_ref() {
                        "eid" => te.id = Some(v),
                        "category" => te.category = Some(v),
                        _ => {}
                    }
                }
                entry = Some((line, te));
            }
            Event::Start(e) => match e.local_name().as_ref() {
                "modifiedtripleset" => in_modified = true,
                "mtriple" if in_modified => collecting = Some(("mtriple", String::new())),
                "lex" => collecting = Some(("lex", String::new())),
                _ => {}
            },
            Event::Empty(e) if e.local_name().as_ref() == "lex" => {
                let line = source::line_of(&text, pos as usize);
                out.skipped
                    .push(Skipped::new(At::Line(line), "empty reference (<lex/>)"));
            }
            Event::Text(t) => {
                if let Some((_, buf)) = collecting.as_mut() {
                    buf.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some((_, buf)) = collecting.as_mut() {
                    buf.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some((_, buf)) = collecting.as_mut() {
                    let ch = r
                        .resolve_char_ref()
                        .map_err(|err| xml_err(pos, format!("bad character reference: {err}")))?;
                    match ch {
                        Some(c) => buf.push(c),
                        None => {
                            let s = quick_xml::escape::resolve_xml_entity(&r).ok_or_else(|| {
                                xml_err(pos, format!("unknown entity `&{};`", &*r))
                            })?;
                            buf.push_str(s);
                        }
                    }
                }
            }
            Event::End(e) => {
                let line = source::line_of(&text, pos as usize);
                match e.local_name().as_ref() {
                    "modifiedtripleset" => in_modified = false,
                    "mtriple" | "lex" => {
                        let Some((kind, buf)) = collecting.take() else {
                            continue;
                        };
                        let Some((_, te)) = entry.as_mut() else {
                            return Err(xml_err(pos, format!("<{kind}> outside an <entry>")));
                        };
                        let s = buf.trim().to_string();
                        if kind == "mtriple" {
                            let t = split_triple(&s).ok_or_else(|| {
                                Error::field(
                                    path,
                                    format!("line {line}: mtriple"),
                                    format!("expected `subject | predicate | object`, found `{s}`"),
                                )
                            })?;
                            te.triples.push(t);
                        } else if s.is_empty() {
                            out.skipped
                                .push(Skipped::new(At::Line(line), "empty reference (<lex>)"));
                        } else {
                            te.references.push(s);
                        }
                    }
                    "entry" => {
                        if let Some((line, te)) = entry.take() {
                            if te.triples.is_empty() {
                                return Err(Error::field(
                                    path,
                                    format!("line {line}: modifiedtripleset"),
                                    "entry has no <mtriple>",
                                ));
                            }
                            if te.references.is_empty() {
                                out.skipped
                                    .push(Skipped::new(At::Line(line), "entry has no reference"));
                            } else {
                                out.records.push(te);
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if out.records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(out)
}

/// One ConvWeather example.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeatherExample {
    pub id: String,
    pub query: String,
    /// The tree-structured meaning representation.
    pub mr: String,
    /// The tree-annotated response as published.
    pub annotated: String,
    /// The response with the annotation tokens removed.
    pub text: String,
}

impl WeatherExample {
    /// As a data-to-text example: input = query, newline, tree MR; target = plain text.
    pub fn to_data_to_text(&self) -> DataToText {
        DataToText {
            input: format!("{}\n{}", self.query, self.mr),
            target: self.text.clone(),
            domain: None,
        }
    }
}

impl HasQuestion for WeatherExample {
    fn question(&self) -> &str {
        &self.query
    }
}

/// Remove TreeNLG bracket annotations: `[__NAME__` opening tokens and `]` closing tokens.
/// Whitespace is collapsed to single spaces.
pub fn strip_tree_annotations(s: &str) -> String {
    s.split_whitespace()
        .filter(|tok| !(tok.starts_with("[__") || *tok == "]"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// ConvWeather TSV (4 columns, no header, no quoting).
pub fn read_conv_weather(path: &Path) -> Result<Loaded<WeatherExample>> {
    let t = source::read_table(path, TableSpec::TSV_NO_HEADER)?;
    let mut records = vec![];
    for (at, row) in &t.rows {
        let loc = Loc::new(path, *at);
        if row.len() != 4 {
            return Err(loc.err(
                "(row)",
                format!(
                    "expected 4 tab-separated fields (id, query, tree MR, annotated response), \
                     found {}",
                    row.len()
                ),
            ));
        }
        let annotated = source::cell_text(row, 3, &loc, "response")?;
        let text = strip_tree_annotations(&annotated);
        if text.is_empty() {
            return Err(loc.err("response", "has no text outside the annotations"));
        }
        records.push(WeatherExample {
            id: source::cell_text(row, 0, &loc, "id")?,
            query: source::cell_text(row, 1, &loc, "query")?,
            mr: source::cell_text(row, 2, &loc, "mr")?,
            annotated,
            text,
        });
    }
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

/// Column / key names accepted for CACAPO's input and reference.
pub const CACAPO_INPUT_KEYS: &[&str] = &[
    "input",
    "mr",
    "meaning_representation",
    "triples",
    "triplets",
];
pub const CACAPO_TARGET_KEYS: &[&str] = &["target", "text", "ref", "reference"];
pub const CACAPO_DOMAIN_KEYS: &[&str] = &["domain", "category"];

/// CACAPO (van der Lee et al. 2020). Accepted:
/// - `.xml`: WebNLG-style entries (the CACAPO release format), linearised like DART;
/// - `.csv`: a header with an input column (first of [`CACAPO_INPUT_KEYS`] present), a
///   reference column ([`CACAPO_TARGET_KEYS`]) and optionally a domain ([`CACAPO_DOMAIN_KEYS`]);
///   the input is used as written;
/// - `.json` / `.jsonl`: objects with the same keys; an input given as a list of
///   `subject | predicate | object` strings (GEM's `triplets`) is linearised like DART, a string
///   input is used as written.
pub fn read_cacapo(path: &Path) -> Result<Loaded<DataToText>> {
    match FileFormat::from_path(path)? {
        FileFormat::Xml => {
            let l = read_webnlg_xml(path)?;
            Ok(Loaded {
                records: triple_examples(&l.records),
                skipped: l.skipped,
            })
        }
        FileFormat::Csv => {
            let t = source::read_table(path, TableSpec::CSV)?;
            let missing = |what: &str, keys: &[&str]| {
                Error::field(
                    path,
                    what,
                    format!(
                        "missing column: need one of {} (the header has: {})",
                        keys.join(", "),
                        t.headers.join(", ")
                    ),
                )
            };
            let i = t
                .column_any(CACAPO_INPUT_KEYS)
                .ok_or_else(|| missing("input", CACAPO_INPUT_KEYS))?;
            let o = t
                .column_any(CACAPO_TARGET_KEYS)
                .ok_or_else(|| missing("target", CACAPO_TARGET_KEYS))?;
            let d = t.column_any(CACAPO_DOMAIN_KEYS);
            let records = t
                .rows
                .iter()
                .map(|(at, row)| {
                    let loc = Loc::new(path, *at);
                    Ok(DataToText {
                        input: source::cell_text(row, i, &loc, &t.headers[i])?,
                        target: source::cell_text(row, o, &loc, &t.headers[o])?,
                        domain: d.map(|d| row[d].clone()).filter(|s| !s.is_empty()),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if records.is_empty() {
                return Err(source::empty(path));
            }
            Ok(Loaded::new(records))
        }
        _ => {
            let mut records = vec![];
            for (at, v) in source::json_records(path)? {
                let loc = Loc::new(path, at);
                let o = source::as_object(&v, &loc)?;
                let key_of =
                    |keys: &[&'static str]| keys.iter().copied().find(|k| o.contains_key(*k));
                let ik = key_of(CACAPO_INPUT_KEYS).ok_or_else(|| {
                    loc.err(
                        "input",
                        format!("missing: need one of {}", CACAPO_INPUT_KEYS.join(", ")),
                    )
                })?;
                let tk = key_of(CACAPO_TARGET_KEYS).ok_or_else(|| {
                    loc.err(
                        "target",
                        format!("missing: need one of {}", CACAPO_TARGET_KEYS.join(", ")),
                    )
                })?;
                let input = match &o[ik] {
                    Value::Array(_) => {
                        let items = source::get_str_list(o, ik, &loc)?;
                        let triples = items
                            .iter()
                            .enumerate()
                            .map(|(j, s)| {
                                split_triple(s).ok_or_else(|| {
                                    loc.err(
                                        &format!("{ik}[{j}]"),
                                        format!(
                                            "expected `subject | predicate | object`, found `{s}`"
                                        ),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>>>()?;
                        if triples.is_empty() {
                            return Err(loc.err(ik, "is empty"));
                        }
                        linearize_triples(&triples)
                    }
                    _ => source::get_text(o, ik, &loc)?,
                };
                let domain = match key_of(CACAPO_DOMAIN_KEYS) {
                    Some(k) => source::opt_str(o, k, &loc)?,
                    None => None,
                };
                records.push(DataToText {
                    input,
                    target: source::get_text(o, tk, &loc)?,
                    domain,
                });
            }
            if records.is_empty() {
                return Err(source::empty(path));
            }
            Ok(Loaded::new(records))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_annotations_are_stripped() {
        let s = "[__DG_YES__ Yes ] , [__DG_INFORM__ [__ARG_DATE_TIME__ [__ARG_COLLOQUIAL__ today's ] ] \
                 forecast is [__ARG_CLOUD_COVERAGE__ mostly cloudy ] ] .";
        assert_eq!(
            strip_tree_annotations(s),
            "Yes , today's forecast is mostly cloudy ."
        );
        assert_eq!(
            strip_tree_annotations("in [__ARG_CITY__ __ARG_CITY__ ]"),
            "in __ARG_CITY__"
        );
    }

    #[test]
    fn triples_linearise_and_split() {
        let t = split_triple("Mars Hill | JOINED | 1973").unwrap();
        assert_eq!(t, ["Mars Hill".to_string(), "JOINED".into(), "1973".into()]);
        assert_eq!(linearize_triples(&[t]), "<H> Mars Hill <R> JOINED <T> 1973");
        assert!(split_triple("a | b").is_none());
        assert_eq!(split_triple("a | b | c | d").unwrap()[2], "c | d");
    }

    #[test]
    fn references_group_by_input_in_order() {
        let ex = |i: &str, t: &str| DataToText {
            input: i.into(),
            target: t.into(),
            domain: None,
        };
        let g = group_references(&[ex("a", "1"), ex("b", "2"), ex("a", "3")]);
        assert_eq!(
            g,
            vec![
                ("a".into(), vec!["1".into(), "3".into()]),
                ("b".into(), vec!["2".into()])
            ]
        );
    }
}
