//! Element-wise kernels of the CPU hot paths, written so that the compiler vectorises them, and
//! compiled three times: for the baseline x86-64 the binary targets (SSE2), for AVX2 + FMA and
//! for AVX-512 (F, BW, VL, DQ: 512-bit vectors, about 1-2% off scoring and the training step on
//! an AVX-512 Xeon, docs/BENCHMARKS.md), picked at run time from the CPU's features
//! (`multiversion`). The binary is built for any x86-64, so code outside such a function never
//! uses AVX2, and `f32::exp` is a scalar libm call per element.
//!
//! [`exp`] is Cephes' `expf` (Cody-Waite reduction to `|r| <= ln 2 / 2`, then its polynomial
//! `1 + r + r^2 P(r)` with `P` of degree 5), branch-free so that a loop of it vectorises; within
//! 1 ulp of the exact value over f32's normal range (0.96 ulp at most in `vmath_tests`' sweep).
//! It takes the place of libm's `expf` in the softmaxes, the SwiGLU and its backward, and the
//! losses (one call per logit: 49,152 per scored token). Rust never fuses `a * b + c` into one
//! rounding on its own, so all three compiled forms run the same IEEE operations in the same order
//! and give the same bits; the lane sums ([`sum_f32`], [`sum_exp_f64`]) fix their order by the
//! slice, not by the CPU.
use multiversion::multiversion;

/// `ln(f32::MIN_POSITIVE)`: below it `e^x` would be subnormal and [`exp`] gives 0.
pub const EXP_MIN: f32 = -87.336_54;
/// `ln(f32::MAX)`: above it [`exp`] gives infinity.
const EXP_MAX: f32 = 88.722_84;
/// `1.5 * 2^23`: adding it rounds a float of magnitude below `2^22` to an integer.
const ROUND: f32 = 12_582_912.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `k * LN2_HI` is exact for the `k` that occur (|k| <= 128).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Lanes of the reductions: an AVX2 register of f32, or of f64 in two halves (one AVX-512
/// register); the same lanes, in the same order, whatever the vector width.
const LANES: usize = 8;

/// `2^n` for `n` in -126..=127.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// `e^x`, within 1 ulp; 0 where the result would be subnormal (`x < EXP_MIN`, as
/// [`crate::model::ops::flush_subnormal`] does), infinity above `ln(f32::MAX)`, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN through the clamp and the arithmetic below.
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    let kr = xc * LOG2E + ROUND; // round(x / ln 2) + ROUND
    let k = kr - ROUND;
    let n = (kr.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let er = p * (r * r) + r + 1.0;
    // 2^n in two factors: n reaches 128 at the top of the range.
    let n1 = n >> 1;
    let y = er * pow2(n1) * pow2(n.wrapping_sub(n1));
    if x > EXP_MAX {
        f32::INFINITY
    } else if x < EXP_MIN || y < f32::MIN_POSITIVE {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The largest element (`f32::NEG_INFINITY` for an empty slice; NaN elements are passed over,
/// as `f32::max` does). Exact: the lanes change only the order of the comparisons.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    tail.iter().copied().fold(m, f32::max)
}

/// Elements per block of the exp-then-sum kernels: each block's `exp` is one loop, which the
/// compiler vectorises, and its lane sum a second (written as one loop with the sum inside,
/// LLVM vectorised neither: the lanes' exp expressions were too large for its SLP pass).
/// A multiple of [`LANES`], so an element's lane is its index modulo 8 in every kernel.
const BLOCK: usize = 256;

/// Adds `x` (a multiple of [`LANES`] long) into the lanes: lane `j` takes `x[j], x[j + 8], ...`.
#[inline(always)]
fn add_lanes_f32(acc: &mut [f32; LANES], x: &[f32]) {
    for c in x.chunks_exact(LANES) {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
}

/// [`add_lanes_f32`] with the lanes in f64.
#[inline(always)]
fn add_lanes_f64(acc: &mut [f64; LANES], x: &[f32]) {
    for c in x.chunks_exact(LANES) {
        for j in 0..LANES {
            acc[j] += c[j] as f64;
        }
    }
}

/// `x` split where its last `len % 8` elements (added after the lanes) begin.
#[inline(always)]
fn body_len(len: usize) -> usize {
    len - len % LANES
}

/// `o[i] = e^(o[i] - shift)`, the body (all but the last `len % 8`) a block of [`BLOCK`] at a
/// time, each block then added into `acc` by `add_lanes`; returns the tail, exponentiated but not
/// added. Inlined into each caller's compiled forms; the exp loop and the lane sum stay two loops
/// per block (one loop with both was left scalar by LLVM).
#[inline(always)]
fn exp_in_place_into_lanes<'o, A>(
    o: &'o mut [f32],
    shift: f32,
    acc: &mut A,
    add_lanes: impl Fn(&mut A, &[f32]),
) -> &'o [f32] {
    let n = body_len(o.len());
    let (body, tail) = o.split_at_mut(n);
    for blk in body.chunks_mut(BLOCK) {
        for v in blk.iter_mut() {
            *v = exp(*v - shift);
        }
        add_lanes(acc, blk);
    }
    for v in tail.iter_mut() {
        *v = exp(*v - shift);
    }
    tail
}

/// Sum in f32: lane `j` adds the elements `j, j + 8, ...` in order; the result is the lanes'
/// sum (added in order) plus the tail's own sum (the last `len % 8` elements, in order).
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn sum_f32(x: &[f32]) -> f32 {
    let (body, tail) = x.split_at(body_len(x.len()));
    let mut acc = [0f32; LANES];
    add_lanes_f32(&mut acc, body);
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Sum of squares in f64: lane `j` adds `x[i]^2` (each square exact in f64) for `i = j, j + 8,
/// ...` in order; the result is the lanes' sum plus the tail's squares, both in order.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn sum_sq_f64(x: &[f32]) -> f64 {
    let (body, tail) = x.split_at(body_len(x.len()));
    let mut acc = [0f64; LANES];
    for c in body.chunks_exact(LANES) {
        for j in 0..LANES {
            let v = c[j] as f64;
            acc[j] += v * v;
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
}

/// `o[i] = e^(o[i] - shift)`; returns their sum in f64 (lanes as [`sum_f32`]).
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn exp_in_place_f64_sum(o: &mut [f32], shift: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let tail = exp_in_place_into_lanes(o, shift, &mut acc, add_lanes_f64);
    acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()
}

/// The sum in f64 of `e^(x[i] - shift)` (lanes as [`sum_f32`]; the same bits as
/// [`exp_in_place_f64_sum`]), without writing them out.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn sum_exp_f64(x: &[f32], shift: f32) -> f64 {
    let (body, tail) = x.split_at(body_len(x.len()));
    let mut acc = [0f64; LANES];
    let mut buf = [0f32; BLOCK];
    for blk in body.chunks(BLOCK) {
        let b = &mut buf[..blk.len()];
        for (d, &v) in b.iter_mut().zip(blk) {
            *d = exp(v - shift);
        }
        add_lanes_f64(&mut acc, b);
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| exp(v - shift) as f64).sum::<f64>()
}

/// `o[i] = e^(o[i] - shift)`; returns their sum in f32 (lanes as [`sum_f32`]).
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn exp_in_place_f32_sum(o: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let tail = exp_in_place_into_lanes(o, shift, &mut acc, add_lanes_f32);
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `o[i] = flush_subnormal(o[i] * k)`.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn scale_flushed(o: &mut [f32], k: f32) {
    for v in o.iter_mut() {
        *v = crate::model::ops::flush_subnormal(*v * k);
    }
}

/// `o[i] = flush_subnormal(g * e^(x[i] - shift))`: a softmax row scaled by `g`, from its
/// logits and their log-sum-exp `shift`. An `e^` below the normal range is 0 before the
/// scaling (libm's subnormal times `|g| > 1` could be normal: at most 1.2e-38 |g|).
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn scaled_exp(o: &mut [f32], x: &[f32], shift: f32, g: f32) {
    for (v, &z) in o.iter_mut().zip(x) {
        *v = crate::model::ops::flush_subnormal(g * exp(z - shift));
    }
}

/// SwiGLU: `o[i] = silu(a[i]) * b[i]`, `silu(a) = a * sigmoid(a)`.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn swiglu(o: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o = a * sigmoid(a) * b;
    }
}

/// SwiGLU's backward: `da = g b s (1 + a (1 - s))`, `db = g silu(a)`, `s = sigmoid(a)`.
#[multiversion(targets(
    "x86_64+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx+avx2+fma"
))]
pub fn swiglu_grad(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    let n = da.len();
    let (db, a, b, g) = (&mut db[..n], &a[..n], &b[..n], &g[..n]);
    for i in 0..n {
        let s = sigmoid(a[i]);
        db[i] = g[i] * (a[i] * s);
        da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
    }
}

#[cfg(test)]
mod vmath_tests {
    use super::*;

    /// Distance in units of f32's spacing in the binade of the exact value `want` (> 0).
    fn ulps(got: f32, want: f64) -> f64 {
        let spacing = 2f64.powi(want.log2().floor() as i32 - 23);
        (got as f64 - want).abs() / spacing
    }

    /// Asserts `exp(x)` within 1 ulp (a NaN fails too) and returns the error.
    fn exp_ulps(x: f32) -> f64 {
        let u = ulps(exp(x), (x as f64).exp());
        assert!(u < 1.0, "exp({x}) = {}: {u} ulp", exp(x));
        u
    }

    #[test]
    fn exp_is_within_one_ulp_over_the_normal_range() {
        // Every 2^-10 from EXP_MIN to ln(f32::MAX), and bit patterns in between.
        let mut worst = 0f64;
        let mut x = EXP_MIN as f64 + 1e-4;
        while x < EXP_MAX as f64 {
            worst = worst.max(exp_ulps(x as f32));
            x += 1.0 / 1024.0;
        }
        for bits in (0u32..1 << 31).step_by(4099) {
            for xf in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if xf > EXP_MIN && xf < EXP_MAX {
                    worst = worst.max(exp_ulps(xf));
                }
            }
        }
        assert!(
            worst > 0.5,
            "the sweep saw no rounding at all ({worst} ulp)"
        );
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(EXP_MIN - 0.01), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(88.8), f32::INFINITY);
        assert!(exp(88.72).is_finite() && exp(88.72) > 3.3e38);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn kernels_match_their_definitions() {
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 60.0) * 0.37)
            .collect();
        // A masked key, one below the normal range after the shift, one just inside it.
        x.extend([-1e9, f32::NEG_INFINITY, -80.0, -60.0]);
        let m = max(&x);
        assert_eq!(m, x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, -3.0, f32::NAN]), -3.0);

        let exact: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let s = sum_exp_f64(&x, m);
        assert!((s - exact).abs() <= 1e-6 * exact, "{s} {exact}");
        let mut o = x.clone();
        let s2 = exp_in_place_f64_sum(&mut o, m);
        assert_eq!(
            s2.to_bits(),
            s.to_bits(),
            "the two sums take the same order"
        );
        let mut o32 = x.clone();
        let s3 = exp_in_place_f32_sum(&mut o32, m);
        assert_eq!(o, o32);
        assert!(((s3 as f64) - exact).abs() <= 1e-5 * exact);
        assert_eq!(sum_f32(&o), s3);
        // The kernels run the dispatched (AVX2 where the CPU has it) form; this function is
        // compiled for the baseline only: the same bits either way.
        let mut flushed = 0;
        for (v, &z) in o.iter().zip(&x) {
            assert_eq!(v.to_bits(), exp(z - m).to_bits());
            let want = ((z - m) as f64).exp();
            if want < f32::MIN_POSITIVE as f64 {
                assert_eq!(*v, 0.0, "e^{}", z - m);
                flushed += 1;
            } else {
                assert!(ulps(*v, want) < 1.0, "e^{}", z - m);
            }
        }
        assert_eq!(flushed, 3);
        assert!(exp_in_place_f32_sum(&mut [1.0, f32::NAN], 0.0).is_nan());
        assert!(sum_exp_f64(&[1.0, f32::NAN], 0.0).is_nan());

        // Sum of squares over the finite entries (1003 + 3: a tail of 6): the lanes' order,
        // written out here, and within 1e-12 of the sum in a different order.
        let fin: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
        let mut lanes = [0f64; LANES];
        let body = fin.len() - fin.len() % LANES;
        for (i, &v) in fin[..body].iter().enumerate() {
            lanes[i % LANES] += (v as f64) * (v as f64);
        }
        let mut want = lanes.iter().sum::<f64>();
        for &v in &fin[body..] {
            want += (v as f64) * (v as f64);
        }
        assert_eq!(sum_sq_f64(&fin).to_bits(), want.to_bits());
        let reversed: f64 = fin.iter().rev().map(|&v| (v as f64).powi(2)).sum();
        assert!((sum_sq_f64(&fin) - reversed).abs() <= 1e-12 * reversed);
        assert_eq!(sum_sq_f64(&[]), 0.0);
        assert_eq!(sum_sq_f64(&[3.0, -4.0]), 25.0);
        assert!(sum_sq_f64(&[1.0; 9].map(|v| v * f32::NAN)).is_nan());
        assert_eq!(
            sum_sq_f64(&[f32::MAX, f32::MAX]),
            2.0 * (f32::MAX as f64).powi(2)
        );

        let mut sc = vec![0f32; x.len()];
        scaled_exp(&mut sc, &x, m, 0.5);
        for (v, &z) in sc.iter().zip(&x) {
            assert_eq!(*v, crate::model::ops::flush_subnormal(0.5 * exp(z - m)));
        }

        let b: Vec<f32> = x.iter().map(|v| v.cos()).collect();
        let g: Vec<f32> = x.iter().map(|v| v.sin()).collect();
        let mut y = vec![0f32; x.len()];
        swiglu(&mut y, &x, &b);
        let (mut da, mut db) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        swiglu_grad(&mut da, &mut db, &x, &b, &g);
        for i in 0..x.len() - 4 {
            // The same bits as this (baseline-compiled) scalar form ...
            let (af, bf, gf) = (x[i], b[i], g[i]);
            let sf = sigmoid(af);
            assert_eq!(y[i].to_bits(), (af * sf * bf).to_bits());
            assert_eq!(db[i].to_bits(), (gf * (af * sf)).to_bits());
            let dgate = gf * bf * sf * (1.0 + af * (1.0 - sf));
            assert_eq!(da[i].to_bits(), dgate.to_bits());
            // ... and close to the exact values, relatively (a below -20 gives about 1e-8).
            let (a, b, g) = (af as f64, bf as f64, gf as f64);
            let s = 1.0 / (1.0 + (-a).exp());
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-5 * want.abs();
            assert!(close(y[i], a * s * b), "swiglu at {a}");
            assert!(close(db[i], g * a * s), "swiglu d_up at {a}");
            assert!(
                close(da[i], g * b * s * (1.0 + a * (1.0 - s))),
                "swiglu d_gate at {a}"
            );
        }
    }
}
