//! The paper's baselines on defence pairs: gradient ascent, the adversarial loss (harmful answers
//! down, refusals up), and Vaccine (Huang et al. 2024)'s perturbation-aware alignment.

use crate::defence::repnoise::PairBatch;
use crate::model::llama::Llama;
use crate::train::objective::{scalar, Batch, CeRows, LossTokens};
use crate::train::StepLoss;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    // f32 whatever the compute dtype: the perturbation's norm sums about a million squares
    // (the forward casts the offsets to the activations' dtype where it adds them).
    let probes = (0..c.num_layers)
        .map(|_| {
            candle_core::Var::zeros((b, t, c.hidden_size), candle_core::DType::F32, net.device())
        })
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
