//! Micro-benchmark: a linear map `x w^T` with few rows (decoding) written two ways, on SmolLM2's
//! shapes: `x.matmul(w.t())` and `w.matmul(x.t()).t()` (what `model::linear` uses from 17 to 64 rows);
//! then with the weight stored transposed (`wt`, `[in, out]`, `Llama::inference`'s layout) as
//! `x.matmul(wt)` (what `model::linear` uses for it) and `wt.t().matmul(x.t()).t()`.
//! Up to 16 rows, both forms run as dot products (vendor/candle-core, `cpu_backend/dot_matmul.rs`);
//! `CANDLE_DOT_MATMUL=0` sends them to gemm instead, for comparison.
//! Run: `cargo run --release --example bench_linear_rows` (and again with `CANDLE_DOT_MATMUL=0`)
use candle_core::{Device, Tensor};
use repnoise::dev::bench::best_seconds;

fn best_ms(f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    Ok(best_seconds(20, f)? * 1e3)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (k, n) in [(576usize, 1536usize), (1536, 576), (576, 576), (576, 49152)] {
        for m in [1usize, 4, 8, 12, 16, 24, 32, 64, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let a = best_ms(|| x.matmul(&w.t()?))?;
            let b = best_ms(|| w.matmul(&x.t()?)?.t()?.contiguous())?;
            let wt = w.t()?.contiguous()?;
            let c = best_ms(|| x.matmul(&wt))?;
            let d = best_ms(|| wt.t()?.matmul(&x.t()?)?.t()?.contiguous())?;
            println!("rows {m:>3}, {k}x{n}: x w^T {a:.3} ms, (w x^T)^T {b:.3} ms, x wt {c:.3} ms, (wt^T x^T)^T {d:.3} ms");
        }
    }
    Ok(())
}
