//! A model's forward pass with its projection weights as stored (`Llama::frozen`: `x w^T`)
//! and re-laid out as `[in, out]` (`Llama::inference`: `x wt`), alternating in one process.
//! Run: `cargo run --release --example bench_inference_layout -- MODEL_DIR [batch] [tokens]
//! [rounds]` (a Hugging Face directory, e.g. `bench/out/smollm2-hf`).
use candle_core::{Device, Tensor};
use repnoise::model::llama::{positions_for, ForwardOpts, Llama, Logits};
use std::time::Instant;

// The binary's allocator and settings (`src/main.rs`).
repnoise::jemalloc_as_the_binary!();

fn main() -> anyhow::Result<()> {
    // As the binary runs (`src/main.rs`): the thread count fixed, the ops issued from inside
    // candle's pool.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    Device::Cpu.with_context(run)
}

fn run() -> anyhow::Result<()> {
    let arg = |i: usize, d: usize| -> usize {
        std::env::args()
            .nth(i)
            .map_or(d, |s| s.parse().expect("a number"))
    };
    let dir = std::env::args().nth(1).expect("a model directory");
    let (b, t, rounds) = (arg(2, 4), arg(3, 128), arg(4, 5));
    let dev = Device::Cpu;
    let m = repnoise::model::load::load_hf_dir(std::path::Path::new(&dir), &dev)?;
    let stored = Llama::frozen(&m.config, &m.params)?;
    let relaid = Llama::inference(&m.config, m.params.deep_clone()?)?;
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i * 7919 % 40000) as u32 + 100)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let pos = positions_for(b, t, 0, &dev)?;
    let opts = ForwardOpts {
        logits: Logits::None,
        ..Default::default()
    };
    let time = |net: &Llama| -> anyhow::Result<(f64, Tensor)> {
        let t0 = Instant::now();
        let h = net.forward(&ids, &pos, None, None, opts)?.residual;
        Ok((t0.elapsed().as_secs_f64(), h))
    };
    time(&stored)?;
    time(&relaid)?;
    let (mut a, mut c) = (vec![], vec![]);
    let mut diff = 0f32;
    for _ in 0..rounds {
        let (ta, ha) = time(&stored)?;
        let (tc, hc) = time(&relaid)?;
        a.push(ta);
        c.push(tc);
        diff = diff.max(
            (ha - hc)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?,
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{b} x {t}: stored (x w^T) {:.3} s, [in, out] (x wt) {:.3} s (medians of {rounds}); \
         largest difference in the last hidden state {diff:.2e}",
        med(&mut a),
        med(&mut c)
    );
    Ok(())
}
