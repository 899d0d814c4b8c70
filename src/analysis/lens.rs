//! Encoding the analysed pairs and the forward passes over them: the logit lens (mean
//! log-probability of the answer tokens read out at every layer) and mean activations per layer.

use super::*;
use crate::util::error::check_at_least_one;

/// Harmful (prompt + harmful answer) and harmless (prompt + harmless answer) samples of the same
/// pairs, each with its answer-token mask.
#[derive(Clone, Debug)]
pub struct Samples {
    pub harmful: Vec<Encoded>,
    pub harmless: Vec<Encoded>,
}

/// At most `limit` pairs (0: all), chosen by a shuffle seeded by `seed`, kept in file order.
pub fn select_pairs(pairs: &[Pair], limit: usize, seed: u64) -> Vec<Pair> {
    Rng::new(seed, "analysis-sample").subset(pairs, limit)
}

/// Tokenise each pair twice, as the attack tokenises QA pairs ([`encode_sft`]: chat template or
/// plain format, answer-only mask, at most `max_len` tokens). A sample whose answer is cut off
/// entirely by `max_len` is left out.
pub fn encode_samples(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
) -> Result<Samples> {
    let side = |f: fn(&Pair) -> &String| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|p| (p.prompt.clone(), f(p).clone()))
            .collect()
    };
    let encode = |what: &str, qa: Vec<(String, String)>| {
        encode_sft(model, &qa, format, max_len, false)
            .map_err(|e| Error::msg(format!("{what} samples ({format:?} format): {e}")))
    };
    Ok(Samples {
        harmful: encode("harmful", side(|p| &p.harmful))?,
        harmless: encode("harmless", side(|p| &p.harmless))?,
    })
}

pub(super) fn check_batch_size(batch_size: usize) -> Result<()> {
    check_at_least_one("batch_size", batch_size)
}

/// Logit lens: the mean log-probability of the answer tokens (the tokens the SFT loss is taken
/// on) when each hidden state is read out through the final norm and the LM head, averaged over
/// every answer token of `seqs`. One value per hidden state: `[0]` reads the embeddings, `[i]`
/// the residual after layer `i`; the last equals minus the model's own SFT loss on `seqs`.
pub fn logit_lens(model: &LoadedModel, seqs: &[Encoded], batch_size: usize) -> Result<Vec<f64>> {
    check_batch_size(batch_size)?;
    let net = Llama::frozen(&model.config, &model.params)?;
    let n_states = model.config.num_layers + 1;
    let mut sums = vec![0f64; n_states];
    let mut tokens = 0usize;
    for chunk in seqs.chunks(batch_size) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.tok.pad_id, net.device())?;
        let (_, t) = batch.dims();
        let rows = CeRows::standard(&batch.ids_v, &answer_masks(&refs, t, false));
        let n = rows.count();
        if n == 0 {
            continue;
        }
        let out = batch.forward(&net, true, false)?;
        for (s, h) in sums.iter_mut().zip(&out.hidden_states) {
            let ce = rows.ce(&net, h, false)?.to_dtype(candle_core::DType::F64)?;
            *s -= ce.to_scalar::<f64>()? * n as f64;
        }
        tokens += n;
    }
    if tokens == 0 {
        return Err(Error::msg(
            "logit lens: no answer token to score (every answer was cut off or empty)",
        ));
    }
    Ok(sums.into_iter().map(|s| s / tokens as f64).collect())
}

/// Which tokens a sequence's activations are averaged over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// The answer tokens (the loss mask).
    #[default]
    Answer,
    /// Every real (non-padding) token, prompt and template included.
    All,
}

/// The mean residual-stream activation of each sequence over its `pool` tokens, per hidden
/// state: `[layer][sample][dim]`. `layer = None` gives every hidden state (`num_layers + 1`
/// entries, `[0]` the embeddings); `Some(l)` gives the one entry for hidden state `l`.
pub fn mean_activations(
    model: &LoadedModel,
    seqs: &[Encoded],
    layer: Option<usize>,
    pool: Pool,
    batch_size: usize,
) -> Result<Vec<Vec<Vec<f32>>>> {
    check_batch_size(batch_size)?;
    let n_states = model.config.num_layers + 1;
    let wanted: Vec<usize> = match layer {
        None => (0..n_states).collect(),
        Some(l) if l < n_states => vec![l],
        Some(l) => {
            return Err(Error::setting(
                "layer",
                l,
                format!("the model has hidden states 0..={}", n_states - 1),
            ))
        }
    };
    let net = Llama::frozen(&model.config, &model.params)?;
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(seqs.len()); wanted.len()];
    for (c, chunk) in seqs.chunks(batch_size).enumerate() {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.tok.pad_id, net.device())?;
        let (b, t) = batch.dims();
        let sel = match pool {
            Pool::Answer => answer_masks(&refs, t, false),
            Pool::All => batch.real.clone(),
        };
        let mut weights = Vec::with_capacity(b * t);
        for (r, m) in sel.iter().enumerate() {
            let k = m.iter().filter(|&&x| x == 1).count();
            if k == 0 {
                return Err(Error::msg(format!(
                    "sample {} has no {} token to average over",
                    c * batch_size + r + 1,
                    if pool == Pool::Answer {
                        "answer"
                    } else {
                        "real"
                    }
                )));
            }
            weights.extend(m.iter().map(|&x| x as f32 / k as f32));
        }
        let w = Tensor::from_vec(weights, (b, t, 1), net.device())?;
        let fwd = batch.forward(&net, true, false)?;
        for (slot, &l) in out.iter_mut().zip(&wanted) {
            let h = &fwd.hidden_states[l]; // [b, t, d]
            let mean = h.broadcast_mul(&w)?.sum(D::Minus2)?; // [b, d]
            slot.extend(mean.to_vec2::<f32>()?);
        }
    }
    Ok(out)
}
