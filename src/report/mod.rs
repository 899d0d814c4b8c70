//! An experiment's report: `report.md` and a self-contained `report.html` (figures inlined),
//! both rendered from one list of blocks so they always say the same thing.

use std::path::Path;

use serde_json::Value;

use crate::eval::overrefusal::Rate;
use crate::experiment::{Cell, CellSummary, Results, SeedMean};
use crate::util::error::Result;
use crate::util::io::write_atomic;

/// A piece of a report.
#[derive(Clone, Debug)]
pub enum Block {
    Heading(usize, String),
    Para(String),
    List(Vec<String>),
    Table {
        head: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// An SVG figure: written to `figures/<file>` and linked from the Markdown; inlined in the
    /// HTML.
    Figure {
        file: String,
        svg: String,
        caption: String,
    },
    Code(String),
}

/// Markdown text of `blocks`.
pub fn markdown(blocks: &[Block]) -> String {
    let mut s = String::new();
    for b in blocks {
        match b {
            Block::Heading(l, t) => s.push_str(&format!("{} {t}\n\n", "#".repeat(*l))),
            Block::Para(t) => s.push_str(&format!("{t}\n\n")),
            Block::List(items) => {
                for i in items {
                    s.push_str(&format!("- {i}\n"));
                }
                s.push('\n');
            }
            Block::Table { head, rows } => {
                let cell = |c: &str| c.replace('|', "\\|");
                s.push_str(&format!(
                    "| {} |\n|{}\n",
                    head.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | "),
                    "---|".repeat(head.len())
                ));
                for r in rows {
                    s.push_str(&format!(
                        "| {} |\n",
                        r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
                    ));
                }
                s.push('\n');
            }
            Block::Figure { file, caption, .. } => {
                s.push_str(&format!("![{caption}](figures/{file})\n\n*{caption}*\n\n"))
            }
            Block::Code(t) => s.push_str(&format!("```\n{t}\n```\n\n")),
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Inline Markdown of our own paragraphs: `code` and **bold** only.
fn inline(s: &str) -> String {
    let mut out = String::new();
    let e = esc(s);
    let mut code = false;
    for (i, part) in e.split('`').enumerate() {
        if i > 0 {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        }
        if code {
            out.push_str(part);
        } else {
            let mut bold = false;
            for (j, p) in part.split("**").enumerate() {
                if j > 0 {
                    out.push_str(if bold { "</b>" } else { "<b>" });
                    bold = !bold;
                }
                out.push_str(p);
            }
            if bold {
                out.push_str("</b>");
            }
        }
    }
    if code {
        out.push_str("</code>");
    }
    out
}

/// A self-contained HTML page of `blocks`.
pub fn html(title: &str, blocks: &[Block]) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;\
line-height:1.45;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}\
th,td{{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}}th{{background:#f3f3f3}}\
pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:0.85em}}\
figure{{margin:1.5em 0}}figcaption{{font-style:italic;color:#555}}\
</style></head><body>\n",
        esc(title)
    );
    for b in blocks {
        match b {
            Block::Heading(l, t) => s.push_str(&format!("<h{l}>{}</h{l}>\n", inline(t))),
            Block::Para(t) => s.push_str(&format!("<p>{}</p>\n", inline(t))),
            Block::List(items) => {
                s.push_str("<ul>\n");
                for i in items {
                    s.push_str(&format!("<li>{}</li>\n", inline(i)));
                }
                s.push_str("</ul>\n");
            }
            Block::Table { head, rows } => {
                s.push_str("<table><thead><tr>");
                for h in head {
                    s.push_str(&format!("<th>{}</th>", inline(h)));
                }
                s.push_str("</tr></thead><tbody>\n");
                for r in rows {
                    s.push_str("<tr>");
                    for c in r {
                        s.push_str(&format!("<td>{}</td>", inline(c)));
                    }
                    s.push_str("</tr>\n");
                }
                s.push_str("</tbody></table>\n");
            }
            Block::Figure { svg, caption, .. } => s.push_str(&format!(
                "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
                esc(caption)
            )),
            Block::Code(t) => s.push_str(&format!("<pre>{}</pre>\n", esc(t))),
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// Write `report.md`, `report.html` and `figures/*.svg` into `out`.
pub fn write(title: &str, blocks: &[Block], out: &Path) -> Result<()> {
    let figs = out.join("figures");
    for b in blocks {
        if let Block::Figure { file, svg, .. } = b {
            std::fs::create_dir_all(&figs)
                .map_err(|e| crate::Error::file(&figs, format!("cannot create directory: {e}")))?;
            write_atomic(&figs.join(file), svg.as_bytes())?;
        }
    }
    write_atomic(&out.join("report.md"), markdown(blocks).as_bytes())?;
    write_atomic(&out.join("report.html"), html(title, blocks).as_bytes())?;
    Ok(())
}

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

/// The verdict sentences: for each attack cell, each defence's harmfulness against the
/// undefended model's, with whether the seed intervals overlap. Facts only.
pub fn verdicts(r: &Results) -> Vec<String> {
    let cells = r.experiment.cells();
    let mut out = vec![];
    for c in &cells {
        let Some(base) = find(&r.cells, "none", c).and_then(|s| s.harm) else {
            continue;
        };
        let before = r
            .defences
            .iter()
            .find(|d| d.name == "none")
            .and_then(|d| d.harm.mean_score)
            .map(|e| e.mean);
        let mut parts = vec![format!(
            "{}: undefended {}{}",
            c.label(),
            with_ci(&base),
            before.map_or(String::new(), |b| format!(" (before the attack {})", f3(b)))
        )];
        // One entry per defence (its defence seeds are pooled in the cell's summary).
        for name in r.experiment.defence_names().iter().filter(|n| *n != "none") {
            if let Some(h) = find(&r.cells, name, c).and_then(|s| s.harm) {
                let rel = if h.ci95.1 < base.ci95.0 {
                    "lower, intervals apart"
                } else if h.ci95.0 > base.ci95.1 {
                    "higher, intervals apart"
                } else if h.mean < base.mean {
                    "lower mean, intervals overlap"
                } else {
                    "not lower"
                };
                parts.push(format!("{name} {} ({rel})", with_ci(&h)));
            }
        }
        out.push(parts.join("; "));
    }
    out
}

fn verdict_word(v: crate::eval::stats::Verdict) -> &'static str {
    match v {
        crate::eval::stats::Verdict::Lower => "lower",
        crate::eval::stats::Verdict::Higher => "higher",
        crate::eval::stats::Verdict::Undetermined => "undetermined",
    }
}

/// The primary metric: paired verdicts, durability curves, steps to break.
pub fn durability_blocks(r: &Results) -> Vec<Block> {
    use crate::eval::durability::Metric;
    let Some(d) = &r.durability else {
        return vec![];
    };
    let e = &r.experiment;
    let mut b = vec![Block::Heading(
        2,
        "Primary metric: the attacker's own loss on held-out questions".into(),
    )];
    let n_items = r
        .defences
        .iter()
        .find_map(|d| d.heldout.as_ref().map(|h| h.harmful_ce.len()))
        .unwrap_or(0);
    b.push(Block::Para(format!(
        "For every model, before the attack and along it: the mean per-token cross-entropy of \
         the data set's own harmful answers to {n_items} held-out {} questions (higher = the \
         attacker has learnt less; nothing of these questions is trained on), and the margin \
         `ce(refusal) - ce(harmful)` against the aligned model's refusal to the same question \
         (lower = more resistant). Differences are defence minus baseline, paired by attack \
         seed and prompt; 95% intervals from a bootstrap over defence seeds ({}), attack seeds \
         ({}) and prompts ({} resamples); verdicts are Holm-corrected over every comparison of \
         the same metric at a family-wise {} (the per-group comparisons, where there are some, \
         as a family of their own); MDD is the smallest difference this design \
         detects with 80% power.",
        e.evaluate_on,
        e.defence_seeds.len().max(1),
        e.seeds.len(),
        e.heldout.bootstrap,
        e.heldout.alpha
    )));
    // Curves: one panel per cell, a line per arm (mean over every attacked copy) with its 95%
    // interval as a band; the figures are in the table below.
    for (ci, c) in e.cells().iter().enumerate() {
        let (series, bands): (Vec<crate::util::plot::Series>, Vec<Vec<(f64, f64, f64)>>) = e
            .defence_names()
            .iter()
            .filter_map(|name| {
                let pts: Vec<_> = d
                    .curves
                    .iter()
                    .filter(|s| &s.defence == name && &s.cell == c)
                    .collect();
                (!pts.is_empty()).then(|| {
                    (
                        crate::util::plot::Series::new(
                            name.clone(),
                            pts.iter()
                                .map(|s| (s.step as f64, s.harmful_ce.mean))
                                .collect(),
                        ),
                        pts.iter()
                            .map(|s| (s.step as f64, s.harmful_ce.ci95.0, s.harmful_ce.ci95.1))
                            .collect(),
                    )
                })
            })
            .unzip();
        if series.is_empty() {
            continue;
        }
        if let Ok(svg) = crate::util::plot::line_chart_with_bands(
            &format!("Held-out harmful CE along the attack: {}", c.label()),
            "attack step",
            "harmful-answer CE (nats/token)",
            &series,
            &bands,
        ) {
            b.push(Block::Figure {
                file: format!("durability-{ci}.svg"),
                svg,
                caption: format!(
                    "Durability curve, {}: held-out harmful-answer cross-entropy after each \
                     evaluated attack step (higher resists more); line: mean over the attacked \
                     copies (defence seeds x attack seeds), band: its 95% interval.",
                    c.label()
                ),
            });
        }
    }
    for (m, grouped) in Metric::ALL
        .into_iter()
        .map(|m| (m, false))
        .chain([(Metric::HarmfulCe, true), (Metric::Margin, true)])
    {
        let rows: Vec<Vec<String>> = d
            .comparisons
            .iter()
            .filter(|c| c.metric == m && c.group.is_some() == grouped)
            .map(|c| {
                let better = match (c.diff.verdict, m.higher_resists()) {
                    (crate::eval::stats::Verdict::Higher, true)
                    | (crate::eval::stats::Verdict::Lower, false) => " (more resistant)",
                    (crate::eval::stats::Verdict::Lower, true)
                    | (crate::eval::stats::Verdict::Higher, false) => " (less resistant)",
                    _ => "",
                };
                let cell = c
                    .cell
                    .as_ref()
                    .map_or("before attack".into(), |c| c.label());
                vec![
                    match &c.group {
                        Some(g) => format!("{cell}; questions of {g}"),
                        None => cell,
                    },
                    format!("{} - {}", c.defence, c.baseline),
                    format!(
                        "{} [{}, {}]",
                        f3(c.diff.diff),
                        f3(c.diff.ci95.0),
                        f3(c.diff.ci95.1)
                    ),
                    format!("{} vs {}", f3(c.diff.mean_a), f3(c.diff.mean_b)),
                    c.diff.p_holm.map_or("-".into(), |p| format!("{p:.3}")),
                    f3(c.diff.mdd),
                    format!("{}{better}", verdict_word(c.diff.verdict)),
                ]
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        b.push(Block::Para(format!(
            "**{}** ({} resists more), at the attack's last step{}:",
            m.label(),
            if m.higher_resists() {
                "higher"
            } else {
                "lower"
            },
            if grouped {
                ", on the held-out questions of each harm-category group (primary category; \
                 `heldout.groups`), Holm-corrected as a family of their own"
            } else {
                ""
            }
        )));
        b.push(Block::Table {
            head: [
                "cell",
                "comparison",
                "difference [95% CI]",
                "means",
                "Holm p",
                "MDD",
                "verdict",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        });
    }
    let rows: Vec<Vec<String>> = d
        .curves
        .iter()
        .map(|s| {
            vec![
                s.cell.label(),
                s.defence.clone(),
                s.step.to_string(),
                with_ci(&s.harmful_ce),
                with_ci(&s.margin),
                s.harmful_ce.n.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        b.push(Block::Para(
            "Every evaluated step, mean [95% interval]:".into(),
        ));
        b.push(Block::Table {
            head: ["cell", "defence", "step", "harmful CE", "margin", "models"]
                .map(String::from)
                .to_vec(),
            rows,
        });
    }
    let rows: Vec<Vec<String>> = d
        .breaks
        .iter()
        .map(|x| {
            let broke: Vec<usize> = x.steps.iter().flatten().copied().collect();
            let each = x
                .steps
                .iter()
                .map(|s| s.map_or(format!(">{}", x.last_step), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                x.cell.label(),
                x.defence.clone(),
                f3(x.threshold),
                format!("{} of {}", broke.len(), x.steps.len()),
                each,
            ]
        })
        .collect();
    if !rows.is_empty() {
        b.push(Block::Para(format!(
            "Steps to break: the first evaluated attack step at which a model's held-out \
             harmful CE is at or below the threshold ({}); `>N`: not within the attack's N \
             steps (censored).",
            match e.heldout.break_threshold {
                Some(t) => format!("{t}, set in the experiment"),
                None => "the undefended model's mean at its first evaluated step after step 0, \
                         per cell"
                    .into(),
            }
        )));
        b.push(Block::Table {
            head: [
                "cell",
                "defence",
                "threshold",
                "broke",
                "step per attacked model",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        });
    }
    if !d.notes.is_empty() {
        b.push(Block::List(d.notes.clone()));
    }
    b
}

/// The judge's calibration table (`report.json`'s `calibration`, see
/// `crate::eval::classifier::Calibration`), with the targets met or missed, and the published
/// agreement figures beside it.
pub fn calibration_blocks(c: &Value) -> Vec<Block> {
    let Some(rows) = c["rows"].as_array() else {
        return vec![Block::Para(
            "This classifier has no calibration figures (trained before they existed).".into(),
        )];
    };
    let opt = |v: &Value| v.as_f64().map_or("-".into(), f3);
    let mut b = vec![Block::Para(
        "The judge's calibration (threshold 0.5; targets: AUROC >= 0.90 and mean P(harmful) of \
         refusals <= 0.10; XSTest files are human-labelled answers of other models left out of \
         the judge's training):"
            .into(),
    )];
    let mut misses = vec![];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let set = r["set"].as_str().unwrap_or("?").to_string();
            if let Some(a) = r["auroc"].as_f64() {
                if a < 0.90 {
                    misses.push(format!(
                        "{set}: AUROC {} (target 0.90, short by {})",
                        f3(a),
                        f3(0.90 - a)
                    ));
                }
            }
            if let Some(p) = r["refusal_mean_p"].as_f64() {
                if p > 0.10 {
                    misses.push(format!(
                        "{set}: refusals' mean P(harmful) {} (target 0.10, over by {})",
                        f3(p),
                        f3(p - 0.10)
                    ));
                }
            }
            vec![
                set,
                format!("{} ({} harmful)", r["n"], r["harmful"]),
                opt(&r["auroc"]),
                opt(&r["accuracy"]),
                opt(&r["precision"]),
                opt(&r["recall"]),
                format!("{} ({})", opt(&r["refusal_mean_p"]), r["refusals"]),
                r["keyword"]["agreement"].as_f64().map_or("-".into(), f3),
            ]
        })
        .collect();
    b.push(Block::Table {
        head: [
            "set",
            "n",
            "AUROC",
            "accuracy",
            "precision",
            "recall",
            "refusals' mean P(harmful) (n)",
            "keyword check's agreement with humans",
        ]
        .map(String::from)
        .to_vec(),
        rows: table,
    });
    b.push(Block::Para(if misses.is_empty() {
        "The judge meets both targets on every set.".into()
    } else {
        format!(
            "**The judge misses its targets** (read every P(harmful) figure with this in mind): {}.",
            misses.join("; ")
        )
    }));
    if let Some(p) = c["published"].as_array() {
        let items: Vec<String> = p
            .iter()
            .map(|x| {
                format!(
                    "{}: {}",
                    x[0].as_str().unwrap_or("?"),
                    x[1].as_f64().map_or("-".into(), |v| format!(
                        "{:.1}%",
                        if v <= 1.0 { v * 100.0 } else { v }
                    ))
                )
            })
            .collect();
        b.push(Block::Para(format!(
            "Published agreement with human labels, for scale (not measured here): {}.",
            items.join("; ")
        )));
    }
    b
}

/// The overlap audit: every pair of data partitions and the questions they share.
pub fn audit_blocks(r: &Results) -> Vec<Block> {
    if r.audit.is_empty() {
        return vec![];
    }
    let bad: Vec<&crate::experiment::AuditRow> = r.audit.iter().filter(|a| a.shared > 0).collect();
    let held = |n: &str| n == "test" || n == "validation";
    let leaks = bad.iter().filter(|a| held(&a.a) || held(&a.b)).count();
    let mut b = vec![Block::Para(format!(
        "Overlap audit (normalised questions shared by each pair of partitions): {} pairs, {} \
         with a shared question, {leaks} of them involving a held-out partition{}.",
        r.audit.len(),
        bad.len(),
        if leaks == 0 {
            " (none: no held-out question is trained on)"
        } else {
            ": LEAK"
        }
    ))];
    b.push(Block::Table {
        head: ["partition", "partition", "questions", "shared", "e.g."]
            .map(String::from)
            .to_vec(),
        rows: r
            .audit
            .iter()
            .map(|a| {
                vec![
                    a.a.clone(),
                    a.b.clone(),
                    format!("{} / {}", a.a_questions, a.b_questions),
                    a.shared.to_string(),
                    a.examples.join("; "),
                ]
            })
            .collect(),
    });
    b
}

/// A model's label: the defence name, with `.sN` for a defence trained with seed N.
fn arm_label(name: &str, seed: Option<u64>) -> String {
    match seed {
        Some(s) if name != "none" => format!("{name}.s{s}"),
        _ => name.to_string(),
    }
}

/// XSTest over-refusal and degeneracy of every model before any attack, with the flag.
pub fn overrefusal_blocks(r: &Results) -> Vec<Block> {
    let rows: Vec<_> = r
        .defences
        .iter()
        .filter_map(|d| d.overrefusal.as_ref().map(|o| (d, o)))
        .collect();
    if rows.is_empty() {
        return vec![];
    }
    let spec = &r.experiment.overrefusal;
    let rate = |x: &crate::eval::overrefusal::Rate| {
        format!(
            "{} [{}, {}] ({}/{})",
            f3(x.rate),
            f3(x.ci95.0),
            f3(x.ci95.1),
            x.k,
            x.n
        )
    };
    let mut b = vec![
        Block::Heading(
            2,
            "Over-refusal and degeneracy before attack (XSTest)".into(),
        ),
        Block::Para(format!(
            "Every model answers XSTest prompts ({} safe ones that only sound harmful, {} unsafe \
             contrast ones; greedy, {} tokens). Refusals by the keyword check, with Wilson 95% \
             intervals; the judge's mean P(harmful) on the unsafe prompts; degenerate: empty, \
             one-word or repetitive answers. A defended model whose safe-prompt refusal rate \
             exceeds the undefended (aligned) model's by more than {} is flagged.",
            rows[0].1.safe.refused.n,
            rows[0].1.unsafe_set.refused.n,
            spec.max_new_tokens,
            f3(spec.flag_margin),
        )),
    ];
    let table = rows
        .iter()
        .map(|(d, o)| {
            vec![
                arm_label(&d.name, d.seed),
                rate(&o.safe.refused),
                rate(&o.unsafe_set.refused),
                o.unsafe_set.judge_mean.map_or("-".into(), f3),
                rate(&Rate::of(
                    o.safe.degenerate.k + o.unsafe_set.degenerate.k,
                    o.safe.degenerate.n + o.unsafe_set.degenerate.n,
                )),
                if d.over_refuses {
                    "over-refuses".into()
                } else {
                    "no".into()
                },
            ]
        })
        .collect();
    b.push(Block::Table {
        head: vec![
            "model".into(),
            "safe prompts refused".into(),
            "unsafe prompts refused".into(),
            "judge P(harmful), unsafe".into(),
            "degenerate answers".into(),
            "flag".into(),
        ],
        rows: table,
    });
    let flagged: Vec<String> = rows
        .iter()
        .filter(|(d, _)| d.over_refuses)
        .map(|(d, _)| arm_label(&d.name, d.seed))
        .collect();
    b.push(Block::Para(if flagged.is_empty() {
        "No defended model refuses XSTest's safe prompts more than the margin above the \
         undefended model."
            .into()
    } else {
        format!(
            "Flagged for over-refusal: {}. Their resistance figures may come from refusing \
             everything rather than from resisting the attack.",
            flagged.join(", ")
        )
    }));
    b
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

/// Grouped bars: mean P(harmful) per attack cell (and before any attack), one bar per defence,
/// with the seed intervals.
fn harm_figure(r: &Results) -> Option<Block> {
    let cells = r.experiment.cells();
    let mut groups = vec!["before attack".to_string()];
    groups.extend(cells.iter().map(|c| c.label()));
    let bars: Vec<crate::util::plot::BarSeries> = r
        .defences
        .iter()
        .map(|d| {
            let mut values = vec![(
                d.harm.mean_score.map_or(f64::NAN, |e| e.mean),
                d.harm.mean_score.map(|e| e.ci95),
            )];
            for c in &cells {
                values.push(match find(&r.cells, &d.name, c).and_then(|s| s.harm) {
                    Some(m) => (m.mean, (m.n > 1).then_some(m.ci95)),
                    None => (f64::NAN, None),
                });
            }
            crate::util::plot::BarSeries {
                name: d.name.clone(),
                values,
            }
        })
        .collect();
    let svg = crate::util::plot::bar_chart(
        "Harmfulness before and after each attack",
        "mean P(harmful)",
        &groups,
        &bars,
    )
    .ok()?;
    Some(Block::Figure {
        file: "harmfulness.svg".into(),
        svg,
        caption: "Mean P(harmful) on the held-out test prompts; bars after an attack are means \
                  over seeds with 95% intervals (before the attack: bootstrap interval over \
                  prompts)."
            .into(),
    })
}

/// The analyses' figures and a short table.
fn analysis_blocks(r: &Results) -> Vec<Block> {
    use crate::analysis;
    let mut b = vec![];
    if r.analyses.is_empty() {
        return b;
    }
    b.push(Block::Heading(2, "Analyses".into()));
    b.push(Block::Para(format!(
        "On {} defence pairs (harmful answer vs the aligned model's refusal), {} format, up to \
         {} tokens.",
        r.experiment.analysis.pairs,
        format!("{:?}", r.experiment.analysis.format).to_lowercase(),
        r.experiment.analysis.max_len
    )));
    let l2: Vec<(String, Vec<analysis::LayerDistance>)> = r
        .analyses
        .iter()
        .filter_map(|a| a.l2_from_aligned.clone().map(|l| (a.defence.clone(), l)))
        .collect();
    if let Ok(svg) = analysis::plot_l2(&l2, false) {
        if !l2.is_empty() {
            b.push(Block::Figure {
                file: "l2-from-aligned.svg".into(),
                svg,
                caption: "L2 distance by layer between the aligned model's weights and each \
                          defended model's."
                    .into(),
            });
        }
    }
    // Defended -> attacked, for the strongest cell (largest lr, then samples), first seed.
    let strongest = r
        .experiment
        .cells()
        .into_iter()
        .filter(|c| c.samples > 0)
        .max_by(|a, b| (a.lr, a.samples).partial_cmp(&(b.lr, b.samples)).unwrap());
    if let Some(c) = strongest {
        let runs: Vec<(String, Vec<analysis::LayerDistance>)> = r
            .attacks
            .iter()
            .filter(|a| a.cell == c)
            .filter_map(|a| a.l2_from_defended.clone().map(|l| (a.defence.clone(), l)))
            .collect();
        if !runs.is_empty() {
            if let Ok(svg) = analysis::plot_l2(&runs, false) {
                b.push(Block::Figure {
                    file: "l2-attack.svg".into(),
                    svg,
                    caption: format!(
                        "L2 distance by layer that the attack ({}, first seed) moved each model.",
                        c.label()
                    ),
                });
            }
        }
    }
    let lens: Vec<(String, Vec<f64>)> = r
        .analyses
        .iter()
        .map(|a| (a.defence.clone(), a.logit_lens.clone()))
        .collect();
    if let Ok(svg) = analysis::plot_logit_lens(&lens) {
        b.push(Block::Figure {
            file: "logit-lens.svg".into(),
            svg,
            caption: "Logit lens: mean log-probability of the harmful answers read out at every \
                      layer (0 = embeddings)."
                .into(),
        });
    }
    let probes: Vec<(String, Vec<analysis::LayerProbe>)> = r
        .analyses
        .iter()
        .map(|a| (a.defence.clone(), a.probes.clone()))
        .collect();
    if let Ok(svg) = analysis::plot_probes(&probes) {
        b.push(Block::Figure {
            file: "probes.svg".into(),
            svg,
            caption: format!(
                "Held-out accuracy of a logistic-regression probe separating harmful from \
                 harmless mean answer activations, by layer (mean over seeds {:?}).",
                r.experiment.analysis.probe_seeds
            ),
        });
    }
    for a in &r.analyses {
        if let Ok(svg) = analysis::plot_pca(&a.pca, a.pca_harmful, &format!("PCA, {}", a.defence)) {
            b.push(Block::Figure {
                file: format!("pca-{}.svg", a.defence),
                svg,
                caption: format!(
                    "{}: last-layer mean answer activations on the first two principal \
                     components (explained variance {}).",
                    a.defence,
                    a.pca
                        .explained_variance_ratio
                        .iter()
                        .map(|x| f3(*x))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    let rows = r
        .analyses
        .iter()
        .map(|a| {
            let n = a.logit_lens.len();
            vec![
                a.defence.clone(),
                a.logit_lens.get(n / 2).map_or("-".into(), |x| f3(*x)),
                a.logit_lens.last().map_or("-".into(), |x| f3(*x)),
                a.l2_from_aligned.as_ref().map_or("-".into(), |l| {
                    f3(l.iter().map(|d| d.l2 * d.l2).sum::<f64>().sqrt())
                }),
            ]
        })
        .collect();
    b.push(Block::Table {
        head: vec![
            "model".into(),
            "logit lens, middle layer".into(),
            "logit lens, last layer".into(),
            "total L2 from aligned".into(),
        ],
        rows,
    });
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
