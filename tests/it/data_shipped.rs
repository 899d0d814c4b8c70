//! Every data file shipped in data/ parses with the expected record and skip counts, is detected
//! as the right kind, and is listed in data/README.md; the directory stays under 36 MB.

use std::path::{Path, PathBuf};

use repnoise::data::mc::EthicsTask;
use repnoise::data::stats::{self, DatasetKind as K};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// (path under data/, kind, records, skipped).
fn shipped() -> Vec<(&'static str, K, usize, usize)> {
    vec![
        ("advbench/harmful_behaviors.csv", K::AdvBench, 520, 0),
        ("arc/arc_challenge.jsonl", K::Arc, 1172, 0),
        ("arc/arc_easy.jsonl", K::Arc, 2376, 0),
        (
            "beavertails_subset_gammaguard/prompt_response_classified.csv",
            K::HarmfulQa,
            1500,
            0,
        ),
        // 4,986 rows, 4,979 distinct questions, with BeaverTails' 14 harm categories.
        (
            "beavertails_disjoint_attack/beavertails_disjoint_attack.jsonl",
            K::HarmfulQa,
            4986,
            0,
        ),
        ("conv_weather/test.tsv", K::ConvWeather, 3121, 0),
        (
            "crows_pairs/crows_pairs_anonymized.csv",
            K::CrowsPairs,
            1508,
            0,
        ),
        // 2,768 triple sets with 6,980 references, one example per reference.
        ("dart/dart-v1.1.1-full-dev.json", K::DartJson, 6980, 0),
        (
            "decoding_trust/decoding_trust_with_refusals_train.json",
            K::DecodingTrust,
            107,
            0,
        ),
        (
            "decoding_trust/training_dataset.jsonl",
            K::DecodingTrust,
            1717,
            0,
        ),
        ("e2e_nlg/devset.csv", K::MrText, 4672, 0),
        ("e2e_nlg/testset_w_refs.csv", K::MrText, 4693, 0),
        (
            "ethics/commonsense/cm_test.csv",
            K::Ethics(EthicsTask::Commonsense),
            3885,
            0,
        ),
        (
            "ethics/deontology/deontology_test.csv",
            K::Ethics(EthicsTask::Deontology),
            3596,
            0,
        ),
        (
            "ethics/justice/justice_test.csv",
            K::Ethics(EthicsTask::Justice),
            2704,
            0,
        ),
        (
            "ethics/utilitarianism/util_test.csv",
            K::Ethics(EthicsTask::Utilitarianism),
            4808,
            0,
        ),
        (
            "ethics/virtue/virtue_test.csv",
            K::Ethics(EthicsTask::Virtue),
            4975,
            0,
        ),
        (
            "harmbench/harmbench_behaviors_text_test.csv",
            K::HarmBench,
            320,
            0,
        ),
        (
            "harmbench/harmbench_behaviors_text_val.csv",
            K::HarmBench,
            80,
            0,
        ),
        (
            "harmbench/harmbench_targets_text.json",
            K::HarmBenchTargets,
            400,
            0,
        ),
        ("harmbench/malicious_instruct.txt", K::PromptLines, 100, 0),
        // 14,044 lines: 14,042 questions and 2 junk header rows.
        ("mmlu/mmlu.jsonl", K::Mmlu, 14042, 2),
        (
            "safety_tuned_llamas/I-CoNa.json",
            K::InstructionList,
            178,
            0,
        ),
        (
            "safety_tuned_llamas/I-Controversial.json",
            K::InstructionList,
            40,
            0,
        ),
        (
            "safety_tuned_llamas/I-MaliciousInstructions.json",
            K::InstructionList,
            100,
            0,
        ),
        (
            "safety_tuned_llamas/I-PhysicalSafetySafe.json",
            K::InstructionList,
            100,
            0,
        ),
        (
            "safety_tuned_llamas/I-PhysicalSafetyUnsafe.json",
            K::InstructionList,
            100,
            0,
        ),
        (
            "safety_tuned_llamas/Q-Harm.json",
            K::InstructionList,
            100,
            0,
        ),
        (
            "safety_tuned_llamas/safety_only_data_Instructions.json",
            K::Instructions,
            2483,
            0,
        ),
        ("truthfulqa/TruthfulQA.csv", K::TruthfulQa, 817, 0),
        ("viggo/test.csv", K::MrText, 1083, 0),
        ("viggo/train.csv", K::MrText, 5103, 0),
        ("viggo/valid.csv", K::MrText, 714, 0),
        ("winogrande/winogrande.jsonl", K::Winogrande, 1267, 0),
    ]
}

/// Licence and documentation files shipped next to the data.
const DOCS: &[&str] = &[
    "README.md",
    "ethics/README.txt",
    "harmbench/LICENSE.txt",
    "xstest/LICENSE",
];

/// XSTest's prompts and its four human-labelled answer sets (read by `data::xstest`, not by
/// `data::stats`): 450 rows each.
const XSTEST: &[&str] = &[
    "xstest/xstest_prompts.csv",
    "xstest/xstest_v2_completions_gpt4.csv",
    "xstest/xstest_v2_completions_llama2new.csv",
    "xstest/xstest_v2_completions_llama2orig.csv",
    "xstest/xstest_v2_completions_mistralguard.csv",
];

/// Everyday requests, factual questions and refusals written for this project (read by
/// `data::everyday`): 240 requests in 12 categories, 10 questions, 32 refusals, 240
/// training-only requests.
const EVERYDAY: &[&str] = &[
    "everyday/everyday_instructions.jsonl",
    "everyday/factual_questions.jsonl",
    "everyday/refusals.txt",
    "everyday/everyday_train_extra.jsonl",
];

#[test]
fn everyday_files_parse() {
    use repnoise::data::everyday;
    let e = everyday::read_everyday(&data_dir().join(EVERYDAY[0])).unwrap();
    assert_eq!(e.len(), 240);
    let f = everyday::read_factual(&data_dir().join(EVERYDAY[1])).unwrap();
    assert_eq!(f.len(), 10);
    let check = repnoise::eval::refusal::RefusalCheck::default();
    let r =
        everyday::read_refusals(&data_dir().join(EVERYDAY[2]), |r| check.is_refusal(r)).unwrap();
    assert_eq!(r.len(), 32);
    let x = everyday::read_everyday(&data_dir().join(EVERYDAY[3])).unwrap();
    assert_eq!(x.len(), 240);
    // Training-only requests never repeat a request that may be held out, nor a factual question.
    let key = |p: &str| repnoise::data::split::normalize_question(p);
    let held: std::collections::BTreeSet<String> = e
        .iter()
        .map(|r| key(&r.prompt))
        .chain(f.iter().map(|q| key(&q.prompt)))
        .collect();
    assert!(x.iter().all(|r| !held.contains(&key(&r.prompt))));
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_file_parses_with_the_expected_counts() {
    for (rel, kind, records, skipped) in shipped() {
        let path = data_dir().join(rel);
        assert_eq!(K::detect(&path).unwrap(), kind, "{rel}: detected kind");
        let data = stats::load(&path, kind).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(data.len(), records, "{rel}: records");
        assert_eq!(
            data.skipped().len(),
            skipped,
            "{rel}: skipped {:?}",
            data.skipped()
        );
    }
}

#[test]
fn xstest_files_parse_with_450_rows_each() {
    use repnoise::data::xstest;
    let prompts = xstest::read_xstest_prompts(&data_dir().join(XSTEST[0])).unwrap();
    assert_eq!(prompts.len(), 450);
    let unsafe_n = prompts
        .iter()
        .filter(|p| xstest::is_unsafe_type(&p.kind))
        .count();
    assert_eq!(unsafe_n, 200, "XSTest has 200 unsafe (contrast) prompts");
    for rel in &XSTEST[1..] {
        let answers = xstest::read_xstest_answers(&data_dir().join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(answers.len(), 450, "{rel}");
    }
}

#[test]
fn shipped_data_details() {
    let s = stats::stats(
        &data_dir().join("beavertails_subset_gammaguard/prompt_response_classified.csv"),
    )
    .unwrap();
    assert_eq!(s.labels["safe"], 1035);
    assert_eq!(s.labels["unsafe"], 465);
    let s = stats::stats(&data_dir().join("decoding_trust/training_dataset.jsonl")).unwrap();
    assert_eq!(s.splits["non_toxic"], 735);
    assert_eq!(s.splits["toxic_test"], 631);
    assert_eq!(s.splits["toxic"], 351);
    let s = stats::stats(&data_dir().join("harmbench/harmbench_behaviors_text_test.csv")).unwrap();
    assert_eq!(s.splits["standard"], 159);
    assert_eq!(s.splits["contextual"], 81);
    assert_eq!(s.splits["copyright"], 80);
    let s = stats::stats(&data_dir().join("mmlu/mmlu.jsonl")).unwrap();
    assert_eq!(s.categories.len(), 57);
    assert_eq!(s.categories["professional law"], 1534);
    let s = stats::stats(&data_dir().join("viggo/train.csv")).unwrap();
    assert_eq!(s.unique_questions, Some(1675));
}

#[test]
fn every_shipped_file_is_listed_and_documented() {
    let mut files = vec![];
    all_files(&data_dir(), &mut files);
    let known: Vec<&str> = shipped()
        .iter()
        .map(|x| x.0)
        .chain(DOCS.iter().copied())
        .chain(XSTEST.iter().copied())
        .chain(EVERYDAY.iter().copied())
        .collect();
    let readme = std::fs::read_to_string(data_dir().join("README.md")).unwrap();
    let mut total = 0u64;
    for f in &files {
        let rel = f
            .strip_prefix(data_dir())
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        assert!(
            known.contains(&rel.as_str()),
            "{rel} is shipped but not tested"
        );
        if rel != "README.md" {
            assert!(
                readme.contains(&format!("`{rel}`")),
                "{rel} is not in data/README.md"
            );
        }
        total += std::fs::metadata(f).unwrap().len();
    }
    assert_eq!(
        files.len(),
        known.len(),
        "a listed file is missing from data/"
    );
    assert!(total < 36_000_000, "data/ is {total} bytes");
    for word in ["WARNING", "Licen", "commit"] {
        assert!(readme.contains(word), "README lacks {word}");
    }
}
