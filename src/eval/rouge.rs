//! ROUGE-1 as Google's `rouge_score` computes it: lower-case, every run of characters outside
//! `a-z0-9` becomes a space, split on whitespace; unigram overlap is the sum over words of the
//! smaller count. Without a stemmer (the default of `rouge_score` and of Hugging Face
//! `evaluate`), or with `use_stemmer=True`: tokens longer than 3 characters go through NLTK's
//! Porter stemmer (its default mode; the `nltk-porter` crate, which agreed with NLTK 3.10.4 on
//! all 80,460 distinct such words of the shipped data).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Precision, recall and F-measure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rouge {
    pub precision: f64,
    pub recall: f64,
    pub f: f64,
}

/// `rouge_score`'s default tokenizer, Porter-stemmed when `stem` (`use_stemmer=True`).
pub fn tokenize_with(text: &str, stem: bool) -> Vec<String> {
    let tokens = tokenize(text);
    if !stem {
        return tokens;
    }
    static PORTER: std::sync::OnceLock<nltk_porter::PorterStemmer> = std::sync::OnceLock::new();
    let porter = PORTER.get_or_init(|| nltk_porter::PorterStemmer::new(nltk_porter::Mode::Nltk));
    tokens
        .into_iter()
        .map(|t| if t.len() > 3 { porter.stem(&t) } else { t })
        .collect()
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

/// ROUGE-1 of `prediction` against `target` (no stemmer).
pub fn rouge1(target: &str, prediction: &str) -> Rouge {
    rouge1_with(target, prediction, false)
}

/// ROUGE-1 of `prediction` against `target`, Porter-stemmed when `stem`.
pub fn rouge1_with(target: &str, prediction: &str, stem: bool) -> Rouge {
    let (t, p) = (tokenize_with(target, stem), tokenize_with(prediction, stem));
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

/// The best ROUGE-1 (by F) of `prediction` against several references, Porter-stemmed when
/// `stem`.
pub fn rouge1_multi<S: AsRef<str>>(targets: &[S], prediction: &str, stem: bool) -> Rouge {
    targets
        .iter()
        .map(|t| rouge1_with(t.as_ref(), prediction, stem))
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
        check(pins, false);
        // With use_stemmer=True rouge_score gives these pairs the same values.
        check(pins, true);
    }

    fn check(pins: &[(&str, &str, f64, f64, f64)], stem: bool) {
        for &(t, p, pr, re, f) in pins {
            let r = rouge1_with(t, p, stem);
            let ok = (r.precision - pr).abs() < 1e-12
                && (r.recall - re).abs() < 1e-12
                && (r.f - f).abs() < 1e-12;
            assert!(
                ok,
                "{t:?} vs {p:?} (stem {stem}): {r:?}, rouge_score: {pr} {re} {f}"
            );
        }
    }

    /// `rouge_score` 0.1.2 with `use_stemmer=True` (NLTK 3.10.4), `tests/reference/rouge_pins.py`.
    #[test]
    fn matches_rouge_score_with_the_porter_stemmer() {
        let pins: &[(&str, &str, f64, f64, f64)] = &[
            (
                "The runners were running quickly to the generalized races",
                "a runner runs quick in generalizing race",
                0.5714285714285714,
                0.4444444444444444,
                0.5,
            ),
            (
                "Skies were cloudy; the dogs died and cats are dying",
                "sky was cloud, dog dies, cat die",
                0.7142857142857143,
                0.5,
                0.588235294117647,
            ),
            (
                "Relational conditioning hopefully adjusts",
                "relate condition hopeful adjustment",
                1.0,
                1.0,
                1.0,
            ),
            ("was has does his", "wa ha doe hi", 0.25, 0.25, 0.25),
        ];
        check(pins, true);
        // Without the stemmer the same pairs share fewer words.
        assert_eq!(rouge1("Relational conditioning", "relate condition").f, 0.0);
        assert_eq!(tokenize_with("was dies skies", true), ["was", "die", "sky"]);
    }

    #[test]
    fn tokenizer_keeps_only_ascii_letters_and_digits() {
        assert_eq!(tokenize("It's 3:45pm!"), ["it", "s", "3", "45pm"]);
        assert_eq!(tokenize("naïve"), ["na", "ve"]);
        assert!(tokenize(" -- ").is_empty());
    }

    #[test]
    fn best_of_several_references() {
        let r = rouge1_multi(&["x y", "a b"], "a b", false);
        assert_eq!(r.f, 1.0);
        assert_eq!(rouge1_multi::<&str>(&[], "a", true).f, 0.0);
    }
}
