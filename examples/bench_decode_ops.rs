//! Micro-benchmark: the work of a batch-64 decoding step besides the weight products, on
//! SmolLM2-135M's shapes (30 layers, 9 query heads sharing 3 key/value heads of 64, hidden 576,
//! vocabulary 49,152) with the cache at 100 positions: the greedy pick (in place on the CPU, and
//! the composed tensor form a GPU runs), the attention products, and the element-wise ops, each
//! as many times as one step runs it. Best of 20, in milliseconds.
//! Run: `cargo run --release --example bench_decode_ops`
use candle_core::{DType, Device, Tensor};
use repnoise::dev::bench::best_seconds;
use repnoise::model::generate::{first_argmax, first_argmax_composed};
use repnoise::model::{llama::attention_mask, ops};

/// Errors are the crate's, so that both `first_argmax` and candle's ops pass through `?`.
fn best_ms<T>(f: impl FnMut() -> repnoise::Result<T>) -> repnoise::Result<f64> {
    Ok(best_seconds(20, f)? * 1e3)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (b, total, h, kvh, hd, d, ff, layers) = (64, 100, 9, 3, 64, 576, 1536, 30);
    let n_rep = h / kvh;
    let report = |what: &str, ms: f64| println!("{what:<44} {ms:>8.3} ms");

    let logits = Tensor::randn(0f32, 1.0, (b, 49152), &dev)?;
    let logits_cols = logits.t()?.contiguous()?.t()?;
    report(
        "greedy pick, rows in place",
        best_ms(|| first_argmax(&logits))?,
    );
    report(
        "greedy pick, transposed (copied, then scanned)",
        best_ms(|| first_argmax(&logits_cols))?,
    );
    report(
        "greedy pick, composed",
        best_ms(|| first_argmax_composed(&logits))?,
    );

    let valid: Vec<Vec<bool>> = (0..b).map(|_| vec![true; total]).collect();
    let mask = attention_mask(b, 1, total - 1, Some(&valid), &dev)?;
    let q = Tensor::randn(0f32, 1.0, (b, kvh, n_rep, hd), &dev)?;
    // The cache as `model::llama` keeps it: room reserved, the filled part a narrowed view.
    let cache = Tensor::randn(0f32, 1.0, (b, kvh, total + 28, hd), &dev)?;
    let k = cache.narrow(2, 0, total)?;
    report(
        "attention scores x layers",
        best_ms(|| {
            for _ in 0..layers {
                drop(q.matmul(&k.t()?)?);
            }
            Ok(())
        })?,
    );
    let scores = q.matmul(&k.t()?)?.reshape((b, h, 1, total))?;
    report(
        "masked softmax x layers",
        best_ms(|| {
            for _ in 0..layers {
                drop(ops::masked_softmax(&scores, &mask, 0.125)?);
            }
            Ok(())
        })?,
    );
    let probs = ops::masked_softmax(&scores, &mask, 0.125)?.reshape((b, kvh, n_rep, total))?;
    report(
        "probabilities x values x layers",
        best_ms(|| {
            for _ in 0..layers {
                drop(probs.matmul(&k)?);
            }
            Ok(())
        })?,
    );

    let x = Tensor::randn(0f32, 1.0, (b, 1, d), &dev)?;
    let w = Tensor::randn(0f32, 1.0, d, &dev)?;
    report(
        "residual adds (2 per layer)",
        best_ms(|| {
            for _ in 0..2 * layers {
                drop((&x + &x)?);
            }
            Ok(())
        })?,
    );
    report(
        "RMSNorm (2 per layer)",
        best_ms(|| {
            for _ in 0..2 * layers {
                drop(ops::rms_norm(&x, &w, 1e-5)?);
            }
            Ok(())
        })?,
    );
    let qh = Tensor::randn(0f32, 1.0, (b, 1, h, hd), &dev)?;
    let cos = Tensor::randn(0f32, 1.0, (b, hd / 2), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (b, hd / 2), &dev)?;
    report(
        "rotary, queries x layers",
        best_ms(|| {
            for _ in 0..layers {
                drop(ops::rope(&qh, &cos, &sin)?);
            }
            Ok(())
        })?,
    );
    let g = Tensor::randn(0f32, 1.0, (b, 1, ff), &dev)?;
    report(
        "SwiGLU x layers",
        best_ms(|| {
            for _ in 0..layers {
                drop(ops::swiglu(&g, &g)?);
            }
            Ok(())
        })?,
    );
    let knew = Tensor::zeros((b, kvh, 1, hd), DType::F32, &dev)?;
    report(
        "cache writes (keys, values) x layers",
        best_ms(|| {
            for _ in 0..2 * layers {
                cache.slice_set(&knew, 2, total - 1)?;
            }
            Ok(())
        })?,
    );
    Ok(())
}
