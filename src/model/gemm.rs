//! One call into the `gemm` crate for the fused CPU operations (the LM-head loss, the
//! adapted linear map): [`product_into`], with each operand a slice and its strides, checked
//! against the slice's length before the call.

use candle_core::{CpuStorage, Layout};

/// A matrix operand: its data from its first element, and its (row, column) strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Operand<'a> {
    /// A contiguous matrix of `cols` columns.
    pub(crate) fn rows_of(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// A 2-D tensor's storage under its layout (any strides).
    pub(crate) fn strided(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("{what}: f32 expected")
        };
        let &[rs, cs] = l.stride() else {
            candle_core::bail!("{what}: a matrix expected, got shape {:?}", l.shape())
        };
        Ok(Self {
            data: &v[l.start_offset()..],
            rs,
            cs,
        })
    }

    /// The same data read as the transposed matrix.
    pub(crate) fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether a `[rows, cols]` matrix at these strides lies within the data (false where
    /// its last element's offset overflows).
    fn covers(&self, (rows, cols): (usize, usize)) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1)
            .checked_mul(self.rs)
            .zip((cols - 1).checked_mul(self.cs))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|i| i < self.data.len())
    }
}

/// `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] rhs [k, n]`, with `dst` contiguous (its
/// first `m * n` elements), on all of rayon's threads. Panics if an operand's extent lies
/// outside its slice.
pub(crate) fn product_into(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    product_into_on(
        dst,
        dims,
        accumulate,
        lhs,
        rhs,
        rayon::current_num_threads(),
    )
}

/// [`product_into`] on `threads` threads (1: on the calling thread alone). The threads share
/// out output blocks, each element summed over `k` in the same order: the same bits whatever
/// the count.
pub(crate) fn product_into_on(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    threads: usize,
) {
    assert!(
        m.checked_mul(n).is_some_and(|mn| dst.len() >= mn)
            && lhs.covers((m, k))
            && rhs.covers((k, n)),
        "gemm: a {m} x {k} by {k} x {n} product's operands out of bounds"
    );
    // SAFETY: every extent was checked above against its slice; `dst` is a `&mut` borrow, so
    // it aliases neither operand.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            match threads {
                0 | 1 => ::gemm::Parallelism::None,
                n => ::gemm::Parallelism::Rayon(n),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of small strided operands against the schoolbook sum.
    #[test]
    fn strided_products_match_the_sum() {
        // lhs [2, 3] read transposed from a [3, 2] buffer; rhs [3, 2] contiguous.
        let lt = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let rhs = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut dst = [1.0f32; 4];
        let l = Operand::rows_of(&lt, 2).t();
        product_into(&mut dst, (2, 2, 3), false, l, Operand::rows_of(&rhs, 2));
        assert_eq!(dst, [58.0, 64.0, 139.0, 154.0]);
        product_into(&mut dst, (2, 2, 3), true, l, Operand::rows_of(&rhs, 2));
        assert_eq!(dst, [116.0, 128.0, 278.0, 308.0]);
    }

    /// `x w^T` with `w` row-major, as every linear map passes it: gemm turns the product round
    /// and packs `w` up front when it has at most `2 mc` rows, on all of the product's threads
    /// when a depth block of it is at least 2^18 elements (vendor/patches/gemm-common-0003-*),
    /// each thread a run of whole panels. On 1, 2 and 3 threads (the panels split evenly or not;
    /// the last panel ragged, 32 rows of 64 or a width the packing pads with zeros, 24 or 13
    /// rows; `w`'s transposing pack in AVX registers, gemm-common-0004, with blocks of 16 and 8
    /// rows, rows left over (717 = 11 x 64 + 8 + 5) and columns left over (1,541 deep, in
    /// depth blocks of 383-386); without AVX the blocked and upstream's packing) the product is
    /// the same bit for bit, equal to the product with `w^T` stored contiguous (packed by a
    /// plain copy), and near a float64 reference. (With AVX-512 a depth block is at most 512
    /// deep, a quarter of 1,541 for the last shape: each shape here takes the shared path.)
    #[test]
    fn a_weight_packed_on_every_thread_gives_the_same_bits() {
        for (m, k, n) in [
            (96usize, 1536usize, 576usize),
            (96, 512, 608),
            (80, 512, 600),
            (80, 1541, 717),
        ] {
            let mut rng = crate::util::rng::Rng::new((m * k + n) as u64, "gemm prepack test");
            let (x, w) = (rng.normal_vec(m * k, 1.0), rng.normal_vec(n * k, 1.0));
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let product = |rhs: Operand, threads: usize| {
                let mut dst = vec![f32::NAN; m * n];
                product_into_on(
                    &mut dst,
                    (m, n, k),
                    false,
                    Operand::rows_of(&x, k),
                    rhs,
                    threads,
                );
                dst
            };
            let contiguous = product(Operand::rows_of(&wt, n), 2);
            for threads in [1, 2, 3] {
                let y = product(Operand::rows_of(&w, k).t(), threads);
                assert!(
                    y.iter()
                        .zip(&contiguous)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{m}x{k}x{n} on {threads} threads: not the contiguous product's bits"
                );
            }
            for (i, &got) in contiguous.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let want: f64 = (0..k)
                    .map(|l| x[r * k + l] as f64 * w[c * k + l] as f64)
                    .sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * k as f64,
                    "{m}x{k}x{n} [{r}, {c}]"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn an_operand_past_its_slice_panics() {
        let a = [0.0f32; 5];
        let mut dst = [0.0f32; 4];
        let (lhs, rhs) = (Operand::rows_of(&a, 3), Operand::rows_of(&a, 2));
        product_into(&mut dst, (2, 2, 3), false, lhs, rhs);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn an_extent_whose_offset_overflows_panics() {
        // The last element's offset, usize::MAX + 1, wraps to 0 unchecked.
        let a = [0.0f32; 4];
        let mut dst = [0.0f32; 4];
        let huge = Operand {
            data: &a,
            rs: usize::MAX,
            cs: 1,
        };
        product_into(&mut dst, (2, 2, 2), false, huge, Operand::rows_of(&a, 2));
    }
}
