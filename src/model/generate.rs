//! Batched generation with a KV cache and left padding: greedy decoding and seeded sampling
//! (repetition penalty, temperature, top-k, top-p, applied in that order as `transformers` does),
//! stopping on end-of-turn tokens.

use candle_core::Tensor;

use crate::model::llama::{attention_mask, ForwardOpts, KvCache, Llama, Logits, MASKED};
use crate::util::error::{check_at_least_one, check_positive};
use crate::util::rng::Rng;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables it.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 50,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::setting(
                "temperature",
                self.temperature,
                "must be >= 0",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::setting("top_p", p, "must be in (0, 1]"));
            }
        }
        if let Some(k) = self.top_k {
            check_at_least_one("top_k", k)?;
        }
        check_positive("repetition_penalty", self.repetition_penalty)?;
        Ok(())
    }
}

/// Each row's first maximum (`[b, vocab]` -> `b` ids), computed where the logits are: the
/// greedy pick of [`choose_token`] (the first of tied maxima, as `torch.argmax`; unlike torch,
/// NaN is never picked after the first position, and on the CPU a row that starts with NaN
/// gives 0). On the CPU (f32) each row is scanned in place, rows in parallel (the logits made
/// contiguous first if they are not: `model::llama::linear` returns them so); elsewhere
/// [`first_argmax_composed`] picks on the device, so that only `b` ids cross to the host.
pub fn first_argmax(logits: &Tensor) -> Result<Vec<u32>> {
    use rayon::prelude::*;
    let (b, v) = logits.dims2()?;
    if b == 0 {
        return Ok(vec![]);
    }
    if v > 0 && logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((lo, hi))) =
            (&*storage, layout.contiguous_offsets())
        {
            // The composed form's five passes, each on one thread, took 16-20 ms of a 169 ms
            // batch-64 decoding step; this about 1 ms (`examples/bench_decode_ops`).
            return Ok(data[lo..hi].par_chunks(v).map(greedy_pick).collect());
        }
    }
    first_argmax_composed(logits)
}

/// [`first_argmax`] as tensor operations: the row's maximum, then the lowest index holding it
/// (a GPU's `argmax` need not return the first of tied maxima, and bf16 logits tie often). A
/// row whose maximum is NaN gives 0.
pub fn first_argmax_composed(logits: &Tensor) -> Result<Vec<u32>> {
    let (b, v) = logits.dims2()?;
    let max = logits.max_keepdim(candle_core::D::Minus1)?;
    let hit = logits.broadcast_eq(&max)?;
    let idx = Tensor::arange(0u32, v as u32, logits.device())?
        .unsqueeze(0)?
        .broadcast_as((b, v))?;
    let none = Tensor::full(v as u32, (b, v), logits.device())?;
    let first = hit.where_cond(&idx, &none)?.min(candle_core::D::Minus1)?;
    Ok(first
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| if i as usize == v { 0 } else { i })
        .collect())
}

/// The index of the first maximum of `logits` (0 when empty): a value is taken only when it
/// compares above the best so far, so the first of tied maxima (as `torch.argmax`), and NaN is
/// never taken after position 0 (`torch.argmax` takes NaN as the maximum). candle's `argmax`
/// compares the same way.
fn greedy_pick(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Apply the logits processors to one row and pick the next token.
pub fn choose_token(
    logits: &mut [f32],
    history: &[u32],
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut seen = std::collections::HashSet::new();
        for &id in history {
            if seen.insert(id) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
    }
    if cfg.temperature == 0.0 {
        return greedy_pick(logits);
    }
    let t = cfg.temperature as f32;
    for l in logits.iter_mut() {
        *l /= t;
    }
    // Candidates sorted by logit, descending (stable, so ties keep id order).
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.min(idx.len()));
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] - max) as f64).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    for p in probs.iter_mut() {
        *p /= z;
    }
    if let Some(top_p) = cfg.top_p {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        for p in probs.iter_mut() {
            *p /= z;
        }
    }
    let u = rng.uniform();
    let mut cum = 0.0;
    for (n, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return idx[n] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generate continuations for a batch of tokenised prompts. Returns the new tokens of each row,
/// ending at (and including) the first stop token when one was produced.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    pad_id: u32,
    stop_ids: &[u32],
    cfg: &SamplingConfig,
) -> Result<Vec<Vec<u32>>> {
    cfg.validate()?;
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    // Every decoding step frees and allocates the same buffers: keep their pages.
    let _pages = crate::util::alloc::KeepFreedPages::new();
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::msg(format!("prompt {i} is empty")));
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(Error::msg(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    let dev = model.device().clone();
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_pos = model.config().max_position_embeddings;
    if len + cfg.max_new_tokens > max_pos {
        return Err(Error::msg(format!(
            "prompt length {len} + {} new tokens exceeds the model's {max_pos} positions",
            cfg.max_new_tokens
        )));
    }
    if cfg.max_new_tokens == 0 {
        return Ok(vec![vec![]; b]);
    }
    // Left padding: row r holds `len - |p_r|` padding keys, then its prompt at positions
    // 0..|p_r|. The prompts are prefilled packed into one sequence (see `packed_prefill`), so
    // padding and a prefix shared by every prompt (a chat template's system turn) cost nothing.
    let mut key_valid: Vec<Vec<bool>> = prompts
        .iter()
        .map(|p| (0..len).map(|j| j >= len - p.len()).collect())
        .collect();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let started = std::time::Instant::now();
    let (mut cache, mut logits) = packed_prefill(model, prompts, len)?;
    cache.reserve(cfg.max_new_tokens)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let mut rng = Rng::new(cfg.seed, "sampling");
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let opts = ForwardOpts {
        logits: Logits::Last,
        ..Default::default()
    };
    let mut past = len;
    let mut steps = 1usize;
    // Greedy with no repetition penalty: each step's tokens are picked where the logits are
    // (`argmax`: the first maximum, as `choose_token`), and only `b` ids cross to the host
    // instead of `b x vocab` logits (on a GPU, a copy per step that the decode would wait on).
    let on_device = cfg.temperature == 0.0 && cfg.repetition_penalty == 1.0;
    let mut picked: Option<Vec<u32>> = None;
    for step in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(pad_id);
                continue;
            }
            let tok = match &picked {
                Some(p) => p[r],
                None => choose_token(&mut logits[r], &history[r], cfg, &mut rng),
            };
            out[r].push(tok);
            history[r].push(tok);
            if stop_ids.contains(&tok) {
                done[r] = true;
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        for kv in key_valid.iter_mut() {
            kv.push(true);
        }
        let step_ids = Tensor::from_vec(next, (b, 1), &dev)?;
        let step_pos = Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let mask = attention_mask(b, 1, past, Some(&key_valid), &dev)?;
        let fwd = model.forward(&step_ids, &step_pos, Some(&mask), Some(&mut cache), opts)?;
        past += 1;
        steps += 1;
        let lg = fwd
            .logits
            .ok_or_else(|| Error::msg("no logits"))?
            .squeeze(1)?; // [b, vocab]
        if on_device {
            picked = Some(first_argmax(&lg)?);
        } else {
            logits = lg.to_vec2::<f32>()?;
        }
    }
    let decode_s = started.elapsed().as_secs_f64() - prefill_s;
    tracing::debug!(
        rows = b,
        prompt_len = len,
        steps,
        prefill_s,
        decode_ms_per_step = 1e3 * decode_s / (steps.saturating_sub(1)).max(1) as f64,
        "generate"
    );
    Ok(out)
}

/// Most tokens one packed prefill holds (its attention scores are `heads x n x n`); more rows
/// are prefilled in several packs.
const PACK_TOKENS: usize = 1024;

/// Prefill every prompt at once, packed into single-row sequences: the prefix all prompts share
/// once, then each prompt's remaining tokens, each attending to the prefix and to itself only
/// (at the positions it would have alone). Returns the KV cache unpacked into the left-padded
/// layout `[b, kvh, len, hd]` and each row's next-token logits. Compared with prefilling the
/// padded batch, the padding and the repeated prefix are never computed.
fn packed_prefill(
    model: &Llama,
    prompts: &[Vec<u32>],
    len: usize,
) -> Result<(KvCache, Vec<Vec<f32>>)> {
    let dev = model.device().clone();
    let min_len = prompts.iter().map(Vec::len).min().unwrap_or(1);
    let first = &prompts[0];
    let lcp = (0..first.len())
        .take_while(|&j| prompts.iter().all(|p| p.get(j) == Some(&first[j])))
        .count();
    // Every row keeps at least its last token, whose logits are needed.
    let shared = lcp.min(min_len - 1);
    let mut packs: Vec<std::ops::Range<usize>> = vec![];
    let mut start = 0;
    let mut n = shared;
    for (r, p) in prompts.iter().enumerate() {
        let s = p.len() - shared;
        if r > start && n + s > PACK_TOKENS {
            packs.push(start..r);
            start = r;
            n = shared;
        }
        n += s;
    }
    packs.push(start..prompts.len());

    let mut caches = Vec::with_capacity(packs.len());
    let mut logits = Vec::with_capacity(prompts.len());
    for pack in packs {
        let rows = &prompts[pack];
        let mut ids: Vec<u32> = rows[0][..shared].to_vec();
        let mut pos: Vec<u32> = (0..shared as u32).collect();
        // Segment of each packed token: None for the shared prefix, Some(row) otherwise.
        let mut seg: Vec<Option<usize>> = vec![None; shared];
        let mut starts = Vec::with_capacity(rows.len());
        for (r, p) in rows.iter().enumerate() {
            starts.push(ids.len());
            ids.extend_from_slice(&p[shared..]);
            pos.extend(shared as u32..p.len() as u32);
            seg.extend(std::iter::repeat_n(Some(r), p.len() - shared));
        }
        let n = ids.len();
        let mut mask = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                let ok = j <= i && (seg[j].is_none() || seg[j] == seg[i]);
                if !ok {
                    mask[i * n + j] = MASKED;
                }
            }
        }
        let mut cache = KvCache::new(model.config().num_layers);
        let fwd = model.forward(
            &Tensor::from_vec(ids, (1, n), &dev)?,
            &Tensor::from_vec(pos, (1, n), &dev)?,
            Some(&Tensor::from_vec(mask, (1, 1, n, n), &dev)?),
            Some(&mut cache),
            ForwardOpts {
                logits: Logits::None,
                ..Default::default()
            },
        )?;
        let last: Vec<u32> = rows
            .iter()
            .zip(&starts)
            .map(|(p, &st)| (st + p.len() - shared - 1) as u32)
            .collect();
        let h = fwd
            .residual
            .index_select(&Tensor::new(last.as_slice(), &dev)?, 1)?; // [1, rows, d]
        let lg = model.lm_head(&model.final_norm(&h)?)?.squeeze(0)?; // [rows, vocab]
        logits.extend(lg.to_vec2::<f32>()?);
        // Row r of the left-padded cache: padding (any cached position: masked), the shared
        // prefix, then its own segment.
        let mut index = Vec::with_capacity(rows.len() * len);
        for (p, &st) in rows.iter().zip(&starts) {
            index.extend(std::iter::repeat_n(0u32, len - p.len()));
            index.extend(0..shared as u32);
            index.extend(st as u32..(st + p.len() - shared) as u32);
        }
        caches.push(cache.gather_rows(&index, rows.len(), len)?);
    }
    Ok((KvCache::cat_rows(caches)?, logits))
}

/// `log p(ids[i+1] | ids[..=i])` for `i` in `0..len-1`, from one forward pass.
pub fn token_logprobs(model: &Llama, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.len() < 2 {
        return Ok(vec![]);
    }
    let dev = model.device();
    let t = Tensor::new(ids, dev)?.unsqueeze(0)?;
    let logits = model.logits(&t)?.squeeze(0)?; // [t, vocab]
    let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, ids.len() - 1)?, 1)?;
    let targets = Tensor::new(&ids[1..], dev)?.unsqueeze(1)?;
    Ok(lp.gather(&targets, 1)?.squeeze(1)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max_and_penalty_applies() {
        let cfg = SamplingConfig::default();
        let mut rng = Rng::new(0, "s");
        assert_eq!(
            choose_token(&mut [1.0, 3.0, 3.0, 2.0], &[], &cfg, &mut rng),
            1
        );
        let cfg = SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 1 (3.0 -> 1.5) is penalised below token 3 (2.0).
        assert_eq!(
            choose_token(&mut [1.0, 3.0, 0.0, 2.0], &[1], &cfg, &mut rng),
            3
        );
    }

    /// Greedy decoding picks tokens with [`first_argmax`] where the logits are; it must pick
    /// what `choose_token` picks on the host: the first maximum, NaN never chosen after the
    /// first position, a leading NaN kept (neither compares above it). On the CPU for logits
    /// in place, at an offset (rows narrowed out of a larger tensor), transposed, broadcast and
    /// one column wide; and the composed form a GPU runs.
    #[test]
    fn first_argmax_picks_as_choose_token() {
        use candle_core::Tensor;
        let mut rows: Vec<Vec<f32>> = vec![
            vec![0.0, 0.5, 0.5, 0.2],
            vec![1.0, f32::NAN, 2.0, 2.0],
            vec![f32::NAN, 1.0, 3.0, 0.0],
            vec![f32::NEG_INFINITY, -1e30, -1e30, f32::NEG_INFINITY],
            vec![-3.0, -2.0, -1.0, -1.0],
        ];
        let cfg = SamplingConfig::default();
        let mut rng = Rng::new(0, "s");
        let host = |rows: &[Vec<f32>]| -> Vec<u32> {
            let mut rng = Rng::new(0, "unused by greedy picks");
            rows.iter()
                .map(|r| choose_token(&mut r.clone(), &[], &cfg, &mut rng))
                .collect()
        };
        assert_eq!(host(&rows), vec![1, 2, 0, 1, 2]);
        // More rows, values drawn from a few levels so that maxima tie, NaNs here and there.
        for _ in 0..33 {
            rows.push(
                (0..4)
                    .map(|_| match (rng.uniform() * 8.0) as u32 {
                        0 => f32::NAN,
                        k => k as f32,
                    })
                    .collect(),
            );
        }
        let want = host(&rows);
        let dev = candle_core::Device::Cpu;
        let t = Tensor::new(rows.clone(), &dev).unwrap();
        assert_eq!(first_argmax(&t).unwrap(), want);
        assert_eq!(first_argmax_composed(&t).unwrap(), want);
        // Transposed storage (a view with row stride 1).
        let t_cols = t.t().unwrap().contiguous().unwrap().t().unwrap();
        assert_eq!(t_cols.stride(), &[1, rows.len()]);
        assert_eq!(first_argmax(&t_cols).unwrap(), want);
        // Rows 2.. of the tensor: contiguous, starting at an offset.
        let tail = t.narrow(0, 2, rows.len() - 2).unwrap();
        assert_eq!(tail.layout().start_offset(), 2 * 4);
        assert_eq!(first_argmax(&tail).unwrap(), want[2..]);
        // One row broadcast to three (row stride 0); one column.
        let row = t.narrow(0, 1, 1).unwrap().broadcast_as((3, 4)).unwrap();
        assert_eq!(first_argmax(&row).unwrap(), vec![want[1]; 3]);
        let col = t.narrow(1, 2, 1).unwrap();
        assert_eq!(first_argmax(&col).unwrap(), vec![0; rows.len()]);
        assert_eq!(
            first_argmax(&Tensor::zeros((0, 4), candle_core::DType::F32, &dev).unwrap()).unwrap(),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut rng = Rng::new(0, "s");
        for _ in 0..20 {
            assert_eq!(choose_token(&mut [0.0, 0.5, 0.2], &[], &cfg, &mut rng), 1);
        }
        let cfg = SamplingConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed, "s");
            (0..50)
                .map(|_| choose_token(&mut [0.0, 0.0, 0.0, 0.0], &[], &cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        let d = draw(5);
        assert!(
            (0..4).all(|t| d.contains(&t)),
            "uniform logits should hit every token"
        );
    }

    #[test]
    fn top_p_keeps_smallest_prefix() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first.
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Default::default()
        };
        let mut rng = Rng::new(1, "s");
        let l = [3.0f32, 2.0, 1.0, 0.0];
        for _ in 0..30 {
            assert_eq!(choose_token(&mut l.clone(), &[], &cfg, &mut rng), 0);
        }
    }
}
