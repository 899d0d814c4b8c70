//! `repnoise run --check`: an experiment validated against its data without running it.

use super::*;

/// `repnoise run CONFIG --check`: the configuration validated against the data it names, with
/// nothing trained or written. Returns what a run would use, one line each; an error names the
/// missing file or the partition that does not fit.
pub fn check(exp: &Experiment) -> Result<Vec<String>> {
    exp.validate().map_err(Error::msg)?;
    let mut lines = vec![];
    let parts = partitions(exp)?;
    lines.extend(parts.notes);
    let need = exp.largest_attack();
    lines.push(format!(
        "attacks: up to {need} samples from {} attack records",
        parts.attack.len()
    ));
    let in_group = |recs: &[HarmfulQa], g: &str| -> Result<usize> {
        let group: crate::data::HarmGroup = g.parse()?;
        Ok(
            crate::data::filter_group(recs, group, crate::data::GroupMatch::Primary)?
                .records
                .len(),
        )
    };
    for a in &exp.attacks {
        let Some(g) = &a.config.group else { continue };
        let n = in_group(&parts.attack, g)?;
        if n < 2 {
            return Err(Error::msg(format!(
                "attack {}: {n} attack records of group {g} (attacks.config.group); an attack \
                 needs at least two",
                a.name
            )));
        }
        let most = a.samples.iter().copied().max().unwrap_or(0);
        lines.push(format!(
            "attack {}: {n} attack records of group {g} for up to {most} samples{}",
            a.name,
            if n < most {
                " (fewer: the attack trains on all of them)"
            } else {
                ""
            }
        ));
    }
    for d in &exp.defences {
        let Some(g) = &d.withhold else { continue };
        lines.push(match &exp.pairs.file {
            Some(p) => format!(
                "defence {}: withholds the pairs of group {g} in {}",
                d.name,
                p.display()
            ),
            None => format!(
                "defence {}: withholds the {} of {} defence questions in group {g} (and their \
                 pairs: only the questions the aligned model refuses make one)",
                d.name,
                in_group(&parts.defence, g)?,
                parts.defence.len()
            ),
        });
    }
    if let Some(p) = &exp.pairs.file {
        let n = crate::data::load_pairs_any(p)?.records.len();
        lines.push(format!("defence pairs: {n} in {}", p.display()));
    }
    let dir = crate::data::default_data_dir();
    for task in &exp.eval.stability_tasks {
        let n = crate::eval::stability::task_items(task, &dir)?.len();
        let limit = exp.eval.stability_limit;
        lines.push(match limit {
            0 => format!("stability {task}: all {n} items"),
            l if l > n => format!("stability {task}: {n} items (fewer than the limit {l})"),
            l => format!("stability {task}: {l} of {n} items"),
        });
    }
    if let Some(task) = &exp.eval.trainability_task {
        let ft = &exp.eval.trainability;
        let d = crate::train::finetune::task_data(task, ft.test, ft.train.seed)?;
        lines.push(format!(
            "trainability {task}: {} training and {} test inputs",
            d.train.len(),
            d.test.len()
        ));
    }
    lines.push(match crate::model::load::resolve(&exp.model) {
        Ok(crate::model::load::ModelSource::Embedded(n)) => {
            format!("model: {n} (embedded; fetched on first use)")
        }
        Ok(_) => format!("model: {}", exp.model),
        Err(e) => format!("model: {e} (`run` needs it)"),
    });
    Ok(lines)
}
