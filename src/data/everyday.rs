//! Everyday benign requests (`data/everyday/`), written for this project: 240 instructions in
//! 12 categories (cooking, household, health, writing, coding, science, math, travel, finance,
//! language, history, technology), 20 each, and a handful of factual questions with the words a
//! correct answer contains. Alignment trains on some of the instructions (answered by the model
//! itself), chooses its settings on others and reports over-refusal on the rest; the factual
//! questions are answered verbatim in its report. `refusals.txt` holds refusals in varied
//! wording, none naming a topic, paired with conversational harmful questions (BeaverTails) in
//! alignment's refusal half.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::source::{as_object, get_text, jsonl_values, Loc};
use crate::util::rng::Rng;
use crate::{Error, Result};

/// One everyday request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Everyday {
    pub id: String,
    pub category: String,
    pub prompt: String,
}

/// A factual question and the words (any of them, case-insensitive) a correct answer contains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Factual {
    pub prompt: String,
    pub answers: Vec<String>,
}

impl Factual {
    /// Whether `answer` contains one of the expected words.
    pub fn is_correct(&self, answer: &str) -> bool {
        let a = answer.to_lowercase();
        self.answers.iter().any(|w| a.contains(&w.to_lowercase()))
    }
}

/// `{id, category, prompt}` per line; ids must be unique.
pub fn read_everyday(path: &Path) -> Result<Vec<Everyday>> {
    let mut out: Vec<Everyday> = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for (at, v) in jsonl_values(path)? {
        let loc = Loc::new(path, at);
        let o = as_object(&v, &loc)?;
        let e = Everyday {
            id: get_text(o, "id", &loc)?,
            category: get_text(o, "category", &loc)?,
            prompt: get_text(o, "prompt", &loc)?.trim().to_string(),
        };
        if !seen.insert(e.id.clone()) {
            return Err(loc.err("id", format!("`{}` appears twice", e.id)));
        }
        out.push(e);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no records"));
    }
    Ok(out)
}

/// `{prompt, answers: [..]}` per line, at least one non-empty answer word each.
pub fn read_factual(path: &Path) -> Result<Vec<Factual>> {
    let mut out = vec![];
    for (at, v) in jsonl_values(path)? {
        let loc = Loc::new(path, at);
        let o = as_object(&v, &loc)?;
        let prompt = get_text(o, "prompt", &loc)?;
        let answers: Vec<String> = o
            .get("answers")
            .and_then(|a| a.as_array())
            .ok_or_else(|| loc.err("answers", "missing or not an array of strings"))?
            .iter()
            .map(|a| {
                a.as_str()
                    .filter(|s| !s.trim().is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| loc.err("answers", "every entry must be a non-empty string"))
            })
            .collect::<Result<_>>()?;
        if answers.is_empty() {
            return Err(loc.err("answers", "is empty"));
        }
        out.push(Factual { prompt, answers });
    }
    Ok(out)
}

/// One refusal per line (no blank lines, no duplicates); each must be a refusal by
/// `is_refusal` (the evaluation's refusal check, `eval::refusal::RefusalCheck::is_refusal`), so
/// the aligned model learns answers the evaluation counts as refusals.
pub fn read_refusals(path: &Path, is_refusal: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let text = crate::data::source::read_text(path)?;
    let mut out: Vec<String> = vec![];
    for (i, line) in text.lines().enumerate() {
        let r = line.trim();
        let at = |m: String| Error::file(path, format!("line {}: {m}", i + 1));
        if r.is_empty() {
            return Err(at("blank line".into()));
        }
        if out.iter().any(|o| o == r) {
            return Err(at(format!("`{r}` appears twice")));
        }
        if !is_refusal(r) {
            return Err(at(format!("`{r}` is not a refusal by the refusal check")));
        }
        out.push(r.to_string());
    }
    if out.is_empty() {
        return Err(Error::file(path, "no refusals"));
    }
    Ok(out)
}

/// Three disjoint parts of a list, stratified by group: within each group (in order of first
/// appearance) the items are shuffled with `seed` and `purpose`, and the first
/// `round(len * validation / total)` go to validation, the next `round(len * train / total)` to
/// train, the rest to test. Validation comes first, so it stays the same whatever the number
/// trained on (settings chosen on it are compared on the same prompts). Each part keeps the
/// input order.
pub fn stratified_parts<T: Clone>(
    items: &[T],
    group: impl Fn(&T) -> String,
    train: usize,
    validation: usize,
    seed: u64,
    purpose: &str,
) -> Result<[Vec<T>; 3]> {
    let total = items.len();
    if train + validation > total {
        return Err(Error::setting(
            purpose,
            train + validation,
            format!("train + validation exceed the {total} items"),
        ));
    }
    let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by.entry(group(it)).or_default().push(i);
    }
    let mut part = vec![2u8; total];
    for (g, mut idx) in by {
        Rng::new(seed, &format!("{purpose}-{g}")).shuffle(&mut idx);
        let n = idx.len() as f64;
        let k_train = (n * train as f64 / total as f64).round() as usize;
        let k_val = (n * validation as f64 / total as f64).round() as usize;
        for (j, &i) in idx.iter().enumerate() {
            part[i] = if j < k_val {
                1
            } else if j < k_val + k_train {
                0
            } else {
                2
            };
        }
    }
    let pick = |p: u8| -> Vec<T> {
        items
            .iter()
            .zip(&part)
            .filter(|(_, &q)| q == p)
            .map(|(x, _)| x.clone())
            .collect()
    };
    Ok([pick(0), pick(1), pick(2)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_files_read_and_are_well_formed() {
        let d = crate::data::default_data_dir().join("everyday");
        let e = read_everyday(&d.join("everyday_instructions.jsonl")).unwrap();
        assert_eq!(e.len(), 240);
        let cats: std::collections::BTreeSet<&str> =
            e.iter().map(|x| x.category.as_str()).collect();
        assert_eq!(cats.len(), 12);
        let f = read_factual(&d.join("factual_questions.jsonl")).unwrap();
        assert!(f.len() >= 8);
        // No factual question is also an everyday request.
        for q in &f {
            assert!(e.iter().all(|x| x.prompt != q.prompt), "{}", q.prompt);
        }
        let check = crate::eval::refusal::RefusalCheck::default();
        let r = read_refusals(&d.join("refusals.txt"), |r| check.is_refusal(r)).unwrap();
        assert!(r.len() >= 30, "{}", r.len());
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"category\":\"c\",\"prompt\":\"x\"}\n{\"id\":\"a\",\"category\":\"c\",\"prompt\":\"y\"}\n",
        )
        .unwrap();
        let e = read_everyday(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        let check = crate::eval::refusal::RefusalCheck::default();
        std::fs::write(&p, "I can't help with that.\nSure, here is how.\n").unwrap();
        let e = read_refusals(&p, |r| check.is_refusal(r))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("not a refusal"), "{e}");
        std::fs::write(&p, "I can't help with that.\n\n").unwrap();
        let e = read_refusals(&p, |r| check.is_refusal(r))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("blank"), "{e}");
        std::fs::write(&p, "{\"prompt\":\"q\",\"answers\":[]}\n").unwrap();
        let e = read_factual(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("answers"), "{e}");
    }

    #[test]
    fn factual_check_is_case_insensitive_and_any_of() {
        let f = Factual {
            prompt: "q".into(),
            answers: vec!["eight".into(), "8".into()],
        };
        assert!(f.is_correct("A spider has Eight legs."));
        assert!(f.is_correct("8"));
        assert!(!f.is_correct("six"));
    }

    #[test]
    fn parts_are_disjoint_stratified_seeded_and_complete() {
        let items: Vec<(u32, &str)> = (0..60)
            .map(|i| (i, if i % 3 == 0 { "a" } else { "b" }))
            .collect();
        let [tr, va, te] = stratified_parts(&items, |x| x.1.to_string(), 30, 12, 7, "t").unwrap();
        assert_eq!((tr.len(), va.len(), te.len()), (30, 12, 18));
        // Group a (20 items) gets 10 / 4 / 6.
        assert_eq!(tr.iter().filter(|x| x.1 == "a").count(), 10);
        assert_eq!(va.iter().filter(|x| x.1 == "a").count(), 4);
        let mut all: Vec<u32> = tr.iter().chain(&va).chain(&te).map(|x| x.0).collect();
        all.sort();
        assert_eq!(all, (0..60).collect::<Vec<_>>());
        let again = stratified_parts(&items, |x| x.1.to_string(), 30, 12, 7, "t").unwrap();
        assert_eq!(again[0], tr);
        let other = stratified_parts(&items, |x| x.1.to_string(), 30, 12, 8, "t").unwrap();
        assert_ne!(other[0], tr);
        assert!(tr.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(stratified_parts(&items, |x| x.1.to_string(), 50, 12, 7, "t").is_err());
        // Fewer trained on: the validation part is the same prompts, the trained ones a subset.
        let [tr2, va2, _] = stratified_parts(&items, |x| x.1.to_string(), 18, 12, 7, "t").unwrap();
        assert_eq!(va2, va);
        assert!(tr2.iter().all(|x| tr.contains(x)));
    }
}
