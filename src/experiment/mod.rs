//! `repnoise run EXPERIMENT.toml` and `repnoise demo`: a grid of defences x attacks x seeds on
//! one model, with the evaluations, run as stages that are cached on disk and resumed.
//!
//! Layout of an experiment directory:
//!
//! ```text
//! OUT/experiment.toml          the resolved experiment, as run
//! OUT/split-<key>.json         held-out test prompts, defence and attack questions (disjoint)
//! OUT/data/attack-<key>.jsonl  the attack's records
//! OUT/align-<key>/             the aligned model (an `align` run directory)
//! OUT/classifier-<key>/        the harmfulness classifier (a `classifier train` directory)
//! OUT/pairs-<key>.jsonl        defence pairs: harmful answers + the aligned model's refusals
//! OUT/defences/<name>-<key>/   each defence's run directory (the model in `model/`)
//! OUT/eval/<defence>/          pre-attack evaluations (harmfulness, stability, trainability)
//! OUT/attacks/<defence>/<attack>-<key>/lr<lr>-n<samples>-s<seed>/  one attack and its scores
//! OUT/stages.jsonl             wall time of every stage of every invocation
//! OUT/results.json, report.md, report.html
//! ```
//!
//! Every stage directory is named by a key (a hash of everything that determines its result),
//! so editing one setting reruns only the stages it touches, and a rerun skips finished stages.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::attack::AttackConfig;
use crate::data::encode::PromptFormat;
use crate::data::harmful::{read_harmful_qa, HarmfulQa};
use crate::data::split::{split_disjoint, Duplicates, SplitSpec};
use crate::defence::align::AlignConfig;
use crate::defence::DefendConfig;
use crate::eval::classifier::{Classifier, HarmfulLabel};
use crate::eval::durability::{CurvePoint, Metric, Obs};
use crate::eval::harmfulness::{EvalPrompt, HarmFigures, HarmReport, HarmfulnessConfig};
use crate::eval::heldout::{HeldoutConfig, HeldoutEncoded, HeldoutItem, HeldoutScores};
use crate::eval::overrefusal::{OverRefusal, OverRefusalSpec};
use crate::eval::refusal::RefusalCheck;
use crate::eval::stability::TaskResult;
use crate::eval::stats::PairedDiff;
use crate::eval::trainability::TrainabilityReport;
use crate::model::load::LoadedModel;
use crate::train::finetune::FinetuneConfig;
use crate::train::Interrupt;
use crate::util::io::{read_json, write_atomic, write_json_atomic};
use crate::{Error, Result};

mod check;
mod results;
mod runner;
mod spec;
mod split;
mod summary;

pub use check::*;
pub use results::*;
pub use runner::*;
pub use spec::*;
pub use split::*;
pub use summary::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withholding_a_group_drops_its_questions_pairs_by_primary_category() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        // q0: privacy (half); q1: theft (other half); q2: animal abuse first, then privacy (its
        // primary category, animal abuse, is in neither half); q0 again with another answer,
        // filed under theft (categories belong to a question-answer pair).
        let rows = [
            ("q0", "a0", vec!["privacy_violation"]),
            ("q1", "a1", vec!["financial_crime,property_crime,theft"]),
            ("q2", "a2", vec!["animal_abuse", "privacy_violation"]),
            ("q0", "a3", vec!["financial_crime,property_crime,theft"]),
        ];
        let text: String = rows
            .iter()
            .map(|(q, a, cs)| {
                let cats: serde_json::Map<String, Value> =
                    cs.iter().map(|c| (c.to_string(), json!(true))).collect();
                format!(
                    "{}\n",
                    json!({"prompt": q, "response": a, "category": cats, "is_safe": false})
                )
            })
            .collect();
        std::fs::write(&data, text).unwrap();
        let pairs = dir.path().join("pairs.jsonl");
        let pair = |q: &str, a: &str| {
            format!(
                "{}\n",
                json!({"prompt": q, "harmful": a, "harmless": "No."})
            )
        };
        std::fs::write(
            &pairs,
            [
                pair("q0", "a0"),
                pair("q1", "a1"),
                pair("q2", "a2"),
                pair("q0", "a3"),
            ]
            .concat(),
        )
        .unwrap();
        let exp = Experiment {
            data: Some(data.clone()),
            ..Experiment::default()
        };
        let kept = |g: &str| -> Vec<(String, String)> {
            let (p, key) = withheld_pairs(&exp, &pairs, "k", g, dir.path()).unwrap();
            assert!(p.display().to_string().contains(&key));
            std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    (
                        v["prompt"].as_str().unwrap().into(),
                        v["harmful"].as_str().unwrap().into(),
                    )
                })
                .collect()
        };
        let qa = |q: &str, a: &str| (q.to_string(), a.to_string());
        assert_eq!(
            kept("half"),
            vec![qa("q1", "a1"), qa("q2", "a2"), qa("q0", "a3")]
        );
        assert_eq!(kept("other_half"), vec![qa("q0", "a0"), qa("q2", "a2")]);
        // A pair's own categories come first: q0/a0 filed under theft in the pairs file is kept
        // when `half` is withheld, whatever the data say.
        let own = format!(
            "{}\n",
            json!({"prompt": "q0", "harmful": "a0", "harmless": "No.",
                   "category": {"financial_crime,property_crime,theft": true}})
        );
        std::fs::write(&pairs, [own, pair("q1", "a1")].concat()).unwrap();
        let (p, _) = withheld_pairs(&exp, &pairs, "k3", "half", dir.path()).unwrap();
        let text = std::fs::read_to_string(p).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("\"category\":[\"financial_crime"), "{text}");
        // A pair whose question and answer are not in the data is named, with its number.
        std::fs::write(&pairs, [pair("q0", "a0"), pair("q9", "a9")].concat()).unwrap();
        let e = withheld_pairs(&exp, &pairs, "k2", "half", dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("pair 2") && e.to_string().contains("q9"),
            "{e}"
        );
        let bad = Experiment::from_toml_str(
            "[[defences]]\nname = \"rn\"\nwithhold = \"halves\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(bad.to_string().contains("withhold"), "{bad}");
        let bad =
            Experiment::from_toml_str("[heldout]\ngroups = [\"nope\"]\n", "t.toml").unwrap_err();
        assert!(bad.to_string().contains("heldout.groups[0]"), "{bad}");
    }

    #[test]
    fn the_split_key_changes_with_every_partition_size() {
        let e = Experiment::from_toml_str(DEMO_TOML, "configs/demo.toml").unwrap();
        let k = split_key(&e);
        let mut other = e.clone();
        other.seeds = vec![9];
        assert_eq!(split_key(&other), k, "attack seeds do not move the split");
        for change in [
            |x: &mut Experiment| x.test_prompts += 1,
            |x: &mut Experiment| x.validation_prompts += 1,
            |x: &mut Experiment| x.pairs.questions += 1,
            |x: &mut Experiment| x.attack_questions += 1,
            |x: &mut Experiment| x.split_seed += 1,
        ] {
            let mut x = e.clone();
            change(&mut x);
            assert_ne!(split_key(&x), k);
        }
    }

    #[test]
    fn seed_mean_uses_student_t() {
        let m = seed_mean(&[0.2, 0.4, 0.6]);
        assert!((m.mean - 0.4).abs() < 1e-12);
        // sd 0.2, se 0.2/sqrt(3), t(2) = 4.303
        let half = 4.303 * 0.2 / 3f64.sqrt();
        assert!((m.ci95.0 - (0.4 - half)).abs() < 1e-9);
        assert!((m.ci95.1 - (0.4 + half)).abs() < 1e-9);
        let one = seed_mean(&[0.5]);
        assert_eq!(one.ci95, (0.5, 0.5));
        assert!(seed_mean(&[]).mean.is_nan());
    }

    #[test]
    fn demo_config_parses_and_validates() {
        // The demo of issue 25: the three arms, one learning rate, >= 3 attack seeds, attacks of
        // >= 20 steps with >= 3 evaluation points, >= 50 test prompts scored by the held-out
        // loss, the judge, XSTest before attack.
        let e = Experiment::from_toml_str(DEMO_TOML, "configs/demo.toml").unwrap();
        assert!(e.seeds.len() >= 3, "the demo runs at least 3 attack seeds");
        assert!(!e.defence_seeds.is_empty());
        let names = e.defence_names();
        for arm in ["none", "repnoise", "safety-sft"] {
            assert!(names.iter().any(|n| n == arm), "{arm} is an arm: {names:?}");
        }
        assert!(e.test_prompts >= 50 && e.validation_prompts > 0);
        assert!(e.heldout.enabled && (e.heldout.prompts == 0 || e.heldout.prompts >= 50));
        assert!(e.eval.judge_prompts >= 50);
        for base in ["none", "safety-sft"] {
            assert!(e.heldout.compare_to.iter().any(|c| c == base), "{base}");
        }
        assert!(e.overrefusal.enabled);
        assert!(e.classifier.disjoint && e.classifier.xstest);
        // The demo aligns the model on a broad benign mix and checks the alignment's targets,
        // the knowledge drop on ARC-Easy's 300 test items among them.
        let a = e.align.as_ref().expect("the demo aligns the model");
        assert!(a.everyday_train > 0 && a.xstest_train > 0 && a.benign_source == "self");
        // ... and refuses conversational harmful questions as well as instructions.
        assert!(a.beavertails_train > 0 && a.beavertails_validation > 0);
        assert!(a.knowledge_tasks.iter().any(|t| t == "arc_easy"));
        assert!(a.knowledge_items >= 300 && !a.validation_only && !a.skip_eval_before);
        assert_eq!(e.attacks.len(), 1);
        assert_eq!(e.attacks[0].lrs.len(), 1, "one learning rate");
        for a in &e.attacks {
            let steps = a.samples.iter().min().unwrap() / a.config.train.batch_size;
            assert!(steps >= 20, "attack {}: {steps} steps", a.name);
            // Before the attack, at the listed steps and at the end: 3 points at least.
            assert!(!a.eval_steps.is_empty() && a.eval_steps.iter().all(|&s| s < steps));
        }
    }

    /// configs/study-embedded.toml has the design issue 25 asks for, and the tuning run shares
    /// its split and alignment but is scored on the validation partition.
    #[test]
    fn the_study_config_has_the_issues_design() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let e = Experiment::from_toml(&dir.join("study-embedded.toml")).unwrap();
        assert!(e.test_prompts >= 100 && e.validation_prompts > 0);
        assert_eq!((e.evaluate_on, e.heldout.prompts), (Partition::Test, 0));
        let data = e.data.as_ref().unwrap().to_string_lossy().into_owned();
        assert!(
            data.contains("beavertails_disjoint_attack"),
            "real categories: {data}"
        );
        assert!(e.defence_seeds.len() >= 2 && e.seeds.len() >= 5);
        let names = e.defence_names();
        assert_eq!(names, ["none", "repnoise", "safety-sft"]);
        // 120 pairs at least once the aligned model's non-refusals are left out (it refused 93
        // of 120 defence questions in the tuning run), and 60 steps at least.
        assert!(e.pairs.questions >= 160, "{}", e.pairs.questions);
        let (rn, sft) = (&e.defences[0].config, &e.defences[1].config);
        assert_eq!(rn.train.epochs, sft.train.epochs);
        assert_eq!(rn.train.batch_size, sft.train.batch_size);
        assert!(120 * rn.train.epochs / rn.train.batch_size >= 60);
        let full = e.attacks.iter().find(|a| a.name == "full").unwrap();
        assert!(full.lrs.len() >= 2);
        assert!(e
            .attacks
            .iter()
            .any(|a| a.config.method == crate::attack::AttackMethod::Lora));
        for a in &e.attacks {
            assert!(a.samples.iter().all(|&n| n >= 160), "{}", a.name);
            assert!(a.samples[0] / a.config.train.batch_size >= 40);
            assert!(!a.eval_steps.is_empty());
        }
        assert!(e.eval.stability_tasks.len() >= 3 && e.eval.stability_limit >= 300);
        assert!(e.eval.trainability.test >= 150);
        assert!(e.overrefusal.enabled);
        let t = Experiment::from_toml(&dir.join("study-tuning.toml")).unwrap();
        assert_eq!(t.evaluate_on, Partition::Validation);
        assert!(!t.overrefusal.enabled, "XSTest is a test set");
        let same = |x: &Experiment| {
            (
                x.data.clone(),
                x.split_seed,
                x.test_prompts,
                x.validation_prompts,
            )
        };
        assert_eq!(same(&t), same(&e));
        assert_eq!(
            (t.pairs.questions, t.attack_questions),
            (e.pairs.questions, e.attack_questions)
        );
        // The same alignment (training settings); only what it answers differs.
        let strip = |x: &Experiment| {
            let mut a = x.align.clone().unwrap();
            (a.validation_only, a.refusals_before, a.validation_scored) = (false, true, true);
            a
        };
        assert_eq!(strip(&t), strip(&e));
    }

    #[test]
    fn bad_experiments_are_named() {
        let e = Experiment::from_toml_str("seeds = []", "x.toml").unwrap_err();
        assert!(e.to_string().contains("seeds"), "{e}");
        let e = Experiment::from_toml_str("[[defences]]\nname = \"none\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        let e = Experiment::from_toml_str("colour = 1", "x.toml").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Experiment::from_toml_str(
            "[[attacks]]\nname = \"a\"\nlrs = [1e-4]\nsamples = [0]\n",
            "x.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("samples"), "{e}");
    }

    #[test]
    fn new_settings_are_validated_naming_the_field() {
        for (text, field) in [
            ("evaluate_on = \"validation\"", "validation_prompts"),
            ("defence_seeds = [1, 1]", "defence_seeds"),
            ("[align]\nbenign_source = \"web\"", "benign_source"),
            (
                "[align.targets]\neveryday_refused_max = 2.0",
                "everyday_refused_max",
            ),
            ("seeds = [2, 2]", "seeds"),
            ("[heldout]\nbootstrap = 0", "heldout.bootstrap"),
            ("[heldout]\nalpha = 1.5", "heldout.alpha"),
            (
                "[heldout]\nbreak_threshold = -1.0",
                "heldout.break_threshold",
            ),
            ("[heldout.config]\nbatch = 0", "heldout.batch"),
            ("[heldout.config]\nmax_len = 2", "heldout.max_len"),
            (
                "[[attacks]]\nname = \"a\"\nlrs = [1e-4]\nsamples = [4]\n[attacks.config]\n\
                 method = \"full\"\n[attacks.config.train]\nbatch_size = 0",
                "batch_size",
            ),
            (
                "[[attacks]]\nname = \"a\"\nlrs = [1e-4]\nsamples = [4]\n[attacks.config]\n\
                 method = \"lora\"\n[attacks.config.lora]\nalpha = 0.0",
                "lora.alpha",
            ),
            (
                "[[attacks]]\nname = \"a\"\nlrs = [1e-4]\nsamples = [4]\n[attacks.config]\n\
                 method = \"lora\"\n[attacks.config.lora]\ntargets = [\"lm_head\"]",
                "lora.targets",
            ),
            (
                "[[defences]]\nname = \"sv\"\n[defences.config]\nmethod = \"security-vectors\"\n\
                 [defences.config.lora]\nrank = 0",
                "lora.rank",
            ),
        ] {
            let e = Experiment::from_toml_str(text, "x.toml").unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn arms_repeat_each_defence_per_seed_with_distinct_ids() {
        let mut e = Experiment::from_toml_str(DEMO_TOML, "demo").expect("demo parses");
        e.defence_seeds = vec![4, 9];
        let arms = e.arms();
        assert_eq!(arms[0].id(), "none");
        assert_eq!(arms.len(), 1 + 2 * e.defences.len());
        let ids: std::collections::BTreeSet<String> = arms.iter().map(Arm::id).collect();
        assert_eq!(ids.len(), arms.len());
        assert!(arms[1].is_first_seed(&e) && !arms[2].is_first_seed(&e));
        assert_eq!(arms[2].id(), format!("{}.s9", e.defences[0].name));
        e.defence_seeds.clear();
        assert_eq!(e.arms().len(), 1 + e.defences.len());
    }

    #[test]
    fn the_audit_counts_shared_normalised_questions_of_every_pair() {
        let parts = vec![
            (
                "test".to_string(),
                vec!["How do I pick a lock?".to_string(), "b".into()],
            ),
            (
                "attack".to_string(),
                vec!["how do i pick a lock".to_string(), "c".into()],
            ),
            ("defence".to_string(), vec!["d".to_string()]),
        ];
        let rows = audit_rows(&parts);
        assert_eq!(rows.len(), 3);
        let shared: Vec<usize> = rows.iter().map(|r| r.shared).collect();
        assert_eq!(shared, vec![1, 0, 0]);
        assert_eq!((rows[0].a.as_str(), rows[0].b.as_str()), ("test", "attack"));
    }

    #[test]
    fn a_run_directory_is_locked_against_a_second_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock_run_dir(dir.path()).expect("first lock");
        // flock locks belong to the open file description: a second open in this process is
        // refused just as another process would be.
        let e = lock_run_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        lock_run_dir(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn keys_change_with_any_setting() {
        let a = key_of(&json!({"lr": 1e-4, "n": 8}));
        let b = key_of(&json!({"lr": 1e-4, "n": 16}));
        assert_ne!(a, b);
        assert_eq!(a, key_of(&json!({"lr": 1e-4, "n": 8})));
        assert_eq!(a.len(), 10);
    }
}
