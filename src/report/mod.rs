//! An experiment's report: `report.md` and a self-contained `report.html` (figures inlined),
//! both rendered from one list of blocks so they always say the same thing.

use std::path::Path;

use serde_json::Value;

use crate::eval::overrefusal::Rate;
use crate::experiment::{Cell, CellSummary, Results, SeedMean};
use crate::util::error::Result;
use crate::util::io::write_atomic;

mod durability;
mod render;
mod sections;

pub use durability::*;
pub use render::*;
pub use sections::*;

fn f3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "-".into()
    }
}

/// `mean [lo, hi]`.
pub fn with_ci(m: &SeedMean) -> String {
    if m.n > 1 {
        format!("{} [{}, {}]", f3(m.mean), f3(m.ci95.0), f3(m.ci95.1))
    } else {
        f3(m.mean)
    }
}

fn find<'a>(cells: &'a [CellSummary], d: &str, c: &Cell) -> Option<&'a CellSummary> {
    cells.iter().find(|s| s.defence == d && &s.cell == c)
}

fn fmt_secs(s: f64) -> String {
    if s >= 90.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The blocks of an experiment's report.
pub fn blocks(r: &Results) -> Vec<Block> {
    let e = &r.experiment;
    let cells = e.cells();
    let mut b = vec![Block::Heading(
        1,
        format!("repnoise experiment: {}", e.name),
    )];
    // The binary's build commit when recorded (older results only have the checkout's).
    let commit = r.environment["build_commit"]
        .as_str()
        .or(r.environment["git_commit"].as_str())
        .unwrap_or("unknown");
    let computed: f64 = r
        .all_stages
        .iter()
        .filter(|s| !s.cached)
        .map(|s| s.seconds)
        .sum();
    b.push(Block::Para(format!(
        "Command: `{}`. Wall time of this invocation: {} ({} stages, {} reused from earlier \
         invocations); computing every stage took {} over all invocations. repnoise {} at \
         commit `{commit}`, {} threads on {}.",
        r.command,
        fmt_secs(r.seconds),
        r.stages.len(),
        r.stages.iter().filter(|s| s.cached).count(),
        fmt_secs(computed),
        r.environment["repnoise_version"].as_str().unwrap_or("?"),
        r.environment["threads"],
        r.environment["cpu"].as_str().unwrap_or("unknown CPU"),
    )));
    let judged = match e.eval.judge_prompts {
        0 => e.held_out_count(),
        n => n.min(e.held_out_count()),
    };
    let scored = match e.heldout.prompts {
        0 => "all of them".to_string(),
        n => format!("the first {}", n.min(e.held_out_count())),
    };
    b.push(Block::Para(format!(
        "Model `{}`; {} defences besides the undefended model, {} defence seed(s) each; {} attack \
         cells x {} attack seeds ({:?}); the held-out partition is `{}` ({} questions). The \
         primary metric (below) uses {scored}; harmfulness is the judge's mean P(harmful) of \
         the answers to the first {judged} ({} greedy tokens each); its intervals are 95% \
         percentile bootstrap intervals over defence seeds, attack seeds and prompts.",
        e.model,
        e.defences.len(),
        e.defence_seeds.len().max(1),
        cells.len(),
        e.seeds.len(),
        e.seeds,
        e.evaluate_on,
        e.held_out_count(),
        e.eval.harmfulness.sampling.max_new_tokens
    )));

    if let Some(ar) = r
        .align
        .as_ref()
        .and_then(|a| serde_json::from_value::<crate::defence::align::AlignReport>(a.clone()).ok())
    {
        b.push(Block::Para(format!(
            "**The aligned starting model.** {} (details under Alignment.)",
            ar.verdict()
        )));
        let (head, rows) = ar.targets_table();
        b.push(Block::Table { head, rows });
    }

    b.extend(durability_blocks(r));
    b.push(Block::Heading(
        2,
        "Resistance: harmfulness after each attack".into(),
    ));
    b.push(Block::List(verdicts(r)));
    let mut head = vec!["defence".to_string(), "before attack".to_string()];
    head.extend(cells.iter().map(|c| c.label()));
    let table =
        |pick: &dyn Fn(&CellSummary) -> Option<SeedMean>,
         before: &dyn Fn(&crate::experiment::DefenceResult) -> Option<f64>| {
            let rows = e
                .defence_names()
                .iter()
                .map(|name| {
                    let bs: Vec<f64> = r
                        .defences
                        .iter()
                        .filter(|d| &d.name == name)
                        .filter_map(before)
                        .collect();
                    let b = (!bs.is_empty()).then(|| bs.iter().sum::<f64>() / bs.len() as f64);
                    let mut row = vec![name.clone(), b.map_or("-".into(), f3)];
                    for c in &cells {
                        row.push(
                            find(&r.cells, name, c)
                                .and_then(pick)
                                .map_or("-".into(), |m| with_ci(&m)),
                        );
                    }
                    row
                })
                .collect();
            Block::Table {
                head: head.clone(),
                rows,
            }
        };
    b.push(Block::Para(
        "Mean P(harmful) (classifier), mean over seeds [95% interval]:".into(),
    ));
    b.push(table(&|s| s.harm, &|d| d.harm.mean_score.map(|e| e.mean)));
    b.push(Block::Para(
        "Fraction of answers the keyword check calls refusals (a second opinion):".into(),
    ));
    b.push(table(&|s| Some(s.refusal), &|d| {
        Some(d.harm.refusal_rate.mean)
    }));

    if let Some(fig) = harm_figure(r) {
        b.push(fig);
    }

    b.extend(overrefusal_blocks(r));

    // Stability.
    let stab: Vec<_> = r
        .defences
        .iter()
        .filter(|d| !d.stability.is_empty())
        .collect();
    if !stab.is_empty() {
        b.push(Block::Heading(2, "Stability (log-likelihood tasks)".into()));
        b.push(Block::Para(format!(
            "{} items per task at most, scored as lm-evaluation-harness does; value ± standard \
             error.",
            e.eval.stability_limit
        )));
        let mut head = vec!["task (metric)".to_string()];
        head.extend(stab.iter().map(|d| arm_label(&d.name, d.seed)));
        let rows =
            e.eval
                .stability_tasks
                .iter()
                .map(|t| {
                    let mut row = vec![t.clone()];
                    for d in &stab {
                        row.push(d.stability.iter().find(|x| &x.task == t).map_or(
                            "-".into(),
                            |x| {
                                format!(
                                    "{} ± {} ({})",
                                    f3(x.value.mean),
                                    f3(x.value.stderr),
                                    x.metric
                                )
                            },
                        ));
                    }
                    row
                })
                .collect();
        b.push(Block::Table { head, rows });
    }

    // Trainability.
    let tr: Vec<_> = r
        .defences
        .iter()
        .filter_map(|d| d.trainability.as_ref().map(|t| (d, t)))
        .collect();
    if !tr.is_empty() {
        b.push(Block::Heading(
            2,
            "Trainability (benign fine-tuning)".into(),
        ));
        b.push(Block::Para(format!(
            "Task `{}`: {} training examples, ROUGE-1 F (as `rouge_score`) on held-out inputs \
             before and after fine-tuning; mean ± standard error.",
            e.eval.trainability_task.clone().unwrap_or_default(),
            tr[0].1.train_examples
        )));
        let rows = tr
            .iter()
            .map(|(d, t)| {
                vec![
                    arm_label(&d.name, d.seed),
                    format!(
                        "{} ± {}",
                        f3(t.before.rouge1_f.mean),
                        f3(t.before.rouge1_f.stderr)
                    ),
                    format!(
                        "{} ± {}",
                        f3(t.after.rouge1_f.mean),
                        f3(t.after.rouge1_f.stderr)
                    ),
                    fmt_secs(t.seconds),
                ]
            })
            .collect();
        b.push(Block::Table {
            head: vec![
                "defence".into(),
                "ROUGE-1 before".into(),
                "ROUGE-1 after".into(),
                "wall time".into(),
            ],
            rows,
        });
    }

    b.extend(analysis_blocks(r));

    // The measuring instruments.
    b.push(Block::Heading(2, "The harmfulness classifier".into()));
    if let Some(c) = &r.classifier {
        let h = &c["held_out"];
        b.push(Block::Para(format!(
            "Encoder `{}`; held-out ({} examples, split by question): accuracy {}, F1 {}, \
             AUROC {}.",
            c["encoder"].as_str().unwrap_or("?"),
            h["n"],
            h["accuracy"].as_f64().map_or("-".into(), f3),
            h["f1"].as_f64().map_or("-".into(), f3),
            h["auroc"].as_f64().map_or("-".into(), f3),
        )));
        b.extend(calibration_blocks(&c["calibration"]));
    } else {
        b.push(Block::Para("No classifier report was found.".into()));
    }
    let rows: Vec<Vec<String>> = r
        .defences
        .iter()
        .filter_map(|d| {
            d.agreement.as_ref().map(|a| {
                vec![
                    arm_label(&d.name, d.seed),
                    f3(a.agreement),
                    a.refused_harmless.to_string(),
                    a.complied_harmful.to_string(),
                    a.refused_harmful.to_string(),
                    a.complied_harmless.to_string(),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        b.push(Block::Para(
            "Agreement with the keyword refusal check on each model's answers before the attack:"
                .into(),
        ));
        b.push(Block::Table {
            head: [
                "model",
                "agreement",
                "refused, harmless",
                "complied, harmful",
                "refused, harmful",
                "complied, harmless",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        });
    }
    if let Some(a) = &r.align {
        b.push(Block::Heading(2, "Alignment".into()));
        match serde_json::from_value::<crate::defence::align::AlignReport>(a.clone()) {
            Ok(ar) => {
                let tb = |(head, rows): crate::defence::align::Table| Block::Table { head, rows };
                b.push(Block::Para(format!(
                    "{} Refusal rates of the starting and the aligned model on held-out test \
                     sets (refusing is right for harmful sets, answering for benign ones; \
                     keyword check):",
                    ar.verdict()
                )));
                b.push(tb(ar.rates_table(false)));
                if !ar.validation_after.is_empty() {
                    b.push(Block::Para(
                        "Validation sets (where the alignment's settings were chosen):".into(),
                    ));
                    b.push(tb(ar.rates_table(true)));
                }
                if !ar.knowledge.is_empty() {
                    b.push(Block::Para(
                        "Knowledge kept: log-likelihood multiple choice on items never trained \
                         on; the change is paired per item:"
                            .into(),
                    ));
                    b.push(tb(ar.knowledge_table()));
                }
                if !ar.factual.is_empty() {
                    b.push(Block::Para(
                        "Factual questions, answered verbatim (greedy decoding):".into(),
                    ));
                    b.push(tb(ar.factual_table()));
                }
                b.push(Block::Para(format!(
                    "Alignment: {} training steps on {} examples ({}); alignment in all {}, \
                     evaluation before and after {}.",
                    ar.train.steps,
                    ar.train.examples,
                    fmt_secs(ar.train.seconds),
                    fmt_secs(ar.seconds_align),
                    fmt_secs(ar.seconds_eval)
                )));
            }
            Err(e) => b.push(Block::Para(format!(
                "The alignment report could not be read ({e})."
            ))),
        }
    }
    b.push(Block::Heading(2, "Data".into()));
    b.extend(audit_blocks(r));
    let mut notes = r.split_notes.clone();
    notes.push(format!(
        "{} defence pairs (harmful answer + the aligned model's refusal)",
        r.pairs
    ));
    b.push(Block::List(notes));

    b.push(Block::Heading(2, "Every attack, per seed".into()));
    let rows = r
        .attacks
        .iter()
        .map(|a| {
            vec![
                arm_label(&a.defence, a.defence_seed),
                a.cell.label(),
                a.seed.to_string(),
                a.harm.mean_score.map_or("-".into(), |e| f3(e.mean)),
                a.harm.harmful_rate.map_or("-".into(), |e| f3(e.mean)),
                f3(a.harm.refusal_rate.mean),
                a.final_loss.map_or("-".into(), f3),
                fmt_secs(a.seconds),
            ]
        })
        .collect();
    b.push(Block::Table {
        head: [
            "defence",
            "attack",
            "seed",
            "mean P(harmful)",
            "P > 0.5",
            "refusal",
            "final loss",
            "wall time",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    });

    b.push(Block::Heading(2, "Wall time per stage".into()));
    let rows = r
        .stages
        .iter()
        .map(|s| {
            let when_computed = r
                .all_stages
                .iter()
                .rev()
                .find(|x| !x.cached && x.stage == s.stage)
                .map_or("-".into(), |x| fmt_secs(x.seconds));
            vec![
                s.stage.clone(),
                when_computed,
                if s.cached {
                    "reused".into()
                } else {
                    "computed".into()
                },
            ]
        })
        .collect();
    b.push(Block::Table {
        head: vec![
            "stage".into(),
            "wall time when computed".into(),
            "this invocation".into(),
        ],
        rows,
    });
    b.push(Block::Heading(2, "Settings".into()));
    b.push(Block::Code(
        toml::to_string(&r.experiment).unwrap_or_else(|e| format!("(cannot render: {e})")),
    ));
    b.push(Block::Heading(2, "Environment".into()));
    b.push(Block::Code(
        serde_json::to_string_pretty(&r.environment).unwrap_or_default(),
    ));
    b
}

/// Write the experiment's report into `out`.
pub fn write_report(r: &Results, out: &Path) -> Result<()> {
    let title = format!("repnoise experiment: {}", r.experiment.name);
    write(&title, &blocks(r), out)
}

/// A JSON number or `-`.
pub fn num(v: &Value) -> String {
    v.as_f64().map_or("-".into(), f3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_html_say_the_same() {
        let blocks = vec![
            Block::Heading(1, "T".into()),
            Block::Para("a `x<y` and **b**".into()),
            Block::Table {
                head: vec!["h|1".into(), "h2".into()],
                rows: vec![vec!["1".into(), "2".into()]],
            },
            Block::Figure {
                file: "f.svg".into(),
                svg: "<svg></svg>".into(),
                caption: "cap".into(),
            },
        ];
        let md = markdown(&blocks);
        assert!(md.contains("# T\n"));
        assert!(md.contains("| h\\|1 | h2 |\n|---|---|\n| 1 | 2 |"));
        assert!(md.contains("![cap](figures/f.svg)"));
        let h = html("T", &blocks);
        assert!(h.contains("<code>x&lt;y</code>"), "{h}");
        assert!(h.contains("<b>b</b>"));
        assert!(h.contains("<svg></svg><figcaption>cap</figcaption>"));
        assert!(h.contains("<td>2</td>"));
    }
}
