//! Micro-benchmark: gemm's jobs shared out from a counter (vendor/patches/gemm-common-0002-*)
//! against upstream's fixed split, paired in one process. For each product shape of a SmolLM2
//! step (and a 7B model's MLP), each repetition times the product once per setting of
//! `gemm_common::gemm::set_job_share_divisor` (0 is upstream's fixed split: one share per
//! thread; d >= 1 guided, each grab `remaining / (d x threads)`), starting from the next setting
//! in turn, so a slow moment of a shared host falls on both sides of a pair and no setting is
//! always timed first; it prints each setting's best GFLOP/s, its median speed-up against the
//! first setting, and in how many pairs it was the quicker.
//! Run: `cargo run --release --example bench_gemm_jobs -- 0 2`
use candle_core::{Device, Tensor};
use std::time::Instant;

repnoise::jemalloc_as_the_binary!();

fn main() -> anyhow::Result<()> {
    let settings: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        settings.len() >= 2,
        "usage: bench_gemm_jobs DIVISOR DIVISOR... (0: fixed split; the first is the baseline)"
    );
    let dev = Device::Cpu;
    for (m, k, n) in [
        (2048usize, 2048usize, 2048usize),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 576),
        (1536, 512, 576),
        (1024, 576, 49152),
        (1024, 49152, 576),
        (512, 4096, 11008),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let flop = 2.0 * (m * k * n) as f64;
        let reps = ((20e9 / flop) as usize).clamp(5, 200);
        let mut speedups = vec![vec![]; settings.len()];
        let mut best = vec![f64::MAX; settings.len()];
        for rep in 0..reps {
            // Each repetition starts from the next setting in turn, so none is always timed
            // first (with the caches and the host's moment that position brings).
            let mut secs = vec![0.0; settings.len()];
            for j in 0..settings.len() {
                let i = (rep + j) % settings.len();
                gemm_common::gemm::set_job_share_divisor(settings[i]);
                let t0 = Instant::now();
                let _y = a.matmul(&w.t()?)?;
                secs[i] = t0.elapsed().as_secs_f64();
            }
            for (i, s) in secs.iter().enumerate() {
                speedups[i].push(secs[0] / s);
                best[i] = best[i].min(*s);
            }
        }
        print!("{m}x{k}x{n} x w^T, {reps} pairs:");
        for (i, g) in settings.iter().enumerate() {
            let v = &mut speedups[i];
            let quicker = v.iter().filter(|&&r| r > 1.0).count();
            v.sort_by(f64::total_cmp);
            print!(
                "  divisor {g}: best {:.0} GFLOP/s, median speed-up {:.3}, quicker in {quicker}",
                flop / best[i] / 1e9,
                v[v.len() / 2]
            );
        }
        println!();
    }
    Ok(())
}
