//! Micro-benchmark: the SmolLM2-sized LM head (49,152 x 576) plus next-token loss over `ROWS`
//! rows (default 8064: the RepNoise step's 32 logit-lens readouts of 4 x 63 answer rows), as
//! (1) the composed candle version (matmul, log_softmax + gather), (2) matmul + the fused row
//! cross-entropy, (3) the fused linear + cross-entropy (`linear_row_nll`) at several chunk
//! sizes. Forward, then backward of the mean. Run:
//! `cargo run --release --example bench_lm_head_loss [ROWS]`
use std::time::Instant;

use candle_core::{Device, Var};
use repnoise::model::loss::{linear_row_nll_with, row_nll, row_nll_composed};
use repnoise::util::rng::Rng;

fn main() -> anyhow::Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8064);
    let dev = Device::Cpu;
    let (v, d) = (49152, 576);
    let mut rng = Rng::new(0, "bench-lm-head");
    let w = Var::from_vec(rng.normal_vec(v * d, 0.02), (v, d), &dev)?;
    let h = Var::from_vec(rng.normal_vec(rows * d, 1.0), (rows, d), &dev)?;
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 97) % v as u32).collect();
    let mut variants: Vec<(String, Option<usize>)> =
        vec![("composed".into(), None), ("row-nll".into(), None)];
    if rows > 4096 {
        // The composed version holds several [rows, vocab] tensors: skip it at large sizes.
        variants.remove(0);
    }
    for c in [512, 1024, 2048, 4096] {
        variants.push((format!("fused, chunk {c}"), Some(c)));
    }
    println!("{rows} rows x {d} -> {v}");
    for (name, chunk) in variants {
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t0 = Instant::now();
            let nll = match chunk {
                Some(c) => linear_row_nll_with(h.as_tensor(), w.as_tensor(), targets.clone(), c)?,
                None => {
                    let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
                    if name == "composed" {
                        row_nll_composed(&logits, &targets)?
                    } else {
                        row_nll(&logits, targets.clone())?
                    }
                }
            };
            let loss = nll.mean_all()?;
            let _ = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let g = loss.backward()?;
            let _ = g.get(w.as_tensor()).expect("gradient");
            let t2 = Instant::now();
            best.0 = best.0.min((t1 - t0).as_secs_f64());
            best.1 = best.1.min((t2 - t1).as_secs_f64());
        }
        println!(
            "{name:>18}: forward {:.3} s, backward {:.3} s, total {:.3} s (best of 3)",
            best.0,
            best.1,
            best.0 + best.1
        );
    }
    Ok(())
}
