//! Training primitives: AdamW with decoupled weight decay on matrices only and f32 moments,
//! updated in place (candle-nn's stock AdamW allocates new tensors for every parameter and was
//! measured at about 45% of a step); global-norm gradient clipping; learning-rate schedules.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use crate::model::params::Params;
use crate::{Error, Result};

/// `n` zeros written into freshly allocated memory. `vec![0.0; n]` asks the allocator for
/// zeroed memory, which for a large buffer is fresh pages the kernel maps to its shared zero
/// page: the first update reads them, then each written page is copied and the TLB of every
/// other core flushed. That cost 2.4-2.8k `perf` samples at 499 Hz (about 5 CPU-seconds, both
/// cores together) in the first AdamW step of the embedded model (`perf record -g -F 499
/// repnoise bench train-step`), every run. `black_box`
/// keeps the fill from being turned back into a zeroed allocation.
fn written_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, std::hint::black_box(0.0f32));
    v
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to tensors of rank >= 2 only (not norms or biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's AdamW defaults, without weight decay (the paper's attack uses none).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

enum Moments {
    /// Host vectors updated in place together with the weight.
    Cpu { m: Vec<f32>, v: Vec<f32> },
    /// Device tensors (non-CPU devices), updated functionally.
    Dev { m: Tensor, v: Tensor },
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// The two moments of a slot, in the order a checkpoint names them.
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// A moment's name in a checkpoint: `NAME.exp_avg` or `NAME.exp_avg_sq`.
fn state_key(name: &str, moment: &str) -> String {
    format!("{name}.{moment}")
}

/// AdamW over a set of variables.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Number of updates applied so far.
    pub step: usize,
    slots: Vec<Slot>,
}

/// The fused per-element update, run in place on the weight's storage.
struct Update<'a> {
    lr: f32,
    beta1: f32,
    beta2: f32,
    /// `1 - beta` computed in f64 then rounded, as PyTorch does (`1 - 0.999f32` is 4.7e-8 off).
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    decay: f32,
    grad_scale: f32,
    bc1: f32,
    bc2_sqrt: f32,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    /// Set when the update leaves a NaN or infinite weight.
    non_finite: std::sync::atomic::AtomicBool,
}

impl candle_core::InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw-update: f32 weights and gradients expected")
        };
        let (Some((w0, w1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw-update: contiguous tensors expected")
        };
        let w = &mut w[w0..w1];
        let g = &g[g0..g1];
        let mut guard = self.moments.lock().expect("adamw moments lock");
        let (m, v) = &mut *guard;
        if m.len() != w.len() || g.len() != w.len() {
            candle_core::bail!("adamw-update: size mismatch")
        }
        let step_size = self.lr / self.bc1;
        let decay_mul = 1.0 - self.lr * self.decay;
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                let mut finite = true;
                for i in 0..w.len() {
                    let gi = g[i] * self.grad_scale;
                    m[i] = self.beta1 * m[i] + self.one_minus_beta1 * gi;
                    v[i] = self.beta2 * v[i] + self.one_minus_beta2 * gi * gi;
                    let denom = v[i].sqrt() / self.bc2_sqrt + self.eps;
                    w[i] = w[i] * decay_mul - step_size * m[i] / denom;
                    finite &= w[i].is_finite();
                }
                if !finite {
                    self.non_finite
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
        Ok(())
    }
}

/// The sum of the squares of a gradient's elements, in f64. On the CPU for a contiguous f32
/// gradient one parallel pass ([`SumOfSquares`]); otherwise `sqr` then `sum_all` in the
/// gradient's dtype.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous() {
        return Ok(g.apply_op1_no_bwd(&SumOfSquares)?.to_scalar::<f64>()?);
    }
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Sum of squares of a contiguous f32 tensor as an f64 scalar: blocks of [`Self::BLOCK`]
/// elements summed in parallel ([`vmath::sum_sq_f64`]), the blocks' sums then added in order, so
/// the result does not depend on the thread count. Replaces `sqr` then `sum_all`, which wrote a
/// squared copy of every gradient (the size of the model, in fresh pages) and summed it in f32.
///
/// [`vmath::sum_sq_f64`]: crate::model::vmath::sum_sq_f64
struct SumOfSquares;

impl SumOfSquares {
    const BLOCK: usize = 1 << 16;
}

impl candle_core::CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("sum-of-squares: f32 expected")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("sum-of-squares: a contiguous tensor expected")
        };
        let blocks: Vec<f64> = x[a..b]
            .par_chunks(Self::BLOCK)
            .map(crate::model::vmath::sum_sq_f64)
            .collect();
        Ok((CpuStorage::F64(vec![blocks.iter().sum()]), Shape::from(())))
    }
}

/// The error of an update that left NaN or infinite weights.
fn non_finite_weight(name: &str) -> Error {
    Error::msg(format!(
        "the update left NaN or infinite values in `{name}`"
    ))
}

impl AdamW {
    /// An optimizer over the parameters for which `trainable(name)` holds.
    pub fn new(
        params: &Params,
        trainable: impl Fn(&str) -> bool,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let mut slots = vec![];
        for (name, var) in params.iter() {
            if !trainable(name) {
                continue;
            }
            let n = var.elem_count();
            let moments = if var.device().is_cpu() {
                Moments::Cpu {
                    m: written_zeros(n),
                    v: written_zeros(n),
                }
            } else {
                Moments::Dev {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                }
            };
            slots.push(Slot {
                name: name.clone(),
                var: var.clone(),
                decay: var.rank() >= 2,
                moments,
            });
        }
        Ok(Self {
            cfg,
            step: 0,
            slots,
        })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Global L2 norm of the gradients of the optimised variables (missing gradients count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += sum_of_squares(g)?;
            }
        }
        Ok(total.sqrt())
    }

    /// The parameter to blame for a gradient norm (`norm`, from [`AdamW::grad_norm`]) that is not
    /// finite: the first whose gradient holds a NaN or an infinity, else (finite values whose
    /// squares overflow) the one with the largest gradient. `None` when the norm is finite.
    pub fn non_finite_grad(&self, grads: &GradStore, norm: f64) -> Result<Option<String>> {
        if norm.is_finite() {
            return Ok(None);
        }
        let mut largest: Option<(f64, &str)> = None;
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let max = g
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let sum = g.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !max.is_finite() || !sum.is_finite() {
                return Ok(Some(format!("{} (holds NaN or infinite values)", s.name)));
            }
            if largest.is_none_or(|(m, _)| max > m) {
                largest = Some((max, &s.name));
            }
        }
        Ok(largest
            .map(|(m, name)| format!("{name} (largest entry {m:e}: the squared norm overflows)")))
    }

    /// One update at learning rate `lr`, gradients multiplied by `grad_scale` (the clipping
    /// coefficient from [`clip_coefficient`]). Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let decay = if s.decay { c.weight_decay } else { 0.0 };
            match &mut s.moments {
                Moments::Cpu { m, v } => {
                    let g = g.contiguous()?;
                    let op = Update {
                        lr: lr as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        one_minus_beta1: (1.0 - c.beta1) as f32,
                        one_minus_beta2: (1.0 - c.beta2) as f32,
                        eps: c.eps as f32,
                        decay: decay as f32,
                        grad_scale: grad_scale as f32,
                        bc1: bc1 as f32,
                        bc2_sqrt: bc2.sqrt() as f32,
                        moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                        non_finite: false.into(),
                    };
                    s.var.as_tensor().inplace_op2(&g, &op).map_err(|e| {
                        Error::msg(format!("AdamW update of `{}` failed: {e}", s.name))
                    })?;
                    if op.non_finite.into_inner() {
                        return Err(non_finite_weight(&s.name));
                    }
                }
                Moments::Dev { m, v } => {
                    let g = (g * grad_scale)?;
                    let nm = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    let nv = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((nv.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let w = s.var.as_tensor();
                    let w = ((w * (1.0 - lr * decay))? - ((&nm / denom)? * (lr / bc1))?)?;
                    let sum = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if !sum.is_finite() {
                        return Err(non_finite_weight(&s.name));
                    }
                    s.var.set(&w)?;
                    *m = nm;
                    *v = nv;
                }
            }
        }
        Ok(())
    }

    /// The names (`NAME.exp_avg`, `NAME.exp_avg_sq`, slot by slot) and shapes of the optimizer
    /// state a checkpoint holds; [`AdamW::state_tensor`] gives each.
    pub fn state_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.slots
            .iter()
            .flat_map(|s| MOMENTS.map(|k| (state_key(&s.name, k), s.var.dims().to_vec())))
            .collect()
    }

    /// The `i`th tensor of [`AdamW::state_shapes`] (host moments copied into a tensor), so a
    /// checkpoint can take the moments one at a time.
    pub fn state_tensor(&self, i: usize) -> Result<Tensor> {
        let s = self
            .slots
            .get(i / 2)
            .ok_or_else(|| Error::msg(format!("no optimizer state number {i}")))?;
        Ok(match (&s.moments, i % 2) {
            (Moments::Cpu { m, .. }, 0) => Tensor::from_slice(m, s.var.shape(), &Device::Cpu)?,
            (Moments::Cpu { v, .. }, _) => Tensor::from_slice(v, s.var.shape(), &Device::Cpu)?,
            (Moments::Dev { m, .. }, 0) => m.clone(),
            (Moments::Dev { v, .. }, _) => v.clone(),
        })
    }

    /// Restore state saved from [`AdamW::state_shapes`] and [`AdamW::state_tensor`] (and the
    /// step count); `get(name)`
    /// reads one tensor (`None`: not in the checkpoint), so the moments arrive one at a time.
    pub fn load_state(
        &mut self,
        step: usize,
        get: impl Fn(&str) -> Result<Option<Tensor>>,
    ) -> Result<()> {
        for s in &mut self.slots {
            let [mk, vk] = MOMENTS.map(|k| state_key(&s.name, k));
            let (Some(mt), Some(vt)) = (get(&mk)?, get(&vk)?) else {
                return Err(Error::msg(format!(
                    "optimizer state for `{}` is missing from the checkpoint",
                    s.name
                )));
            };
            if mt.dims() != s.var.dims() || vt.dims() != s.var.dims() {
                return Err(Error::msg(format!(
                    "optimizer state for `{}` has the wrong shape",
                    s.name
                )));
            }
            match &mut s.moments {
                Moments::Cpu { m, v } => {
                    *m = mt.flatten_all()?.to_vec1()?;
                    *v = vt.flatten_all()?.to_vec1()?;
                }
                Moments::Dev { m, v } => {
                    *m = mt.to_device(s.var.device())?;
                    *v = vt.to_device(s.var.device())?;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// AdamW over groups of parameters that each have their own peak learning rate (a fresh
/// classification head trained faster than the encoder under it): one [`AdamW`] per group, in
/// the order of the groups' first parameters in the store; the gradient norm is taken over all
/// of them (one group: its own norm); every group follows the same schedule from its own peak.
pub struct AdamWGroups {
    groups: Vec<(f64, AdamW)>,
}

impl AdamWGroups {
    /// The parameters for which `trainable(name)` holds, grouped by `peak(name)`.
    pub fn new(
        params: &Params,
        trainable: impl Fn(&str) -> bool,
        peak: impl Fn(&str) -> f64,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let mut peaks: Vec<f64> = vec![];
        for (name, _) in params.iter() {
            let p = peak(name);
            if trainable(name) && !peaks.contains(&p) {
                peaks.push(p);
            }
        }
        let groups = peaks
            .into_iter()
            .map(|p| {
                Ok((
                    p,
                    AdamW::new(params, |n| trainable(n) && peak(n) == p, cfg)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    /// No parameter is trained.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|(_, o)| o.vars().next().is_none())
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> usize {
        self.groups.first().map_or(0, |(_, o)| o.step)
    }

    /// Global L2 norm of the gradients of every group ([`AdamW::grad_norm`]).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        if let [(_, o)] = self.groups.as_slice() {
            return o.grad_norm(grads);
        }
        let mut sq = 0f64;
        for (_, o) in &self.groups {
            sq += o.grad_norm(grads)?.powi(2);
        }
        Ok(sq.sqrt())
    }

    /// [`AdamW::non_finite_grad`] over every group: the first group's culprit.
    pub fn non_finite_grad(&self, grads: &GradStore, norm: f64) -> Result<Option<String>> {
        for (_, o) in &self.groups {
            if let Some(c) = o.non_finite_grad(grads, norm)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// One update of every group at the learning rate `lr_of(its peak)`.
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr_of: impl Fn(f64) -> f64,
        grad_scale: f64,
    ) -> Result<()> {
        for (peak, o) in &mut self.groups {
            o.step(grads, lr_of(*peak), grad_scale)?;
        }
        Ok(())
    }

    /// Every group's [`AdamW::state_shapes`] in turn (the names are the parameters', so they
    /// do not collide).
    pub fn state_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.groups
            .iter()
            .flat_map(|(_, o)| o.state_shapes())
            .collect()
    }

    /// The `i`th tensor of [`AdamWGroups::state_shapes`].
    pub fn state_tensor(&self, mut i: usize) -> Result<Tensor> {
        for (_, o) in &self.groups {
            let n = 2 * o.slots.len();
            if i < n {
                return o.state_tensor(i);
            }
            i -= n;
        }
        Err(Error::msg("no such optimizer state"))
    }

    /// Restore every group ([`AdamW::load_state`]).
    pub fn load_state(
        &mut self,
        step: usize,
        get: impl Fn(&str) -> Result<Option<Tensor>>,
    ) -> Result<()> {
        for (_, o) in &mut self.groups {
            o.load_state(step, &get)?;
        }
        Ok(())
    }
}

/// The factor that scales gradients of global norm `norm` down to `max_norm` (1 when below;
/// as PyTorch's `clip_grad_norm_`).
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm.is_finite() => (max / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

/// Learning-rate schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    /// Cosine decay to zero after a linear warm-up (`transformers`'
    /// `get_cosine_schedule_with_warmup`).
    #[default]
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::setting(
                "schedule",
                other,
                "expected constant, linear or cosine",
            )),
        }
    }
}

/// Learning rate for the optimizer step `step` (0-based) of `total`, with `warmup` linear
/// warm-up steps from 0, as `transformers`' schedulers compute it.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The global norm over a gradient larger than one block of the parallel sum (three blocks
    /// and a ragged tail) and a small one, summed in f64: one entry of 1e4 among 196,610 of 0.1,
    /// and (3, 4), give a squared norm of 1e8 + 1966.1 + 25, which an f32 sum (ulp 8 at 1e8)
    /// would round to about 1e8 (2e-5 off, relatively; the f64 sum is within 1e-11 here).
    #[test]
    fn grad_norm_sums_large_gradients_in_f64() {
        let dev = Device::Cpu;
        let n = 3 * SumOfSquares::BLOCK + 3;
        let mut c = vec![0.1f32; n];
        c[SumOfSquares::BLOCK + 5] = 1e4;
        let mut p = Params::new();
        p.insert("w", Tensor::zeros(n, DType::F32, &dev).unwrap())
            .unwrap();
        p.insert("b", Tensor::zeros(2, DType::F32, &dev).unwrap())
            .unwrap();
        let ct = Tensor::from_vec(c.clone(), n, &dev).unwrap();
        let loss = ((p.tensor("w").unwrap() * &ct).unwrap().sum_all().unwrap()
            + (p.tensor("b").unwrap() * Tensor::new(&[3f32, 4.], &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let opt = AdamW::new(&p, |_| true, AdamWConfig::default()).unwrap();
        let want: f64 = c.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() + 25.0;
        let norm = opt.grad_norm(&grads).unwrap();
        let got = norm.powi(2);
        assert!((got - want).abs() <= 1e-10 * want, "{got} vs {want}");
        assert!(want - 1e8 > 1990.0);
        // The same with more threads (the blocks' sums are added in order either way).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let again = pool.install(|| opt.grad_norm(&grads).unwrap());
        assert_eq!(again.to_bits(), norm.to_bits());
    }

    #[test]
    fn cosine_schedule_matches_transformers() {
        // get_cosine_schedule_with_warmup(opt, 2, 10): factors for steps 0..10.
        let want = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.3086582838174551,
            0.14644660940672624,
            0.03806023374435663,
        ];
        for (s, w) in want.iter().enumerate() {
            let got = lr_at(Schedule::Cosine, 1.0, s, 10, 2);
            assert!((got - w).abs() < 1e-12, "step {s}: {got} vs {w}");
        }
        assert_eq!(lr_at(Schedule::Constant, 3e-5, 5, 10, 0), 3e-5);
        assert!((lr_at(Schedule::Linear, 1.0, 5, 10, 0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn clipping_coefficient() {
        assert_eq!(clip_coefficient(0.5, Some(1.0)), 1.0);
        assert!((clip_coefficient(4.0, Some(1.0)) - 0.25).abs() < 1e-6);
        assert_eq!(clip_coefficient(4.0, None), 1.0);
    }

    /// Two AdamW steps on a matrix and a vector, against values computed with
    /// `torch.optim.AdamW(lr=0.1, weight_decay=0.5)` (decay on the matrix only), printed by:
    ///
    /// ```python
    /// w = torch.tensor([[1., -2.], [3., 0.5]], requires_grad=True); b = torch.tensor([0.3, -0.7], requires_grad=True)
    /// o = torch.optim.AdamW([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    /// for g in ([[0.1, -0.2], [0.3, 0.4]], [[-0.5, 0.1], [0.2, 0.0]]):
    ///     w.grad = torch.tensor(g); b.grad = torch.tensor([1.0, -1.0]); o.step()
    /// print(w.tolist(), b.tolist())
    /// ```
    #[test]
    fn adamw_matches_pytorch() {
        let dev = Device::Cpu;
        let mut p = Params::new();
        p.insert("w", Tensor::new(&[[1f32, -2.], [3., 0.5]], &dev).unwrap())
            .unwrap();
        p.insert("b", Tensor::new(&[0.3f32, -0.7], &dev).unwrap())
            .unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(&p, |_| true, cfg).unwrap();
        for g in [[[0.1f32, -0.2], [0.3, 0.4]], [[-0.5, 0.1], [0.2, 0.0]]] {
            // loss = sum(w * G) + sum(b * [1, -1]) has exactly these gradients.
            let gw = Tensor::new(&g, &dev).unwrap();
            let gb = Tensor::new(&[1f32, -1.], &dev).unwrap();
            let loss = ((p.tensor("w").unwrap() * gw).unwrap().sum_all().unwrap()
                + (p.tensor("b").unwrap() * gb).unwrap().sum_all().unwrap())
            .unwrap();
            let store = loss.backward().unwrap();
            opt.step(&store, 0.1, 1.0).unwrap();
        }
        let w: Vec<Vec<f32>> = p.tensor("w").unwrap().to_vec2().unwrap();
        let b: Vec<f32> = p.tensor("b").unwrap().to_vec1().unwrap();
        // Printed by the PyTorch snippet above (torch 2.x).
        let want_w = [
            [0.8673353791236877f32, -1.6833661794662476],
            [2.5154647827148438, 0.2892441749572754],
        ];
        let want_b = [0.10000001639127731f32, -0.5];
        for i in 0..2 {
            for j in 0..2 {
                assert!(
                    (w[i][j] - want_w[i][j]).abs() < 1e-6,
                    "{i}{j} {} {}",
                    w[i][j],
                    want_w[i][j]
                );
            }
            assert!(
                (b[i] - want_b[i]).abs() < 1e-6,
                "{i} {} {}",
                b[i],
                want_b[i]
            );
        }
    }

    /// Parameter groups as PyTorch's: each group an AdamW of its own at its own learning rate,
    /// clipped by one norm over every gradient (`clip_grad_norm_` over all parameters). The
    /// reference is two single-group optimizers stepped by hand with the norm of the known
    /// gradients; a single group is the plain optimizer.
    #[test]
    fn groups_step_each_at_its_peak_under_one_norm() {
        let dev = Device::Cpu;
        let fresh = || {
            let mut p = Params::new();
            p.insert("w", Tensor::new(&[[1f32, -2.], [3., 0.5]], &dev).unwrap())
                .unwrap();
            p.insert("head.b", Tensor::new(&[0.3f32, -0.7], &dev).unwrap())
                .unwrap();
            p
        };
        let (gw, gb) = ([[3f32, -4.], [0., 12.]], [1f32, -1.]);
        let grads = |p: &Params| {
            let loss = ((p.tensor("w").unwrap() * Tensor::new(&gw, &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                + (p.tensor("head.b").unwrap() * Tensor::new(&gb, &dev).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            loss.backward().unwrap()
        };
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let peak = |n: &str| if n.starts_with("head.") { 0.01 } else { 0.1 };
        let half = |peak: f64| peak / 2.0;
        let grouped = fresh();
        let mut g = AdamWGroups::new(&grouped, |_| true, peak, cfg).unwrap();
        let by_hand = fresh();
        let mut ow = AdamW::new(&by_hand, |n| n == "w", cfg).unwrap();
        let mut ob = AdamW::new(&by_hand, |n| n == "head.b", cfg).unwrap();
        // |G| = sqrt(9 + 16 + 144 + 1 + 1) = sqrt(171).
        let want_norm = 171f64.sqrt();
        for _ in 0..2 {
            let s = grads(&grouped);
            let norm = g.grad_norm(&s).unwrap();
            assert!((norm - want_norm).abs() < 1e-9, "{norm}");
            g.step(&s, half, clip_coefficient(norm, Some(1.0))).unwrap();
            let s = grads(&by_hand);
            let c = clip_coefficient(norm, Some(1.0));
            ow.step(&s, 0.05, c).unwrap();
            ob.step(&s, 0.005, c).unwrap();
        }
        assert_eq!(g.step_count(), 2);
        for n in ["w", "head.b"] {
            let a: Vec<f32> = grouped
                .tensor(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = by_hand
                .tensor(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{n}");
        }
        // One group: the plain optimizer, its norm included.
        let single = fresh();
        let mut one = AdamWGroups::new(&single, |_| true, |_| 0.1, cfg).unwrap();
        let plain = fresh();
        let mut opt = AdamW::new(&plain, |_| true, cfg).unwrap();
        let (s1, s2) = (grads(&single), grads(&plain));
        assert_eq!(one.grad_norm(&s1).unwrap(), opt.grad_norm(&s2).unwrap());
        one.step(&s1, |p| p, 0.5).unwrap();
        opt.step(&s2, 0.1, 0.5).unwrap();
        for n in ["w", "head.b"] {
            let a: Vec<f32> = single
                .tensor(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = plain
                .tensor(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{n}");
        }
        // Checkpointed state round-trips through names that do not collide.
        let state: Vec<(String, Tensor)> = g
            .state_shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (n, _))| (n, g.state_tensor(i).unwrap()))
            .collect();
        assert_eq!(state.len(), 4);
        let mut back = AdamWGroups::new(&fresh(), |_| true, peak, cfg).unwrap();
        back.load_state(2, |k| {
            Ok(state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()))
        })
        .unwrap();
        assert_eq!(back.step_count(), 2);
    }
}
