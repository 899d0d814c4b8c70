//! Micro-benchmarks of the hot paths (full and LoRA fine-tuning steps, the RepNoise step,
//! generation, scoring), printed as JSON so `bench/run.sh` can put them beside the PyTorch
//! reference measured in the same run.

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::data::encode::EncodedPair;
use crate::data::Encoded;
use crate::defence::repnoise::{repnoise_loss, PairBatch, RepNoiseConfig, RepNoiseTerms};
use crate::eval::heldout::HeldoutEncoded;
use crate::model::generate::{self, SamplingConfig};
use crate::model::llama::Llama;
use crate::model::load::LoadedModel;
use crate::train::objective::sft_loss;
use crate::train::optim::{clip_coefficient, AdamW, AdamWConfig};
use crate::train::Trainee;
use crate::util::error::Result;
use crate::util::rng::Rng;

/// The quickest of `reps` timed calls of `f` after one untimed warm-up call, in seconds: the
/// micro-benchmarks' (`examples/`) measure of an operation, least disturbed by the host.
pub fn best_seconds<T, E>(
    reps: usize,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> std::result::Result<f64, E> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = f()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(best)
}

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The token batch of step `seed`: [`synthetic_token`]s (the reference side draws the same
/// ones, so both start from the same loss).
fn synthetic_batch(
    m: &LoadedModel,
    device: &Device,
    batch: usize,
    seq: usize,
    seed: u64,
) -> Result<Tensor> {
    let v = m.config.vocab_size;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|k| synthetic_token(v, seed as usize, k / seq, k % seq, 13))
        .collect();
    Ok(Tensor::from_vec(ids, (batch, seq), device)?)
}

/// Seconds of each timed step, the loss of every step (warm-up included), and the seconds spent
/// in forward+loss, backward and optimizer (clip + AdamW), summed over the timed steps.
pub type StepTimes<L> = (Vec<f64>, Vec<L>, [f64; 3]);

/// Times `warmup + steps` optimizer steps of `loss_of(net, step)`: forward and loss, backward,
/// clipping at 1.0 and AdamW at `lr` over every variable of `trainee`.
fn timed_steps<T: Trainee<Net = Llama> + ?Sized, L>(
    trainee: &T,
    lr: f64,
    steps: usize,
    warmup: usize,
    mut loss_of: impl FnMut(&Llama, usize) -> Result<(Tensor, L)>,
) -> Result<StepTimes<L>> {
    let mut opt = AdamW::new(trainee.store(), |_| true, AdamWConfig::default())?;
    let mut times = vec![];
    let mut losses = vec![];
    let mut phases = [0f64; 3];
    for s in 0..warmup + steps {
        let t0 = Instant::now();
        let net = trainee.net(&|_| true)?;
        let (loss, record) = loss_of(&net, s)?;
        // On an accelerator the ops only queue work: wait for it at each phase boundary so the
        // phases are timed, not their launches (a no-op on the CPU).
        let dev = net.device().clone();
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward_owned()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, lr, clip_coefficient(norm, Some(1.0)))?;
        dev.synchronize()?;
        let t3 = Instant::now();
        losses.push(record);
        if s >= warmup {
            times.push((t3 - t0).as_secs_f64());
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += (t3 - t2).as_secs_f64();
        }
    }
    Ok((times, losses, phases))
}

/// Fine-tuning steps on random token batches of `trainee`: the model itself (full fine-tuning,
/// lr 1e-5) or a LoRA adapter on it (lr 1e-4). The loss is the attack's, [`sft_loss`] (the fused
/// LM head and cross-entropy), with every token an answer token: next-token cross-entropy on
/// every position.
pub fn train_steps<T: Trainee<Net = Llama> + ?Sized>(
    trainee: &T,
    m: &LoadedModel,
    lr: f64,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
) -> Result<StepTimes<f32>> {
    timed_steps(trainee, lr, steps, warmup, |net, s| {
        let ids = synthetic_batch(m, m.device()?, batch, seq, s as u64)?.to_vec2::<u32>()?;
        let seqs: Vec<Encoded> = ids
            .into_iter()
            .map(|ids| Encoded {
                ids,
                loss_mask: vec![1; seq],
                attention_mask: vec![1; seq],
            })
            .collect();
        let refs: Vec<&Encoded> = seqs.iter().collect();
        let out = sft_loss(net, &refs, m.tok.pad_id)?;
        let v = out.terms["ce"] as f32;
        Ok((out.loss, v))
    })
}

/// Token `i` of row `r` of the synthetic pair batch of step `step` (`bench/reference.py` has
/// the same formula): ordinary tokens (ids >= 256) spread over the vocabulary, `offset` telling
/// the prompt (13), the harmful answer (77) and the refusal (5077) apart.
pub fn synthetic_token(vocab: usize, step: usize, r: usize, i: usize, offset: usize) -> u32 {
    (256 + ((step * 131 + r) * 7919 + i * 104_729 + offset) % (vocab - 256)) as u32
}

/// `batch` synthetic pairs of `seq` tokens: a shared prompt of `seq / 2` tokens, then answers
/// that differ at every position, so the pair mask is the answer span.
pub fn synthetic_pairs(vocab: usize, batch: usize, seq: usize, step: usize) -> Vec<EncodedPair> {
    let p = seq / 2;
    let seq_of = |r: usize, answer: usize| Encoded {
        ids: (0..seq)
            .map(|i| synthetic_token(vocab, step, r, i, if i < p { 13 } else { answer }))
            .collect(),
        loss_mask: (0..seq).map(|i| (i >= p) as u8).collect(),
        attention_mask: vec![1; seq],
    };
    (0..batch)
        .map(|r| EncodedPair {
            harmful: seq_of(r, 77),
            harmless: seq_of(r, 5077),
            pair_mask: (0..seq).map(|i| (i >= p) as u8).collect(),
        })
        .collect()
}

/// RepNoise defence steps on synthetic pairs with the paper's settings (alpha 1, beta 0.001,
/// AdamW lr 2e-5) in faithful mode, the reference code's arithmetic, so the loss terms can be
/// compared with the reference implementation's.
pub fn repnoise_steps(
    m: &LoadedModel,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
) -> Result<StepTimes<RepNoiseTerms>> {
    let cfg = RepNoiseConfig {
        faithful: true,
        ..Default::default()
    };
    let mut rng = Rng::new(0, "bench-noise");
    let dev = m
        .params
        .tensor("model.embed_tokens.weight")?
        .device()
        .clone();
    timed_steps(m, 2e-5, steps, warmup, |net, s| {
        let pairs = synthetic_pairs(m.config.vocab_size, batch, seq, s);
        let refs: Vec<&EncodedPair> = pairs.iter().collect();
        let pb = PairBatch::new(&refs, m.tok.pad_id, &dev)?;
        repnoise_loss(net, &pb, &cfg, &mut rng)
    })
}

/// The network the forward-only arms (scoring, held-out cross-entropy) time, as the stages
/// they stand for build it (`eval::run_stability`, the runner's held-out stage):
/// [`Llama::inference`], which takes the model's store (those arms need only its config and
/// tokenizer besides). The generation arms time [`Llama::frozen`], as the evaluation generates.
pub fn inference_net(m: &mut LoadedModel) -> Result<Llama> {
    Llama::inference(&m.config, std::mem::take(&mut m.params))
}

/// Batched greedy generation of exactly `new_tokens` tokens per row (no early stop).
pub fn generation(
    m: &LoadedModel,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let net = Llama::frozen(&m.config, &m.params)?;
    let cfg = SamplingConfig {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let mut times = vec![];
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = generate::generate(&net, prompts, m.tok.pad_id, &[], &cfg)?;
        times.push(t0.elapsed().as_secs_f64());
        debug_assert!(out.iter().all(|o| o.len() == new_tokens));
    }
    Ok(times)
}

/// Log-likelihood scoring as the stability benchmarks do it (`eval::stability::score_tokens`):
/// each of `batch` sequences of `seq` tokens scored after its first token, i.e. the
/// log-probability of every next token and whether greedy decoding would have produced it.
pub fn scoring(
    m: &LoadedModel,
    net: &Llama,
    batch: usize,
    seq: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let mut times = vec![];
    for r in 0..reps + 1 {
        let ids: Vec<Vec<u32>> =
            synthetic_batch(m, net.device(), batch, seq, 1000 + r as u64)?.to_vec2()?;
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = ids
            .into_iter()
            .map(|row| (row[..1].to_vec(), row[1..].to_vec()))
            .collect();
        let t0 = Instant::now();
        let scores = crate::eval::stability::score_tokens(net, &seqs, seq, batch)?;
        std::hint::black_box(&scores);
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// The held-out arm's synthetic items: `items` of a prompt of `seq / 2` tokens followed by a
/// harmful answer of `seq / 2` tokens and a refusal of `seq / 4` (two sequences of `seq` and
/// `3 seq / 4` tokens); the same tokens as bench/reference.py's.
pub fn synthetic_heldout(m: &LoadedModel, items: usize, seq: usize) -> HeldoutEncoded {
    let (prompt, harmful, refusal) = (seq / 2, seq / 2, seq / 4);
    let seq_of = |r: usize, answer: usize, offset: usize| Encoded {
        ids: (0..prompt + answer)
            .map(|i| {
                let o = if i < prompt { 13 } else { offset };
                synthetic_token(m.config.vocab_size, 7, r, i, o)
            })
            .collect(),
        loss_mask: (0..prompt + answer).map(|i| (i >= prompt) as u8).collect(),
        attention_mask: vec![1; prompt + answer],
    };
    HeldoutEncoded {
        harmful: (0..items).map(|r| seq_of(r, harmful, 77)).collect(),
        refusal: (0..items).map(|r| seq_of(r, refusal, 5077)).collect(),
        pad_id: m.tok.pad_id,
    }
}

/// The instrument's held-out cross-entropy ([`crate::eval::heldout::score`], forward only) of
/// `enc`, `batch` sequences at a time, timed `reps` times; `apart` scores each item's two
/// answers as separate sequences ([`crate::eval::heldout::per_sequence_ce`] twice, the
/// instrument's way before it packed them behind their shared prompt). Returns the times and
/// the mean cross-entropy of the harmful answers and of the refusals.
pub fn heldout_ce(
    net: &Llama,
    enc: &HeldoutEncoded,
    batch: usize,
    reps: usize,
    apart: bool,
) -> Result<(Vec<f64>, [f64; 2])> {
    use crate::eval::heldout::{mean, per_sequence_ce, score};
    let mut times = vec![];
    let mut means = [f64::NAN; 2];
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let (h, r) = if apart {
            (
                per_sequence_ce(net, &enc.harmful, enc.pad_id, batch)?,
                per_sequence_ce(net, &enc.refusal, enc.pad_id, batch)?,
            )
        } else {
            let s = score(net, enc, batch)?;
            (s.harmful_ce, s.refusal_ce)
        };
        times.push(t0.elapsed().as_secs_f64());
        means = [mean(&h), mean(&r)];
    }
    Ok((times, means))
}

/// The evaluation's generation: `prompts` answered `batch` at a time in order of length (as
/// [`crate::eval::answer::generate_batched`] forms its batches), exactly `new_tokens` greedy
/// tokens each (no early stop), timed `reps` times.
pub fn generation_batched(
    m: &LoadedModel,
    prompts: &[Vec<u32>],
    batch: usize,
    new_tokens: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    use crate::data::encode::{length_order, Longest};
    let net = Llama::frozen(&m.config, &m.params)?;
    let cfg = SamplingConfig {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let order = length_order(prompts.iter().map(Vec::len), Longest::Last);
    let mut times = vec![];
    for _ in 0..reps {
        let t0 = Instant::now();
        for chunk in order.chunks(batch.max(1)) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let out = generate::generate(&net, &ids, m.tok.pad_id, &[], &cfg)?;
            debug_assert!(out.iter().all(|o| o.len() == new_tokens));
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// This machine's f32 matrix-multiply rate in GFLOP/s (best of `reps` 2048^3 products), the
/// peak that step FLOP/s are reported against.
pub fn matmul_peak_gflops(reps: usize) -> Result<f64> {
    let dev = candle_core::Device::Cpu;
    let n = 2048;
    let mut rng = Rng::new(0, "bench-matmul");
    let a = Tensor::from_vec(rng.normal_vec(n * n, 1.0), (n, n), &dev)?;
    let b = Tensor::from_vec(rng.normal_vec(n * n, 1.0), (n, n), &dev)?;
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// FLOPs of one forward pass over `batch x seq` tokens: 2 per matrix parameter per token (the
/// tied LM head counted once, as it is used once; norms left out) plus attention's two `t x t`
/// products per layer.
pub fn forward_flops(cfg: &crate::model::config::ModelConfig, batch: usize, seq: usize) -> f64 {
    let tokens = (batch * seq) as f64;
    let params = cfg.num_params() as f64 - (cfg.num_layers * 2 + 1) as f64 * cfg.hidden_size as f64;
    let attn = 2.0
        * 2.0
        * (batch * cfg.num_heads * seq * seq * cfg.head_dim) as f64
        * cfg.num_layers as f64;
    2.0 * params * tokens + attn
}

/// FLOPs of one full fine-tuning step: forward + backward = 3x the forward pass.
pub fn train_step_flops(cfg: &crate::model::config::ModelConfig, batch: usize, seq: usize) -> f64 {
    3.0 * forward_flops(cfg, batch, seq)
}

/// FLOPs of one LoRA step: the forward pass and the backward pass through the activations (2x
/// the forward); the frozen weights get no gradient and the adapters' own products are
/// negligible at rank 8.
pub fn lora_step_flops(cfg: &crate::model::config::ModelConfig, batch: usize, seq: usize) -> f64 {
    2.0 * forward_flops(cfg, batch, seq)
}

/// The arithmetic a RepNoise step needs at the least (forward + backward = 3x forward of each
/// product): both sequences through the decoder layers, and the LM head only at the rows the
/// losses read: `harmless_rows` for the refusal's cross-entropy, `harmful_rows` for each of
/// `readouts` logit-lens readouts. Recomputation (the chunked LM-head loss recomputes its
/// logits in the backward pass) is overhead, not counted.
pub fn repnoise_step_flops(
    cfg: &crate::model::config::ModelConfig,
    batch: usize,
    seq: usize,
    harmless_rows: usize,
    harmful_rows: usize,
    readouts: usize,
) -> f64 {
    let head = 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64;
    let body = forward_flops(cfg, batch, seq) - head * (batch * seq) as f64;
    3.0 * (2.0 * body + head * (harmless_rows + readouts * harmful_rows) as f64)
}

/// Scaling charts from the JSON lines of earlier bench runs: for each step benchmark, the median
/// seconds per step against sequence length (at batch 4) and against batch size (at 128
/// tokens), one line per implementation. Returns `(file name, SVG)`; a benchmark with fewer
/// than two shapes gets no chart.
pub fn scaling_charts(results: &std::path::Path) -> Result<Vec<(String, String)>> {
    use crate::util::error::Error;
    use crate::util::plot::{line_chart, Series};
    use std::collections::BTreeMap;
    let text = crate::util::io::read_text(results)?;
    // (what, impl) -> [(batch, seq, median seconds)]
    type Shapes = Vec<(usize, usize, f64)>;
    let mut by: BTreeMap<(String, String), Shapes> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(results, format!("line {}: not valid JSON: {e}", i + 1)))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| Error::file(results, format!("line {}: no field `{k}`", i + 1)))
        };
        let what = field("what")?.as_str().unwrap_or_default().to_string();
        if !what.ends_with("-step") {
            continue;
        }
        let imp = field("impl")?.as_str().unwrap_or_default().to_string();
        let num = |k: &str| -> Result<usize> {
            field(k)?.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::file(results, format!("line {}: `{k}` is not a count", i + 1))
            })
        };
        let mut secs: Vec<f64> = field("seconds")?
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        if secs.is_empty() {
            continue;
        }
        secs.sort_by(f64::total_cmp);
        let n = secs.len();
        let median = if n % 2 == 1 {
            secs[n / 2]
        } else {
            (secs[n / 2 - 1] + secs[n / 2]) / 2.0
        };
        by.entry((what, imp))
            .or_default()
            .push((num("batch")?, num("seq")?, median));
    }
    let whats: Vec<String> = by.keys().map(|k| k.0.clone()).collect();
    let mut whats = whats;
    whats.dedup();
    let mut out = vec![];
    for what in whats {
        for (axis, fixed_batch) in [
            ("sequence length (tokens, batch 4)", true),
            ("batch size (128 tokens)", false),
        ] {
            let series: Vec<Series> = by
                .iter()
                .filter(|((w, _), _)| *w == what)
                .map(|((_, imp), pts)| {
                    let mut p: Vec<(f64, f64)> = pts
                        .iter()
                        .filter(|(b, t, _)| if fixed_batch { *b == 4 } else { *t == 128 })
                        .map(|&(b, t, s)| (if fixed_batch { t } else { b } as f64, s))
                        .collect();
                    p.sort_by(|a, b| a.0.total_cmp(&b.0));
                    p.dedup_by(|a, b| a.0 == b.0);
                    Series::new(imp.clone(), p)
                })
                .collect();
            if series.iter().all(|s| s.points.len() < 2) {
                continue;
            }
            let (tag, name) = if fixed_batch {
                ("seq", "sequence length")
            } else {
                ("batch", "batch size")
            };
            let title = format!("{what}: seconds per step vs {name}");
            let svg = line_chart(&title, axis, "seconds per step (median)", &series)?;
            out.push((format!("scaling-{what}-{tag}.svg"), svg));
        }
    }
    Ok(out)
}
