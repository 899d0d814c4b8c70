//! The losses of every training method, over tokenised batches: supervised fine-tuning on
//! answers (alignment, safety training, the attacks), gradient ascent, the adversarial loss, and
//! Representation Noising (Rosati et al. 2024, §3) with its ablations and a faithful mode that
//! reproduces the reference code's arithmetic. `docs/REPNOISE.md` states each term and each
//! difference between the modes.
//!
//! Cross-entropies are computed only at the positions that are trained on: the hidden states of
//! the predicting positions are gathered first and only those rows go through the final norm and
//! the LM head (for the logit lens, one readout per hidden state). The value and gradient are the
//! same as masking full `[b, t, vocab]` logits, at a fraction of the cost.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::encode::{pad_to, EncodedPair, PadSide};
use crate::data::Encoded;
use crate::model::llama::{attention_mask, positions_for, ForwardOpts, ForwardOut, Llama, Logits};
use crate::model::loss::linear_row_nll;
use crate::train::StepLoss;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Right-padded token batch ready for a forward pass.
pub struct Batch {
    pub ids: Tensor,
    pub ids_v: Vec<Vec<u32>>,
    /// 1 on real tokens.
    pub real: Vec<Vec<u8>>,
    positions: Tensor,
    mask: Tensor,
}

impl Batch {
    /// Pad `seqs` on the right to the longest and build the tensors.
    pub fn new(seqs: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(|e| e.len()).max().unwrap_or(0);
        if seqs.is_empty() || t < 2 {
            return Err(Error::msg("a batch needs sequences of at least two tokens"));
        }
        let mut ids_v = Vec::with_capacity(seqs.len());
        let mut real = Vec::with_capacity(seqs.len());
        for e in seqs {
            let mut e = (*e).clone();
            pad_to(&mut e, t, PadSide::Right, pad_id)?;
            ids_v.push(e.ids);
            real.push(e.attention_mask);
        }
        let b = seqs.len();
        let flat: Vec<u32> = ids_v.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), device)?;
        let key_valid: Vec<Vec<bool>> = real
            .iter()
            .map(|r| r.iter().map(|&x| x == 1).collect())
            .collect();
        let mask = attention_mask(b, t, 0, Some(&key_valid), device)?;
        Ok(Self {
            ids,
            ids_v,
            real,
            positions: positions_for(b, t, 0, device)?,
            mask,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.ids_v.len(), self.ids_v[0].len())
    }

    pub fn forward(&self, net: &Llama, hidden: bool, mlp: bool) -> Result<ForwardOut> {
        net.forward(
            &self.ids,
            &self.positions,
            Some(&self.mask),
            None,
            ForwardOpts {
                logits: Logits::None,
                hidden_states: true,
                mlp_outputs: mlp,
            },
        )
        .map(|mut o| {
            if !hidden {
                // Keep only the last hidden state (the one the model's logits come from).
                let last = o.hidden_states.pop();
                o.hidden_states = last.into_iter().collect();
            }
            o
        })
    }
}

/// Which next-token predictions a cross-entropy averages over.
#[derive(Clone, Debug)]
pub struct CeRows {
    /// Flattened `[b * t]` indices of the predicting positions whose logits are used.
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// Predictions that count with a constant loss (the reference code's zeroed logits: a
    /// uniform distribution, `ln vocab` each, no gradient).
    constant: usize,
}

impl CeRows {
    /// Standard rows: position `i` predicts token `i + 1` wherever `mask[i + 1]` is set.
    pub fn standard(ids: &[Vec<u32>], mask: &[Vec<u8>]) -> Self {
        let t = ids[0].len();
        let mut rows = vec![];
        let mut targets = vec![];
        for (r, (ids, m)) in ids.iter().zip(mask).enumerate() {
            for i in 0..t - 1 {
                if m[i + 1] == 1 {
                    rows.push((r * t + i) as u32);
                    targets.push(ids[i + 1]);
                }
            }
        }
        Self {
            rows,
            targets,
            constant: 0,
        }
    }

    /// The reference code's rows: logits multiplied by the mask (so a prediction made at an
    /// unmasked position sees all-zero logits), labels multiplied by the mask with id 0
    /// dropped, then shifted.
    pub fn faithful(ids: &[Vec<u32>], mask: &[Vec<u8>]) -> Self {
        let t = ids[0].len();
        let mut out = Self {
            rows: vec![],
            targets: vec![],
            constant: 0,
        };
        for (r, (ids, m)) in ids.iter().zip(mask).enumerate() {
            for i in 0..t - 1 {
                let label = ids[i + 1] * m[i + 1] as u32;
                if label == 0 {
                    continue;
                }
                if m[i] == 1 {
                    out.rows.push((r * t + i) as u32);
                    out.targets.push(label);
                } else {
                    out.constant += 1;
                }
            }
        }
        out
    }

    /// Number of predictions averaged over.
    pub fn count(&self) -> usize {
        self.rows.len() + self.constant
    }

    /// Mean cross-entropy of reading `hidden` `[b, t, d]` out through the final norm (twice
    /// when `double_norm`) and the LM head at these rows.
    pub fn ce(&self, net: &Llama, hidden: &Tensor, double_norm: bool) -> Result<Tensor> {
        if double_norm {
            self.ce_mean(net, &[net.final_norm(hidden)?])
        } else {
            self.ce_mean(net, std::slice::from_ref(hidden))
        }
    }

    /// The mean over `hiddens` of [`Self::ce`] (no double norm). The rows of every hidden
    /// state are stacked and read out together through [`linear_row_nll`], which never holds
    /// more than a chunk of full-vocabulary logits and gives the LM head one gradient, not one
    /// per hidden state (candle would sum `[vocab, d]` gradients one by one).
    pub fn ce_mean(&self, net: &Llama, hiddens: &[Tensor]) -> Result<Tensor> {
        self.ce_mean_with(net, hiddens, true)
    }

    /// [`Self::ce_mean`], with `tracked` false a value only: no gradient is made or kept for
    /// the hidden states or the LM head (a readout that is logged, not optimised).
    pub fn ce_mean_with(&self, net: &Llama, hiddens: &[Tensor], tracked: bool) -> Result<Tensor> {
        let n = self.count();
        if n == 0 {
            return Err(Error::msg("the loss mask selects no tokens"));
        }
        if hiddens.is_empty() {
            return Err(Error::msg("no hidden states to read out"));
        }
        let layers = hiddens.len();
        let dev = hiddens[0].device();
        let vocab = net.config().vocab_size;
        let const_part = self.constant as f64 * (vocab as f64).ln();
        if self.rows.is_empty() {
            return Ok(Tensor::new(const_part as f32 / n as f32, dev)?);
        }
        let idx = Tensor::new(self.rows.as_slice(), dev)?;
        let picked = hiddens
            .iter()
            .map(|h| {
                let (b, t, d) = h.dims3()?;
                let h = if tracked { h.clone() } else { h.detach() };
                Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let h = Tensor::cat(&picked, 0)?; // [layers * rows, d]
        let h = net.final_norm(&h)?;
        let targets = self.targets.repeat(layers);
        let total = if tracked {
            linear_row_nll(&h, net.lm_head_weight(), targets)?
        } else {
            linear_row_nll(&h.detach(), &net.lm_head_weight().detach(), targets)?
        }
        .sum_all()?;
        Ok((((total / layers as f64)? + const_part)? / n as f64)?)
    }
}

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

/// The loss masks of a batch padded to `t`, restricted to real tokens unless `include_padding`.
pub fn answer_masks(seqs: &[&Encoded], t: usize, include_padding: bool) -> Vec<Vec<u8>> {
    seqs.iter()
        .map(|e| {
            let mut m: Vec<u8> = e
                .loss_mask
                .iter()
                .zip(&e.attention_mask)
                .map(|(a, b)| if include_padding { *a } else { a & b })
                .collect();
            m.resize(t, 0);
            m
        })
        .collect()
}

/// Supervised fine-tuning: answer-token cross-entropy.
pub fn sft_loss(net: &Llama, seqs: &[&Encoded], pad_id: u32) -> Result<StepLoss> {
    sft_loss_with(net, seqs, pad_id, false)
}

/// [`sft_loss`]; with `include_padding`, padding positions whose loss mask is 1 count too (the
/// reference attack's loss, which covered prompt and padding tokens).
pub fn sft_loss_with(
    net: &Llama,
    seqs: &[&Encoded],
    pad_id: u32,
    include_padding: bool,
) -> Result<StepLoss> {
    let batch = Batch::new(seqs, pad_id, net.device())?;
    let (_, t) = batch.dims();
    let masks = answer_masks(seqs, t, include_padding);
    let rows = CeRows::standard(&batch.ids_v, &masks);
    let out = batch.forward(net, false, false)?;
    let ce = rows.ce(net, &out.hidden_states[0], false)?;
    let v = scalar(&ce)?;
    Ok(StepLoss {
        loss: ce,
        terms: BTreeMap::from([("ce".to_string(), v)]),
    })
}

/// Sequence-level unlikelihood (Welleck et al., 2020, applied to whole openings): for each
/// sequence, `p` is the probability of its loss-masked tokens given what precedes them (here a
/// refusal's first tokens after a benign prompt) and the loss is `-ln(1 - p)`, averaged over
/// the sequences. Its gradient, `p / (1 - p)` times that of `ln p`, vanishes while `p` is small,
/// so it acts only where the model starts to open a benign answer with a refusal. Returns the
/// loss and the mean `p`.
pub fn opening_unlikelihood(net: &Llama, seqs: &[&Encoded], pad_id: u32) -> Result<(Tensor, f64)> {
    let batch = Batch::new(seqs, pad_id, net.device())?;
    let (b, t) = batch.dims();
    let masks = answer_masks(seqs, t, false);
    for (s, m) in masks.iter().enumerate() {
        if !m.contains(&1) {
            return Err(Error::msg(format!(
                "unlikelihood sequence {s} has no loss-masked tokens"
            )));
        }
    }
    let rows = CeRows::standard(&batch.ids_v, &masks);
    let n = rows.rows.len();
    let mut owner = vec![0f32; b * n];
    for (j, &r) in rows.rows.iter().enumerate() {
        owner[(r as usize / t) * n + j] = 1.0;
    }
    let out = batch.forward(net, false, false)?;
    let dev = out.hidden_states[0].device().clone();
    let (_, _, d) = out.hidden_states[0].dims3()?;
    let idx = Tensor::new(rows.rows.as_slice(), &dev)?;
    let h = out.hidden_states[0]
        .reshape((b * t, d))?
        .index_select(&idx, 0)?;
    let nll = linear_row_nll(&net.final_norm(&h)?, net.lm_head_weight(), rows.targets)?;
    let owner = Tensor::from_vec(owner, (b, n), &dev)?;
    let seq_nll = owner.matmul(&nll.reshape((n, 1))?)?.squeeze(1)?; // [b]
    let p = seq_nll.neg()?.exp()?;
    let loss = p
        .affine(-1.0, 1.0)?
        .clamp(1e-6f32, 1f32)?
        .log()?
        .neg()?
        .mean_all()?;
    let p_mean = scalar(&p.mean_all()?)?;
    Ok((loss, p_mean))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
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

    fn and_real(&self, real: &[Vec<u8>]) -> Vec<Vec<u8>> {
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

/// The baselines' losses on a batch of pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairLoss {
    /// Cross-entropy of the refusal (additional safety training).
    SafetySft,
    /// Minus the cross-entropy of the harmful answer (unbounded: it diverges, and the run
    /// reports it).
    GradientAscent,
    /// Refusal cross-entropy minus harmful-answer cross-entropy.
    Adversarial,
    /// Cross-entropy of the harmful answer (training a security vector).
    HarmfulSft,
}

/// Which tokens the baselines' cross-entropies cover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossTokens {
    /// The answer: the pair mask on the sequence's own real tokens.
    #[default]
    Answer,
    /// Every position of the sequence padded to `max_len`: the question, the answer and the
    /// padding (the reference code's `labels=input_ids` for `min_harmless_loss`,
    /// `max_harmful_loss` and the security vector). The adversarial loss keeps the pair mask
    /// with the reference's masked cross-entropy (`masked_token_ce_loss`: logits at unmasked
    /// positions zeroed, labels outside the mask or equal to 0 ignored), as its
    /// `adversarial_loss` did.
    Sequence,
}

/// Settings of the baselines' losses; the defaults are this project's, [`Self::reference`]
/// the reference code's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Weight of the harmful answer's cross-entropy in the adversarial loss:
    /// `CE(refusal) - weight * CE(harmful)`.
    pub adversarial_weight: f64,
    pub tokens: LossTokens,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            adversarial_weight: 1.0,
            tokens: LossTokens::Answer,
        }
    }
}

impl BaselineConfig {
    /// The reference code's (`boyiwei/RepNoise-Reproduce` a35c98a): adversarial weight 0.1
    /// (`immunization_llms/arguments.py` line 13, "0.1 for Llama2"), full-sequence losses
    /// (`training.py` lines 629-634).
    pub fn reference() -> Self {
        Self {
            adversarial_weight: 0.1,
            tokens: LossTokens::Sequence,
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.adversarial_weight > 0.0 && self.adversarial_weight.is_finite()) {
            return Err(Error::setting(
                "baseline.adversarial_weight",
                self.adversarial_weight,
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

/// Vaccine (Huang et al., NeurIPS 2024, "Vaccine: Perturbation-aware Alignment for Large
/// Language Models against Harmful Fine-tuning"): alignment on the refusals that stays aligned
/// when every layer's attention output is pushed, within a budget, the way that hurts it most.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaccineConfig {
    /// The budget: the L2 norm of all layers' perturbations together (`--rho`; the authors'
    /// `train.py` default, git-disl/Vaccine 8937f68).
    pub rho: f64,
}

impl Default for VaccineConfig {
    fn default() -> Self {
        Self { rho: 2.0 }
    }
}

impl VaccineConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.rho > 0.0 && self.rho.is_finite()) {
            return Err(Error::setting(
                "vaccine.rho",
                self.rho,
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

/// One Vaccine step on a batch of pairs (the authors' `VaccineTrainer.training_step`): a first
/// forward and backward pass of the refusals' cross-entropy gives `g_l`, the gradient at each
/// layer's attention output; the perturbation is `e_l = rho g_l / (sqrt(sum_l |g_l|^2) + 1e-7)`
/// (one norm over all layers); the parameter gradients of that pass are dropped (the authors'
/// `zero_grad`), and the returned loss is the same cross-entropy with every `e_l` added to its
/// layer's attention output as a constant (no gradient flows through it). `bl.tokens` picks
/// the refusal's tokens, as for safety-SFT.
pub fn vaccine_loss(
    net: &Llama,
    batch: &PairBatch,
    cfg: &VaccineConfig,
    bl: &BaselineConfig,
) -> Result<StepLoss> {
    let (b, t) = batch.harmless.dims();
    let c = net.config();
    let dtype = net.lm_head_weight().dtype();
    let probes = (0..c.num_layers)
        .map(|_| candle_core::Var::zeros((b, t, c.hidden_size), dtype, net.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let probe_net =
        net.with_attention_offsets(probes.iter().map(|v| v.as_tensor().clone()).collect())?;
    let first = pair_baseline_loss_with(&probe_net, batch, PairLoss::SafetySft, bl)?;
    let first_ce = scalar(&first.loss)?;
    let grads = first.loss.backward_owned()?;
    let g = probes
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.detach()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    drop(grads);
    let mut sq = 0f64;
    for x in &g {
        sq += scalar(&x.sqr()?.sum_all()?)?;
    }
    let norm = sq.sqrt();
    let scale = cfg.rho / (norm + 1e-7);
    let eps = g
        .into_iter()
        .map(|x| Ok((x * scale)?.detach()))
        .collect::<Result<Vec<_>>>()?;
    let second = pair_baseline_loss_with(
        &net.with_attention_offsets(eps)?,
        batch,
        PairLoss::SafetySft,
        bl,
    )?;
    let mut terms = second.terms;
    terms.insert("unperturbed_ce".to_string(), first_ce);
    terms.insert("attention_grad_norm".to_string(), norm);
    Ok(StepLoss {
        loss: second.loss,
        terms,
    })
}

/// [`pair_baseline_loss_with`] at the default settings.
pub fn pair_baseline_loss(net: &Llama, batch: &PairBatch, which: PairLoss) -> Result<StepLoss> {
    pair_baseline_loss_with(net, batch, which, &BaselineConfig::default())
}

/// The baselines' losses on a batch of pairs.
pub fn pair_baseline_loss_with(
    net: &Llama,
    batch: &PairBatch,
    which: PairLoss,
    cfg: &BaselineConfig,
) -> Result<StepLoss> {
    let whole = cfg.tokens == LossTokens::Sequence && which != PairLoss::Adversarial;
    // The reference's adversarial loss: its masked cross-entropy (`CeRows::faithful`) on both
    // sides, with the pair mask as is (padding inside it included).
    let reference_pair = cfg.tokens == LossTokens::Sequence && which == PairLoss::Adversarial;
    let mask = |b: &Batch| -> Vec<Vec<u8>> {
        if whole {
            let (rows, t) = b.dims();
            vec![vec![1; t]; rows]
        } else if reference_pair {
            batch.pair_mask.clone()
        } else {
            batch.and_real(&b.real)
        }
    };
    let rows_for = |ids: &[Vec<u32>], m: &[Vec<u8>]| {
        if reference_pair {
            CeRows::faithful(ids, m)
        } else {
            CeRows::standard(ids, m)
        }
    };
    let mut terms = BTreeMap::new();
    let harmless = if matches!(which, PairLoss::SafetySft | PairLoss::Adversarial) {
        let out = batch.harmless.forward(net, false, false)?;
        let m = mask(&batch.harmless);
        let ce = rows_for(&batch.harmless.ids_v, &m).ce(net, &out.hidden_states[0], false)?;
        terms.insert("harmless_ce".to_string(), scalar(&ce)?);
        Some(ce)
    } else {
        None
    };
    let harmful = if which != PairLoss::SafetySft {
        let out = batch.harmful.forward(net, false, false)?;
        let m = mask(&batch.harmful);
        let ce = rows_for(&batch.harmful.ids_v, &m).ce(net, &out.hidden_states[0], false)?;
        terms.insert("harmful_ce".to_string(), scalar(&ce)?);
        Some(ce)
    } else {
        None
    };
    let loss = match (harmless, harmful) {
        (Some(s), Some(h)) => (s - (h * cfg.adversarial_weight)?)?,
        (Some(s), None) => s,
        (None, Some(h)) if which == PairLoss::HarmfulSft => h,
        (None, Some(h)) => h.neg()?,
        (None, None) => unreachable!(),
    };
    Ok(StepLoss { loss, terms })
}

/// The same cross-entropy the slow, obvious way (full `[b, t, vocab]` logits, masked), for
/// tests of [`CeRows`].
#[doc(hidden)]
pub fn full_logits_ce(
    net: &Llama,
    batch: &Batch,
    mask: &[Vec<u8>],
    faithful: bool,
) -> Result<Tensor> {
    let out = net.forward(
        &batch.ids,
        &batch.positions,
        Some(&batch.mask),
        None,
        ForwardOpts::default(),
    )?;
    let logits = out.logits.ok_or_else(|| Error::msg("no logits"))?;
    let (b, t, _) = logits.dims3()?;
    let dev = logits.device().clone();
    let dev = &dev;
    let mflat: Vec<f32> = mask
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as f32))
        .collect();
    let m = Tensor::from_vec(mflat, (b, t), dev)?;
    let logits = if faithful {
        logits.broadcast_mul(&m.unsqueeze(D::Minus1)?)?
    } else {
        logits
    };
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let mut total = Tensor::new(0f32, dev)?;
    let mut n = 0usize;
    for r in 0..b {
        for i in 0..t - 1 {
            let tgt = batch.ids_v[r][i + 1];
            let keep = if faithful {
                tgt * mask[r][i + 1] as u32 != 0
            } else {
                mask[r][i + 1] == 1
            };
            if keep {
                let x = lp.get(r)?.get(i)?.get(tgt as usize)?;
                total = (total - x)?;
                n += 1;
            }
        }
    }
    Ok((total / n as f64)?)
}
