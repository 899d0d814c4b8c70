//! repnoise patch: f32 matrix products with few rows or few columns, as dot products.
//!
//! When both operands run along `k` contiguously (the left one row-major, the right one a
//! transposed row-major matrix, as in `x.matmul(&w.t())` with a weight `w` of shape
//! `[out, in]`), every output element is the dot product of two contiguous vectors. With few
//! vectors on one side (decoding: a handful of token rows against every weight row), the
//! product is a stream through the weights. gemm packs both operands into panels first, and
//! its AVX-512 kernels were measured at half the speed of its FMA ones at these shapes
//! (docs/BENCHMARKS.md, "generation"); this kernel reads each weight row once, keeps the few
//! vectors of the other side in cache, and picks AVX-512, AVX2+FMA or plain code at run time.
//!
//! Each output element is summed in one fixed order by one thread, so results do not depend on
//! the number of threads.

use std::mem::MaybeUninit;

/// Most vectors on the narrow side for which the kernel is used (set from
/// `cargo run --release --example bench_linear_rows`; see docs/BENCHMARKS.md).
#[doc(hidden)]
pub const MAX_NARROW: usize = 16;
/// Shortest `k` for which the kernel is used.
pub(super) const MIN_K: usize = 16;
/// Wide vectors per scheduled work item.
const WIDE_PER_ITEM: usize = 32;
/// How far ahead of the wide vectors being computed the kernels prefetch, in wide vectors: the
/// next block of four (8, two blocks ahead, was measured 4% slower in batch-8 generation).
const PREFETCH_AHEAD: usize = 4;
/// Below this many multiply-adds the product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Whether the kernel is switched on: `CANDLE_DOT_MATMUL=0` turns it off (to compare with gemm;
/// a kernel's name picks it, `select_kernel`), and so does a CPU without AVX2 and FMA (gemm's
/// own SIMD kernels beat the plain loop there).
pub(super) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("CANDLE_DOT_MATMUL").map_or(true, |v| v != "0") && available()[0].0 != "plain"
    })
}

/// Whether the kernels prefetch the next block's wide vectors: `CANDLE_DOT_PREFETCH=0` turns it
/// off (to measure it; the results are the same bits either way).
fn prefetch_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CANDLE_DOT_PREFETCH").map_or(true, |v| v != "0"))
}

/// One batch of operands: `lhs` rows are `lhs_rs` apart, `rhs` columns are `rhs_cs` apart, both
/// contiguous along `k`.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Operands {
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_skip: usize,
    pub b_skip: usize,
    pub lhs_rs: usize,
    pub rhs_cs: usize,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: work items write disjoint elements of the destination (see `run`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `dst[s * m * n + i * n + j] = sum_l lhs[s * a_skip + i * lhs_rs + l] * rhs[s * b_skip + j * rhs_cs + l]`.
///
/// The caller checks that every index read is in bounds (`check_bounds`) and that `dst` holds
/// `b * m * n` elements.
pub(super) fn run(p: Operands, lhs: &[f32], rhs: &[f32], dst: &mut [MaybeUninit<f32>]) {
    run_with(select_kernel(), p, lhs, rhs, dst)
}

fn run_with(kernel: Kernel, p: Operands, lhs: &[f32], rhs: &[f32], dst: &mut [MaybeUninit<f32>]) {
    assert!(check_bounds(&p, lhs.len(), rhs.len()) && dst.len() >= p.b * p.m * p.n);
    // The wide side is walked in items; the narrow side's vectors are reused for each wide one.
    let wide_is_rhs = p.n >= p.m;
    let (n_wide, n_narrow) = if wide_is_rhs { (p.n, p.m) } else { (p.m, p.n) };
    let items_per_batch = n_wide.div_ceil(WIDE_PER_ITEM);
    let n_items = p.b * items_per_batch;
    let out = SendPtr(dst.as_mut_ptr().cast::<f32>());
    let prefetch = prefetch_on();
    let work = |range: std::ops::Range<usize>| {
        let out = out;
        for item in range {
            let s = item / items_per_batch;
            let w0 = (item % items_per_batch) * WIDE_PER_ITEM;
            let w1 = (w0 + WIDE_PER_ITEM).min(n_wide);
            let (wide, wide_stride, narrow, narrow_stride) = if wide_is_rhs {
                (
                    &rhs[s * p.b_skip..],
                    p.rhs_cs,
                    &lhs[s * p.a_skip..],
                    p.lhs_rs,
                )
            } else {
                (
                    &lhs[s * p.a_skip..],
                    p.lhs_rs,
                    &rhs[s * p.b_skip..],
                    p.rhs_cs,
                )
            };
            // Output strides of a wide and a narrow index in this batch's `m x n` block.
            let (out_w, out_n) = if wide_is_rhs { (1, p.n) } else { (p.n, 1) };
            let base = s * p.m * p.n;
            let geometry = Block {
                wide,
                wide_stride,
                w0,
                w1,
                narrow,
                narrow_stride,
                n_narrow,
                k: p.k,
                out_w,
                out_n,
                prefetch,
            };
            // SAFETY: this item writes only the elements `base + w * out_w + i * out_n` for its
            // own wide range `w0..w1` and every narrow `i`: disjoint from all other items, and
            // within `dst` (checked above). The selected kernel's CPU features were detected.
            unsafe { kernel(&geometry, out.0.add(base)) };
        }
    };
    if p.b * p.m * p.n * p.k < PARALLEL_MIN_MACS || crate::utils::get_num_threads() <= 1 {
        work(0..n_items);
    } else {
        // rayon's pool, as gemm and the element-wise ops use: a second pool's spinning workers
        // would compete with rayon's for the same cores between products.
        use rayon::prelude::*;
        (0..n_items)
            .into_par_iter()
            .for_each(|item| work(item..item + 1));
    }
}

/// Whether every vector read by `run` lies inside the operand slices.
#[doc(hidden)]
pub fn check_bounds(p: &Operands, lhs_len: usize, rhs_len: usize) -> bool {
    if p.b == 0 || p.m == 0 || p.n == 0 || p.k == 0 {
        return false;
    }
    // The destination's size must not wrap either.
    if p.b
        .checked_mul(p.m)
        .and_then(|bm| bm.checked_mul(p.n))
        .is_none()
    {
        return false;
    }
    let last = |skip: usize, count: usize, stride: usize| {
        (p.b - 1)
            .checked_mul(skip)
            .and_then(|a| {
                (count - 1)
                    .checked_mul(stride)
                    .and_then(|b| a.checked_add(b))
            })
            .and_then(|a| a.checked_add(p.k))
    };
    matches!(last(p.a_skip, p.m, p.lhs_rs), Some(e) if e <= lhs_len)
        && matches!(last(p.b_skip, p.n, p.rhs_cs), Some(e) if e <= rhs_len)
}

struct Block<'a> {
    wide: &'a [f32],
    wide_stride: usize,
    w0: usize,
    w1: usize,
    narrow: &'a [f32],
    narrow_stride: usize,
    n_narrow: usize,
    k: usize,
    out_w: usize,
    out_n: usize,
    /// Whether the kernel prefetches the next block's wide vectors ([`prefetch_on`]).
    prefetch: bool,
}

type Kernel = unsafe fn(&Block, *mut f32);

impl Block<'_> {
    /// Where the wide vectors of the block after `w`'s (`w + 4 .. w + 8`) start, for the
    /// kernels to prefetch while they compute `w`'s; a vector that would end past the `wide`
    /// slice (this batch's operand and any later batches' behind it) is replaced by `w`'s own
    /// (already read, so its prefetch costs nothing). Past `w1` they are the next item's, which
    /// the same thread usually takes next; past this batch's last vector, the next batch's or
    /// whatever else the slice holds (a prefetch reads nothing into the computation).
    fn next_block(&self, w: usize) -> [*const f32; 4] {
        std::array::from_fn(|d| {
            let r = if (w + PREFETCH_AHEAD + d) * self.wide_stride + self.k <= self.wide.len() {
                w + PREFETCH_AHEAD + d
            } else {
                w
            };
            self.wide[r * self.wide_stride..].as_ptr()
        })
    }
}

/// The first kernel of `available`, or the one `CANDLE_DOT_MATMUL` names (`avx2` on an AVX-512
/// CPU, to measure it there). A name this CPU has no kernel for is reported on stderr, once, and
/// the first kernel is used (so a benchmark is not labelled with a kernel it did not run).
fn select_kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let kernels = available();
        let named = std::env::var("CANDLE_DOT_MATMUL").unwrap_or_default();
        match kernels.iter().find(|(name, _)| *name == named) {
            Some((_, kernel)) => *kernel,
            None => {
                if !matches!(named.as_str(), "" | "0" | "1") {
                    let names: Vec<_> = kernels.iter().map(|(name, _)| *name).collect();
                    eprintln!(
                        "CANDLE_DOT_MATMUL={named}: no such kernel on this CPU (it has {}); \
                         using {}",
                        names.join(", "),
                        names[0]
                    );
                }
                kernels[0].1
            }
        }
    })
}

// Each kernel computes, for wide vectors `w0..w1` and every narrow vector, the dot product in
// lane-wide partial sums over `k` (the tail through a masked load), then the lanes reduced in a
// fixed order. Four wide by two narrow vectors are done at a time (eight accumulators, enough
// to cover the multiply-add latency); at the ragged edges the last vector is repeated and its
// extra results are not stored, so each element's value does not depend on where it fell in a
// block, nor on the item or thread that computed it. The first pass over a block's four wide
// vectors (narrow vectors 0 and 1) reads them from memory, the later passes from the cache; the
// first pass also prefetches the next block's four, one cache line per step, so that they
// arrive while the later passes compute instead of after them (decoding's products are a
// stream through the weights, which the hardware prefetcher alone does not overlap with those
// passes).

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(g: &Block, out: *mut f32) {
    use std::arch::x86_64::*;
    let k = g.k;
    let body = k - k % 16;
    let tail: __mmask16 = ((1u32 << (k % 16)) - 1) as __mmask16;
    let (wide, narrow) = (g.wide.as_ptr(), g.narrow.as_ptr());
    let mut w = g.w0;
    while w < g.w1 {
        let nw = (g.w1 - w).min(4);
        let wp: [*const f32; 4] =
            std::array::from_fn(|d| wide.add((w + d.min(nw - 1)) * g.wide_stride));
        let next = g.next_block(w);
        let mut i = 0;
        while i < g.n_narrow {
            let nn = (g.n_narrow - i).min(2);
            let xp: [*const f32; 2] =
                std::array::from_fn(|e| narrow.add((i + e.min(nn - 1)) * g.narrow_stride));
            let mut acc = [[_mm512_setzero_ps(); 4]; 2];
            let mut c = 0;
            while c < body {
                if g.prefetch && i == 0 {
                    // One 64-byte line of each next vector per step of 16 floats (`c < k`: in
                    // bounds, `next_block`).
                    for p in next {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(c).cast());
                    }
                }
                let x = [_mm512_loadu_ps(xp[0].add(c)), _mm512_loadu_ps(xp[1].add(c))];
                for d in 0..4 {
                    let v = _mm512_loadu_ps(wp[d].add(c));
                    acc[0][d] = _mm512_fmadd_ps(x[0], v, acc[0][d]);
                    acc[1][d] = _mm512_fmadd_ps(x[1], v, acc[1][d]);
                }
                c += 16;
            }
            if c < k {
                let x = [
                    _mm512_maskz_loadu_ps(tail, xp[0].add(c)),
                    _mm512_maskz_loadu_ps(tail, xp[1].add(c)),
                ];
                for d in 0..4 {
                    let v = _mm512_maskz_loadu_ps(tail, wp[d].add(c));
                    acc[0][d] = _mm512_fmadd_ps(x[0], v, acc[0][d]);
                    acc[1][d] = _mm512_fmadd_ps(x[1], v, acc[1][d]);
                }
            }
            for e in 0..nn {
                for d in 0..nw {
                    *out.add((w + d) * g.out_w + (i + e) * g.out_n) =
                        _mm512_reduce_add_ps(acc[e][d]);
                }
            }
            i += nn;
        }
        w += nw;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(g: &Block, out: *mut f32) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn reduce(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
    let k = g.k;
    let body = k - k % 8;
    let tail = _mm256_cmpgt_epi32(
        _mm256_set1_epi32((k % 8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let (wide, narrow) = (g.wide.as_ptr(), g.narrow.as_ptr());
    let mut w = g.w0;
    while w < g.w1 {
        let nw = (g.w1 - w).min(4);
        let wp: [*const f32; 4] =
            std::array::from_fn(|d| wide.add((w + d.min(nw - 1)) * g.wide_stride));
        let next = g.next_block(w);
        let mut i = 0;
        while i < g.n_narrow {
            let nn = (g.n_narrow - i).min(2);
            let xp: [*const f32; 2] =
                std::array::from_fn(|e| narrow.add((i + e.min(nn - 1)) * g.narrow_stride));
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            let mut c = 0;
            while c < body {
                if g.prefetch && i == 0 && c % 16 == 0 {
                    // One 64-byte line of each next vector per 16 floats (in bounds, as above).
                    for p in next {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(c).cast());
                    }
                }
                let x = [_mm256_loadu_ps(xp[0].add(c)), _mm256_loadu_ps(xp[1].add(c))];
                for d in 0..4 {
                    let v = _mm256_loadu_ps(wp[d].add(c));
                    acc[0][d] = _mm256_fmadd_ps(x[0], v, acc[0][d]);
                    acc[1][d] = _mm256_fmadd_ps(x[1], v, acc[1][d]);
                }
                c += 8;
            }
            if c < k {
                let x = [
                    _mm256_maskload_ps(xp[0].add(c), tail),
                    _mm256_maskload_ps(xp[1].add(c), tail),
                ];
                for d in 0..4 {
                    let v = _mm256_maskload_ps(wp[d].add(c), tail);
                    acc[0][d] = _mm256_fmadd_ps(x[0], v, acc[0][d]);
                    acc[1][d] = _mm256_fmadd_ps(x[1], v, acc[1][d]);
                }
            }
            for e in 0..nn {
                for d in 0..nw {
                    *out.add((w + d) * g.out_w + (i + e) * g.out_n) = reduce(acc[e][d]);
                }
            }
            i += nn;
        }
        w += nw;
    }
}

/// Without SIMD: eight partial sums per dot product (so the compiler can still vectorise).
unsafe fn block_plain(g: &Block, out: *mut f32) {
    let k = g.k;
    for w in g.w0..g.w1 {
        let wv = &g.wide[w * g.wide_stride..w * g.wide_stride + k];
        for i in 0..g.n_narrow {
            let xv = &g.narrow[i * g.narrow_stride..i * g.narrow_stride + k];
            let mut acc = [0f32; 8];
            let (xc, wc) = (xv.chunks_exact(8), wv.chunks_exact(8));
            let (xr, wr) = (xc.remainder(), wc.remainder());
            for (a, b) in xc.zip(wc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            for l in 0..xr.len() {
                acc[l] += xr[l] * wr[l];
            }
            *out.add(w * g.out_w + i * g.out_n) = acc.iter().sum();
        }
    }
}

/// The kernels this CPU can run, by name: the first is the one `matmul` uses.
#[doc(hidden)]
pub fn kernel_names() -> Vec<&'static str> {
    available().into_iter().map(|(name, _)| name).collect()
}

/// `run` with a named kernel from `kernel_names` (for tests that check each one).
#[doc(hidden)]
pub fn run_named(name: &str, p: Operands, lhs: &[f32], rhs: &[f32]) -> Option<Vec<f32>> {
    let (_, kernel) = available().into_iter().find(|(n, _)| *n == name)?;
    let mut dst = vec![MaybeUninit::new(f32::NAN); p.b * p.m * p.n];
    run_with(kernel, p, lhs, rhs, &mut dst);
    // SAFETY: initialised above (and overwritten by the kernel).
    Some(
        dst.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect(),
    )
}

fn available() -> Vec<(&'static str, Kernel)> {
    let mut kernels: Vec<(&'static str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", block_avx512));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.push(("avx2", block_avx2));
        }
    }
    kernels.push(("plain", block_plain));
    kernels
}
