//! Language-modelling losses shared by alignment, defences and attacks.
//!
//! The cross-entropy over a large vocabulary is a fused CPU operation with its own backward
//! pass: one sweep per row forward (max, log-sum-exp, target logit) and one backward
//! (`softmax - onehot`), skipping rows whose target is masked out. The composed candle version
//! (log_softmax + gather) made about ten full-vocabulary passes and took 1.8 s of a 4 x 128
//! SmolLM2 step on the 2-core machine (see docs/BENCHMARKS.md); it remains the path on other
//! devices and the reference in the tests.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::slice_f32;

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
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // exp in f32 (arguments <= 0, exact to an ulp; f64 exp took a fifth of a
                // logit-lens pass), summed in f64.
                let sum: f64 = row.iter().map(|&z| (z - max).exp() as f64).sum();
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
            let g = gr[r];
            for (oi, &z) in o.iter_mut().zip(row) {
                *oi = g * (z - lse).exp();
            }
            o[t as usize] -= g;
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

    #[test]
    fn fused_nll_equals_composed_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(0, "t");
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
