//! Language-modelling losses shared by alignment, defences and attacks.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Next-token cross-entropy averaged over the positions where `mask` is 1.
///
/// * `logits`: `[b, t, vocab]`; position `i` predicts token `i + 1`.
/// * `ids`: `[b, t]` u32.
/// * `mask`: `[b, t]` f32, 1 on the tokens to be predicted (e.g. the answer), read at the
///   *target* position: `mask[:, 0]` is never used.
pub fn masked_next_token_ce(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(Error::msg("need at least two tokens for a next-token loss"));
    }
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?; // [n, vocab]
    let target = ids.narrow(1, 1, t - 1)?.reshape((b * (t - 1), 1))?; // [n, 1]
    let w = mask.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?; // [n]
    let lp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let picked = lp.gather(&target, 1)?.squeeze(1)?; // [n]
    let denom = w.sum_all()?.to_scalar::<f32>()?;
    if denom <= 0.0 {
        return Err(Error::msg("the loss mask selects no tokens"));
    }
    Ok(((picked * &w)?.sum_all()?.neg()? / denom as f64)?)
}
