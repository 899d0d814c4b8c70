//! Refusal-direction ablation ("abliteration", Arditi et al. 2024): an attack without a single
//! gradient step, which the RepNoise paper lists as untested.
//!
//! 1. Read the residual stream at the last prompt token (where the answer starts) for harmful
//!    and harmless prompts, at every layer; the refusal direction of layer `l` is the unit
//!    difference of the two means.
//! 2. Project the direction out of every matrix that writes into the residual stream: the token
//!    embedding (`E <- E - (E r) r^T`), each attention output and MLP down projection
//!    (`W <- W - r (r^T W)`, and their biases). Nothing the model writes then has a component
//!    along `r`, so no layer can read it.
//! 3. Which layer's direction: the one that, ablated, lowers the refusal rate most on a few
//!    harmful validation prompts (greedy answers, the refusal check), unless a layer is given.
//!
//! With tied embeddings the LM head changes with the embedding, as in the reference
//! implementations for tied models.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::encode::{encode_prompt, EncodeOptions, PromptFormat};
use crate::eval::refusal::RefusalCheck;
use crate::model::llama::{Llama, PROJECTIONS};
use crate::model::load::LoadedModel;
use crate::model::params::Params;
use crate::model::tokenizer::Tok;
use crate::train::objective::Batch;
use crate::{Error, Result};

/// Abliteration settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbliterateConfig {
    /// Layer whose direction is ablated (index into the `num_layers + 1` residual readouts:
    /// 0 is the embedding output); `None` chooses among `candidates`.
    pub layer: Option<usize>,
    /// Candidate layers as fractions of the depth.
    pub candidates: Vec<f64>,
    /// Harmful and harmless prompts for the means (each).
    pub prompts: usize,
    /// Harmful validation prompts for choosing the layer (disjoint from the means' prompts).
    pub select_prompts: usize,
    /// Tokens generated per validation prompt.
    pub select_tokens: usize,
    pub batch: usize,
}

impl Default for AbliterateConfig {
    fn default() -> Self {
        Self {
            layer: None,
            candidates: vec![0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            prompts: 64,
            select_prompts: 24,
            select_tokens: 24,
            batch: 16,
        }
    }
}

/// Mean residual stream at the last token of each prompt, per readout (`num_layers + 1` vectors
/// `[d]`).
pub fn mean_last_token_states(
    net: &Llama,
    tok: &Tok,
    prompts: &[String],
    format: PromptFormat,
    batch: usize,
) -> Result<Vec<Tensor>> {
    if prompts.is_empty() {
        return Err(Error::msg(
            "abliteration needs at least one prompt of each kind",
        ));
    }
    let opts = EncodeOptions {
        format,
        ..EncodeOptions::default()
    };
    let enc = prompts
        .iter()
        .map(|p| encode_prompt(tok, p, &opts))
        .collect::<Result<Vec<_>>>()?;
    let mut sums: Option<Vec<Tensor>> = None;
    for chunk in enc.chunks(batch.max(1)) {
        let refs: Vec<_> = chunk.iter().collect();
        let b = Batch::new(&refs, tok.pad_id, net.device())?;
        let out = b.forward(net, true, false)?;
        let last: Vec<u32> = chunk.iter().map(|e| (e.len() - 1) as u32).collect();
        let (bsz, t) = b.dims();
        // Flattened row index of each sequence's last real token.
        let rows: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(i, &l)| i as u32 * t as u32 + l)
            .collect();
        let rows = Tensor::from_vec(rows, bsz, net.device())?;
        let per_layer: Vec<Tensor> = out
            .hidden_states
            .iter()
            .map(|h| {
                let d = h.dim(D::Minus1)?;
                Ok(h.reshape((bsz * t, d))?.index_select(&rows, 0)?.sum(0)?)
            })
            .collect::<Result<_>>()?;
        sums = Some(match sums {
            None => per_layer,
            Some(s) => s
                .iter()
                .zip(&per_layer)
                .map(|(a, b)| Ok((a + b)?))
                .collect::<Result<_>>()?,
        });
    }
    let n = prompts.len() as f64;
    sums.unwrap_or_default()
        .into_iter()
        .map(|s| Ok((s / n)?))
        .collect()
}

/// Unit refusal direction at one readout: `normalize(mean_harmful - mean_harmless)`.
pub fn direction(harmful: &Tensor, harmless: &Tensor) -> Result<Tensor> {
    let d = (harmful - harmless)?;
    let norm = d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if !(norm > 0.0 && norm.is_finite()) {
        return Err(Error::msg(
            "the harmful and harmless means coincide at this layer: no direction to ablate",
        ));
    }
    Ok((d / norm as f64)?)
}

/// Project the unit vector `r [d]` out of every matrix (and bias) that writes into the residual
/// stream, in place.
pub fn orthogonalize(params: &Params, num_layers: usize, r: &Tensor) -> Result<()> {
    let rc = r.unsqueeze(1)?; // [d, 1]
    let rr = r.unsqueeze(0)?; // [1, d]
                              // Embedding [V, d]: E - (E r) r^T.
    let e = params
        .get("model.embed_tokens.weight")
        .ok_or_else(|| Error::msg("parameter `model.embed_tokens.weight` is missing"))?;
    let er = e.as_tensor().matmul(&rc)?; // [V, 1]
    e.set(&(e.as_tensor() - er.matmul(&rr)?)?)?;
    // Output maps [d, in]: W - r (r^T W); biases [d]: b - r (r . b).
    let writers = [PROJECTIONS[3], PROJECTIONS[6]];
    for l in 0..num_layers {
        for w in writers {
            let name = format!("model.layers.{l}.{w}.weight");
            let v = params
                .get(&name)
                .ok_or_else(|| Error::msg(format!("parameter `{name}` is missing")))?;
            let rw = rr.matmul(v.as_tensor())?; // [1, in]
            v.set(&(v.as_tensor() - rc.matmul(&rw)?)?)?;
            if let Some(b) = params.get(&format!("model.layers.{l}.{w}.bias")) {
                let dot = (b.as_tensor() * r)?.sum_all()?;
                b.set(&(b.as_tensor() - r.broadcast_mul(&dot)?)?)?;
            }
        }
    }
    Ok(())
}

/// One candidate layer's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Candidate {
    pub layer: usize,
    /// Norm of `mean_harmful - mean_harmless` at that readout.
    pub mean_difference_norm: f64,
    /// Refusal rate on the validation prompts with that direction ablated (`None`: not tried).
    pub refusal_rate: Option<f64>,
}

/// What [`abliterate`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AbliterateReport {
    pub layer: usize,
    pub refusal_rate_before: Option<f64>,
    pub candidates: Vec<Candidate>,
    pub harmful_prompts: usize,
    pub harmless_prompts: usize,
    pub select_prompts: usize,
}

/// Abliterate `model` in place. `harmful` supplies the means' prompts then the validation
/// prompts (`cfg.prompts + cfg.select_prompts`); `harmless` the means' harmless prompts.
pub fn abliterate(
    model: &mut LoadedModel,
    harmful: &[String],
    harmless: &[String],
    format: PromptFormat,
    check: &RefusalCheck,
    cfg: &AbliterateConfig,
) -> Result<(AbliterateReport, Tensor)> {
    let n_mean = cfg.prompts.min(harmful.len()).min(harmless.len());
    if n_mean == 0 {
        return Err(Error::msg(
            "abliteration needs harmful and harmless prompts",
        ));
    }
    let mean_h = &harmful[..n_mean];
    let select: Vec<String> = harmful[n_mean..]
        .iter()
        .take(cfg.select_prompts)
        .cloned()
        .collect();
    let net = Llama::frozen(&model.config, &model.params)?;
    let a = mean_last_token_states(&net, &model.tok, mean_h, format, cfg.batch)?;
    let b = mean_last_token_states(&net, &model.tok, &harmless[..n_mean], format, cfg.batch)?;
    let norms: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| Ok((x - y)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64))
        .collect::<Result<_>>()?;
    let nl = model.config.num_layers;
    let rate = |net: &Llama| -> Result<f64> {
        let ans = crate::eval::answer::answer_prompts(
            net,
            &model.tok,
            &select,
            format,
            cfg.select_tokens,
            cfg.batch,
            "abliteration: choosing the layer",
        )?;
        Ok(check.rate(&ans))
    };
    let mut candidates: Vec<Candidate> = vec![];
    let mut before = None;
    let layer = match cfg.layer {
        Some(l) => {
            if l > nl {
                return Err(Error::setting(
                    "abliterate.layer",
                    l,
                    format!("the model has readouts 0..={nl}"),
                ));
            }
            l
        }
        None => {
            if select.is_empty() {
                return Err(Error::msg(
                    "choosing the abliteration layer needs validation prompts beyond the means' \
                     prompts; give more harmful prompts or set abliterate.layer",
                ));
            }
            before = Some(rate(&net)?);
            let mut layers: Vec<usize> = cfg
                .candidates
                .iter()
                .map(|f| ((f * nl as f64).round() as usize).clamp(1, nl))
                .collect();
            layers.dedup();
            let mut best: Option<(f64, usize)> = None;
            for l in layers {
                let trial = model.params.deep_clone()?;
                orthogonalize(&trial, nl, &direction(&a[l], &b[l])?)?;
                let r = rate(&Llama::frozen(&model.config, &trial)?)?;
                eprintln!("abliteration: layer {l}: refusal rate {r:.3}");
                candidates.push(Candidate {
                    layer: l,
                    mean_difference_norm: norms[l],
                    refusal_rate: Some(r),
                });
                if best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, l));
                }
            }
            best.map(|(_, l)| l).unwrap_or(nl / 2)
        }
    };
    drop(net);
    let dir = direction(&a[layer], &b[layer])?;
    orthogonalize(&model.params, nl, &dir)?;
    Ok((
        AbliterateReport {
            layer,
            refusal_rate_before: before,
            candidates,
            harmful_prompts: n_mean,
            harmless_prompts: n_mean,
            select_prompts: select.len(),
        },
        dir,
    ))
}
