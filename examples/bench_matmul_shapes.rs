//! Micro-benchmark: candle gemm GFLOP/s on the matrix shapes of a SmolLM2 training step and of
//! the fused LM-head loss (`loss::linear_row_nll`, 1024-row chunks: logits `h w^T`, `dh = g w`,
//! `dw = g^T h`), each with the right operand as is (nn), transposed (nt), and the left one
//! transposed (tn); then a 7B model's linear maps (Llama-2-7B: 4096 wide, 11008 in the MLP) at
//! 512 rows. Run: `cargo run --release --example bench_matmul_shapes`
use candle_core::{Device, Tensor};
use std::time::Instant;

// The binary's allocator and settings (`src/main.rs`): with glibc's, every product's output
// and gemm's packing buffer are fresh pages, which the binary does not pay.
repnoise::jemalloc_as_the_binary!();

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (2048usize, 2048usize, 2048usize),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
        (1536, 512, 576),
        (1024, 576, 49152),
        (1024, 49152, 576),
        (49152, 1024, 576),
        (512, 4096, 4096),
        (512, 4096, 11008),
        (512, 11008, 4096),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let at = Tensor::randn(0f32, 1.0, (k, m), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let bt = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let mut best = [f64::MAX; 3];
        for _ in 0..3 {
            for (i, (l, r)) in [
                (a.clone(), b.clone()),
                (a.clone(), bt.t()?),
                (at.t()?, b.clone()),
            ]
            .into_iter()
            .enumerate()
            {
                let t0 = Instant::now();
                let _c = l.matmul(&r)?;
                best[i] = best[i].min(t0.elapsed().as_secs_f64());
            }
        }
        let fl = 2.0 * (m * k * n) as f64;
        println!(
            "{m}x{k}x{n}: {:.1} GFLOP/s (nn), {:.1} GFLOP/s (nt), {:.1} GFLOP/s (tn)",
            fl / best[0] / 1e9,
            fl / best[1] / 1e9,
            fl / best[2] / 1e9
        );
    }
    Ok(())
}
