//! Seeded, deterministic, disjoint splits (paper Section 4: the defence, the attack and the
//! evaluation must not share questions), and a report of any overlap between user-given splits.
//!
//! Questions are compared after [`normalize_question`]: lowercase, whitespace collapsed to single
//! spaces, and non-alphanumeric characters stripped from both ends. All records that share a
//! normalised question go to the same split (or, with [`Duplicates::KeepFirst`], only the first
//! is kept), so no question of one split appears in another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

use super::{HasQuestion, Loaded, Skipped};
use crate::util::rng::Rng;
use crate::{Error, Result};

/// The key two questions are compared by.
pub fn normalize_question(s: &str) -> String {
    let lower = s.to_lowercase();
    let collapsed = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_string()
}

/// How big a split is, in records.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum SplitSize {
    Count(usize),
    /// A fraction of all (kept) records, rounded down.
    Fraction(f64),
    /// Everything left (only as the last split).
    Rest,
}

/// One named split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitSpec {
    pub name: String,
    pub size: SplitSize,
    /// Keep every record of a question in this split (repeated questions with different
    /// answers, as BeaverTails has), whatever the [`Duplicates`] policy of the other splits.
    /// The split's size then counts records, several of which may share a question.
    pub keep_repeats: bool,
}

impl SplitSpec {
    pub fn count(name: &str, n: usize) -> Self {
        Self::sized(name, SplitSize::Count(n))
    }
    pub fn fraction(name: &str, f: f64) -> Self {
        Self::sized(name, SplitSize::Fraction(f))
    }
    pub fn rest(name: &str) -> Self {
        Self::sized(name, SplitSize::Rest)
    }
    fn sized(name: &str, size: SplitSize) -> Self {
        Self {
            name: name.into(),
            size,
            keep_repeats: false,
        }
    }
    /// This split keeps every record of each of its questions (see [`Self::keep_repeats`]).
    pub fn with_repeats(mut self, keep: bool) -> Self {
        self.keep_repeats = keep;
        self
    }
}

/// What to do with records whose normalised question repeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Duplicates {
    /// Keep them all, in the same split.
    #[default]
    KeepTogether,
    /// Keep only the first record of each question (the others are counted as dropped).
    KeepFirst,
}

/// The result of [`split_disjoint`].
#[derive(Clone, Debug, PartialEq)]
pub struct Splits<T> {
    /// The splits in the order they were asked for.
    pub splits: Vec<(String, Vec<T>)>,
    /// Distinct normalised questions in the input.
    pub questions: usize,
    /// Records dropped as repeats ([`Duplicates::KeepFirst`]).
    pub duplicates_dropped: usize,
    /// Records in no split: left over after the last split, or the rest of a question whose
    /// records did not all fit in the split it was assigned to.
    pub unused: usize,
}

impl<T> Splits<T> {
    /// The records of the split called `name`.
    pub fn get(&self, name: &str) -> Option<&[T]> {
        self.splits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

impl<T: HasQuestion> Splits<T> {
    /// Check the splits against each other (always clean for splits made here).
    pub fn overlap(&self) -> OverlapReport {
        let named: Vec<(&str, Vec<&str>)> = self
            .splits
            .iter()
            .map(|(n, v)| (n.as_str(), questions(v)))
            .collect();
        report_overlap(&named)
    }
}

/// Split `records` into disjoint named splits, shuffled with `Rng::new(seed, "data-split")`.
///
/// Questions (groups of records with the same normalised question) are taken in shuffled order
/// and fill the splits one after another; a split takes exactly its size in records. Asking for
/// more records than there are is an error naming the split.
pub fn split_disjoint<T: HasQuestion + Clone>(
    records: &[T],
    specs: &[SplitSpec],
    duplicates: Duplicates,
    seed: u64,
) -> Result<Splits<T>> {
    if specs.is_empty() {
        return Err(Error::setting("splits", "[]", "name at least one split"));
    }
    let mut names = BTreeSet::new();
    for (i, s) in specs.iter().enumerate() {
        if !names.insert(s.name.as_str()) {
            return Err(Error::setting("split name", &s.name, "used twice"));
        }
        match s.size {
            SplitSize::Rest if i + 1 != specs.len() => {
                return Err(Error::setting(
                    format!("split `{}`", s.name),
                    "rest",
                    "only the last split can take the rest",
                ))
            }
            SplitSize::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(Error::setting(
                    format!("split `{}`", s.name),
                    f,
                    "a fraction must be in (0, 1]",
                ))
            }
            _ => {}
        }
    }

    // Group by normalised question, first-seen order.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = vec![];
    for (i, r) in records.iter().enumerate() {
        let key = normalize_question(r.question());
        match index.get(&key) {
            Some(&g) => groups[g].push(i),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    let questions = groups.len();
    // A question's records under the global policy (fractions are of their sum); a split with
    // `keep_repeats` takes all of them.
    let kept = |g: &Vec<usize>| match duplicates {
        Duplicates::KeepTogether => g.len(),
        Duplicates::KeepFirst => 1,
    };
    let total: usize = groups.iter().map(kept).sum();
    // The same shuffle of questions whatever the policies, so that asking one split to keep
    // repeats moves no question between splits.
    let mut rng = Rng::new(seed, "data-split");
    rng.shuffle(&mut groups);

    let targets: Vec<Option<usize>> = specs
        .iter()
        .map(|s| match s.size {
            SplitSize::Count(n) => Some(n),
            SplitSize::Fraction(f) => Some((f * total as f64).floor() as usize),
            SplitSize::Rest => None,
        })
        .collect();
    let fixed: usize = targets.iter().flatten().sum();
    // With a split that keeps repeats, every record may be used.
    let available = if specs.iter().any(|s| s.keep_repeats) {
        groups.iter().map(Vec::len).sum()
    } else {
        total
    };
    if fixed > available {
        return Err(Error::setting(
            "split sizes",
            fixed,
            format!("the splits ask for {fixed} records but only {available} are available"),
        ));
    }

    let mut out: Vec<(String, Vec<T>)> = specs.iter().map(|s| (s.name.clone(), vec![])).collect();
    let mut unused = 0;
    let mut duplicates_dropped = 0;
    let mut g = 0;
    for (k, target) in targets.iter().enumerate() {
        let want = target.unwrap_or(usize::MAX);
        let keep_all = specs[k].keep_repeats || duplicates == Duplicates::KeepTogether;
        let split = &mut out[k].1;
        while split.len() < want && g < groups.len() {
            let room = want - split.len();
            let group = &groups[g];
            let take = if keep_all { group.len() } else { 1 };
            duplicates_dropped += group.len() - take;
            split.extend(
                group
                    .iter()
                    .take(take.min(room))
                    .map(|&i| records[i].clone()),
            );
            unused += take.saturating_sub(room);
            g += 1;
        }
        if let Some(n) = target {
            if split.len() < *n {
                return Err(Error::setting(
                    format!("split `{}`", specs[k].name),
                    n,
                    format!(
                        "only {} records were left for it (questions are kept whole, so repeats \
                         of a question assigned to an earlier split are not available)",
                        split.len()
                    ),
                ));
            }
        }
    }
    for group in &groups[g..] {
        let take = kept(group);
        duplicates_dropped += group.len() - take;
        unused += take;
    }
    Ok(Splits {
        splits: out,
        questions,
        duplicates_dropped,
        unused,
    })
}

/// The questions of some records, for [`report_overlap`].
pub fn questions<T: HasQuestion>(records: &[T]) -> Vec<&str> {
    records.iter().map(HasQuestion::question).collect()
}

/// Questions shared by two splits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overlap {
    pub a: String,
    pub b: String,
    /// Distinct normalised questions in both.
    pub count: usize,
    /// Up to five of them, sorted.
    pub examples: Vec<String>,
}

/// Every pair of splits that shares a normalised question.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OverlapReport {
    pub overlaps: Vec<Overlap>,
}

impl OverlapReport {
    pub fn is_clean(&self) -> bool {
        self.overlaps.is_empty()
    }
}

impl fmt::Display for OverlapReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return writeln!(f, "no question is shared between splits");
        }
        for o in &self.overlaps {
            writeln!(
                f,
                "{} and {} share {} question(s), e.g.:",
                o.a, o.b, o.count
            )?;
            for e in &o.examples {
                writeln!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}

/// Report the normalised questions each pair of named splits has in common.
pub fn report_overlap(splits: &[(&str, Vec<&str>)]) -> OverlapReport {
    let sets: Vec<BTreeSet<String>> = splits
        .iter()
        .map(|(_, qs)| qs.iter().map(|q| normalize_question(q)).collect())
        .collect();
    let mut overlaps = vec![];
    for i in 0..splits.len() {
        for j in i + 1..splits.len() {
            let shared: Vec<&String> = sets[i].intersection(&sets[j]).collect();
            if !shared.is_empty() {
                overlaps.push(Overlap {
                    a: splits[i].0.to_string(),
                    b: splits[j].0.to_string(),
                    count: shared.len(),
                    examples: shared.iter().take(5).map(|s| s.to_string()).collect(),
                });
            }
        }
    }
    OverlapReport { overlaps }
}

/// Drop the records whose normalised question is among `against` (e.g. remove test questions
/// from a training set drawn from another file); the dropped ones are listed as skipped.
pub fn remove_overlap<T: HasQuestion + Clone>(records: &[T], against: &[&str]) -> Loaded<T> {
    let banned: BTreeSet<String> = against.iter().map(|q| normalize_question(q)).collect();
    let mut out = Loaded::new(vec![]);
    for (i, r) in records.iter().enumerate() {
        if banned.contains(&normalize_question(r.question())) {
            out.skipped.push(Skipped::new(
                format!("record {}", i + 1),
                "question is in the held-out set",
            ));
        } else {
            out.records.push(r.clone());
        }
    }
    out
}

/// Records per normalised question (for statistics): how many questions occur how often.
pub fn duplicate_histogram<T: HasQuestion>(records: &[T]) -> BTreeMap<usize, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in records {
        *counts.entry(normalize_question(r.question())).or_default() += 1;
    }
    let mut hist = BTreeMap::new();
    for c in counts.values() {
        *hist.entry(*c).or_default() += 1;
    }
    hist
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Q(String);
    impl HasQuestion for Q {
        fn question(&self) -> &str {
            &self.0
        }
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_question("  How do I   X?? "), "how do i x");
        assert_eq!(
            normalize_question("\"Quoted,\" she said."),
            "quoted,\" she said"
        );
        assert_eq!(normalize_question("Ünïcode  Test!"), "ünïcode test");
        assert_eq!(normalize_question("?!"), "");
    }

    #[test]
    fn exact_sizes_and_leftovers() {
        let recs: Vec<Q> = (0..10).map(|i| Q(format!("q{i}"))).collect();
        let s = split_disjoint(
            &recs,
            &[SplitSpec::count("a", 3), SplitSpec::fraction("b", 0.5)],
            Duplicates::KeepTogether,
            1,
        )
        .unwrap();
        assert_eq!(s.get("a").unwrap().len(), 3);
        assert_eq!(s.get("b").unwrap().len(), 5);
        assert_eq!(s.unused, 2);
        assert!(s.overlap().is_clean());
    }

    /// 20 questions with 1 to 4 answers each: the test split keeps one record per question, the
    /// attack split every record of its questions; no question is in both, the same questions go
    /// to the test split as when no split keeps repeats, and the attack split's size counts
    /// records.
    #[test]
    fn one_split_keeps_repeats_the_others_one_record_per_question() {
        let recs: Vec<Q> = (0..20)
            .flat_map(|i| (0..1 + i % 4).map(move |_| Q(format!("q{i}"))))
            .collect();
        assert_eq!(recs.len(), 50);
        let specs = |keep: bool| {
            [
                SplitSpec::count("test", 5),
                SplitSpec::count("attack", 12).with_repeats(keep),
            ]
        };
        let plain = split_disjoint(&recs, &specs(false), Duplicates::KeepFirst, 3).unwrap();
        let rep = split_disjoint(&recs, &specs(true), Duplicates::KeepFirst, 3).unwrap();
        assert_eq!(plain.get("test"), rep.get("test"));
        let test = rep.get("test").unwrap();
        let attack = rep.get("attack").unwrap();
        assert_eq!(attack.len(), 12);
        let distinct = |v: &[Q]| v.iter().map(|q| q.0.clone()).collect::<BTreeSet<_>>().len();
        assert_eq!(distinct(test), 5);
        assert!(distinct(attack) < 12, "repeats kept");
        assert!(rep.overlap().is_clean());
        // Each attack question's records are all there, except perhaps the last one's.
        let last = &attack.last().unwrap().0;
        for q in attack.iter().map(|r| &r.0).collect::<BTreeSet<_>>() {
            if q != last {
                let n = recs.iter().filter(|r| &r.0 == q).count();
                let there = attack.iter().filter(|r| &r.0 == q).count();
                assert_eq!(there, n, "{q}");
            }
        }
        // Too many records for one record per question, enough with repeats.
        assert!(split_disjoint(
            &recs,
            &[SplitSpec::count("attack", 40)],
            Duplicates::KeepFirst,
            0
        )
        .is_err());
        let all = split_disjoint(
            &recs,
            &[SplitSpec::count("attack", 50).with_repeats(true)],
            Duplicates::KeepFirst,
            0,
        )
        .unwrap();
        assert_eq!(all.get("attack").unwrap().len(), 50);
        assert_eq!((all.unused, all.duplicates_dropped), (0, 0));
    }

    #[test]
    fn too_large_and_misplaced_rest_are_errors() {
        let recs: Vec<Q> = (0..4).map(|i| Q(format!("q{i}"))).collect();
        let e = split_disjoint(&recs, &[SplitSpec::count("a", 5)], Duplicates::KeepFirst, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 4"), "{e}");
        let e = split_disjoint(
            &recs,
            &[SplitSpec::rest("a"), SplitSpec::count("b", 1)],
            Duplicates::KeepFirst,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("last split"), "{e}");
        assert!(split_disjoint(
            &recs,
            &[SplitSpec::fraction("a", 1.5)],
            Duplicates::KeepFirst,
            0
        )
        .is_err());
    }

    #[test]
    fn overlap_report_finds_normalised_matches() {
        let r = report_overlap(&[
            ("defence", vec!["How do I X?", "other"]),
            ("attack", vec!["b"]),
            ("test", vec!["how do i  x", "b."]),
        ]);
        assert_eq!(r.overlaps.len(), 2);
        assert_eq!(r.overlaps[0].a, "defence");
        assert_eq!(r.overlaps[0].examples, vec!["how do i x"]);
        assert_eq!(r.overlaps[1].a, "attack");
        assert!(r.to_string().contains("attack and test share 1"));
    }
}
