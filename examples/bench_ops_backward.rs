//! Micro-benchmark: forward and backward time of the per-layer operations at SmolLM2 sizes
//! (batch 4 x 128). Run: `cargo run --release --example bench_ops_backward`
use candle_core::{Device, Tensor, Var, D};
use std::time::Instant;
fn time<F: Fn() -> anyhow::Result<Tensor>>(name: &str, vars: &[&Var], f: F) -> anyhow::Result<()> {
    for rep in 0..3 {
        let t0 = Instant::now();
        let y = f()?;
        let t1 = Instant::now();
        let loss = y.sqr()?.sum_all()?;
        let g = loss.backward()?;
        let t2 = Instant::now();
        for v in vars {
            let _ = g.get(v.as_tensor()).unwrap();
        }
        if rep == 2 {
            println!(
                "{name:<14} fwd {:>7.2} ms  bwd(incl sqr/sum) {:>7.2} ms",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 128, 576), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (1536, 576), &dev)?)?;
    let n = Var::from_tensor(&Tensor::ones(576, candle_core::DType::F32, &dev)?)?;
    time("identity", &[&x], || Ok(x.as_tensor().clone()))?;
    time("linear", &[&x, &w], || {
        Ok(x.as_tensor()
            .reshape((512, 576))?
            .matmul(&w.as_tensor().t()?)?)
    })?;
    time("rmsnorm", &[&x, &n], || {
        Ok(repnoise::model::llama::rms_norm(
            x.as_tensor(),
            n.as_tensor(),
            1e-5,
        )?)
    })?;
    let s = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 9, 128, 128), &dev)?)?;
    time("softmax", &[&s], || {
        Ok(candle_nn::ops::softmax(s.as_tensor(), D::Minus1)?)
    })?;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 128, 9, 64), &dev)?)?;
    let cos = Tensor::randn(0f32, 1.0, (4, 1, 128, 64), &dev)?;
    time("rope", &[&q], || {
        let q = q.as_tensor().transpose(1, 2)?;
        let x1 = q.narrow(D::Minus1, 0, 32)?;
        let x2 = q.narrow(D::Minus1, 32, 32)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((q.broadcast_mul(&cos)? + rot.broadcast_mul(&cos)?)?)
    })?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 128, 64), &dev)?)?;
    time("repeat_kv", &[&k], || {
        Ok(k.as_tensor()
            .unsqueeze(2)?
            .expand((4, 3, 3, 128, 64))?
            .reshape((4, 9, 128, 64))?)
    })?;
    let qq = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 9, 128, 64), &dev)?)?;
    let kk = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 9, 128, 64), &dev)?)?;
    time("qk^T", &[&qq, &kk], || {
        Ok(qq.as_tensor().matmul(&kk.as_tensor().t()?)?)
    })?;
    let g = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 128, 1536), &dev)?)?;
    time("silu*up", &[&g], || {
        Ok((candle_nn::ops::silu(g.as_tensor())? * g.as_tensor())?)
    })?;
    time("transpose-reshape", &[&qq], || {
        Ok(qq.as_tensor().transpose(1, 2)?.reshape((4, 128, 576))?)
    })?;
    Ok(())
}
