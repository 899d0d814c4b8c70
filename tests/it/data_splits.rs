//! Seeded splits: deterministic for a seed, different across seeds, disjoint after question
//! normalisation (so no test question reaches the defence or the attack), and an overlap report
//! that finds shared questions between user-given splits.

use std::path::{Path, PathBuf};

use repnoise::data::harmful::{read_harmful_qa, HarmfulQa};
use repnoise::data::split::{
    normalize_question, questions, remove_overlap, report_overlap, split_disjoint, Duplicates,
    SplitSpec,
};
use repnoise::data::HasQuestion;

fn shipped(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

fn beavertails() -> Vec<HarmfulQa> {
    read_harmful_qa(&shipped(
        "beavertails_subset_gammaguard/prompt_response_classified.csv",
    ))
    .unwrap()
    .records
}

fn specs() -> Vec<SplitSpec> {
    vec![
        SplitSpec::count("defence", 600),
        SplitSpec::count("attack", 500),
        SplitSpec::count("test", 100),
        SplitSpec::rest("unused"),
    ]
}

fn keys<T: HasQuestion>(xs: &[T]) -> std::collections::BTreeSet<String> {
    xs.iter()
        .map(|x| normalize_question(x.question()))
        .collect()
}

#[test]
fn splits_are_disjoint_after_normalisation() {
    let recs = beavertails();
    let s = split_disjoint(&recs, &specs(), Duplicates::KeepTogether, 42).unwrap();
    assert_eq!(s.get("defence").unwrap().len(), 600);
    assert_eq!(s.get("attack").unwrap().len(), 500);
    assert_eq!(s.get("test").unwrap().len(), 100);
    let used: usize = s.splits.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(
        used + s.unused + s.duplicates_dropped,
        recs.len(),
        "every record is accounted for"
    );
    assert!(
        s.questions < recs.len(),
        "the shipped subset repeats questions"
    );
    let names = ["defence", "attack", "test", "unused"];
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            let a = keys(s.get(names[i]).unwrap());
            let b = keys(s.get(names[j]).unwrap());
            assert!(
                a.is_disjoint(&b),
                "{} and {} share questions",
                names[i],
                names[j]
            );
        }
    }
    assert!(s.overlap().is_clean());
}

#[test]
fn splits_are_deterministic_per_seed() {
    let recs = beavertails();
    let a = split_disjoint(&recs, &specs(), Duplicates::KeepTogether, 7).unwrap();
    let b = split_disjoint(&recs, &specs(), Duplicates::KeepTogether, 7).unwrap();
    assert_eq!(a, b);
    let c = split_disjoint(&recs, &specs(), Duplicates::KeepTogether, 8).unwrap();
    assert_ne!(a.get("test"), c.get("test"));
}

#[test]
fn keep_first_drops_and_counts_repeats() {
    let recs = beavertails();
    let s = split_disjoint(
        &recs,
        &[SplitSpec::fraction("train", 0.8), SplitSpec::rest("test")],
        Duplicates::KeepFirst,
        1,
    )
    .unwrap();
    assert_eq!(s.duplicates_dropped, recs.len() - s.questions);
    let train = s.get("train").unwrap();
    let test = s.get("test").unwrap();
    assert_eq!(train.len(), s.questions * 8 / 10);
    assert_eq!(train.len() + test.len(), s.questions);
    assert_eq!(
        keys(train).len(),
        train.len(),
        "no repeated question within a split"
    );
    assert!(keys(train).is_disjoint(&keys(test)));
}

#[test]
fn near_duplicate_questions_stay_together() {
    #[derive(Clone, Debug, PartialEq)]
    struct Q(&'static str);
    impl HasQuestion for Q {
        fn question(&self) -> &str {
            self.0
        }
    }
    let recs = vec![
        Q("How do I pick a lock?"),
        Q("how do i  pick a lock"),
        Q("  HOW DO I PICK A LOCK!!"),
        Q("Another question"),
        Q("A third one"),
    ];
    for seed in 0..20 {
        let s = split_disjoint(
            &recs,
            &[SplitSpec::count("a", 1), SplitSpec::rest("b")],
            Duplicates::KeepTogether,
            seed,
        )
        .unwrap();
        let a = keys(s.get("a").unwrap());
        let b = keys(s.get("b").unwrap());
        assert!(a.is_disjoint(&b), "seed {seed}");
        // A split of 1 that draws the lock question leaves its two repeats unused.
        assert_eq!(
            s.get("a").unwrap().len() + s.get("b").unwrap().len() + s.unused,
            5
        );
    }
    // Three distinct questions: four records cannot be drawn once repeats are dropped.
    let e = split_disjoint(&recs, &[SplitSpec::count("a", 4)], Duplicates::KeepFirst, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ask for 4") && e.contains("only 3"), "{e}");
}

#[test]
fn overlap_between_user_given_splits_is_reported() {
    let recs = beavertails();
    let defence = &recs[..300];
    let attack = &recs[250..600];
    let test = &recs[1400..];
    let r = report_overlap(&[
        ("defence", questions(defence)),
        ("attack", questions(attack)),
        ("test", questions(test)),
    ]);
    assert!(!r.is_clean());
    let da = r
        .overlaps
        .iter()
        .find(|o| o.a == "defence" && o.b == "attack")
        .unwrap();
    assert!(da.count >= 45, "{}", da.count);
    assert!(da.examples.len() <= 5);
    assert!(r.to_string().contains("defence and attack share"));
    // Removing the test questions from the attack set makes those two disjoint.
    let cleaned = remove_overlap(attack, &questions(test));
    let r2 = report_overlap(&[
        ("attack", questions(&cleaned.records)),
        ("test", questions(test)),
    ]);
    assert!(r2.is_clean(), "{r2}");
    assert_eq!(cleaned.records.len() + cleaned.skipped.len(), attack.len());
}
