//! The experiment runner on a tiny model: every stage runs once, a rerun reuses all of them with
//! the same figures, a lost stage is redone alone with the same result, and a changed setting
//! runs only the stages it touches.

use std::path::Path;

use repnoise::experiment::{Experiment, Results, RunOptions, StageTime};

/// Run (or resume) the experiment and write its report, as `repnoise run` does.
fn run(exp: &Experiment, out: &Path, o: &RunOptions) -> repnoise::Result<Results> {
    let r = repnoise::experiment::run(exp, out, o)?;
    repnoise::report::write_report(&r, out)?;
    Ok(r)
}

use crate::common::{tiny_config, tiny_params, write_tiny_hf};

fn write_data(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("harmful.jsonl");
    let mut lines = String::new();
    for i in 0..30 {
        lines.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("how do i do bad thing {i}?"),
                "response": format!("first do step {i}, then the next."), "is_safe": false})
        ));
    }
    // A safe record, which the split leaves out.
    lines.push_str(
        "{\"prompt\": \"how do i bake?\", \"response\": \"bake it.\", \"is_safe\": true}\n",
    );
    std::fs::write(&data, lines).unwrap();
    let pairs = dir.join("pairs.jsonl");
    let mut p = String::new();
    for i in 0..6 {
        p.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("how do i hurt {i}?"),
                "harmful": format!("hit them {i} times."), "harmless": "sorry, i cannot."})
        ));
    }
    std::fs::write(&pairs, p).unwrap();
    (data, pairs)
}

fn experiment(dir: &Path) -> Experiment {
    let model = dir.join("model");
    let cfg = tiny_config(repnoise::model::config::Arch::Llama, true);
    write_tiny_hf(&model, &cfg, &tiny_params(&cfg, 3));
    let clf = dir.join("classifier");
    crate::classifier::write_tiny_classifier(&clf, &["safe", "harmful"], 5);
    let (data, pairs) = write_data(dir);
    let text = format!(
        r#"
name = "tiny"
model = "{model}"
data = "{data}"
test_prompts = 4
seeds = [1, 2]

[pairs]
file = "{pairs}"
questions = 4
format = "plain"

[classifier]
path = "{clf}"

[[defences]]
name = "sft"
[defences.config]
method = "safety-sft"
max_len = 80
[defences.config.train]
lr = 1e-3
batch_size = 3
checkpoint_every = 0

[[attacks]]
name = "full"
lrs = [1e-3]
samples = [2, 4]
[attacks.config]
method = "full"
format = "plain"
max_len = 80
[attacks.config.train]
batch_size = 2
warmup_ratio = 0.0
checkpoint_every = 0

[analysis]
format = "plain"
pairs = 6
max_len = 80
probe_seeds = [1, 2]

[heldout.config]
format = "plain"
max_len = 64

[eval.harmfulness]
format = "plain"
batch = 4
[eval.harmfulness.sampling]
max_new_tokens = 4
"#,
        model = model.display(),
        data = data.display(),
        pairs = pairs.display(),
        clf = clf.display()
    );
    Experiment::from_toml_str(&text, "tiny.toml").unwrap()
}

fn opts(dir: &Path) -> RunOptions {
    RunOptions {
        cache: dir.join("cache"),
        device: candle_core::Device::Cpu,
        command: "test".into(),
        ignore_align_targets: false,
        dtype: candle_core::DType::F32,
    }
}

fn ran(stages: &[StageTime]) -> Vec<String> {
    stages
        .iter()
        .filter(|s| !s.cached)
        .map(|s| s.stage.clone())
        .collect()
}

fn scores(r: &Results) -> Vec<(String, String, u64, f64, f64)> {
    r.attacks
        .iter()
        .map(|a| {
            (
                a.defence.clone(),
                a.cell.label(),
                a.seed,
                a.harm.mean_score.unwrap().mean,
                a.harm.refusal_rate.mean,
            )
        })
        .collect()
}

#[test]
fn experiment_runs_once_reuses_its_stages_and_redoes_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    let out = dir.path().join("exp");
    let o = opts(dir.path());

    let first = run(&exp, &out, &o).unwrap();
    // none + sft, 2 cells, 2 seeds.
    assert_eq!(first.attacks.len(), 8);
    assert_eq!(first.cells.len(), 4);
    assert_eq!(first.defences.len(), 2);
    assert!(first.cells.iter().all(|c| c.harm.unwrap().n == 2));
    assert!(ran(&first.stages).len() >= 8 + 2, "{:?}", first.stages);
    assert_eq!(first.analyses.len(), 2);
    assert!(first.analyses[0].l2_from_aligned.is_none());
    let l2 = first.analyses[1].l2_from_aligned.as_ref().unwrap();
    assert!(l2.iter().any(|d| d.l2 > 0.0), "the defence moved no weight");
    assert!(out.join("figures").join("harmfulness.svg").exists());
    assert!(out.join("figures").join("logit-lens.svg").exists());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| sft |") && md.contains("full lr 1e-3 n 4"),
        "{md}"
    );
    assert!(std::fs::read_to_string(out.join("report.html"))
        .unwrap()
        .contains("<table>"));
    // Attacked models are deleted once scored (keep_attacked_models = false).
    let attacked: Vec<_> = walk(&out.join("attacks"))
        .into_iter()
        .filter(|p| p.ends_with("model.safetensors"))
        .collect();
    assert!(attacked.is_empty(), "{attacked:?}");

    // A rerun does nothing again and reports the same figures.
    let second = run(&exp, &out, &o).unwrap();
    assert!(ran(&second.stages).is_empty(), "{:?}", ran(&second.stages));
    assert_eq!(scores(&first), scores(&second));

    // One attack lost (as if killed before it finished): only it runs, to the same result.
    let lost = walk(&out.join("attacks"))
        .into_iter()
        .find(|p| p.ends_with("result.json") && p.to_string_lossy().contains("n4-s2"))
        .unwrap();
    std::fs::remove_dir_all(lost.parent().unwrap()).unwrap();
    let third = run(&exp, &out, &o).unwrap();
    assert_eq!(ran(&third.stages).len(), 1, "{:?}", ran(&third.stages));
    assert_eq!(scores(&first), scores(&third));

    // A new learning rate: only its attacks run.
    let mut more = exp.clone();
    more.attacks[0].lrs.push(2e-3);
    let fourth = run(&more, &out, &o).unwrap();
    let r = ran(&fourth.stages);
    assert_eq!(r.len(), 2 * 2 * 2, "{r:?}");
    assert!(r.iter().all(|s| s.contains("lr 2e-3")), "{r:?}");
    assert_eq!(fourth.attacks.len(), 16);
}

/// The measuring instrument on the tiny model: a validation partition, two defence seeds,
/// held-out curves at the configured steps, paired comparisons with verdicts, the overlap
/// audit, and a second process refused on the same run directory.
#[test]
fn experiment_measures_held_out_loss_along_attacks_and_compares_paired() {
    let dir = tempfile::tempdir().unwrap();
    let mut exp = experiment(dir.path());
    exp.validation_prompts = 3;
    exp.defence_seeds = vec![5, 6];
    exp.attacks[0].samples = vec![4];
    exp.attacks[0].eval_steps = vec![1, 7];
    exp.analysis.enabled = false;
    exp.heldout.compare_to = vec!["none".into()];
    exp.heldout.bootstrap = 200;
    exp.overrefusal.enabled = true;
    exp.overrefusal.safe = 4;
    exp.overrefusal.unsafe_prompts = 2;
    exp.overrefusal.max_new_tokens = 4;
    exp.overrefusal.format = repnoise::data::encode::PromptFormat::Plain;
    let out = dir.path().join("exp");
    let r = run(&exp, &out, &opts(dir.path())).unwrap();
    // XSTest over-refusal of every model before attack: 4 safe and 2 unsafe prompts each
    // (the tiny model's 128 positions hold them all in the plain format).
    for d in &r.defences {
        let o = d.overrefusal.as_ref().expect("over-refusal measured");
        assert_eq!(o.left_out, 0, "{}", d.name);
        assert_eq!(
            (o.safe.refused.n, o.unsafe_set.refused.n),
            (4, 2),
            "{}",
            d.name
        );
        assert!(o.unsafe_set.judge_mean.is_some() && o.safe.judge_mean.is_none());
    }
    // none + sft x 2 defence seeds, 1 cell, 2 attack seeds.
    assert_eq!(r.defences.len(), 3);
    assert_eq!(r.attacks.len(), 6);
    for a in &r.attacks {
        // Step 0 (before), the listed step 1, the last (2); step 7 is past the end.
        let steps: Vec<usize> = a.curve.iter().map(|p| p.step).collect();
        assert_eq!(steps, vec![0, 1, 2], "{}", a.defence);
        assert!(a.curve.iter().all(|p| p.scores.harmful_ce.len() == 4));
        assert!(a.curve[2].scores.harmful_ce.iter().all(|x| x.is_finite()));
        assert_eq!(a.judge.len(), 4);
        assert_eq!(a.refused.len(), 4);
    }
    // Step 0 of the curve is the defended model's own pre-attack score.
    let sft5 = r.defences.iter().find(|d| d.seed == Some(5)).unwrap();
    let a5 = r
        .attacks
        .iter()
        .find(|a| a.defence_seed == Some(5))
        .unwrap();
    assert_eq!(Some(&a5.curve[0].scores), sft5.heldout.as_ref());
    // The attack lowers the harmful CE it trains on the held-out answers of the same kind.
    let d = r.durability.as_ref().unwrap();
    assert!(!d.curves.is_empty());
    // Copies of one cell whose attacks end a step apart (training samples left out): each
    // copy's last point is the curve's end, at the cell's longest attack, for every arm.
    let mut longer = r.attacks.clone();
    let a = longer.iter_mut().find(|a| a.defence == "none").unwrap();
    a.curve.last_mut().unwrap().step = 3;
    let d2 = repnoise::experiment::summarise_durability(&exp, &r.defences, &longer, &[]).unwrap();
    for arm in ["none", "sft"] {
        let steps: Vec<usize> = d2
            .curves
            .iter()
            .filter(|c| c.defence == arm)
            .map(|c| c.step)
            .collect();
        assert_eq!(steps, vec![0, 1, 3], "{arm}");
    }
    let end = |d: &repnoise::experiment::Durability, arm: &str| {
        d.curves
            .iter()
            .filter(|c| c.defence == arm)
            .next_back()
            .map(|c| (c.harmful_ce.mean, c.harmful_ce.n))
    };
    assert_eq!(end(&d2, "none"), end(d, "none"));
    // Per harm-category group: the same comparison on the group's held-out questions only
    // (items 0 and 2 of group `half` by their primary category, 1 of `other_half`, 3 of
    // neither), Holm-corrected apart from the whole-set comparisons, which stay as they were.
    use repnoise::data::{HarmCategories, HarmCategory as C};
    let mut grouped = exp.clone();
    grouped.heldout.groups = vec!["half".into(), "other_half".into(), "self_harm".into()];
    let cats = [
        vec![C::PrivacyViolation, C::TerrorismOrganizedCrime],
        vec![C::DrugAbuseWeaponsBannedSubstance],
        vec![C::ViolenceAidingAbettingIncitement],
        vec![C::AnimalAbuse],
    ]
    .map(|c| Some(HarmCategories::from_slice(&c)));
    let d3 = repnoise::experiment::summarise_durability(&grouped, &r.defences, &r.attacks, &cats)
        .unwrap();
    let whole = |d: &repnoise::experiment::Durability| -> Vec<_> {
        d.comparisons
            .iter()
            .filter(|c| c.group.is_none())
            .cloned()
            .collect()
    };
    assert_eq!(whole(&d3), whole(d));
    let ce_end_mean = |arm: &str, items: &[usize]| -> f64 {
        let xs: Vec<f64> = r
            .attacks
            .iter()
            .filter(|a| a.defence == arm)
            .flat_map(|a| {
                let s = &a.curve.last().unwrap().scores.harmful_ce;
                items.iter().map(|&i| s[i] as f64).collect::<Vec<_>>()
            })
            .collect();
        xs.iter().sum::<f64>() / xs.len() as f64
    };
    for (g, items) in [("half", &[0usize, 2][..]), ("other_half", &[1][..])] {
        let c = d3
            .comparisons
            .iter()
            .find(|c| {
                c.group.as_deref() == Some(g)
                    && c.metric == repnoise::eval::durability::Metric::HarmfulCe
            })
            .unwrap_or_else(|| panic!("no comparison for {g}: {:?}", d3.comparisons));
        assert!(
            (c.diff.mean_a - ce_end_mean("sft", items)).abs() < 1e-9,
            "{g}"
        );
        assert!(
            (c.diff.mean_b - ce_end_mean("none", items)).abs() < 1e-9,
            "{g}"
        );
        assert!(c.diff.p_holm.is_some() && c.cell.is_some());
    }
    assert_eq!(
        d3.comparisons.iter().filter(|c| c.group.is_some()).count(),
        4,
        "harmful CE and margin for each group with questions"
    );
    assert!(
        d3.notes.iter().any(
            |n| n.starts_with("heldout.groups: 2 of the 4 held-out questions")
                && n.ends_with("group half")
        ),
        "{:?}",
        d3.notes
    );
    assert!(
        d3.notes.iter().any(|n| n.contains("group self_harm")),
        "{:?}",
        d3.notes
    );
    let cmp: Vec<_> = d.comparisons.iter().filter(|c| c.cell.is_some()).collect();
    assert_eq!(cmp.len(), 4, "one per metric: {:?}", d.comparisons);
    assert!(cmp
        .iter()
        .all(|c| c.defence == "sft" && c.baseline == "none"));
    assert!(cmp
        .iter()
        .all(|c| c.diff.defence_seeds_a == 2 && c.diff.attack_seeds == 2));
    assert!(cmp.iter().all(|c| c.diff.p_holm.is_some()));
    assert_eq!(d.breaks.len(), 2);
    // Held-out partitions share nothing with anything else.
    let test_val = r
        .audit
        .iter()
        .find(|a| a.a == "test" && a.b == "validation")
        .unwrap();
    assert_eq!((test_val.a_questions, test_val.b_questions), (4, 3));
    for a in r
        .audit
        .iter()
        .filter(|a| a.a == "test" || a.a == "validation")
    {
        assert_eq!(a.shared, 0, "{a:?}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("Primary metric") && md.contains("Overlap audit"),
        "{md}"
    );
    assert!(md.contains("sft - none"), "{md}");
    assert!(
        md.contains("Over-refusal and degeneracy before attack (XSTest)"),
        "{md}"
    );
    // Models are labelled with their defence seed; the verdict line names each defence once.
    assert!(
        md.contains("| sft.s5 |") && md.contains("| sft.s6 |"),
        "{md}"
    );
    assert_eq!(md.matches("; sft ").count(), 1, "{md}");
    assert!(out.join("figures").join("durability-0.svg").exists());
    // Proportions' intervals stay inside [0, 1].
    for c in &r.cells {
        assert!(c.refusal.ci95.0 >= 0.0 && c.refusal.ci95.1 <= 1.0, "{c:?}");
    }
    // A second process on the same directory is refused, naming the holder.
    let _held = repnoise::experiment::lock_run_dir(&out).unwrap();
    let e = run(&exp, &out, &opts(dir.path())).unwrap_err().to_string();
    assert!(e.contains("in use by another process"), "{e}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every shipped experiment configuration, validated against the data it names (not only
/// parsed): the embedded ones and `paper-shipped.toml` pass against the shipped data; the paper
/// configurations name BeaverTails' 330k training split, which is not shipped, and fail naming
/// that file. Pointed at a stand-in with repeated questions (6,000 questions x 6 answers, with
/// categories; far smaller than the 330k split), every paper configuration's partitions fit.
#[test]
fn shipped_configs_check_against_their_data() {
    use repnoise::experiment::check;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    // 6,000 questions x 6 answers; the categories alternate between the two halves' groups.
    let standin = tmp.path().join("330k_train.jsonl");
    let mut lines = String::new();
    for q in 0..6000 {
        let cat = if q % 2 == 0 {
            "financial_crime,property_crime,theft"
        } else {
            "privacy_violation"
        };
        for a in 0..6 {
            lines.push_str(&format!(
                "{}\n",
                serde_json::json!({"prompt": format!("how would someone do harmful thing {q}?"),
                    "response": format!("answer {a} to question {q}"), "is_safe": false,
                    "category": {cat: true}})
            ));
        }
    }
    std::fs::write(&standin, lines).unwrap();

    let mut checked = vec![];
    for e in std::fs::read_dir(root.join("configs")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_experiment = name.starts_with("paper")
            || name.starts_with("study")
            || name.starts_with("generalisation")
            || name == "demo.toml"
            || name == "grid-embedded.toml";
        if !is_experiment {
            continue;
        }
        let mut exp =
            Experiment::from_toml(&e.path()).unwrap_or_else(|err| panic!("{name}: {err}"));
        // Not shipped; a user who fetched it (docs/REPNOISE.md) has it.
        let names_330k = exp
            .data
            .as_ref()
            .is_some_and(|d| d.ends_with("beavertails/330k_train.jsonl") && !d.exists());
        match check(&exp) {
            Ok(lines) => {
                assert!(!names_330k, "{name}: the 330k split is not shipped");
                assert!(
                    lines.iter().any(|l| l.contains("held-out test prompts")),
                    "{name}: {lines:?}"
                );
                if name == "generalisation-embedded.toml" {
                    // Each group's attack records and withheld defence questions, counted.
                    for l in [
                        "attack attack-half: ",
                        "attack attack-other-half: ",
                        "defence rn-without-half: withholds the ",
                        "defence rn-without-other-half: withholds the ",
                    ] {
                        assert!(lines.iter().any(|x| x.starts_with(l)), "{l}: {lines:?}");
                    }
                }
            }
            Err(err) => {
                let msg = format!("{err:#}");
                assert!(names_330k, "{name}: {msg}");
                assert!(
                    msg.contains("330k_train.jsonl") && msg.contains("does not exist"),
                    "{name}: {msg}"
                );
                exp.data = Some(standin.clone());
                let lines = check(&exp).unwrap_or_else(|e| panic!("{name} on the stand-in: {e:#}"));
                let split = lines
                    .iter()
                    .find(|l| l.contains("held-out test prompts"))
                    .unwrap();
                assert!(
                    split.contains("defence records (") && split.contains("attack records ("),
                    "{name}: {split}"
                );
            }
        }
        checked.push(name);
    }
    checked.sort();
    assert!(checked.len() >= 10, "{checked:?}");
    assert!(checked.contains(&"paper-shipped.toml".to_string()));
}

/// `--check` errors name what is wrong: a partition larger than the data, and a data file that
/// does not exist.
#[test]
fn check_names_what_does_not_fit() {
    use repnoise::experiment::check;
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = write_data(tmp.path());
    let exp = Experiment::from_toml_str(
        &format!(
            "data = {:?}\ntest_prompts = 20\nattack_questions = 20\n",
            data.display().to_string()
        ),
        "t.toml",
    )
    .unwrap();
    let e = format!("{:#}", check(&exp).unwrap_err());
    assert!(e.contains("harmful.jsonl") && e.contains("split"), "{e}");
    let mut missing = exp.clone();
    missing.data = Some(tmp.path().join("nope.jsonl"));
    let e = format!("{:#}", check(&missing).unwrap_err());
    assert!(
        e.contains("nope.jsonl") && e.contains("does not exist"),
        "{e}"
    );
    let bad = Experiment::from_toml_str("keep_repeats = [\"test\"]\n", "t.toml").unwrap_err();
    assert!(bad.to_string().contains("keep_repeats[0]"), "{bad}");
}

/// A stage's key is unchanged in f32 (runs made before `--dtype` keep their results) and
/// different in bf16/f16, so a run in another dtype never reuses an f32 result.
#[test]
fn stage_keys_carry_the_compute_dtype_below_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serde_json::json!({"model": "m", "attack": {"lr": 1e-4}});
    let mut o = opts(tmp.path());
    let f32_key = o.stage_key(v.clone());
    assert_eq!(f32_key, repnoise::experiment::key_of(&v));
    o.dtype = candle_core::DType::BF16;
    let bf16_key = o.stage_key(v.clone());
    o.dtype = candle_core::DType::F16;
    assert!(bf16_key != f32_key && o.stage_key(v) != bf16_key);
}
