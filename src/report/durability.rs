//! The report's lead: the durability curves and the paired verdict tables (defence minus baseline
//! along and at the end of each attack, with intervals and Holm-corrected verdicts).

use super::*;

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

pub(super) fn verdict_word(v: crate::eval::stats::Verdict) -> &'static str {
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
