//! Language-modelling losses shared by alignment, defences and attacks.
//!
//! The cross-entropy over a large vocabulary is a fused CPU operation with its own backward
//! pass: one sweep per row forward (max, log-sum-exp, target logit) and one backward
//! (`softmax - onehot`), skipping rows whose target is masked out. The composed candle version
//! (log_softmax + gather) made about ten full-vocabulary passes and took 1.8 s of a 4 x 128
//! SmolLM2 step on the 2-core machine (see docs/BENCHMARKS.md); it remains the path on other
//! devices and the reference in the tests.
//!
//! Scoring's variant, [`linear_nll_first_argmax`], takes the loss and greedy decoding's pick
//! from the LM head a slice of the vocabulary at a time, without a gradient.
//!
//! Just under 900 lines: the fused loss, its backward, the fused LM-head variant (which
//! recomputes its logits chunk by chunk in the backward) and scoring's are read together.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::model::gemm::{product_into, Operand};
use crate::model::ops::slice_f32;
use crate::model::vmath;
use crate::{Error, Result};

/// Target value marking a row that contributes nothing.
pub const IGNORE: u32 = u32::MAX;

/// Per-row negative log-likelihood of `targets` under `logits` `[n, vocab]`.
struct RowNll {
    targets: Arc<Vec<u32>>,
}

/// Gradient of [`RowNll`]: `grad[r] * (softmax(row) - onehot(target))`.
struct RowNllGrad {
    targets: Arc<Vec<u32>>,
}

impl CustomOp1 for RowNll {
    fn name(&self) -> &'static str {
        "row-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = slice_f32(s, l, "row-nll")?;
        if self.targets.len() != n {
            candle_core::bail!("row-nll: {} targets for {n} rows", self.targets.len())
        }
        let out: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|r| {
                let t = self.targets[r];
                if t == IGNORE {
                    return 0.0;
                }
                let row = &x[r * v..(r + 1) * v];
                let max = vmath::max(row);
                // exp in f32 (arguments <= 0, within 1 ulp; f64 exp took a fifth of a
                // logit-lens pass), summed in f64.
                let sum = vmath::sum_exp_f64(row, max);
                (max as f64 + sum.ln() - row[t as usize] as f64) as f32
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = arg.apply_op3_no_bwd(
            res,
            grad_res,
            &RowNllGrad {
                targets: self.targets.clone(),
            },
        )?;
        Ok(Some(g))
    }
}

impl CustomOp3 for RowNllGrad {
    fn name(&self) -> &'static str {
        "row-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = slice_f32(s1, l1, "row-nll-grad logits")?;
        let nll = slice_f32(s2, l2, "row-nll-grad loss")?;
        let gr = slice_f32(s3, l3, "row-nll-grad grad")?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            let t = self.targets[r];
            if t == IGNORE || gr[r] == 0.0 {
                return;
            }
            let row = &x[r * v..(r + 1) * v];
            // log-sum-exp recovered from the forward's output: nll = lse - row[t].
            let lse = nll[r] + row[t as usize];
            vmath::scaled_exp(o, row, lse, gr[r]);
            o[t as usize] -= gr[r];
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

/// Negative log-likelihood of `targets` for each row of `logits` `[n, vocab]`; rows whose
/// target is [`IGNORE`] give 0. Differentiable with respect to `logits`.
pub fn row_nll(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(Error::msg(format!(
            "{} targets for {n} rows",
            targets.len()
        )));
    }
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        return Err(Error::msg(format!(
            "target id {bad} is outside the vocabulary ({v})"
        )));
    }
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        let logits = logits.contiguous()?;
        return Ok(logits.apply_op1(RowNll {
            targets: Arc::new(targets),
        })?);
    }
    row_nll_composed(logits, &targets)
}

/// The same quantity from stock candle ops (log_softmax + gather): other devices, and tests.
pub fn row_nll_composed(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| (t != IGNORE) as u8 as f32)
        .collect();
    let safe: Vec<u32> = targets
        .iter()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let dev = logits.device();
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = lp
        .gather(&Tensor::new(safe.as_slice(), dev)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    Ok((picked.neg()? * Tensor::new(keep.as_slice(), dev)?)?)
}

/// Rows of `h` that [`linear_row_nll`] turns into logits at a time (a chunk's logits take
/// `rows x vocab` floats: 200 MB for SmolLM2's 49,152-token vocabulary; 1024 was the quickest
/// of 512-4096 in `cargo run --release --example bench_lm_head_loss`).
pub const LINEAR_NLL_CHUNK: usize = 1024;

/// Per-row negative log-likelihood of `targets` under the logits `h w^T` (`h` `[n, d]`, `w`
/// `[vocab, d]`), differentiable with respect to both, fused so that the `[n, vocab]` logits,
/// their log-softmax and their gradient never exist as tensors: the logits are computed
/// [`LINEAR_NLL_CHUNK`] rows at a time, turned into probabilities in place, then into
/// `softmax - onehot`, and multiplied out into both gradients at once while the chunk is at
/// hand (when `h` or `w` carries a gradient). What stays for the backward pass is those
/// gradients for a gradient of 1 per row, `[n, d]` and `[vocab, d]`; the backward scales them,
/// which is exact whenever every counted row receives the same gradient (a sum or mean of the
/// losses, as every caller here takes). Any other incoming gradient makes the backward
/// recompute the logits chunk by chunk. Rows whose target is [`IGNORE`] give 0 and no gradient.
/// Other devices than the CPU use the composed path.
pub fn linear_row_nll(h: &Tensor, w: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    linear_row_nll_with(h, w, targets, LINEAR_NLL_CHUNK)
}

/// [`linear_row_nll`] with the chunk size given (tests use small ones).
pub fn linear_row_nll_with(
    h: &Tensor,
    w: &Tensor,
    targets: Vec<u32>,
    chunk: usize,
) -> Result<Tensor> {
    check_linear_nll(h, w, &targets)?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !cpu_f32(h) || !cpu_f32(w) {
        // The product in the weight's dtype (f32 for a trained head; a frozen head below f32
        // is the compute dtype's copy), the loss in f32.
        let logits = h.to_dtype(w.dtype())?.matmul(&w.t()?)?;
        return row_nll(&logits.to_dtype(candle_core::DType::F32)?, targets);
    }
    let state = Arc::new(LinearNllState {
        targets,
        chunk: chunk.max(1),
        grad_h: h.track_op(),
        grad_w: w.track_op(),
        unit_grads: Mutex::new(None),
        dw: Mutex::new(None),
    });
    Ok(h.contiguous()?
        .apply_op2(&w.contiguous()?, LinearRowNll(state))?)
}

/// Checks the operands of an LM-head loss (`h` `[n, d]`, `w` `[vocab, d]`, `n` targets within
/// the vocabulary or [`IGNORE`]) and returns `(n, d, vocab)`.
fn check_linear_nll(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<(usize, usize, usize)> {
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if d != dw {
        return Err(Error::msg(format!(
            "hidden size {d} does not match the output matrix's {dw}"
        )));
    }
    if targets.len() != n {
        return Err(Error::msg(format!(
            "{} targets for {n} rows",
            targets.len()
        )));
    }
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        return Err(Error::msg(format!(
            "target id {bad} is outside the vocabulary ({v})"
        )));
    }
    Ok((n, d, v))
}

/// Vocabulary columns that [`linear_nll_first_argmax`] turns into logits at a time: the chunk's
/// logits, `rows x cols` floats (4 MB for 508 rows), are read while still in cache.
pub const NLL_ARGMAX_COLS: usize = 2048;

/// Per-row negative log-likelihood of `targets` under the logits `h w^T` (`h` `[n, d]`, `w`
/// `[vocab, d]`; 0 for an [`IGNORE`] target) and each row's first maximum, greedy decoding's
/// pick ([`crate::model::generate::first_argmax`]), without a gradient and without the `[n,
/// vocab]` logits: they are computed [`NLL_ARGMAX_COLS`] vocabulary columns at a time for all
/// rows, and each row's maximum, sum of exponentials (in f64, rescaled when the maximum
/// moves), target logit and first maximum are carried from chunk to chunk. The pick is the
/// same as over the whole row; the loss is [`row_nll`]'s up to the rounding of the rescaled
/// sums (bit for bit with one chunk). Other devices or dtypes, or a non-contiguous `w`: the
/// logits, then [`row_nll`] and `first_argmax`.
pub fn linear_nll_first_argmax(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
) -> Result<(Vec<f32>, Vec<u32>)> {
    linear_nll_first_argmax_with(h, w, targets, NLL_ARGMAX_COLS)
}

/// A row's state in [`linear_nll_first_argmax`] after the chunks so far.
#[derive(Clone, Copy)]
struct RowScan {
    /// The largest logit (NaN skipped) and the sum of `exp(logit - max)`, once a chunk with
    /// a logit above -inf has `started` them.
    max: f32,
    sum: f64,
    started: bool,
    target: f32,
    /// The greedy scan's best value and its column.
    best: f32,
    best_at: u32,
}

/// [`linear_nll_first_argmax`] with the chunk width given (tests use small ones).
pub fn linear_nll_first_argmax_with(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    cols: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let (n, d, v) = check_linear_nll(h, w, targets)?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !cpu_f32(h) || !cpu_f32(w) || !w.is_contiguous() || v == 0 {
        let logits = h.to_dtype(w.dtype())?.matmul(&w.t()?)?;
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        let nll = row_nll(&logits, targets.to_vec())?.to_vec1()?;
        return Ok((nll, crate::model::generate::first_argmax(&logits)?));
    }
    let h = h.contiguous()?;
    let (hs, hl) = h.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(hs), candle_core::Storage::Cpu(ws)) = (&*hs, &*ws) else {
        return Err(Error::msg("linear-nll-argmax: CPU storage expected"));
    };
    let hv = &slice_f32(hs, hl, "linear-nll-argmax h")?[..n * d];
    let wv = &slice_f32(ws, wl, "linear-nll-argmax w")?[..v * d];
    let cols = cols.clamp(1, v);
    let mut buf = vec![0f32; n * cols];
    let mut rows = vec![
        RowScan {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            started: false,
            target: 0.0,
            best: 0.0,
            best_at: 0,
        };
        n
    ];
    for c0 in (0..v).step_by(cols) {
        let len = cols.min(v - c0);
        let buf = &mut buf[..n * len];
        // All rows of h times vocabulary rows c0.. of w, read as its transpose [d, len].
        product_into(
            buf,
            (n, len, d),
            false,
            Operand::rows_of(hv, d),
            Operand::rows_of(&wv[c0 * d..], d).t(),
        );
        buf.par_chunks(len)
            .zip(rows.par_iter_mut())
            .zip(targets.par_iter())
            .for_each(|((row, st), &t)| {
                if c0 == 0 {
                    // The scan starts at column 0 (a NaN there is never passed).
                    st.best = row[0];
                }
                let m = vmath::max(row);
                if m > st.best {
                    // The scan's pick in this chunk: the first column holding the chunk's
                    // maximum, which is above the best so far.
                    let i = row.iter().position(|&x| x == m).unwrap_or(0);
                    st.best = m;
                    st.best_at = (c0 + i) as u32;
                }
                if t != IGNORE && m == f32::NEG_INFINITY {
                    // A chunk of only -inf adds nothing (exp(-inf - max) = 0); one with a NaN
                    // (which `max` passes over) makes the sum NaN, as over the whole row.
                    if row.iter().any(|x| x.is_nan()) {
                        st.sum = f64::NAN;
                    }
                } else if t != IGNORE {
                    let s = vmath::sum_exp_f64(row, m);
                    if !st.started {
                        (st.max, st.sum, st.started) = (m, st.sum + s, true);
                    } else if m > st.max {
                        st.sum = st.sum * (st.max as f64 - m as f64).exp() + s;
                        st.max = m;
                    } else {
                        st.sum += s * (m as f64 - st.max as f64).exp();
                    }
                }
                if (c0..c0 + len).contains(&(t as usize)) {
                    st.target = row[t as usize - c0];
                }
            });
    }
    let nll = rows
        .iter()
        .zip(targets)
        .map(|(st, &t)| {
            if t == IGNORE {
                0.0
            } else {
                (st.max as f64 + st.sum.ln() - st.target as f64) as f32
            }
        })
        .collect();
    Ok((nll, rows.iter().map(|st| st.best_at).collect()))
}

/// What the forward of [`linear_row_nll`] leaves for its backward.
struct LinearNllState {
    targets: Vec<u32>,
    chunk: usize,
    /// Which inputs carry a gradient (and get theirs computed, in the forward pass).
    grad_h: bool,
    grad_w: bool,
    /// The gradients of `h` and `w` for a gradient of 1 on every row, from the forward.
    unit_grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    /// The gradient of `w`, handed from the backward's kernel to `bwd`.
    dw: Mutex<Option<Vec<f32>>>,
}

impl LinearNllState {
    /// The probabilities of rows `start..start + len`, `softmax(h w^T)`, computed into a fresh
    /// buffer, and each row's loss (0 for ignored rows, whose buffer row holds raw logits).
    fn probabilities(
        &self,
        h: &[f32],
        w: &[f32],
        (v, d): (usize, usize),
        start: usize,
        len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut buf = vec![0f32; len * v];
        // h's rows start.. times w [v, d] read as its transpose [d, v].
        let (rows, wt) = (
            Operand::rows_of(&h[start * d..], d),
            Operand::rows_of(w, d).t(),
        );
        product_into(&mut buf, (len, v, d), false, rows, wt);
        let targets = &self.targets[start..start + len];
        let nll = buf
            .par_chunks_mut(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                if t == IGNORE {
                    return 0.0;
                }
                let target = row[t as usize];
                let max = vmath::max(row);
                let sum = vmath::exp_in_place_f64_sum(row, max);
                // Subnormal probabilities become 0 (see `flush_subnormal`): they are the
                // gradient products' operands.
                vmath::scale_flushed(row, (1.0 / sum) as f32);
                (max as f64 + sum.ln() - target as f64) as f32
            })
            .collect();
        (buf, nll)
    }

    /// Turns the probabilities of rows `start..` into their loss gradient, `grad[r] *
    /// (softmax - onehot)` (0 for ignored rows), and adds its products into `dh` (rows
    /// `start..`) and `dw` (`accumulate`: added to what is there), each only when its input
    /// carries a gradient (the other buffer may be empty).
    #[allow(clippy::too_many_arguments)]
    fn backprop_chunk(
        &self,
        mut g: Vec<f32>,
        grad: &[f32],
        (h, w): (&[f32], &[f32]),
        (v, d): (usize, usize),
        start: usize,
        (dh, dw): (&mut [f32], &mut [f32]),
        accumulate: bool,
    ) {
        let len = g.len() / v;
        let targets = &self.targets[start..start + len];
        g.par_chunks_mut(v)
            .zip(targets.par_iter().zip(grad))
            .for_each(|(row, (&t, &gv))| {
                if t == IGNORE || gv == 0.0 {
                    row.fill(0.0);
                } else {
                    if gv != 1.0 {
                        for z in row.iter_mut() {
                            *z = crate::model::ops::flush_subnormal(*z * gv);
                        }
                    }
                    row[t as usize] -= gv;
                }
            });
        // g [len, v]; w [v, d]; dh's and h's rows start..; dw [v, d] from g read as [v, len].
        let g = Operand::rows_of(&g, v);
        if self.grad_h {
            let w = Operand::rows_of(w, d);
            product_into(&mut dh[start * d..], (len, d, v), false, g, w);
        }
        if self.grad_w {
            let rows = Operand::rows_of(&h[start * d..], d);
            product_into(dw, (v, d, len), accumulate, g.t(), rows);
        }
    }
}

/// The graph node of [`linear_row_nll`].
struct LinearRowNll(Arc<LinearNllState>);

/// The backward kernel of [`linear_row_nll`]: returns the gradient of `h` and leaves the
/// gradient of `w` in the state.
struct LinearRowNllGrad(Arc<LinearNllState>);

impl CustomOp2 for LinearRowNll {
    fn name(&self) -> &'static str {
        "linear-row-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let st = &self.0;
        let (n, d) = l1.shape().dims2()?;
        let v = l2.shape().dims2()?.0;
        let h = slice_f32(s1, l1, "linear-row-nll h")?;
        let w = slice_f32(s2, l2, "linear-row-nll w")?;
        let mut out = Vec::with_capacity(n);
        let eager = st.grad_h || st.grad_w;
        let mut dh = vec![0f32; if st.grad_h { n * d } else { 0 }];
        let mut dw = vec![0f32; if st.grad_w { v * d } else { 0 }];
        let ones = vec![1f32; st.chunk.min(n)];
        for (c, start) in (0..n).step_by(st.chunk).enumerate() {
            let len = st.chunk.min(n - start);
            let (probs, nll) = st.probabilities(h, w, (v, d), start, len);
            out.extend(nll);
            if eager {
                st.backprop_chunk(
                    probs,
                    &ones[..len],
                    (h, w),
                    (v, d),
                    start,
                    (&mut dh, &mut dw),
                    c > 0,
                );
            }
        }
        if eager {
            *st.unit_grads.lock().expect("linear-row-nll state") = Some((dh, dw));
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_res = grad_res.contiguous()?;
        let dh = h.apply_op3_no_bwd(w, &grad_res, &LinearRowNllGrad(self.0.clone()))?;
        let dw = self
            .0
            .dw
            .lock()
            .expect("linear-row-nll state")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("linear-row-nll: no gradient".into()))?;
        let dw = if self.0.grad_w {
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        Ok((self.0.grad_h.then_some(dh), dw))
    }
}

impl CustomOp3 for LinearRowNllGrad {
    fn name(&self) -> &'static str {
        "linear-row-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let st = &self.0;
        let (n, d) = l1.shape().dims2()?;
        let v = l2.shape().dims2()?.0;
        let h = slice_f32(s1, l1, "linear-row-nll-grad h")?;
        let w = slice_f32(s2, l2, "linear-row-nll-grad w")?;
        let gr = slice_f32(s3, l3, "linear-row-nll-grad grad")?;
        // One gradient value for every counted row: scale the gradients the forward made.
        let mut counted = gr
            .iter()
            .zip(&st.targets)
            .filter(|(_, &t)| t != IGNORE)
            .map(|(g, _)| *g);
        let first = counted.next().unwrap_or(0.0);
        let uniform = counted.all(|g| g == first);
        let unit = st.unit_grads.lock().expect("linear-row-nll state").take();
        let (dh, dw) = match unit {
            Some((mut dh, mut dw)) if uniform => {
                if first != 1.0 {
                    dh.par_iter_mut().for_each(|x| *x *= first);
                    dw.par_iter_mut().for_each(|x| *x *= first);
                }
                (dh, dw)
            }
            _ => {
                let mut dh = vec![0f32; if st.grad_h { n * d } else { 0 }];
                let mut dw = vec![0f32; if st.grad_w { v * d } else { 0 }];
                for (c, start) in (0..n).step_by(st.chunk).enumerate() {
                    let len = st.chunk.min(n - start);
                    let g = st.probabilities(h, w, (v, d), start, len).0;
                    st.backprop_chunk(
                        g,
                        &gr[start..start + len],
                        (h, w),
                        (v, d),
                        start,
                        (&mut dh, &mut dw),
                        c > 0,
                    );
                }
                (dh, dw)
            }
        };
        *st.dw.lock().expect("linear-row-nll state") = Some(dw);
        let dh = if st.grad_h { dh } else { vec![0f32; n * d] };
        Ok((CpuStorage::F32(dh), Shape::from((n, d))))
    }
}

/// Next-token cross-entropy averaged over the positions where `mask` is non-zero (weighted by
/// it).
///
/// * `logits`: `[b, t, vocab]`; position `i` predicts token `i + 1`.
/// * `ids`: `[b, t]` u32.
/// * `mask`: `[b, t]` f32 read at the *target* position (`mask[:, 0]` is never used).
pub fn masked_next_token_ce(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(Error::msg("need at least two tokens for a next-token loss"));
    }
    let ids_v: Vec<Vec<u32>> = ids.to_vec2()?;
    let mask_v: Vec<Vec<f32>> = mask.to_vec2()?;
    // Row r*t + i of the flattened logits predicts ids[r][i+1], weighted by mask[r][i+1].
    let mut targets = vec![IGNORE; b * t];
    let mut weights = vec![0f32; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            let w = mask_v[r][i + 1];
            if w != 0.0 {
                targets[r * t + i] = ids_v[r][i + 1];
                weights[r * t + i] = w;
            }
        }
    }
    let denom: f32 = weights.iter().sum();
    if denom <= 0.0 {
        return Err(Error::msg("the loss mask selects no tokens"));
    }
    let nll = row_nll(&logits.reshape((b * t, v))?, targets)?;
    let w = Tensor::from_vec(weights, b * t, logits.device())?;
    Ok(((nll * w)?.sum_all()? / denom as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The chunked loss and pick against the whole logits' [`row_nll`] and
    /// [`crate::model::generate::first_argmax`]: rows whose maximum recurs across chunks, NaN
    /// at the first column (never passed) and in the middle (never taken), -inf columns, an
    /// ignored target; chunks of 1, 3 and 4 columns, the whole row and more.
    #[test]
    fn chunked_nll_and_pick_match_the_whole_logits() {
        use crate::model::generate::first_argmax;
        let dev = Device::Cpu;
        // The reference: the whole logits, then the loss and the pick over each whole row.
        let whole = |h: &Tensor, w: &Tensor, targets: &[u32]| {
            let logits = h.matmul(&w.t().unwrap()).unwrap();
            let nll: Vec<f32> = row_nll(&logits, targets.to_vec())
                .unwrap()
                .to_vec1()
                .unwrap();
            (nll, first_argmax(&logits).unwrap())
        };
        let v = 10;
        // With w the identity, the logits are h; a NaN or -inf column comes from w's row.
        let h: Vec<f32> = [
            [0.5, 3.0, -1.0, 3.0, 2.0, 3.0, 0.0, 1.0, -2.0, 3.0],
            [-0.0, 0.0, 0.0, -1.0, -0.0, 0.5, 0.5, 0.25, 0.5, 0.1],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [4.0, -3.0, 2.0, 7.5, 7.5, -8.0, 7.5, 0.0, 6.0, 7.5],
        ]
        .concat();
        let targets = [3, 9, IGNORE, 7];
        let h = Tensor::from_vec(h, (4, v), &dev).unwrap();
        let eye = |special: &[(usize, f32)]| {
            let mut w = vec![0f32; v * v];
            for i in 0..v {
                w[i * v + i] = 1.0;
            }
            for &(row, x) in special {
                w[row * v + row] = x;
            }
            Tensor::from_vec(w, (v, v), &dev).unwrap()
        };
        for w in [
            eye(&[]),
            eye(&[(0, f32::NAN)]),
            eye(&[(4, f32::NAN), (1, f32::NEG_INFINITY)]),
            eye(&[(5, f32::INFINITY)]),
        ] {
            // A NaN or infinite diagonal entry makes its column NaN, +inf or -inf by the sign of
            // each row's entry there (NaN where that entry is 0).
            let (want_nll, want_pick) = whole(&h, &w, &targets);
            for cols in [1, 3, 4, v, 64] {
                let (nll, pick) = linear_nll_first_argmax_with(&h, &w, &targets, cols).unwrap();
                assert_eq!(pick, want_pick, "cols {cols}, w {w}");
                for (r, (&a, &b)) in nll.iter().zip(&want_nll).enumerate() {
                    let close = if cols >= v {
                        a.to_bits() == b.to_bits()
                    } else {
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
                    };
                    assert!(
                        close || (a.is_nan() && b.is_nan()),
                        "row {r}, cols {cols}: {a} against {b}"
                    );
                }
            }
        }
        // Random rows over a larger vocabulary, the weight non-contiguous (the whole logits).
        let mut rng = crate::util::rng::Rng::new(7, "chunked-nll-test");
        let (n, d, v) = (37, 16, 1000);
        let hv = rng.normal_vec(n * d, 1.0);
        let wv = rng.normal_vec(v * d, 1.0);
        let h = Tensor::from_vec(hv, (n, d), &dev).unwrap();
        let w = Tensor::from_vec(wv, (v, d), &dev).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 97) % v as u32).collect();
        let (want_nll, want_pick) = whole(&h, &w, &targets);
        let w_strided = w.t().unwrap().contiguous().unwrap().t().unwrap();
        for (cols, w) in [
            (64, &w),
            (999, &w),
            (NLL_ARGMAX_COLS, &w),
            (100, &w_strided),
        ] {
            let (nll, pick) = linear_nll_first_argmax_with(&h, w, &targets, cols).unwrap();
            assert_eq!(pick, want_pick, "cols {cols}");
            for (&a, &b) in nll.iter().zip(&want_nll) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "cols {cols}: {a} against {b}"
                );
            }
        }
        assert!(linear_nll_first_argmax(&h, &w, &targets[1..]).is_err());
        assert!(linear_nll_first_argmax(&h, &w, &[v as u32; 37]).is_err());
    }

    #[test]
    fn fused_nll_equals_composed_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = crate::util::rng::Rng::new(0, "t");
        let (n, v) = (7, 50);
        let x = Var::from_vec(rng.normal_vec(n * v, 3.0), (n, v), &dev).unwrap();
        let targets = vec![3, IGNORE, 49, 0, 17, IGNORE, 8];
        let w = Tensor::new(&[1f32, 0., 0.5, 2., 1., 0., 1.], &dev).unwrap();
        let fused = row_nll(x.as_tensor(), targets.clone()).unwrap();
        let composed = row_nll_composed(x.as_tensor(), &targets).unwrap();
        let a: Vec<f32> = fused.to_vec1().unwrap();
        let b: Vec<f32> = composed.to_vec1().unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        let ga = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga: Vec<Vec<f32>> = ga.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        let gb: Vec<Vec<f32>> = gb.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        for (ra, rb) in ga.iter().zip(&gb) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() < 1e-6, "{p} vs {q}");
            }
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_linear_nll_equals_the_unfused_one_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = crate::util::rng::Rng::new(1, "t");
        let (n, d, v) = (11, 6, 40);
        let h = Var::from_vec(rng.normal_vec(n * d, 1.0), (n, d), &dev).unwrap();
        let w = Var::from_vec(rng.normal_vec(v * d, 1.0), (v, d), &dev).unwrap();
        let targets = vec![3, IGNORE, 39, 0, 17, 5, 8, 8, IGNORE, 1, 22];
        // Uniform row weights (the gradients made in the forward pass, scaled) and per-row
        // weights (the backward recomputes the logits), so every row's share is checked.
        let uniform = Tensor::new(&[0.37f32; 11], &dev).unwrap();
        let varied: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.25).collect();
        let varied = Tensor::new(varied.as_slice(), &dev).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let unfused = row_nll_composed(&logits, &targets).unwrap();
        let want_v: Vec<f32> = unfused.to_vec1().unwrap();
        for wt in [&uniform, &varied] {
            let g0 = (&unfused * wt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for chunk in [1, 4, 11, 64] {
                let fused =
                    linear_row_nll_with(h.as_tensor(), w.as_tensor(), targets.clone(), chunk)
                        .unwrap();
                let got_v: Vec<f32> = fused.to_vec1().unwrap();
                for (p, q) in got_v.iter().zip(&want_v) {
                    assert!((p - q).abs() < 1e-5, "chunk {chunk}: {p} vs {q}");
                }
                let g1 = (fused * wt).unwrap().sum_all().unwrap().backward().unwrap();
                for var in [&h, &w] {
                    let a = g0.get(var.as_tensor()).unwrap();
                    let b = g1.get(var.as_tensor()).unwrap();
                    let diff = max_abs_diff(a, b);
                    assert!(diff < 1e-5, "chunk {chunk}: gradient differs by {diff}");
                }
            }
        }
        // A frozen output matrix: the gradient of h only.
        let w_frozen = w.as_tensor().detach();
        let logits = h.as_tensor().matmul(&w_frozen.t().unwrap()).unwrap();
        let g0 = (row_nll_composed(&logits, &targets).unwrap() * &varied)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for wt in [&uniform, &varied] {
            let fused = linear_row_nll_with(h.as_tensor(), &w_frozen, targets.clone(), 4).unwrap();
            let g1 = (fused * wt).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g1.get(&w_frozen).is_none());
            if std::ptr::eq(wt, &varied) {
                let diff = max_abs_diff(
                    g0.get(h.as_tensor()).unwrap(),
                    g1.get(h.as_tensor()).unwrap(),
                );
                assert!(diff < 1e-5, "frozen w: gradient of h differs by {diff}");
            }
        }
        // Untracked inputs: values only.
        let frozen =
            linear_row_nll_with(&h.as_tensor().detach(), &w.as_tensor().detach(), targets, 4)
                .unwrap();
        let got_v: Vec<f32> = frozen.to_vec1().unwrap();
        for (p, q) in got_v.iter().zip(&want_v) {
            assert!((p - q).abs() < 1e-5, "untracked: {p} vs {q}");
        }
    }

    #[test]
    fn fused_linear_nll_with_every_target_ignored_is_zero_with_zero_gradients() {
        let dev = Device::Cpu;
        let mut rng = crate::util::rng::Rng::new(2, "t");
        let (n, d, v) = (5, 4, 9);
        let h = Var::from_vec(rng.normal_vec(n * d, 1.0), (n, d), &dev).unwrap();
        let w = Var::from_vec(rng.normal_vec(v * d, 1.0), (v, d), &dev).unwrap();
        for chunk in [1, 2, 64] {
            let nll =
                linear_row_nll_with(h.as_tensor(), w.as_tensor(), vec![IGNORE; n], chunk).unwrap();
            assert_eq!(nll.to_vec1::<f32>().unwrap(), vec![0.0; n]);
            // Uniform and per-row incoming gradients both give zero gradients, finite.
            let rows = Tensor::new(&[1f32, 2., 3., 4., 5.], &dev).unwrap();
            for g in [
                nll.sum_all().unwrap(),
                (&nll * &rows).unwrap().sum_all().unwrap(),
            ] {
                let grads = g.backward().unwrap();
                for var in [&h, &w] {
                    if let Some(t) = grads.get(var.as_tensor()) {
                        let vals: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                        assert!(vals.iter().all(|&x| x == 0.0), "chunk {chunk}: {vals:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn hand_computed_cross_entropy() {
        // logits [0, ln 3]: p(1) = 3/4, so -log p(1) = ln(4/3) and -log p(0) = ln 4.
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[0f32, 3f32.ln()], [0., 3f32.ln()], [0., 0.]]], &dev).unwrap();
        let ids = Tensor::new(&[[0u32, 1, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[0f32, 1., 1.]], &dev).unwrap();
        let l = masked_next_token_ce(&logits, &ids, &mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = ((4f32 / 3.).ln() + 4f32.ln()) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        let only_last = Tensor::new(&[[0f32, 0., 1.]], &dev).unwrap();
        let l = masked_next_token_ce(&logits, &ids, &only_last)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 4f32.ln()).abs() < 1e-6);
    }
}
