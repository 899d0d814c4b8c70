//! Where a forward pass's time goes: each operation of a SmolLM2-135M layer (random weights of
//! its shapes, the same calls as `model::llama::Llama::forward`, no gradient), timed one after
//! the other over 150 layers after 30 untimed ones, reported per 30 layers (one forward pass of
//! the model without its LM head). Run: `cargo run --release --example bench_layer_ops -- 4 128`
//! (batch, tokens).
use candle_core::{Device, Tensor};
use repnoise::model::ops;
use std::time::Instant;

// The binary's allocator and settings (`src/main.rs`): with glibc's, every product's output
// and gemm's packing buffer are fresh pages, which the binary does not pay.
repnoise::jemalloc_as_the_binary!();

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let b: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(4);
    let t: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(128);
    let (d, h, kvh, hd, ff) = (576usize, 9usize, 3usize, 64usize, 1536usize);
    let r = |s: &[usize]| Tensor::randn(0f32, 0.05, s, &dev).unwrap();
    let (wq, wk, wv, wo, wg, wu, wd) = (
        r(&[d, d]),
        r(&[kvh * hd, d]),
        r(&[kvh * hd, d]),
        r(&[d, d]),
        r(&[ff, d]),
        r(&[ff, d]),
        r(&[d, ff]),
    );
    let nw = Tensor::ones(d, candle_core::DType::F32, &dev)?;
    let cos = r(&[b * t, hd / 2]);
    let sin = r(&[b * t, hd / 2]);
    let mask = repnoise::model::llama::attention_mask(b, t, 0, None, &dev)?;
    let mut x = r(&[b, t, d]);
    let names = [
        "norm1", "q", "k", "v+T", "rope q", "rope k", "q view", "scores", "softmax", "pv+T", "o",
        "add1", "norm2", "gate", "up", "swiglu", "down", "add2",
    ];
    let mut acc = vec![0f64; names.len()];
    let lin = |x: &Tensor, w: &Tensor| -> anyhow::Result<Tensor> {
        let (bb, tt, di) = x.dims3()?;
        Ok(x.reshape((bb * tt, di))?
            .matmul(&w.t()?)?
            .reshape((bb, tt, ()))?)
    };
    let reps = 30 * 5;
    let scale = 1.0 / (hd as f64).sqrt();
    for rep in 0..reps + 30 {
        let mut ts = vec![];
        let mut tick = Instant::now();
        let mut lap = |ts: &mut Vec<f64>| {
            let n = Instant::now();
            ts.push((n - tick).as_secs_f64());
            tick = n;
        };
        let xn = ops::rms_norm(&x, &nw, 1e-5)?;
        lap(&mut ts);
        let q = lin(&xn, &wq)?.reshape((b, t, h, hd))?;
        lap(&mut ts);
        let k = lin(&xn, &wk)?.reshape((b, t, kvh, hd))?;
        lap(&mut ts);
        let v = lin(&xn, &wv)?
            .reshape((b, t, kvh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        lap(&mut ts);
        let q = ops::rope(&q, &cos, &sin)?; // [b, h, t, hd]
        lap(&mut ts);
        let k = ops::rope(&k, &cos, &sin)?;
        lap(&mut ts);
        let n_rep = h / kvh;
        let q = q.reshape((b, kvh, n_rep * t, hd))?;
        lap(&mut ts);
        let scores = q.matmul(&k.t()?)?.reshape((b, h, t, t))?;
        lap(&mut ts);
        let probs = ops::masked_softmax(&scores, &mask, scale)?;
        lap(&mut ts);
        let attn = probs
            .reshape((b, kvh, n_rep * t, t))?
            .matmul(&v)?
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
        lap(&mut ts);
        let attn = lin(&attn, &wo)?;
        lap(&mut ts);
        let x1 = (&x + attn)?;
        lap(&mut ts);
        let xn = ops::rms_norm(&x1, &nw, 1e-5)?;
        lap(&mut ts);
        let g = lin(&xn, &wg)?;
        lap(&mut ts);
        let u = lin(&xn, &wu)?;
        lap(&mut ts);
        let s = ops::swiglu(&g, &u)?;
        lap(&mut ts);
        let m = lin(&s, &wd)?;
        lap(&mut ts);
        x = (x1 + m)?;
        lap(&mut ts);
        if rep >= 30 {
            for (a, v) in acc.iter_mut().zip(&ts) {
                *a += v;
            }
        }
    }
    let per_fwd = |a: f64| a / (reps as f64 / 30.0) * 1e3;
    let total: f64 = acc.iter().sum();
    for (n, a) in names.iter().zip(&acc) {
        println!(
            "{n:>10}: {:7.1} ms per 30 layers ({:4.1}%)",
            per_fwd(*a),
            100.0 * a / total
        );
    }
    println!("{:>10}: {:7.1} ms", "total", per_fwd(total));
    Ok(())
}
