//! Micro-benchmarks of the hot paths (training step, generation, scoring), printed as JSON so
//! `bench/run.sh` can put them beside the PyTorch reference measured in the same run.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::generate::{self, SamplingConfig};
use crate::loss::masked_next_token_ce;
use crate::model::Llama;
use crate::modelio::LoadedModel;
use crate::optim::{clip_coefficient, AdamW, AdamWConfig};
use crate::rng::Rng;

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn random_batch(m: &LoadedModel, batch: usize, seq: usize, seed: u64) -> Result<Tensor> {
    let mut rng = Rng::new(seed, "bench-batch");
    // Ordinary tokens only (skip the first 256 ids, which hold specials in SmolLM2).
    let v = m.config.vocab_size;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| (256 + rng.below(v - 256)) as u32)
        .collect();
    Ok(Tensor::from_vec(
        ids,
        (batch, seq),
        m.params.tensor("model.embed_tokens.weight")?.device(),
    )?)
}

/// Full fine-tuning steps (forward, masked CE on every token, backward, clip, AdamW).
/// Returns the seconds of each step, warm-up excluded.
pub fn train_steps(
    m: &LoadedModel,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
) -> Result<(Vec<f64>, Vec<f32>, [f64; 3])> {
    let mut opt = AdamW::new(&m.params, |_| true, AdamWConfig::default())?;
    let mut times = vec![];
    let mut losses = vec![];
    // Seconds in forward+loss, backward, and optimizer (clip + AdamW), summed over timed steps.
    let mut phases = [0f64; 3];
    for s in 0..warmup + steps {
        let ids = random_batch(m, batch, seq, s as u64)?;
        let dev = ids.device().clone();
        let mask = Tensor::ones((batch, seq), DType::F32, &dev)?;
        let t0 = Instant::now();
        let net = Llama::trainable(&m.config, &m.params)?;
        let logits = net.logits(&ids)?;
        let loss = masked_next_token_ce(&logits, &ids, &mask)?;
        // On an accelerator the ops only queue work: wait for it at each phase boundary so the
        // phases are timed, not their launches (a no-op on the CPU).
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, 1e-5, clip_coefficient(norm, Some(1.0)))?;
        dev.synchronize()?;
        let t3 = Instant::now();
        losses.push(loss.to_scalar::<f32>()?);
        if s >= warmup {
            times.push((t3 - t0).as_secs_f64());
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += (t3 - t2).as_secs_f64();
        }
    }
    Ok((times, losses, phases))
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

/// Log-likelihood scoring: one forward pass over `batch x seq` tokens with log-softmax.
pub fn scoring(m: &LoadedModel, batch: usize, seq: usize, reps: usize) -> Result<Vec<f64>> {
    let net = Llama::frozen(&m.config, &m.params)?;
    let mut times = vec![];
    for r in 0..reps + 1 {
        let ids = random_batch(m, batch, seq, 1000 + r as u64)?;
        let t0 = Instant::now();
        let logits = net.logits(&ids)?;
        let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let _ = lp.sum_all()?.to_scalar::<f32>()?;
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
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

/// FLOPs of one full fine-tuning step (forward + backward = 3x forward): 2 per parameter per
/// token for the matrices (the tied LM head counted once, as it is used once) plus attention's
/// two `t x t` products per layer.
pub fn train_step_flops(cfg: &crate::config::ModelConfig, batch: usize, seq: usize) -> f64 {
    let tokens = (batch * seq) as f64;
    let params = cfg.num_params() as f64 - (cfg.num_layers * 2 + 1) as f64 * cfg.hidden_size as f64;
    let attn = 2.0
        * 2.0
        * (batch * cfg.num_heads * seq * seq * cfg.head_dim) as f64
        * cfg.num_layers as f64;
    3.0 * (2.0 * params * tokens + attn)
}
