//! Micro-benchmark: candle gemm GFLOP/s on the matrix shapes of a SmolLM2 training step.
//! Run: `cargo run --release --example bench_matmul_shapes`
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (2048usize, 2048usize, 2048usize),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
        (1536, 512, 576),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let bt = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let mut best = f64::MAX;
        let mut best_t = f64::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            let _c = a.matmul(&b)?;
            best = best.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let _c = a.matmul(&bt.t()?)?;
            best_t = best_t.min(t0.elapsed().as_secs_f64());
        }
        let fl = 2.0 * (m * k * n) as f64;
        println!(
            "{m}x{k}x{n}: {:.1} GFLOP/s (nn), {:.1} GFLOP/s (nt)",
            fl / best / 1e9,
            fl / best_t / 1e9
        );
    }
    Ok(())
}
