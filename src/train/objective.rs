//! The losses the training methods share, over tokenised batches: supervised fine-tuning on
//! answers (alignment, safety training, the attacks), the refusal opening's unlikelihood, and the
//! batch and cross-entropy-row machinery the defences' losses (`crate::defence::repnoise`,
//! `crate::defence::baselines`) are built on.
//!
//! Cross-entropies are computed only at the positions that are trained on: the hidden states of
//! the predicting positions are gathered first and only those rows go through the final norm and
//! the LM head (for the logit lens, one readout per hidden state). The value and gradient are the
//! same as masking full `[b, t, vocab]` logits, at a fraction of the cost.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::encode::{pad_to, PadSide};
use crate::data::Encoded;
use crate::model::llama::{attention_mask, positions_for, ForwardOpts, ForwardOut, Llama, Logits};
use crate::model::loss::linear_row_nll;
use crate::train::StepLoss;
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

pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
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
