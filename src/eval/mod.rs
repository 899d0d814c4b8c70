//! The evaluations behind the paper's four conditions: resistance ([`harmfulness`]), stability
//! ([`stability`]), trainability ([`trainability`], scored by [`rouge`]); generalisation is
//! resistance measured after attacks on harm categories the defence did not see.

pub mod answer;
pub mod classifier;
pub mod durability;
pub mod harmfulness;
pub mod heldout;
pub mod overrefusal;
pub mod refusal;
pub mod rouge;
pub mod stability;
pub mod stats;
pub mod trainability;

use std::path::Path;

use serde_json::json;

use crate::model::llama::Llama;
use crate::model::load::LoadedModel;
use crate::{Error, Result};

/// Run the stability tasks on `model`, `limit` items each (0: all), writing
/// `<task>.json` per task into `out` (a finished task is read back, not scored again) and
/// `stability.json` with them all. The model's store is given up to a [`Llama::inference`]
/// network (forward passes only).
pub fn run_stability(
    model: LoadedModel,
    tasks: &[String],
    limit: usize,
    seed: u64,
    max_len: usize,
    batch: usize,
    out: &Path,
) -> Result<Vec<stability::TaskResult>> {
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create directory: {e}")))?;
    let data = crate::data::default_data_dir();
    let start_id = stability::start_id(&model);
    let weights = crate::model::load::weights_fingerprint(&model);
    let LoadedModel {
        config,
        params,
        tok,
        source,
        ..
    } = model;
    // Built at the first task not read back: re-laying the weights out is wasted when every
    // task's result is already there.
    let mut params = Some(params);
    let mut net = None;
    let mut results = vec![];
    for task in tasks {
        let path = out.join(format!("{task}.json"));
        let key = json!({"model": source, "weights": weights,
                         "limit": limit, "seed": seed, "max_len": max_len});
        if let Some(r) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter(|v| v["key"] == key)
            .and_then(|v| serde_json::from_value::<stability::TaskResult>(v["result"].clone()).ok())
        {
            results.push(r);
            continue;
        }
        let t0 = std::time::Instant::now();
        let all = stability::task_items(task, &data)?;
        let total = all.len();
        let items = stability::limit_items(all, limit, seed);
        eprintln!("{task}: scoring {} of {total} items", items.len());
        let net = match (net.as_ref(), params.take()) {
            (Some(n), _) => n,
            (None, Some(p)) => net.insert(Llama::inference(&config, p)?),
            (None, None) => unreachable!("the store is taken only to build the network"),
        };
        let per_item = stability::evaluate_items(net, &tok, start_id, &items, max_len, batch)?;
        let r = stability::summarise(task, &per_item, total, t0.elapsed().as_secs_f64());
        // Every item with its options, so the figures can be checked against another tool.
        let detail: Vec<serde_json::Value> = items
            .iter()
            .zip(&per_item)
            .map(|(it, r)| json!({"options": it.options, "scores": r}))
            .collect();
        crate::util::io::write_json_atomic(
            &path,
            &json!({"key": key, "result": r, "items": detail}),
        )?;
        results.push(r);
    }
    crate::util::io::write_json_atomic(
        &out.join("stability.json"),
        &json!({"model": source, "limit": limit, "seed": seed, "tasks": results}),
    )?;
    Ok(results)
}

/// A plain-text table of stability results.
pub fn stability_table(results: &[stability::TaskResult]) -> String {
    let mut s = format!(
        "{:<24} {:<15} {:>7} {:>7} {:>6}\n",
        "task", "metric", "value", "stderr", "n"
    );
    for r in results {
        s += &format!(
            "{:<24} {:<15} {:>7.4} {:>7.4} {:>6}\n",
            r.task, r.metric, r.value.mean, r.value.stderr, r.value.n
        );
    }
    s
}
