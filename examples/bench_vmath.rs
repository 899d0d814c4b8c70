//! The element-wise kernels of `model::vmath` against the scalar loops they replaced (libm's
//! `expf` per element, sums in order), one thread, on rows of the LM head's width (the losses'
//! softmax over 49,152 logits) and of attention's (128 keys), and on SwiGLU. Run:
//! `cargo run --release --example bench_vmath` (prints ns per element, best of 5).
use repnoise::model::ops::flush_subnormal;
use repnoise::model::vmath;
use std::time::Instant;

repnoise::jemalloc_as_the_binary!();

/// The losses' softmax row before `vmath` (src/model/loss.rs at ee1b3b4).
fn libm_row_f64(row: &mut [f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for z in row.iter_mut() {
        *z = (*z - max).exp();
        sum += *z as f64;
    }
    let inv = (1.0 / sum) as f32;
    for z in row.iter_mut() {
        *z = flush_subnormal(*z * inv);
    }
    sum
}

fn vmath_row_f64(row: &mut [f32]) -> f64 {
    let max = vmath::max(row);
    let sum = vmath::exp_in_place_f64_sum(row, max);
    vmath::scale_flushed(row, (1.0 / sum) as f32);
    sum
}

/// Attention's softmax row before `vmath` (src/model/ops.rs at ee1b3b4).
fn libm_row_f32(o: &mut [f32]) -> f64 {
    let max = o.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in o.iter_mut() {
        let d = *v - max;
        let e = if d < -87.5 { 0.0 } else { d.exp() };
        *v = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for v in o.iter_mut() {
        *v = flush_subnormal(*v * inv);
    }
    sum as f64
}

fn vmath_row_f32(o: &mut [f32]) -> f64 {
    let max = vmath::max(o);
    let sum = vmath::exp_in_place_f32_sum(o, max);
    vmath::scale_flushed(o, 1.0 / sum);
    sum as f64
}

fn best_ns(elems: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e9 / elems as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // Logits spread over about 20 nats, as a model's are; the same data for both forms.
    let n = 4 << 20;
    let src: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2_654_435_761 % 1000) as f32) * 0.02 - 10.0)
        .collect();
    let mut x = src.clone();
    type Row = fn(&mut [f32]) -> f64;
    for (what, width, old, new) in [
        (
            "softmax rows of 49152 (f64 sum)",
            49152,
            libm_row_f64 as Row,
            vmath_row_f64 as Row,
        ),
        (
            "softmax rows of 128 (f32 sum)",
            128,
            libm_row_f32,
            vmath_row_f32,
        ),
    ] {
        let mut sums = [0f64; 2];
        let mut ns = [0f64; 2];
        for (k, f) in [old, new].into_iter().enumerate() {
            ns[k] = best_ns(n, || {
                x.copy_from_slice(&src);
                sums[k] = x.chunks_mut(width).map(f).sum();
            });
        }
        println!(
            "{what}: libm {:.2} ns/element, vmath {:.2} ns/element ({:.1}x); sums {:.6e} / {:.6e}",
            ns[0],
            ns[1],
            ns[0] / ns[1],
            sums[0],
            sums[1]
        );
    }
    let b: Vec<f32> = src.iter().map(|v| v * 0.1).collect();
    let mut o = vec![0f32; n];
    let old = best_ns(n, || {
        for ((o, &a), &b) in o.iter_mut().zip(&src).zip(&b) {
            *o = a * (1.0 / (1.0 + (-a).exp())) * b;
        }
    });
    let new = best_ns(n, || vmath::swiglu(&mut o, &src, &b));
    println!(
        "swiglu: libm {old:.2} ns/element, vmath {new:.2} ns/element ({:.1}x)",
        old / new
    );
}
