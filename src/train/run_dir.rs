//! A training run's directory, and its checkpoints. A run lives in a directory:
//!
//! - `config.json`: the resolved configuration, written first; a later run in the same
//!   directory must have the same configuration (it then resumes).
//! - `env.json`: version, commit, machine, device.
//! - `metrics.jsonl`: one line per optimizer step (every loss term, learning rate, gradient norm,
//!   seconds), append-only; on resume, lines after the checkpoint are dropped first.
//! - `log.txt`: human-readable lines.
//! - `checkpoints/step-NNNNNN/`: weights, optimizer state and `state.json`, made complete by the
//!   `COMPLETE` marker written last and by an atomic rename of the directory; only the newest
//!   `keep_checkpoints` are kept.
//! - `model/`: the final model as a Hugging Face directory, then `DONE` (a JSON summary).
//!

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::TrainSummary;
use crate::model::params::Params;
use crate::model::tensor_file::{save_safetensors, write_safetensors, TensorFile};
use crate::train::optim::AdamWGroups;
use crate::util::io::{write_atomic, write_json_atomic};
use crate::{Error, Result};

/// A run directory.
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Open `path` for a run with `config` (any JSON value): write it when the directory is new;
    /// when it holds a run already, the configurations must match.
    pub fn open(path: &Path, config: &Value) -> Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::file(path, format!("cannot create run directory: {e}")))?;
        let cfg_path = path.join("config.json");
        if cfg_path.exists() {
            let text = crate::util::io::read_text(&cfg_path)?;
            let old: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
            // A directory whose run never took a step (it stopped on a bad setting, say) holds
            // nothing to keep: the new configuration replaces the old.
            let started = ["metrics.jsonl", "checkpoints", "DONE", "model"]
                .iter()
                .any(|f| {
                    let p = path.join(f);
                    p.is_dir() || std::fs::metadata(&p).is_ok_and(|m| m.len() > 0)
                });
            if &old != config && !started {
                write_json_atomic(&cfg_path, config)?;
            } else if &old != config {
                let diff = diff_keys(&old, config, "");
                return Err(Error::file(
                    &cfg_path,
                    format!(
                        "this directory holds a run with another configuration (differs at: \
                         {}); choose another --out, or delete the directory to start over",
                        diff.join(", ")
                    ),
                ));
            }
        } else {
            write_json_atomic(&cfg_path, config)?;
        }
        let dir = Self {
            path: path.to_path_buf(),
        };
        if !path.join("env.json").exists() {
            write_json_atomic(&path.join("env.json"), &environment())?;
        }
        Ok(dir)
    }

    pub fn done(&self) -> Option<TrainSummary> {
        let text = std::fs::read_to_string(self.path.join("DONE")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn model_dir(&self) -> PathBuf {
        self.path.join("model")
    }

    pub(super) fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// Complete checkpoints, oldest first: `(step, dir)`.
    pub fn complete_checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let mut out = vec![];
        if let Ok(rd) = std::fs::read_dir(self.checkpoints()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
                    if e.path().join("COMPLETE").exists() {
                        out.push((n, e.path()));
                    }
                }
            }
        }
        out.sort();
        out
    }

    pub fn log(&self, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join("log.txt"))
        {
            let _ = writeln!(f, "{line}");
        }
    }

    pub(super) fn append_metrics(&self, v: &Value) -> Result<()> {
        let p = self.path.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::file(&p, format!("cannot open: {e}")))?;
        let line = format!("{v}\n");
        if crate::util::fault::armed("metrics.partial") {
            let _ = f.write_all(&line.as_bytes()[..line.len() / 2]);
            crate::util::fault::kill_now();
        }
        f.write_all(line.as_bytes())
            .map_err(|e| Error::file(&p, format!("cannot write: {e}")))
    }

    /// The metrics line of `step` (1-based, as written), if the file has one.
    pub(super) fn metrics_line(&self, step: usize) -> Option<Value> {
        let text = std::fs::read_to_string(self.path.join("metrics.jsonl")).ok()?;
        text.lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["step"].as_u64() == Some(step as u64))
    }

    /// Keep only the metric lines of steps `<= step` (the rest came after the checkpoint).
    pub(super) fn truncate_metrics(&self, step: usize) -> Result<()> {
        let p = self.path.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&p, kept.as_bytes())
    }
}

/// Keys under which two JSON values differ.
fn diff_keys(a: &Value, b: &Value, prefix: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    diff_keys(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        &p,
                    )
                })
                .collect()
        }
        _ if a == b => vec![],
        _ => vec![if prefix.is_empty() {
            "(top level)".into()
        } else {
            prefix.into()
        }],
    }
}

/// The environment a run used: versions, commit, machine.
pub fn environment() -> Value {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|x| x.trim().to_string())
    });
    json!({
        "repnoise_version": env!("CARGO_PKG_VERSION"),
        "git_commit": commit,
        // The commit this binary was built from (`-dirty`: with uncommitted changes); it can
        // differ from the checkout's `git_commit` above.
        "build_commit": Some(env!("REPNOISE_BUILD_COMMIT")).filter(|c| !c.is_empty()),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cuda_feature": cfg!(feature = "cuda"),
        "started": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

pub(super) fn save_checkpoint(
    run: &RunDir,
    step: usize,
    store: &Params,
    opt: &AdamWGroups,
    keep: usize,
) -> Result<()> {
    let root = run.checkpoints();
    let tmp = root.join(format!(".tmp-step-{step:06}"));
    let dst = root.join(format!("step-{step:06}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    crate::util::fault::point("checkpoint.dir");
    let weights: Vec<(String, Tensor)> = store
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save_safetensors(&tmp.join("model.safetensors"), &weights)?;
    crate::util::fault::point("checkpoint.weights");
    // The moments one at a time, as the writer reaches them (all at once held a copy of them
    // beside the optimizer's own).
    write_safetensors(
        &tmp.join("optimizer.safetensors"),
        &opt.state_shapes(),
        DType::F32,
        |i| opt.state_tensor(i),
    )?;
    write_json_atomic(
        &tmp.join("state.json"),
        &json!({"step": step, "optimizer_step": opt.step_count()}),
    )?;
    write_atomic(&tmp.join("COMPLETE"), b"ok\n")?;
    crate::util::fault::point("checkpoint.marker");
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::file(&dst, format!("cannot rename: {e}")))?;
    crate::util::fault::point("checkpoint.renamed");
    run.log(&format!("checkpoint at step {step}"));
    let all = run.complete_checkpoints();
    if all.len() > keep {
        for (_, d) in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    Ok(())
}

pub(super) fn load_checkpoint(dir: &Path, store: &Params, opt: &mut AdamWGroups) -> Result<()> {
    // Tensor by tensor: reading the files whole held them beside what they set.
    TensorFile::open(&dir.join("model.safetensors"))?.set_vars(
        store.iter(),
        |name| name.to_string(),
        "the checkpoint",
    )?;
    let dev = store
        .iter()
        .next()
        .ok_or_else(|| Error::msg("nothing to train"))?
        .1
        .device()
        .clone();
    let state = TensorFile::open(&dir.join("optimizer.safetensors"))?;
    let spath = dir.join("state.json");
    let s: Value = serde_json::from_str(&crate::util::io::read_text(&spath)?)
        .map_err(|e| Error::file(&spath, format!("not valid JSON: {e}")))?;
    let ostep = s["optimizer_step"]
        .as_u64()
        .ok_or_else(|| Error::field(&spath, "optimizer_step", "missing"))?;
    opt.load_state(ostep as usize, |k| state.get(k, &dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_without_progress_takes_a_new_configuration() {
        let tmp = tempfile::tempdir().unwrap();
        let a = json!({"lr": 1.0});
        let b = json!({"lr": 2.0});
        RunDir::open(tmp.path(), &a).unwrap();
        // Stopped before its first step (a bad setting): the corrected run may use the directory.
        let run = RunDir::open(tmp.path(), &b).unwrap();
        run.append_metrics(&json!({"step": 1})).unwrap();
        // Once a step is recorded, another configuration is refused, naming the difference.
        let e = RunDir::open(tmp.path(), &a).err().unwrap().to_string();
        assert!(
            e.contains("another configuration") && e.contains("lr"),
            "{e}"
        );
        RunDir::open(tmp.path(), &b).unwrap();
    }

    #[test]
    fn config_diff_names_the_keys() {
        let a = json!({"train": {"lr": 1e-5, "seed": 1}, "method": "sft"});
        let b = json!({"train": {"lr": 2e-5, "seed": 1}, "method": "sft"});
        assert_eq!(diff_keys(&a, &b, ""), vec!["train.lr".to_string()]);
    }
}
