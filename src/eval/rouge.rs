//! ROUGE-1 as Google's `rouge_score` computes it (no stemmer, its default and that of Hugging
//! Face `evaluate`): lower-case, every run of characters outside `a-z0-9` becomes a space,
//! split on whitespace; unigram overlap is the sum over words of the smaller count.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Precision, recall and F-measure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rouge {
    pub precision: f64,
    pub recall: f64,
    pub f: f64,
}

/// `rouge_score`'s default tokenizer.
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = vec![];
    let mut cur = String::new();
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn counts(tokens: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for t in tokens {
        *m.entry(t.as_str()).or_insert(0) += 1;
    }
    m
}

/// ROUGE-1 of `prediction` against `target`.
pub fn rouge1(target: &str, prediction: &str) -> Rouge {
    let (t, p) = (tokenize(target), tokenize(prediction));
    let (ct, cp) = (counts(&t), counts(&p));
    let overlap: usize = ct
        .iter()
        .map(|(w, &n)| n.min(cp.get(w).copied().unwrap_or(0)))
        .sum();
    let precision = overlap as f64 / p.len().max(1) as f64;
    let recall = overlap as f64 / t.len().max(1) as f64;
    let f = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Rouge {
        precision,
        recall,
        f,
    }
}

/// The best ROUGE-1 (by F) of `prediction` against several references.
pub fn rouge1_multi<S: AsRef<str>>(targets: &[S], prediction: &str) -> Rouge {
    targets
        .iter()
        .map(|t| rouge1(t.as_ref(), prediction))
        .max_by(|a, b| a.f.total_cmp(&b.f))
        .unwrap_or(Rouge {
            precision: 0.0,
            recall: 0.0,
            f: 0.0,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (target, prediction, precision, recall, f) from `rouge_score` 0.1.2
    /// (`tests/reference/rouge_pins.py`).
    #[test]
    fn matches_rouge_score_on_pinned_pairs() {
        let pins: &[(&str, &str, f64, f64, f64)] = &[
            (
                "The cat sat on the mat.",
                "the cat is on the mat",
                0.8333333333333334,
                0.8333333333333334,
                0.8333333333333334,
            ),
            (
                "Bioshock is a first-person shooter released in 2007.",
                "BioShock, released 2007, is an FPS game!",
                0.5714285714285714,
                0.4444444444444444,
                0.5,
            ),
            (
                "name[The Eagle], eatType[coffee shop]",
                "The Eagle is a coffee shop.",
                0.6666666666666666,
                0.6666666666666666,
                0.6666666666666666,
            ),
            ("", "anything at all", 0.0, 0.0, 0.0),
            ("something", "", 0.0, 0.0, 0.0),
            (
                "Café déjà vu — naïve façade",
                "cafe deja vu naive facade",
                0.2,
                0.125,
                0.15384615384615385,
            ),
            (
                "a a a b",
                "a b b",
                0.6666666666666666,
                0.5,
                0.5714285714285715,
            ),
            (
                "It's 3:45pm; rain (light) expected",
                "its 3 45pm rain light expected",
                0.8333333333333334,
                0.7142857142857143,
                0.7692307692307692,
            ),
            (
                "What a game: great graphics, great story.",
                "great great great",
                0.6666666666666666,
                0.2857142857142857,
                0.4,
            ),
        ];
        for &(t, p, pr, re, f) in pins {
            let r = rouge1(t, p);
            let ok = (r.precision - pr).abs() < 1e-12
                && (r.recall - re).abs() < 1e-12
                && (r.f - f).abs() < 1e-12;
            assert!(ok, "{t:?} vs {p:?}: {r:?}, rouge_score: {pr} {re} {f}");
        }
    }

    #[test]
    fn tokenizer_keeps_only_ascii_letters_and_digits() {
        assert_eq!(tokenize("It's 3:45pm!"), ["it", "s", "3", "45pm"]);
        assert_eq!(tokenize("naïve"), ["na", "ve"]);
        assert!(tokenize(" -- ").is_empty());
    }

    #[test]
    fn best_of_several_references() {
        let r = rouge1_multi(&["x y", "a b"], "a b");
        assert_eq!(r.f, 1.0);
        assert_eq!(rouge1_multi::<&str>(&[], "a").f, 0.0);
    }
}
