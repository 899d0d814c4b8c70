//! Representation Noising (Rosati et al. 2024, §3; docs/REPNOISE.md): the loss in one place,
//! beside the paper's equation. For a harmful batch `h` and its paired harmless
//! batch `s`, with the pair mask `M` (the answer span),
//!
//! ```text
//! loss = CE_masked(s) + beta * mean_l MMD(mlp_l(h) * M, noise * M) - alpha * ln(1 + harm(h))
//! ```
//!
//! [`mmd`] is the biased squared MMD with five Gaussian kernels, [`repnoise_loss`] the whole step
//! (`harm` is the logit-lens cross-entropy of the harmful answer), with its ablations and the
//! faithful mode that follows the authors' code (docs/REPNOISE.md states each term and each
//! difference between the modes).

use crate::data::encode::{pad_to, EncodedPair, PadSide};
use crate::data::Encoded;
use crate::model::llama::Llama;
use crate::train::objective::{scalar, Batch, CeRows};
use crate::util::rng::Rng;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Biased squared MMD between the rows of `x` and `y` (`[n, f]` each) with a sum of five
/// Gaussian kernels: bandwidths `base * 2^i`, `i = 0..4`, where `base` is the mean pairwise
/// squared distance of the stacked points (off-diagonal mean, no gradient) divided by
/// `2^(5 / 2) = 4`.
pub fn mmd(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    if y.dim(0)? != n {
        return Err(Error::msg("mmd: x and y must have the same number of rows"));
    }
    let z = Tensor::cat(&[x, y], 0)?; // [2n, f]
    let m = 2 * n;
    // Squared distances from the Gram matrix (clamped at 0 against rounding).
    let sq = z.sqr()?.sum_keepdim(1)?; // [m, 1]
    let gram = z.matmul(&z.t()?)?; // [m, m]
    let dist = (sq.broadcast_add(&sq.t()?)? - (gram * 2.0)?)?.relu()?;
    let denom = (m * m - m).max(1) as f64;
    let base = (dist
        .detach()
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        / denom)
        / 4.0;
    let base = if base > 0.0 { base } else { 1.0 };
    let mut k = dist.zeros_like()?;
    for i in 0..5 {
        let bw = base * 2f64.powi(i);
        k = (k + (dist.clone() * (-1.0 / bw))?.exp()?)?;
    }
    let kxx = k.narrow(0, 0, n)?.narrow(1, 0, n)?.mean_all()?;
    let kyy = k.narrow(0, n, n)?.narrow(1, n, n)?.mean_all()?;
    let kxy = k.narrow(0, 0, n)?.narrow(1, n, n)?.mean_all()?;
    let kyx = k.narrow(0, n, n)?.narrow(1, 0, n)?.mean_all()?;
    Ok((((kxx + kyy)? - kxy)? - kyx)?)
}

/// Representation Noising settings and ablations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepNoiseConfig {
    pub alpha: f64,
    pub beta: f64,
    /// Reproduce the reference code's arithmetic (see `docs/REPNOISE.md`).
    pub faithful: bool,
    /// Ablation: drop the noise (MMD) term.
    pub no_noise: bool,
    /// Ablation: drop the ascent term.
    pub no_ascent: bool,
    /// Ablation: noise and ascent over every real token of the harmful sequence (prompt
    /// included) instead of the pair mask.
    pub no_mask: bool,
    /// Ablation: ascend on the final layer's output only (no logit lens).
    pub ascent_last_layer_only: bool,
}

impl Default for RepNoiseConfig {
    /// The paper's values for Llama-2-7b-chat.
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 0.001,
            faithful: false,
            no_noise: false,
            no_ascent: false,
            no_mask: false,
            ascent_last_layer_only: false,
        }
    }
}

/// Pairs of one batch, padded to a common length.
pub struct PairBatch {
    pub harmful: Batch,
    pub harmless: Batch,
    /// Pair mask per row, padded with zeros.
    pub pair_mask: Vec<Vec<u8>>,
}

impl PairBatch {
    pub fn new(pairs: &[&EncodedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let t = pairs.iter().map(|p| p.pair_mask.len()).max().unwrap_or(0);
        let pad = |e: &Encoded| -> Result<Encoded> {
            let mut e = e.clone();
            pad_to(&mut e, t, PadSide::Right, pad_id)?;
            Ok(e)
        };
        let h: Vec<Encoded> = pairs
            .iter()
            .map(|p| pad(&p.harmful))
            .collect::<Result<_>>()?;
        let s: Vec<Encoded> = pairs
            .iter()
            .map(|p| pad(&p.harmless))
            .collect::<Result<_>>()?;
        let pair_mask = pairs
            .iter()
            .map(|p| {
                let mut m = p.pair_mask.clone();
                m.resize(t, 0);
                m
            })
            .collect();
        Ok(Self {
            harmful: Batch::new(&h.iter().collect::<Vec<_>>(), pad_id, device)?,
            harmless: Batch::new(&s.iter().collect::<Vec<_>>(), pad_id, device)?,
            pair_mask,
        })
    }

    pub(crate) fn and_real(&self, real: &[Vec<u8>]) -> Vec<Vec<u8>> {
        self.pair_mask
            .iter()
            .zip(real)
            .map(|(m, r)| m.iter().zip(r).map(|(a, b)| a & b).collect())
            .collect()
    }
}

/// The loss terms of one RepNoise evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct RepNoiseTerms {
    pub harmless_ce: f64,
    /// The averaged logit-lens cross-entropy of the harmful answers (before `+1` and the log).
    pub harmful_ce: f64,
    /// Layer-averaged MMD between masked MLP outputs and masked noise (before beta).
    pub noise_mmd: f64,
    pub loss: f64,
    /// Positions in the pair mask (summed over the batch).
    pub mask_positions: usize,
}

/// The RepNoise loss on one batch of pairs:
/// `CE(harmless) + beta * mean_l MMD(mlp_l(harmful) * M, noise * M) - alpha * ln(1 + harm)`.
pub fn repnoise_loss(
    net: &Llama,
    batch: &PairBatch,
    cfg: &RepNoiseConfig,
    rng: &mut Rng,
) -> Result<(Tensor, RepNoiseTerms)> {
    let dev = net.device().clone();
    let faithful = cfg.faithful;
    // Masks: faithful uses the pair mask as is (padding inside it included); the default
    // restricts it to each sequence's real tokens.
    let m_harmless = if faithful {
        batch.pair_mask.clone()
    } else {
        batch.and_real(&batch.harmless.real)
    };
    let m_harmful = if cfg.no_mask {
        batch.harmful.real.clone()
    } else if faithful {
        batch.pair_mask.clone()
    } else {
        batch.and_real(&batch.harmful.real)
    };
    let rows_for = |ids: &[Vec<u32>], m: &[Vec<u8>]| {
        if faithful {
            CeRows::faithful(ids, m)
        } else {
            CeRows::standard(ids, m)
        }
    };

    // Harmless: cross-entropy of the refusal.
    let out_s = batch.harmless.forward(net, false, false)?;
    let rows_s = rows_for(&batch.harmless.ids_v, &m_harmless);
    let harmless_ce = rows_s.ce(net, &out_s.hidden_states[0], false)?;
    drop(out_s);

    let need_hidden = !cfg.no_ascent && !cfg.ascent_last_layer_only;
    let need_mlp = !cfg.no_noise;
    let out_h = batch.harmful.forward(net, need_hidden, need_mlp)?;
    let mut loss = harmless_ce.clone();

    // Ascent: logit-lens cross-entropy of the harmful answer.
    let harmful_ce_v;
    {
        let rows_h = rows_for(&batch.harmful.ids_v, &m_harmful);
        let hs = &out_h.hidden_states;
        let last = hs.len() - 1;
        let harm = if cfg.no_ascent {
            // Logged only: read out without gradients.
            rows_h.ce_mean_with(net, std::slice::from_ref(&hs[last]), false)?
        } else if cfg.ascent_last_layer_only {
            rows_h.ce(net, &hs[last], false)?
        } else if faithful {
            // The reference (loss.py, lines 120-128) sums L + 2 readouts: the final logits'
            // own cross-entropy, then one per entry of transformers' `hidden_states`, whose
            // last entry is already normed (and the lens norms it again). It divides the sum
            // by `len(hidden_states)` = L + 1, not by the number of readouts, and adds 1
            // (`/ len(...) + 1`). Here: every hidden state, then the last one normed once
            // more, read out together; their mean times (L + 2) / (L + 1) is that quotient.
            let mut all = hs.clone();
            all.push(net.final_norm(&hs[last])?);
            let readouts = all.len() as f64;
            (rows_h.ce_mean(net, &all)? * (readouts / hs.len() as f64))?
        } else {
            // One readout per hidden state; the last readout is the model's own logits.
            rows_h.ce_mean(net, hs)?
        };
        harmful_ce_v = scalar(&harm)?;
        if !cfg.no_ascent {
            let ascent = (harm + 1.0)?.log()?;
            loss = (loss - (ascent * cfg.alpha)?)?;
        }
    }

    // Noise: MMD between masked MLP outputs and masked Gaussian noise, averaged over layers.
    let mut noise_mmd_v = 0.0;
    if need_mlp {
        let (b, t) = batch.harmful.dims();
        let d = net.config().hidden_size;
        let mflat: Vec<f32> = m_harmful
            .iter()
            .flat_map(|r| r.iter().map(|&x| x as f32))
            .collect();
        let m = Tensor::from_vec(mflat, (b, t, 1), &dev)?;
        let mut total: Option<Tensor> = None;
        for act in &out_h.mlp_outputs {
            let x = act.broadcast_mul(&m)?.reshape((b, t * d))?;
            let noise = Tensor::from_vec(rng.normal_vec(b * t * d, 1.0), (b, t, d), &dev)?;
            let y = noise.broadcast_mul(&m)?.reshape((b, t * d))?;
            let v = mmd(&x, &y)?;
            total = Some(match total {
                None => v,
                Some(s) => (s + v)?,
            });
        }
        let mean = (total.ok_or_else(|| Error::msg("model has no layers"))?
            / out_h.mlp_outputs.len() as f64)?;
        noise_mmd_v = scalar(&mean)?;
        loss = (loss + (mean * cfg.beta)?)?;
    }
    let mask_positions = batch
        .pair_mask
        .iter()
        .flatten()
        .filter(|&&x| x == 1)
        .count();
    let terms = RepNoiseTerms {
        harmless_ce: scalar(&harmless_ce)?,
        harmful_ce: harmful_ce_v,
        noise_mmd: noise_mmd_v,
        loss: scalar(&loss)?,
        mask_positions,
    };
    Ok((loss, terms))
}

impl RepNoiseTerms {
    pub fn as_map(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("harmless_ce".to_string(), self.harmless_ce),
            ("harmful_ce".to_string(), self.harmful_ce),
            ("noise_mmd".to_string(), self.noise_mmd),
        ])
    }
}
