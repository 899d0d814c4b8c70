//! One call into the `gemm` crate for the fused CPU operations (the LM-head loss, the
//! adapted linear map), with each operand given by its pointer and strides.

/// `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] rhs [k, n]`, each operand given by its
/// pointer and (row stride, column stride) in elements.
///
/// # Safety
/// The pointers must cover the strided extents given, and `dst` must not alias the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    ::gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        ::gemm::Parallelism::Rayon(rayon::current_num_threads()),
    )
}
