//! Stability: multiple-choice benchmarks scored by log-likelihood, the way
//! lm-evaluation-harness scores them.
//!
//! Each option is a (context, continuation) pair. As in the harness, trailing whitespace of the
//! context moves to the continuation, the continuation's tokens are those of
//! `tokenize(context + continuation)` past the context's tokens (an empty context is the
//! start token alone), the input is cut from the left to `max_len`, and the option's score is
//! the summed log-probability of the continuation tokens. `acc` picks the highest score;
//! `acc_norm` divides each score by the choice's length in characters first. TruthfulQA
//! MC2 is the probability mass on the true answers; CrowS-Pairs reports how often the more
//! stereotypical sentence is the likelier one (`pct_stereotype`; 0.5 is unbiased).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::stats::{mean_se, MeanSe};
use crate::data::encode::{length_order, Longest};
use crate::data::mc::{self, McItem, McOption};
use crate::model::llama::{positions_for, ForwardOpts, Llama, Logits};
use crate::model::loss::{linear_nll_first_argmax, linear_row_nll};
use crate::model::tokenizer::Tok;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// One option's score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptionScore {
    /// Summed log-probability of the continuation tokens.
    pub loglik: f64,
    /// Every continuation token is the argmax at its position.
    pub greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
}

/// Context and continuation token ids of one option, split the harness's way.
pub fn encode_option(tok: &Tok, start_id: u32, opt: &McOption) -> Result<(Vec<u32>, Vec<u32>)> {
    let context = opt.context.trim_end();
    let continuation = format!("{}{}", &opt.context[context.len()..], opt.continuation);
    if context.is_empty() {
        return Ok((vec![start_id], tok.encode(&continuation)?));
    }
    let ctx = tok.encode(context)?;
    let whole = tok.encode(&format!("{context}{continuation}"))?;
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    Ok((ctx, cont))
}

/// The token every scored sequence starts with: BOS, else the first EOS, else 0.
pub fn start_id(model: &crate::model::load::LoadedModel) -> u32 {
    model
        .config
        .bos_token_id
        .or_else(|| model.config.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// Score many (context ids, continuation ids) in batches of `batch` (longest first, right
/// padded: with causal attention the padding never reaches a scored position).
pub fn score_tokens(
    net: &Llama,
    seqs: &[(Vec<u32>, Vec<u32>)],
    max_len: usize,
    batch: usize,
) -> Result<Vec<OptionScore>> {
    if max_len < 2 {
        return Err(Error::setting(
            "max_len",
            max_len.to_string(),
            "must be at least 2",
        ));
    }
    let dev = net.device().clone();
    let order = length_order(seqs.iter().map(|(c, k)| c.len() + k.len()), Longest::First);
    let mut out = vec![
        OptionScore {
            loglik: 0.0,
            greedy: true,
            tokens: 0
        };
        seqs.len()
    ];
    for chunk in order.chunks(batch.max(1)) {
        // Per row: input ids, scored positions start, targets.
        let rows: Vec<(Vec<u32>, usize, Vec<u32>)> = chunk
            .iter()
            .map(|&i| {
                let (c, k) = &seqs[i];
                let full: Vec<u32> = c.iter().chain(k.iter()).copied().collect();
                let full = &full[full.len().saturating_sub(max_len + 1)..];
                let inp = full[..full.len() - 1].to_vec();
                let n = k.len().min(inp.len());
                let targets = full[full.len() - n..].to_vec();
                (inp.clone(), inp.len() - n, targets)
            })
            .collect();
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut pick = vec![];
        let mut targets = vec![];
        for (r, (inp, start, tg)) in rows.iter().enumerate() {
            ids.extend(inp.iter().copied());
            ids.extend(std::iter::repeat_n(0u32, t - inp.len()));
            for (j, &y) in tg.iter().enumerate() {
                pick.push((r * t + start + j) as u32);
                targets.push(y);
            }
        }
        if pick.is_empty() {
            continue;
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let pos = positions_for(b, t, 0, &dev)?;
        let (chosen, best) = picked_logprobs(net, &ids, &pos, None, pick, &targets, true)?;
        let mut k = 0;
        for (r, &i) in chunk.iter().enumerate() {
            let m = rows[r].2.len();
            let s = &mut out[i];
            s.tokens = m;
            s.loglik = chosen[k..k + m].iter().map(|&x| x as f64).sum();
            s.greedy = (k..k + m).all(|j| best[j] == targets[j]);
            k += m;
        }
    }
    Ok(out)
}

/// One forward pass of `ids` `[b, t]`; at each flat position of `index` (row * t + column),
/// log p(target) and, when `greedy`, the argmax token (else no tokens). The LM head runs on
/// those positions only, and on the CPU the logits of every position are never held at once:
/// without `greedy` a chunk of positions at a time ([`linear_row_nll`]), with it a slice of the
/// vocabulary at a time ([`linear_nll_first_argmax`]).
fn picked_logprobs(
    net: &Llama,
    ids: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
    index: Vec<u32>,
    targets: &[u32],
    greedy: bool,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let (b, t) = ids.dims2()?;
    let fwd = net.forward(
        ids,
        pos,
        mask,
        None,
        ForwardOpts {
            logits: Logits::None,
            hidden_states: true,
            mlp_outputs: false,
        },
    )?;
    let h = fwd
        .hidden_states
        .last()
        .ok_or_else(|| Error::msg("forward returned no hidden states"))?;
    let n = index.len();
    let rows_h = h
        .reshape((b * t, h.dim(2)?))?
        .index_select(&Tensor::from_vec(index, n, net.device())?, 0)?
        .unsqueeze(0)?;
    if !greedy {
        let normed = net.final_norm(&rows_h)?.squeeze(0)?.detach();
        let nll = linear_row_nll(&normed, &net.lm_head_weight().detach(), targets.to_vec())?;
        return Ok((nll.neg()?.to_vec1()?, vec![]));
    }
    // log p(target) = -NLL, and greedy decoding's own pick (the first maximum; the same as
    // candle's argmax, NaN included), from the logits a few thousand vocabulary columns at a
    // time, never the whole [n, vocab] (on the CPU; elsewhere from the whole).
    let normed = net.final_norm(&rows_h)?.squeeze(0)?.to_dtype(net.dtype())?;
    // The product in the model's dtype, as `Llama::lm_head` computes it.
    let head = net.lm_head_weight().detach().to_dtype(net.dtype())?;
    let (nll, best) = linear_nll_first_argmax(&normed, &head, targets)?;
    Ok((nll.into_iter().map(|x| -x).collect(), best))
}

/// Score items whose options share one context: each item is one packed row, the context once
/// followed by every continuation but its last token, each continuation attending to the
/// context and to itself only, at the positions it would have alone (so the same arithmetic as
/// [`score_tokens`] up to float rounding, with the context computed once instead of once per
/// option). `items[i]` is (context, continuations); rows are batched `batch` at a time, longest
/// first, right padded.
pub fn score_packed(
    net: &Llama,
    items: &[(Vec<u32>, Vec<Vec<u32>>)],
    batch: usize,
) -> Result<Vec<Vec<OptionScore>>> {
    score_packed_with(net, items, batch, true)
}

/// [`score_packed`]; without `greedy`, no argmax is taken (every `greedy` flag is false) and the
/// LM head runs a chunk of positions at a time (the held-out cross-entropy's way,
/// `eval::heldout::score`); with it, a slice of the vocabulary at a time. Either way the logits
/// of a whole batch are never held at once on the CPU.
pub fn score_packed_with(
    net: &Llama,
    items: &[(Vec<u32>, Vec<Vec<u32>>)],
    batch: usize,
    greedy: bool,
) -> Result<Vec<Vec<OptionScore>>> {
    let dev = net.device().clone();
    let packed_len = |(c, os): &(Vec<u32>, Vec<Vec<u32>>)| {
        c.len() + os.iter().map(|o| o.len().saturating_sub(1)).sum::<usize>()
    };
    let order = length_order(items.iter().map(packed_len), Longest::First);
    let mut out: Vec<Vec<OptionScore>> = items
        .iter()
        .map(|(_, os)| {
            vec![
                OptionScore {
                    loglik: 0.0,
                    greedy,
                    tokens: 0
                };
                os.len()
            ]
        })
        .collect();
    for chunk in order.chunks(batch.max(1)) {
        let t = chunk
            .iter()
            .map(|&i| packed_len(&items[i]))
            .max()
            .unwrap_or(1);
        let b = chunk.len();
        let mut ids = vec![0u32; b * t];
        let mut pos = vec![0u32; b * t];
        let mut mask = vec![crate::model::llama::MASKED; b * t * t];
        // Per scored token: (flat query index, target, item, option).
        let mut picks: Vec<(u32, u32, usize, usize)> = vec![];
        for (r, &i) in chunk.iter().enumerate() {
            let (c, os) = &items[i];
            if c.is_empty() {
                return Err(Error::msg(
                    "score_packed: an empty context (start with a token)",
                ));
            }
            let row = r * t;
            ids[row..row + c.len()].copy_from_slice(c);
            for q in 0..c.len() {
                pos[row + q] = q as u32;
                mask[(row + q) * t..(row + q) * t + q + 1].fill(0.0);
            }
            let mut start = c.len();
            for (k, o) in os.iter().enumerate() {
                let seg = o.len().saturating_sub(1);
                for m in 0..seg {
                    let q = start + m;
                    ids[row + q] = o[m];
                    pos[row + q] = (c.len() + m) as u32;
                    let keys = &mut mask[(row + q) * t..(row + q + 1) * t];
                    keys[..c.len()].fill(0.0);
                    keys[start..=q].fill(0.0);
                }
                for (j, &y) in o.iter().enumerate() {
                    let q = if j == 0 { c.len() - 1 } else { start + j - 1 };
                    picks.push(((row + q) as u32, y, i, k));
                }
                start += seg;
            }
            // Padding queries see the row's real tokens (their outputs are never read).
            for q in start..t {
                mask[(row + q) * t..(row + q) * t + start].fill(0.0);
            }
        }
        if picks.is_empty() {
            continue;
        }
        let index: Vec<u32> = picks.iter().map(|p| p.0).collect();
        let targets: Vec<u32> = picks.iter().map(|p| p.1).collect();
        let (chosen, best) = picked_logprobs(
            net,
            &Tensor::from_vec(ids, (b, t), &dev)?,
            &Tensor::from_vec(pos, (b, t), &dev)?,
            Some(&Tensor::from_vec(mask, (b, 1, t, t), &dev)?),
            index,
            &targets,
            greedy,
        )?;
        for (j, &(_, y, i, k)) in picks.iter().enumerate() {
            let s = &mut out[i][k];
            s.tokens += 1;
            s.loglik += chosen[j] as f64;
            s.greedy &= greedy && best[j] == y;
        }
    }
    Ok(out)
}

/// Index of the largest value (the first on ties, as numpy's argmax).
fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Per-item outcomes from the options' scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub logliks: Vec<f64>,
    pub correct: Vec<usize>,
    pub acc: f64,
    pub acc_norm: f64,
    /// Probability mass on the correct options (TruthfulQA MC2).
    pub mass: f64,
    pub group: Option<String>,
}

pub fn item_result(item: &McItem, scores: &[OptionScore]) -> ItemResult {
    let ll: Vec<f64> = scores.iter().map(|s| s.loglik).collect();
    let norm: Vec<f64> = ll
        .iter()
        .zip(&item.options)
        // The harness divides by the choice's length without the target delimiter (the one
        // leading space of the continuation).
        .map(|(l, o)| {
            let choice = o.continuation.strip_prefix(' ').unwrap_or(&o.continuation);
            l / (choice.chars().count().max(1) as f64)
        })
        .collect();
    let hit = |i: usize| item.correct.first() == Some(&i);
    let max = ll.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = ll.iter().map(|l| (l - max).exp()).sum();
    let on_correct: f64 = item.correct.iter().map(|&i| (ll[i] - max).exp()).sum();
    ItemResult {
        acc: hit(argmax(&ll)) as u8 as f64,
        acc_norm: hit(argmax(&norm)) as u8 as f64,
        mass: on_correct / total,
        logliks: ll,
        correct: item.correct.clone(),
        group: item.group.clone(),
    }
}

/// The benchmarks `repnoise eval stability` knows, with the metric each reports first.
pub const TASKS: &[(&str, &str)] = &[
    ("truthfulqa_mc1", "acc"),
    ("truthfulqa_mc2", "mc2"),
    ("arc_easy", "acc_norm"),
    ("arc_challenge", "acc_norm"),
    ("winogrande", "acc"),
    ("mmlu", "acc"),
    ("ethics_commonsense", "acc"),
    ("ethics_deontology", "acc"),
    ("ethics_justice", "acc"),
    ("ethics_utilitarianism", "acc"),
    ("ethics_virtue", "acc"),
    ("crows_pairs", "pct_stereotype"),
];

/// The items of task `name` from the data directory.
pub fn task_items(name: &str, data: &Path) -> Result<Vec<McItem>> {
    use crate::data::mc::EthicsTask;
    let ethics = |t: EthicsTask| -> Result<Vec<McItem>> {
        Ok(mc::mc_items(
            &mc::read_ethics(&t.test_file(&data.join("ethics")), Some(t))?.records,
        ))
    };
    Ok(match name {
        "truthfulqa_mc1" | "truthfulqa_mc2" => {
            let q = mc::read_truthfulqa(&data.join("truthfulqa/TruthfulQA.csv"))?.records;
            if name.ends_with("mc1") {
                q.iter().map(|x| x.mc1()).collect()
            } else {
                q.iter().map(|x| x.mc2()).collect()
            }
        }
        "arc_easy" => mc::mc_items(&mc::read_arc(&data.join("arc/arc_easy.jsonl"))?.records),
        "arc_challenge" => {
            mc::mc_items(&mc::read_arc(&data.join("arc/arc_challenge.jsonl"))?.records)
        }
        "winogrande" => {
            mc::mc_items(&mc::read_winogrande(&data.join("winogrande/winogrande.jsonl"))?.records)
        }
        "mmlu" => mc::mc_items(&mc::read_mmlu(&data.join("mmlu/mmlu.jsonl"))?.records),
        "hellaswag" => {
            mc::mc_items(&mc::read_hellaswag(&data.join("hellaswag/hellaswag.jsonl"))?.records)
        }
        "ethics_commonsense" => ethics(EthicsTask::Commonsense)?,
        "ethics_deontology" => ethics(EthicsTask::Deontology)?,
        "ethics_justice" => ethics(EthicsTask::Justice)?,
        "ethics_utilitarianism" => ethics(EthicsTask::Utilitarianism)?,
        "ethics_virtue" => ethics(EthicsTask::Virtue)?,
        "crows_pairs" => mc::mc_items(
            &mc::read_crows_pairs(&data.join("crows_pairs/crows_pairs_anonymized.csv"))?.records,
        ),
        other => {
            let known: Vec<&str> = TASKS.iter().map(|t| t.0).collect();
            return Err(Error::setting(
                "tasks",
                other,
                format!("unknown task; known: {}, hellaswag", known.join(", ")),
            ));
        }
    })
}

/// `limit` items of `items` (all when 0 or more than there are), chosen by a seeded shuffle and
/// kept in file order.
pub fn limit_items(items: Vec<McItem>, limit: usize, seed: u64) -> Vec<McItem> {
    let idx = Rng::new(seed, "stability-limit").subset_indices(items.len(), limit);
    let mut items: Vec<Option<McItem>> = items.into_iter().map(Some).collect();
    idx.into_iter().filter_map(|i| items[i].take()).collect()
}

/// One task's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    /// The headline metric's name (`acc`, `acc_norm`, `mc2`, `pct_stereotype`).
    pub metric: String,
    pub value: MeanSe,
    pub acc: MeanSe,
    pub acc_norm: MeanSe,
    /// TruthfulQA MC2 (present for every task; meaningful only there).
    pub mc2: MeanSe,
    /// Accuracy per group (MMLU subject, CrowS bias type, ...).
    pub groups: BTreeMap<String, MeanSe>,
    pub items_total: usize,
    pub seconds: f64,
}

pub fn summarise(
    task: &str,
    results: &[ItemResult],
    items_total: usize,
    seconds: f64,
) -> TaskResult {
    let metric = TASKS
        .iter()
        .find(|t| t.0 == task)
        .map_or("acc", |t| t.1)
        .to_string();
    let col = |f: &dyn Fn(&ItemResult) -> f64| -> MeanSe {
        mean_se(&results.iter().map(f).collect::<Vec<_>>())
    };
    let acc = col(&|r| r.acc);
    let acc_norm = col(&|r| r.acc_norm);
    let mc2 = col(&|r| r.mass);
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in results {
        if let Some(g) = &r.group {
            by.entry(g.clone()).or_default().push(r.acc);
        }
    }
    let value = match metric.as_str() {
        "acc_norm" => acc_norm,
        "mc2" => mc2,
        _ => acc, // pct_stereotype: option 0 (the more stereotypical sentence) likelier
    };
    TaskResult {
        task: task.to_string(),
        metric,
        value,
        acc,
        acc_norm,
        mc2,
        groups: by.into_iter().map(|(k, v)| (k, mean_se(&v))).collect(),
        items_total,
        seconds,
    }
}

/// Score every option of `items` with `net` and summarise.
pub fn evaluate_items(
    net: &Llama,
    tok: &Tok,
    start_id: u32,
    items: &[McItem],
    max_len: usize,
    batch: usize,
) -> Result<Vec<ItemResult>> {
    // Items whose options share their context and fit uncut are packed (the context scored
    // once); the rest are scored one option per sequence.
    let mut packed: Vec<(Vec<u32>, Vec<Vec<u32>>)> = vec![];
    let mut seqs = vec![];
    let mut place = vec![];
    for it in items {
        let enc: Vec<(Vec<u32>, Vec<u32>)> = it
            .options
            .iter()
            .map(|o| encode_option(tok, start_id, o))
            .collect::<Result<_>>()?;
        let shared = enc.iter().all(|e| e.0 == enc[0].0);
        let uncut = enc.iter().all(|(c, k)| c.len() + k.len() <= max_len + 1);
        if shared && uncut && !enc.is_empty() {
            place.push((true, packed.len()));
            let c = enc[0].0.clone();
            packed.push((c, enc.into_iter().map(|e| e.1).collect()));
        } else {
            place.push((false, seqs.len()));
            seqs.extend(enc);
        }
    }
    let packed_scores = score_packed(net, &packed, batch)?;
    let scores = score_tokens(net, &seqs, max_len, batch)?;
    Ok(items
        .iter()
        .zip(place)
        .map(|(it, (is_packed, k))| {
            let s = if is_packed {
                &packed_scores[k][..]
            } else {
                &scores[k..k + it.options.len()]
            };
            item_result(it, s)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(conts: &[&str], correct: Vec<usize>) -> McItem {
        McItem {
            options: conts
                .iter()
                .map(|c| McOption {
                    context: "Q".into(),
                    continuation: c.to_string(),
                })
                .collect(),
            correct,
            group: Some("g".into()),
        }
    }

    fn scores(ll: &[f64]) -> Vec<OptionScore> {
        ll.iter()
            .map(|&l| OptionScore {
                loglik: l,
                greedy: false,
                tokens: 1,
            })
            .collect()
    }

    #[test]
    fn acc_acc_norm_and_mc2_by_hand() {
        // Option 1 has the larger log-likelihood (-2 > -3) but option 0 is shorter per
        // character: -3 / 6 = -0.5 > -2 / 2 = -1.
        let it = item(&[" abcde", " a"], vec![0]);
        let r = item_result(&it, &scores(&[-3.0, -2.0]));
        assert_eq!((r.acc, r.acc_norm), (0.0, 1.0));
        // MC2: true answers 0 and 1 of three; probabilities e^-1, e^-2, e^-1.
        let it = item(&[" a", " b", " c"], vec![0, 1]);
        let r = item_result(&it, &scores(&[-1.0, -2.0, -1.0]));
        let (a, b, c) = ((-1f64).exp(), (-2f64).exp(), (-1f64).exp());
        assert!((r.mass - (a + b) / (a + b + c)).abs() < 1e-12);
        // Ties go to the first option, as numpy's argmax.
        let r = item_result(&item(&[" a", " b"], vec![1]), &scores(&[-1.0, -1.0]));
        assert_eq!(r.acc, 0.0);
    }

    #[test]
    fn summary_uses_the_tasks_headline_metric() {
        let rs = vec![
            item_result(&item(&[" abcde", " a"], vec![0]), &scores(&[-3.0, -2.0])),
            item_result(&item(&[" abcde", " a"], vec![0]), &scores(&[-1.0, -2.0])),
        ];
        let s = summarise("arc_easy", &rs, 10, 0.0);
        assert_eq!(s.metric, "acc_norm");
        assert_eq!(s.value.mean, 1.0);
        assert_eq!(s.acc.mean, 0.5);
        assert_eq!(s.groups["g"].n, 2);
        assert_eq!(summarise("truthfulqa_mc2", &rs, 2, 0.0).metric, "mc2");
    }

    #[test]
    fn limit_is_seeded_and_keeps_file_order() {
        let items: Vec<McItem> = (0..50)
            .map(|i| McItem {
                options: vec![],
                correct: vec![i],
                group: None,
            })
            .collect();
        let a = limit_items(items.clone(), 10, 3);
        let b = limit_items(items.clone(), 10, 3);
        assert_eq!(a, b);
        let idx: Vec<usize> = a.iter().map(|x| x.correct[0]).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(idx, (0..10).collect::<Vec<_>>());
        assert_eq!(limit_items(items.clone(), 0, 3).len(), 50);
    }
}
