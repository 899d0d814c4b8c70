//! Micro-benchmark: LM head (SmolLM2 size) + next-token loss, fused row cross-entropy against the
//! composed candle version (log_softmax + gather). Run:
//! `cargo run --release --example bench_lm_head_loss`
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use repnoise::loss::{row_nll, row_nll_composed};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (49152, 576), &dev)?)?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (512, 576), &dev)?)?;
    let targets: Vec<u32> = (0..512u32).map(|i| (i * 97) % 49152).collect();
    for (name, fused) in [("composed", false), ("fused", true)] {
        for rep in 0..3 {
            let t0 = Instant::now();
            let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
            let nll = if fused {
                row_nll(&logits, targets.clone())?
            } else {
                row_nll_composed(&logits, &targets)?
            };
            let loss = nll.mean_all()?;
            let t1 = Instant::now();
            let g = loss.backward()?;
            let _ = g.get(w.as_tensor()).expect("gradient");
            let t2 = Instant::now();
            if rep == 2 {
                println!(
                    "{name:>8}: forward {:.3} s, backward {:.3} s",
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64()
                );
            }
        }
    }
    Ok(())
}
