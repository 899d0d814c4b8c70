//! The one training loop every method uses (alignment, the defences, the attacks): methods
//! differ only in the loss they return for a batch.
//!
//! The run directory (`config.json`, `metrics.jsonl`, checkpoints, the final model, `DONE`)
//! is [`run_dir`]'s.
//!
//! Resuming after a crash or `kill -9` loads the newest complete checkpoint and gives the same
//! result as an uninterrupted run: the data order of each epoch and every random draw of a step
//! derive from `(seed, epoch)` and `(seed, step)` only. A non-finite loss or gradient stops the
//! run with an error, leaving the last good checkpoint in place.

pub mod finetune;
pub mod lora;
pub mod objective;
pub mod optim;
pub mod run_dir;

pub use run_dir::{environment, RunDir};
use run_dir::{load_checkpoint, save_checkpoint};

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::llama::Llama;
use crate::model::load::{save_hf_dir, LoadedModel};
use crate::model::params::Params;
use crate::train::optim::{clip_coefficient, lr_at, AdamWConfig, AdamWGroups, Schedule};
use crate::util::error::{check_at_least_one, check_positive};
use crate::util::io::write_json_atomic;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Optimisation settings shared by every method.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub lr: f64,
    pub schedule: Schedule,
    /// Fraction of the steps spent in linear warm-up.
    pub warmup_ratio: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Stop after this many optimizer steps (fewer than the epochs give), if set.
    pub max_steps: Option<usize>,
    pub weight_decay: f64,
    /// Global gradient-norm clipping; `None` disables it (`max_grad_norm = false` in a file).
    #[serde(serialize_with = "grad_norm_out", deserialize_with = "grad_norm_in")]
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Frozen parameters (see [`Freeze`]): layer ranges `0-10`, single layers `5`, `embed`,
    /// `lm_head`, `norm`.
    pub freeze: Vec<String>,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Complete checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Plain progress lines every this many steps when no terminal is attached.
    pub log_every: usize,
    /// Write the final model (not a setting of the result, so never serialised): a caller that
    /// uses the trained model in memory and discards it turns this off. A finished run without
    /// its model is trained again when reopened (same seed, same result).
    #[serde(skip, default = "yes")]
    pub save_model: bool,
}

fn yes() -> bool {
    true
}

/// Clipping off is written `false` (TOML has no null).
fn grad_norm_out<S: serde::Serializer>(
    v: &Option<f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(n) => s.serialize_f64(*n),
        None => s.serialize_bool(false),
    }
}

/// A norm, or `false` (or a JSON null) for no clipping.
fn grad_norm_in<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    struct NormOrFlag;
    impl<'de> serde::de::Visitor<'de> for NormOrFlag {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number (the largest gradient norm), or false for no clipping")
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Option<f64>, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Option<f64>, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Option<f64>, E> {
            Ok(Some(v as f64))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Option<f64>, E> {
            if v {
                Err(E::custom(
                    "max_grad_norm = true names no norm: give a number, or false for no clipping",
                ))
            } else {
                Ok(None)
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Option<f64>, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Option<f64>, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Option<f64>, D::Error> {
            d.deserialize_any(NormOrFlag)
        }
    }
    d.deserialize_any(NormOrFlag)
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-5,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.1,
            epochs: 1,
            batch_size: 8,
            max_steps: None,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 42,
            freeze: vec![],
            checkpoint_every: 50,
            keep_checkpoints: 1,
            log_every: 10,
            save_model: true,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        check_positive("lr", self.lr)?;
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(Error::setting(
                "warmup_ratio",
                self.warmup_ratio,
                "must be in [0, 1)",
            ));
        }
        check_at_least_one("epochs", self.epochs)?;
        check_at_least_one("batch_size", self.batch_size)?;
        if let Some(n) = self.max_steps {
            check_at_least_one("max_steps", n)?;
        }
        check_at_least_one("keep_checkpoints", self.keep_checkpoints)?;
        if let Some(n) = self.max_grad_norm {
            if !(n > 0.0) {
                return Err(Error::setting("max_grad_norm", n, "must be positive"));
            }
        }
        Ok(())
    }

    /// Optimizer steps for `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_epoch = n.div_ceil(self.batch_size);
        let all = per_epoch * self.epochs;
        self.max_steps.map_or(all, |m| m.min(all))
    }
}

/// Which parameters a run leaves untouched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Freeze {
    layers: Vec<(usize, usize)>,
    embed: bool,
    norm: bool,
}

impl Freeze {
    /// Parse specs such as `0-10`, `5`, `embed`, `lm_head`, `norm` (also comma-separated).
    /// With tied embeddings, `lm_head` and `embed` are the same matrix.
    pub fn parse(specs: &[String], num_layers: usize) -> Result<Self> {
        let mut f = Freeze::default();
        for spec in specs.iter().flat_map(|s| s.split(',')) {
            let s = spec.trim();
            match s {
                "" => {}
                "embed" | "embed_tokens" | "lm_head" => f.embed = true,
                "norm" => f.norm = true,
                _ => {
                    let (a, b) = match s.split_once('-') {
                        Some((a, b)) => (a.trim(), b.trim()),
                        None => (s, s),
                    };
                    let parse = |x: &str| {
                        x.parse::<usize>().map_err(|_| {
                            Error::setting(
                                "freeze",
                                s,
                                "expected a layer index, a range such as 0-10, embed, lm_head or norm",
                            )
                        })
                    };
                    let (a, b) = (parse(a)?, parse(b)?);
                    if a > b || b >= num_layers {
                        return Err(Error::setting(
                            "freeze",
                            s,
                            format!(
                                "layers must be an increasing range within 0-{}",
                                num_layers - 1
                            ),
                        ));
                    }
                    f.layers.push((a, b));
                }
            }
        }
        Ok(f)
    }

    /// Whether the named parameter is trained.
    pub fn trainable(&self, name: &str) -> bool {
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            return !self.embed;
        }
        if name == "model.norm.weight" {
            return !self.norm;
        }
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some(l) = rest.split('.').next().and_then(|x| x.parse::<usize>().ok()) {
                return !self.layers.iter().any(|&(a, b)| a <= l && l <= b);
            }
        }
        true
    }
}

/// What a method's loss function returns for one batch.
pub struct StepLoss {
    /// The scalar to minimise.
    pub loss: Tensor,
    /// Named terms for the metrics (e.g. `harmless_ce`, `harmful_ce`, `noise_mmd`).
    pub terms: BTreeMap<String, f64>,
}

/// What the loop hands the loss function: the batch's example indices, and a generator for
/// the step's random draws (derived from the seed and the step, so resumed runs draw the same).
pub struct StepCtx<'a> {
    pub step: usize,
    pub indices: &'a [usize],
    pub rng: Rng,
}

/// Result of a completed run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub examples: usize,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub resumed_from: Option<usize>,
    pub final_terms: BTreeMap<String, f64>,
    pub model_dir: PathBuf,
}

/// The example order of one epoch: a seeded permutation.
pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed, &format!("data-order-epoch-{epoch}")).shuffle(&mut idx);
    idx
}

/// The example indices of optimizer step `step`.
pub fn batch_indices(cfg: &TrainConfig, n: usize, step: usize) -> Vec<usize> {
    let per_epoch = n.div_ceil(cfg.batch_size);
    let epoch = step / per_epoch;
    let b = step % per_epoch;
    let order = epoch_order(cfg.seed, epoch, n);
    let end = ((b + 1) * cfg.batch_size).min(n);
    order[b * cfg.batch_size..end].to_vec()
}

/// How a run ends early on purpose (tests of resume simulate a crash with it).
#[derive(Clone, Copy, Debug, Default)]
pub struct Interrupt {
    /// Return after this many steps of this invocation, as if killed (no final model).
    pub after_steps: Option<usize>,
}

/// What a run trains: the variables it optimises and checkpoints, the network built from them,
/// and how its result is written and read back. A whole model ([`LoadedModel`]) is one; a LoRA
/// adapter over a frozen model is another (`crate::train::lora`); the judge's encoder with its
/// head, or the head alone on frozen features, are two more (`crate::eval::classifier`).
pub trait Trainee {
    /// What the loss function of a step runs (a [`Llama`] for the language models).
    type Net;
    /// The optimised (and checkpointed) variables.
    fn store(&self) -> &Params;
    /// Layers of the model (for `--freeze` ranges).
    fn num_layers(&self) -> usize;
    /// The peak learning rate of store entry `name` in a run whose own is `lr`: `lr`, unless
    /// part of the trainee learns at its own rate (a fresh classification head).
    fn peak_lr(&self, _name: &str, lr: f64) -> f64 {
        lr
    }
    /// The network for one step; `trainable(name)` says which store entries carry gradients.
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Self::Net>;
    /// Write the final result into `dir`.
    fn save_final(&self, dir: &Path) -> Result<()>;
    /// Read a finished run's result from `dir` back into the store.
    fn load_final(&self, dir: &Path) -> Result<()>;
    /// The dtype the network computes in (f16 turns on loss scaling).
    fn compute_dtype(&self) -> DType {
        DType::F32
    }
}

/// Dynamic loss scaling for f16 training, with PyTorch's `GradScaler` defaults: the loss is
/// multiplied by `scale` (2^16 at first) before the backward pass so that small gradients do
/// not flush to zero in f16, and the gradients are divided by it before the update. A step
/// whose gradients overflow is skipped and the scale halved; after 2,000 good steps in a row
/// it doubles. Off (scale 1, nothing skipped) in every other dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub active: bool,
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: usize,
}

impl LossScaler {
    pub const INIT: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new(dtype: DType) -> Self {
        let active = dtype == DType::F16;
        Self {
            active,
            scale: if active { Self::INIT } else { 1.0 },
            good_steps: 0,
        }
    }

    /// After a step: `finite` says whether its (scaled) gradients were all finite. Returns
    /// whether the update is to be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.active {
            return finite;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
        finite
    }

    /// The state after the step a metrics line records (written by [`train_any`]).
    fn restore(&mut self, line: &Value) {
        if self.active {
            if let (Some(s), Some(g)) = (
                line["loss_scale_next"].as_f64(),
                line["good_steps"].as_u64(),
            ) {
                self.scale = s;
                self.good_steps = g as usize;
            }
        }
    }
}

impl Trainee for LoadedModel {
    type Net = Llama;
    fn store(&self) -> &Params {
        &self.params
    }
    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Llama> {
        Llama::new(&self.config, &self.params, trainable)
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        save_hf_dir(dir, &self.config, &self.params, &self.tok)
    }
    fn compute_dtype(&self) -> DType {
        self.config.compute_dtype
    }
    fn load_final(&self, dir: &Path) -> Result<()> {
        let dev = self
            .params
            .tensor("model.embed_tokens.weight")?
            .device()
            .clone();
        let trained = crate::model::load::load_hf_dir(dir, &dev)?;
        for (name, var) in self.params.iter() {
            var.set(trained.params.tensor(name)?)?;
        }
        Ok(())
    }
}

/// Train `model` in place on `n` examples with `loss_fn`, in `run`. Resumes from the newest
/// complete checkpoint when there is one. Writes the final model and the `DONE` marker.
pub fn train(
    run: &RunDir,
    model: &mut LoadedModel,
    n: usize,
    cfg: &TrainConfig,
    interrupt: Interrupt,
    loss_fn: impl FnMut(&Llama, &mut StepCtx) -> Result<StepLoss>,
) -> Result<TrainSummary> {
    train_any(run, &*model, n, cfg, interrupt, loss_fn)
}

/// [`train`] for any [`Trainee`]. A finished run (its `DONE` marker present) is not trained
/// again: its result is loaded back, so later stages use it.
pub fn train_any<T: Trainee + ?Sized>(
    run: &RunDir,
    model: &T,
    n: usize,
    cfg: &TrainConfig,
    interrupt: Interrupt,
    mut loss_fn: impl FnMut(&T::Net, &mut StepCtx) -> Result<StepLoss>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    if n == 0 {
        return Err(Error::msg("no training examples"));
    }
    let dtype = model.compute_dtype();
    // The dtype each step ran in is on its metrics line (absent: f32); a run made in another
    // dtype is neither reused nor resumed.
    let check_dtype = |step: usize| -> Result<Option<Value>> {
        let Some(line) = run.metrics_line(step) else {
            return Ok(None);
        };
        let was = line["dtype"].as_str().unwrap_or("f32");
        if was != dtype.as_str() {
            return Err(Error::msg(format!(
                "{}: it was trained with --dtype {was}; use the same dtype (now {}) or a fresh \
                 directory",
                run.path.display(),
                dtype.as_str()
            )));
        }
        Ok(Some(line))
    };
    if let Some(s) = run.done() {
        check_dtype(s.steps)?;
        if run.model_dir().exists() {
            model.load_final(&run.model_dir())?;
            // A crash after the DONE marker can leave the superseded checkpoints.
            let _ = std::fs::remove_dir_all(run.checkpoints());
            run.log("run already complete; loaded its final result");
            return Ok(s);
        }
        run.log("run complete but its final model was not kept: training it again");
    }
    let freeze = Freeze::parse(&cfg.freeze, model.num_layers())?;
    let trainable = |name: &str| freeze.trainable(name);
    let mut opt = AdamWGroups::new(
        model.store(),
        trainable,
        |name| model.peak_lr(name, cfg.lr),
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    if opt.is_empty() {
        return Err(Error::setting(
            "freeze",
            cfg.freeze.join(","),
            "every parameter is frozen",
        ));
    }
    let total = cfg.total_steps(n);
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;

    // Resume.
    let mut scaler = LossScaler::new(dtype);
    let mut start = 0;
    let mut resumed_from = None;
    if let Some((step, dir)) = run.complete_checkpoints().pop() {
        if let Some(line) = check_dtype(step)? {
            scaler.restore(&line);
        }
        load_checkpoint(&dir, model.store(), &mut opt)?;
        run.truncate_metrics(step)?;
        start = step;
        resumed_from = Some(step);
        run.log(&format!("resumed from checkpoint at step {step}"));
        eprintln!("resuming from {} (step {step} of {total})", dir.display());
    } else {
        run.truncate_metrics(0)?;
    }

    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_position(start as u64);
        Some(pb)
    } else {
        None
    };

    let t_run = Instant::now();
    let mut last_terms = BTreeMap::new();
    let mut done_here = 0;
    for step in start..total {
        if interrupt.after_steps.is_some_and(|k| done_here >= k) {
            if let Some(pb) = &bar {
                pb.abandon();
            }
            return Err(Error::msg(format!("interrupted after step {step}")));
        }
        let t0 = Instant::now();
        let indices = batch_indices(cfg, n, step);
        let lr = lr_at(cfg.schedule, cfg.lr, step, total, warmup);
        let net = model.net(&trainable)?;
        let mut ctx = StepCtx {
            step,
            indices: &indices,
            rng: Rng::new(
                cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                "step",
            ),
        };
        let out = loss_fn(&net, &mut ctx)?;
        let loss_v = out
            .loss
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        // In f16 the forward itself can overflow: the step is skipped and the scale halved, as
        // GradScaler does (until the scale falls below 1, when every step overflows).
        let forward_overflow = scaler.active && !loss_v.is_finite() && scaler.scale >= 1.0;
        if !loss_v.is_finite() && !forward_overflow {
            let bad: Vec<&str> = out
                .terms
                .iter()
                .filter(|(_, v)| !v.is_finite())
                .map(|(k, _)| k.as_str())
                .collect();
            let terms = if bad.is_empty() {
                "the total".into()
            } else {
                bad.join(", ")
            };
            return Err(stop(
                run,
                step,
                &format!(
                    "the loss is {loss_v} (not finite: {terms}; terms {:?})",
                    out.terms
                ),
            ));
        }
        let scale_used = scaler.scale;
        let grads = if forward_overflow {
            drop(out.loss);
            candle_core::backprop::GradStore::default()
        } else if scaler.active {
            (out.loss * scale_used)?.backward_owned()?
        } else {
            out.loss.backward_owned()?
        };
        let norm = if forward_overflow {
            f64::INFINITY
        } else {
            opt.grad_norm(&grads)? / scale_used
        };
        let apply = scaler.update(norm.is_finite());
        if !apply && !scaler.active {
            let culprit = opt
                .non_finite_grad(&grads, norm)?
                .unwrap_or_else(|| "no single parameter".into());
            return Err(stop(
                run,
                step,
                &format!("the gradient norm is {norm}; the gradient of {culprit}"),
            ));
        }
        let lr_of = |peak| lr_at(cfg.schedule, peak, step, total, warmup);
        let unscale = clip_coefficient(norm, cfg.max_grad_norm) / scale_used;
        if !apply {
            // An f16 overflow: skip the update (the scaler halved the scale).
            run.log(&format!(
                "step {}: gradients overflowed at loss scale {scale_used}; update skipped",
                step + 1
            ));
        } else if let Err(e) = opt.step(&grads, lr_of, unscale) {
            return Err(stop(
                run,
                step,
                &format!("{e}; the weights in memory are spoilt"),
            ));
        }
        drop(grads);
        let secs = t0.elapsed().as_secs_f64();
        let mut line = serde_json::Map::new();
        line.insert("step".into(), json!(step + 1));
        line.insert("epoch".into(), json!(step / n.div_ceil(cfg.batch_size)));
        line.insert("loss".into(), json!(loss_v));
        for (k, v) in &out.terms {
            line.insert(k.clone(), json!(v));
        }
        line.insert("lr".into(), json!(lr));
        line.insert(
            "grad_norm".into(),
            json!(if norm.is_finite() { Some(norm) } else { None }),
        );
        line.insert("seconds".into(), json!(secs));
        if dtype != DType::F32 {
            line.insert("dtype".into(), json!(dtype.as_str()));
        }
        if scaler.active {
            line.insert("loss_scale".into(), json!(scale_used));
            line.insert("loss_scale_next".into(), json!(scaler.scale));
            line.insert("good_steps".into(), json!(scaler.good_steps));
            line.insert("skipped".into(), json!(!apply));
        }
        run.append_metrics(&Value::Object(line))?;
        last_terms = out.terms.clone();
        last_terms.insert("loss".into(), loss_v);
        let msg = last_terms
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        match &bar {
            Some(pb) => {
                pb.set_message(msg.clone());
                pb.inc(1);
            }
            None => {
                if (step + 1) % cfg.log_every.max(1) == 0 || step + 1 == total {
                    eprintln!("step {}/{total} {msg} lr {lr:.3e} {secs:.1}s", step + 1);
                }
            }
        }
        if (step + 1) % cfg.log_every.max(1) == 0 {
            run.log(&format!(
                "step {} {msg} lr {lr:.3e} gnorm {norm:.3}",
                step + 1
            ));
        }
        done_here += 1;
        let last = step + 1 == total;
        if cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0 && !last {
            save_checkpoint(run, step + 1, model.store(), &opt, cfg.keep_checkpoints)?;
        }
    }
    if let Some(pb) = &bar {
        pb.finish();
    }
    let seconds = t_run.elapsed().as_secs_f64();
    let model_dir = run.model_dir();
    if cfg.save_model {
        model.save_final(&model_dir)?;
    }
    let summary = TrainSummary {
        steps: total,
        examples: n,
        seconds,
        seconds_per_step: seconds / done_here.max(1) as f64,
        resumed_from,
        final_terms: last_terms,
        model_dir,
    };
    write_json_atomic(&run.path.join("DONE"), &summary)?;
    crate::util::fault::point("done.marker");
    // The final model supersedes the checkpoints.
    let _ = std::fs::remove_dir_all(run.checkpoints());
    run.log(&format!(
        "done: {total} steps in {seconds:.1}s ({:.2}s/step)",
        summary.seconds_per_step
    ));
    Ok(summary)
}

/// The error that stops a run at `step` for `what` (a non-finite loss, gradient or weight),
/// written to the run's log too; the last good checkpoint stays where it is.
fn stop(run: &RunDir, step: usize, what: &str) -> Error {
    let msg = format!(
        "step {step}: {what}; stopping. The last good checkpoint is kept in {}",
        run.checkpoints().display()
    );
    run.log(&msg);
    Error::msg(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_specs() {
        let f = Freeze::parse(&["0-2,lm_head".into(), "5".into()], 8).unwrap();
        assert!(!f.trainable("model.layers.0.mlp.up_proj.weight"));
        assert!(!f.trainable("model.layers.2.self_attn.q_proj.weight"));
        assert!(f.trainable("model.layers.3.self_attn.q_proj.weight"));
        assert!(!f.trainable("model.layers.5.input_layernorm.weight"));
        assert!(!f.trainable("model.embed_tokens.weight"));
        assert!(f.trainable("model.norm.weight"));
        for bad in ["3-1", "0-8", "x", "1-y"] {
            let e = Freeze::parse(&[bad.into()], 8).unwrap_err().to_string();
            assert!(e.contains("freeze"), "{e}");
        }
    }

    #[test]
    fn batches_cover_each_epoch_once_and_are_seeded() {
        let cfg = TrainConfig {
            batch_size: 3,
            epochs: 2,
            ..TrainConfig::default()
        };
        assert_eq!(cfg.total_steps(10), 8);
        let mut seen: Vec<usize> = (0..4).flat_map(|s| batch_indices(&cfg, 10, s)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(batch_indices(&cfg, 10, 5), batch_indices(&cfg, 10, 5));
        assert_ne!(epoch_order(42, 0, 10), epoch_order(42, 1, 10));
        assert_ne!(epoch_order(42, 0, 10), epoch_order(43, 0, 10));
        assert_eq!(batch_indices(&cfg, 10, 3).len(), 1);
    }
}
