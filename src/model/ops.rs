//! Fused CPU operations with their own backward passes: RMSNorm, softmax over the last
//! dimension, SwiGLU (`silu(gate) * up`) and half-split rotary embeddings.
//!
//! candle's fast versions of the first and last of these have no backward pass, and composing
//! them from elementary ops (which do) costs several full passes and allocations each: on the
//! 2-core machine the composed versions made the backward pass of a SmolLM2 step about three
//! times its forward (see docs/BENCHMARKS.md). Each op here runs rows in parallel with rayon.
//! On other devices the composed versions run instead; the tests check both agree, values and
//! gradients.
//!
//! About 770 lines because each op sits beside its backward and its composed twin, which the
//! tests compare it with; split, an op would be read away from the gradient it must match.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::model::vmath;
use crate::util::error::Result;

/// The contiguous f32 data of a CPU tensor argument.
pub(crate) fn slice_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous tensor expected")
    };
    Ok(&v[a..b])
}

fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps), per row of the last dimension.

struct RmsNorm {
    eps: f32,
}

struct RmsNormGrad {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1, "rms-norm x")?;
        let w = slice_f32(s2, l2, "rms-norm w")?;
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, xr)| {
                let r = inv_rms(xr, self.eps);
                for i in 0..d {
                    o[i] = xr[i] * r * w[i];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }
    /// Returns `dx` (flattened) followed by `dw`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1, "rms-norm-grad x")?;
        let w = slice_f32(s2, l2, "rms-norm-grad w")?;
        let g = slice_f32(s3, l3, "rms-norm-grad g")?;
        let d = w.len();
        let n = x.len();
        let mut out = vec![0f32; n + d];
        let (dx, dw_out) = out.split_at_mut(n);
        // dx = r * u - x * r^3 * mean(u * x), with u = g * w.
        // dw sums over rows. Rows go in fixed blocks whose partial sums are added in block order,
        // so the result does not depend on how rayon schedules the work (a rayon fold/reduce
        // does: its split points follow work stealing, and float addition is not associative).
        let rows_per_block = 64;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * rows_per_block)
            .zip(x.par_chunks(d * rows_per_block))
            .zip(g.par_chunks(d * rows_per_block))
            .map(|((ob, xb), gb)| {
                let mut acc = vec![0f32; d];
                for ((o, xr), gr) in ob.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                    let r = inv_rms(xr, self.eps);
                    let mut dot = 0f32;
                    for i in 0..d {
                        dot += gr[i] * w[i] * xr[i];
                    }
                    let c = r * r * r * dot / d as f32;
                    for i in 0..d {
                        o[i] = r * gr[i] * w[i] - xr[i] * c;
                        acc[i] += gr[i] * xr[i] * r;
                    }
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in &partials {
            for i in 0..d {
                dw[i] += p[i];
            }
        }
        dw_out.copy_from_slice(&dw);
        Ok((CpuStorage::F32(out), Shape::from(n + d)))
    }
}

/// Composed RMSNorm (differentiable through stock candle ops). Below f32 the normalisation is
/// computed in f32 and rounded to `x`'s dtype before the weight multiplies it, as
/// `transformers`' `LlamaRMSNorm` does.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    Ok(normed.broadcast_mul(w)?)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        let x = x.contiguous()?;
        return Ok(x.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })?);
    }
    rms_norm_composed(x, w, eps)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct Softmax;
/// `dx = y * (g - sum(g * y))`, times `scale` when the softmax's input was scaled
/// ([`masked_softmax`]).
struct SoftmaxGrad {
    scale: Option<f32>,
}

/// Softmax of one row in place: `o` holds the inputs on entry, the probabilities on exit.
/// `exp` is [`vmath::exp`], which gives 0 where the result would be subnormal (a masked key's
/// score, -1e9 below the row's maximum); the sum is taken in 8 lanes ([`vmath::sum_f32`]).
#[inline(always)]
fn softmax_row_in_place(o: &mut [f32]) {
    let max = vmath::max(o);
    let sum = vmath::exp_in_place_f32_sum(o, max);
    vmath::scale_flushed(o, 1.0 / sum);
}

/// Attention's probabilities of one row in place: `o` holds the scores on entry,
/// `softmax(o * scale + mask_row)` on exit. Two roundings before the softmax, as the unfused
/// `scores * scale` then `+ mask`.
#[inline(always)]
fn masked_softmax_row_in_place(o: &mut [f32], mask_row: &[f32], scale: f32) {
    for (v, &mv) in o.iter_mut().zip(mask_row) {
        let z = *v * scale;
        *v = z + mv;
    }
    softmax_row_in_place(o);
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice_f32(s, l, "softmax x")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(d).for_each(softmax_row_in_place);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxGrad { scale: None },
        )?))
    }
}

/// Attention's probabilities from its queries and keys: `softmax(q k^T * scale + mask)` as
/// [`masked_softmax`] of `q.matmul(&k.t())` reshaped, for `q` `[b, g, r, hd]` (the `r / t` query
/// heads sharing key/value head `g`, stacked as rows, `t` query positions each), `k` `[b, g, T,
/// hd]` and `mask` `[b, 1, t, T]` (other shapes [`masked_softmax`] takes: the composed ops):
/// `[b, g * r / t, t, T]`. On the CPU in f32 one operation: each product's scores are
/// scaled, masked and normalised while in cache, and the scores are not kept for the backward
/// pass (the composed form's graph holds them beside the probabilities: a `[b, h, t, T]` tensor
/// per layer). The same bits forward and backward: gemm's product as candle's `matmul` takes it
/// (only where candle would take gemm rather than its dot products: more than `MAX_NARROW` rows
/// and keys), the same softmax, and the gradients as candle's `matmul` backward computes them.
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scale: f64,
    t: usize,
) -> Result<Tensor> {
    let (b, g, r, hd) = q.dims4()?;
    let total = k.dim(2)?;
    if t == 0 || r % t != 0 || k.dims4()? != (b, g, total, hd) {
        return Err(crate::Error::msg(format!(
            "attention: queries {:?} ({t} positions) and keys {:?} do not fit",
            q.dims(),
            k.dims()
        )));
    }
    let h = g * (r / t);
    let narrow = candle_core::cpu_backend::dot_matmul::MAX_NARROW;
    let gemm = r > narrow && total > narrow;
    // The fused form reads a `[b, 1, t, T]` mask only; others take the composed ops.
    let fits = mask.dims4().is_ok_and(|m| m == (b, 1, t, total));
    if fused(q)
        && fused(k)
        && fits
        && mask.dtype() == q.dtype()
        && q.is_contiguous()
        && k.is_contiguous()
        && gemm
    {
        return Ok(q.apply_op2(
            k,
            AttentionProbs {
                mask: mask.contiguous()?,
                scale: scale as f32,
                t,
            },
        )?);
    }
    let scores = q.matmul(&k.t()?)?.reshape((b, h, t, total))?;
    masked_softmax(&scores, mask, scale)
}

struct AttentionProbs {
    /// `[b, 1, t, T]`, contiguous.
    mask: Tensor,
    scale: f32,
    /// Query positions: a product's row `j` is query `j % t`.
    t: usize,
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::model::gemm::{product_into_on, Operand};
        let q = slice_f32(s1, l1, "attention q")?;
        let k = slice_f32(s2, l2, "attention k")?;
        let (b, g, r, hd) = l1.shape().dims4()?;
        let total = l2.shape().dims()[2];
        let t = self.t;
        let (ms, ml) = self.mask.storage_and_layout();
        let candle_core::Storage::Cpu(ms) = &*ms else {
            candle_core::bail!("attention: the mask is not on the CPU")
        };
        let m = slice_f32(ms, ml, "attention mask")?;
        let scale = self.scale;
        let per = r * total;
        let mut out = vec![0f32; b * g * per];
        // Product p (batch p / g) into `o`, then its rows' softmax, on `threads` threads.
        let one = |p: usize, o: &mut [f32], threads: usize| {
            product_into_on(
                o,
                (r, total, hd),
                false,
                Operand::rows_of(&q[p * r * hd..(p + 1) * r * hd], hd),
                Operand::rows_of(&k[p * total * hd..(p + 1) * total * hd], hd).t(),
                threads,
            );
            let row = |(j, o): (usize, &mut [f32])| {
                let mr = &m[((p / g) * t + j % t) * total..][..total];
                masked_softmax_row_in_place(o, mr, scale);
            };
            if threads > 1 {
                o.par_chunks_mut(total).enumerate().for_each(row);
            } else {
                o.chunks_mut(total).enumerate().for_each(row);
            }
        };
        // As the vendored candle's batched `matmul` shares them out: one product per thread
        // when the batch as a whole is above gemm's threading threshold and either each product
        // is below it or there are at least four per thread; else each on all threads in turn.
        let threads = rayon::current_num_threads();
        let (n, threshold, work) = (b * g, ::gemm::get_threading_threshold(), per * hd);
        if per > 0
            && n > 1
            && threads > 1
            && work.saturating_mul(n) >= threshold
            && (work < threshold || n >= 4 * threads)
        {
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(p, o)| one(p, o, 1));
        } else if per > 0 {
            for (p, o) in out.chunks_mut(per).enumerate() {
                one(p, o, threads);
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, g * (r / t), t, total)),
        ))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The composed form's backward: the masked softmax's, then `q.matmul(&k.t())`'s as the
        // vendored candle computes a product with a transposed right operand (`grad k` for
        // `q`; `grad^T q`, detached, for `k` itself).
        let (b, g, r, _) = q.dims4()?;
        let ds = y
            .apply_op2_no_bwd(
                &grad.contiguous()?,
                &SoftmaxGrad {
                    scale: Some(self.scale),
                },
            )?
            .reshape((b, g, r, k.dim(2)?))?;
        let dq = q.track_op().then(|| ds.matmul(&k.t()?.t()?)).transpose()?;
        let dk = k
            .track_op()
            .then(|| Ok::<_, candle_core::Error>(ds.t()?.matmul(q)?.detach()))
            .transpose()?;
        Ok((dq, dk))
    }
}

/// Attention's probabilities: `softmax(scores * scale + mask)` over the last dimension, with
/// `scores` `[b, h, t, T]` and an additive `mask` `[b, 1, t, T]` shared by the heads, in one
/// pass (the unfused form makes three, the scaling on one thread). The mask is a constant: it
/// gets no gradient.
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1, "masked-softmax scores")?;
        let m = slice_f32(s2, l2, "masked-softmax mask")?;
        let (b, h, t, tt) = l1.shape().dims4()?;
        if l2.shape().dims4()? != (b, 1, t, tt) {
            candle_core::bail!(
                "masked-softmax: mask {:?} does not fit scores {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(tt)
            .zip(x.par_chunks(tt))
            .enumerate()
            .for_each(|(r, (o, xr))| {
                // Row r is (batch r / (h t), query r % t); the mask row is (batch, query).
                let mrow = (r / (h * t)) * t + r % t;
                o.copy_from_slice(xr);
                masked_softmax_row_in_place(o, &m[mrow * tt..(mrow + 1) * tt], scale);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxGrad {
                scale: Some(self.scale),
            },
        )?;
        Ok((Some(dx), None))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-grad"
    }
    /// dx = y * (g - sum(g * y)).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice_f32(s1, l1, "softmax-grad y")?;
        let g = slice_f32(s2, l2, "softmax-grad g")?;
        let d = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .zip(g.par_chunks(d))
            .for_each(|((o, yr), gr)| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for i in 0..d {
                    o[i] = yr[i] * (gr[i] - dot);
                }
                if let Some(scale) = scale {
                    for v in o.iter_mut() {
                        *v *= scale;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x`, or 0 when it is subnormal (below `f32::MIN_POSITIVE`, about 1.2e-38 in magnitude).
///
/// Probabilities that small come out of very peaked softmax rows (an early layer's logit lens,
/// a confident attention head). As operands of the matrix products that follow they cost a
/// microcode assist each on x86: flushing them halved the RepNoise step's logit lens (11.2 ->
/// 5.9 s, `repnoise bench repnoise-step`), and their contribution to any sum is below f32's
/// resolution of it.
#[inline(always)]
pub fn flush_subnormal(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        x
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// `softmax(scores * scale + mask)` over the last dimension: `scores` `[b, h, t, T]`, `mask`
/// `[b, 1, t, T]` (additive, constant: no gradient reaches it). Fused on CPU; other devices and
/// other mask shapes take the composed ops.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let fits = match (scores.dims4(), mask.dims4()) {
        (Ok((b, _, t, tt)), Ok(m)) => m == (b, 1, t, tt),
        _ => false,
    };
    if fused(scores) && fits && mask.dtype() == scores.dtype() {
        return Ok(scores.contiguous()?.apply_op2(
            &mask.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        )?);
    }
    // Below f32, the scores are scaled, masked and normalised in f32 and the probabilities
    // rounded back (`transformers`' eager attention: `softmax(..., dtype=torch.float32)`).
    let dt = scores.dtype();
    let s = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    Ok(softmax_last(&s)?.to_dtype(dt)?)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up.

struct SwiGlu;
struct SwiGluGrad;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice_f32(s1, l1, "swiglu gate")?;
        let b = slice_f32(s2, l2, "swiglu up")?;
        let mut out = vec![0f32; a.len()];
        const C: usize = 4096;
        out.par_chunks_mut(C)
            .zip(a.par_chunks(C))
            .zip(b.par_chunks(C))
            .for_each(|((o, a), b)| vmath::swiglu(o, a, b));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluGrad)?;
        let dgate = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let dup = both.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(dgate), Some(dup)))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }
    /// Returns d_gate followed by d_up.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice_f32(s1, l1, "swiglu-grad gate")?;
        let b = slice_f32(s2, l2, "swiglu-grad up")?;
        let g = slice_f32(s3, l3, "swiglu-grad g")?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (da, db) = out.split_at_mut(n);
        const C: usize = 4096;
        da.par_chunks_mut(C)
            .zip(db.par_chunks_mut(C))
            .zip(a.par_chunks(C).zip(b.par_chunks(C)).zip(g.par_chunks(C)))
            .for_each(|((da, db), ((a, b), g))| vmath::swiglu_grad(da, db, a, b, g));
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(gate) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding, half-split layout (transformers' rotate_half), of x: [b, t, h, hd] with
// cos/sin: [b * t, hd / 2] gathered at each token's position, written heads first,
// [b, h, t, hd]: the layout attention takes, so that no transposing copy (and no tensor kept
// for the backward) sits between the rotation and attention.

struct Rope {
    /// Rotate by -angle (the backward pass of a rotation is the inverse rotation).
    inverse: bool,
    /// The input is laid out `[b, h, t, hd]` and the output `[b, t, h, hd]` (the backward);
    /// otherwise the input `[b, t, h, hd]` and the output `[b, h, t, hd]` (the forward).
    from_heads_first: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1, "rope x")?;
        let cos = slice_f32(s2, l2, "rope cos")?;
        let sin = slice_f32(s3, l3, "rope sin")?;
        let (b, d1, d2, hd) = l1.shape().dims4()?;
        let (t, h) = if self.from_heads_first {
            (d2, d1)
        } else {
            (d1, d2)
        };
        let half = hd / 2;
        if cos.len() != b * t * half || sin.len() != cos.len() {
            candle_core::bail!("rope: tables do not match [{b}*{t}, {half}]")
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        // Where head `hi` of token `ti` in row `bi` starts in the input.
        let src = |bi: usize, hi: usize, ti: usize| {
            if self.from_heads_first {
                ((bi * h + hi) * t + ti) * hd
            } else {
                ((bi * t + ti) * h + hi) * hd
            }
        };
        let mut out = vec![0f32; x.len()];
        // One chunk per output run of `inner` heads' vectors: a (row, head)'s tokens (heads
        // first) or a token's heads (tokens first).
        let inner = if self.from_heads_first { h } else { t };
        // (At least 1: an empty input, `t` or `h` 0, has no chunks to rotate.)
        out.par_chunks_mut((inner * hd).max(1))
            .enumerate()
            .for_each(|(outer, o)| {
                for (j, oo) in o.chunks_exact_mut(hd).enumerate() {
                    let (bi, hi, ti) = if self.from_heads_first {
                        (outer / t, j, outer % t)
                    } else {
                        (outer / h, outer % h, j)
                    };
                    let tok = bi * t + ti;
                    let c = &cos[tok * half..(tok + 1) * half];
                    let s = &sin[tok * half..(tok + 1) * half];
                    let xo = &x[src(bi, hi, ti)..][..hd];
                    for i in 0..half {
                        let (x1, x2) = (xo[i], xo[i + half]);
                        let si = sign * s[i];
                        oo[i] = x1 * c[i] - x2 * si;
                        oo[i + half] = x2 * c[i] + x1 * si;
                    }
                }
            });
        let shape = if self.from_heads_first {
            (b, t, h, hd)
        } else {
            (b, h, t, hd)
        };
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
                from_heads_first: !self.from_heads_first,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Composed rotary embedding (stock candle ops), same conventions as [`rope`].
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _h, hd) = x.dims4()?;
    let half = hd / 2;
    let full = |tab: &Tensor| -> Result<Tensor> {
        Ok(Tensor::cat(&[tab, tab], D::Minus1)?.reshape((b, t, 1, hd))?)
    };
    let (c, s) = (full(cos)?, full(sin)?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?)?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Rotary embedding of `x` `[b, t, h, hd]` with `cos`/`sin` `[b * t, hd / 2]`, returned heads
/// first: `[b, h, t, hd]`, contiguous.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return Ok(x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope {
                inverse: false,
                from_heads_first: false,
            },
        )?);
    }
    rope_composed(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Var {
        let n = shape.iter().product();
        let mut r = crate::util::rng::Rng::new(seed, "ops-test");
        Var::from_vec(r.normal_vec(n, 1.0), shape, &Device::Cpu).unwrap()
    }

    /// A very peaked row: the probabilities that would be subnormal are exactly 0, the others
    /// are those of the unflushed softmax, and the row still sums to 1.
    #[test]
    fn softmax_flushes_subnormal_probabilities_to_zero() {
        let row = [0f32, -80.0, -88.0, -95.0, -100.0, -120.0, -2.0];
        let x = Tensor::new(&row, &Device::Cpu)
            .unwrap()
            .reshape((1, 7))
            .unwrap();
        let y: Vec<f32> = softmax_last(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = row.iter().map(|&z| (z as f64).exp()).sum();
        for (i, (&z, &p)) in row.iter().zip(&y).enumerate() {
            let exact = (z as f64).exp() / sum;
            if exact < f32::MIN_POSITIVE as f64 {
                assert_eq!(p, 0.0, "position {i}: {p} should be flushed");
            } else {
                assert!(
                    (p as f64 - exact).abs() <= 1e-6 * exact,
                    "position {i}: {p} vs {exact}"
                );
            }
        }
        // -88 and -95 are below f32's normal range after the softmax, -80 is not.
        assert!(y[1] > 0.0 && y[2] == 0.0 && y[3] == 0.0);
        assert!((y.iter().map(|&p| p as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        assert_eq!(flush_subnormal(-1e-39), 0.0);
        assert_eq!(flush_subnormal(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
        assert_eq!(flush_subnormal(-3.5), -3.5);
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "{what}: max difference {d}");
    }

    /// Values and gradients of `fused` and `composed` agree for a random upstream gradient.
    fn check(vars: &[&Var], fused: &Tensor, composed: &Tensor, what: &str) {
        close(fused, composed, 1e-5, what);
        let up = rand(fused.dims(), 99);
        let gf = (fused * up.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * up.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gc.get(v.as_tensor()).expect("composed gradient");
            close(a, b, 1e-4, &format!("{what} gradient {i}"));
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let x = rand(&[3, 5, 16], 1);
        let w = rand(&[16], 2);
        let f = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let c = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        check(&[&x, &w], &f, &c, "rms_norm");
    }

    /// Many rows (several blocks of the weight-gradient sum): still equal to the composed op,
    /// and bit-identical from call to call whatever the thread scheduling did.
    #[test]
    fn rms_norm_weight_gradient_is_correct_and_deterministic_over_many_rows() {
        let x = rand(&[7, 83, 24], 11);
        let w = rand(&[24], 12);
        let f = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let c = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        check(&[&x, &w], &f, &c, "rms_norm (many rows)");
        let up = rand(f.dims(), 13);
        let dw = || -> Vec<u32> {
            let f = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            let g = (f * up.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let t = g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            t.into_iter().map(f32::to_bits).collect()
        };
        let first = dw();
        for _ in 0..30 {
            assert_eq!(dw(), first);
        }
    }

    #[test]
    fn softmax_matches_composed() {
        let x = rand(&[2, 3, 4, 7], 3);
        let f = softmax_last(x.as_tensor()).unwrap();
        let c = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        check(&[&x], &f, &c, "softmax");
    }

    /// The fused attention softmax equals the unfused ops bit for bit (and the scores' gradient
    /// equals theirs), with a causal mask, a padded key and a row whose keys are all masked.
    #[test]
    fn masked_softmax_equals_scale_mask_softmax_bit_for_bit() {
        let (b, h, t) = (2, 3, 5);
        let x = rand(&[b, h, t, t], 21);
        let mut valid = vec![vec![true; t]; b];
        valid[1][0] = false; // a left-padding key
        let mut mask =
            crate::model::llama::attention_mask(b, t, 0, Some(&valid), &Device::Cpu).unwrap();
        // Row 0 of batch 1 (query 0 sees only key 0, which is padding): every key masked.
        let scale = 0.125;
        let f = masked_softmax(x.as_tensor(), &mask, scale).unwrap();
        let c = softmax_last(
            &(x.as_tensor() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
        )
        .unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(bits(&f), bits(&c));
        // The all-masked row is uniform, and masked keys elsewhere get exactly 0.
        let fv: Vec<f32> = f.flatten_all().unwrap().to_vec1().unwrap();
        let row = |bi: usize, hi: usize, ti: usize| &fv[((bi * h + hi) * t + ti) * t..][..t];
        assert!(row(1, 0, 0).iter().all(|&p| (p - 0.2).abs() < 1e-6));
        assert!(row(0, 2, 1)[2..].iter().all(|&p| p == 0.0));
        let up = rand(f.dims(), 22);
        let grad = |y: &Tensor| {
            let g = (y * up.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Equal as numbers (the unfused scaling adds +0.0, turning some -0.0 into +0.0).
        assert_eq!(grad(&f), grad(&c));
        // A mask that does not fit the scores takes the composed ops.
        mask = Tensor::zeros((t, t), DType::F32, &Device::Cpu).unwrap();
        let g = masked_softmax(x.as_tensor(), &mask, scale).unwrap();
        close(
            &g,
            &softmax_last(&(x.as_tensor() * scale).unwrap()).unwrap(),
            1e-7,
            "2-D mask",
        );
    }

    /// The fused attention probabilities equal `q.matmul(&k.t())` then the masked softmax bit
    /// for bit, and so do the gradients of `q` and `k`: with right padding and with keys beyond
    /// the queries (a cached prefix), a batch of products one per thread, products in turn and a
    /// product above gemm's threading threshold (600 x 200 x 16); and at decoding's few rows (the
    /// composed form: candle's dot products).
    #[test]
    fn attention_probs_equal_the_product_and_masked_softmax_bit_for_bit() {
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        // (batch, key/value heads, queries per key/value head, query positions, past keys)
        for (b, g, n_rep, t, past) in [
            (4, 3, 3, 40, 0),
            (3, 2, 2, 24, 9),
            (1, 1, 1, 48, 0),
            (1, 1, 3, 200, 0),
            (2, 1, 3, 1, 30),
        ] {
            let (r, total, hd) = (n_rep * t, past + t, 16);
            let q = rand(&[b, g, r, hd], 31);
            let k = rand(&[b, g, total, hd], 32);
            let valid: Vec<Vec<bool>> = (0..b)
                .map(|i| (0..total).map(|j| i == 0 || j < total - 3).collect())
                .collect();
            let mask = crate::model::llama::attention_mask(b, t, past, Some(&valid), &Device::Cpu)
                .unwrap();
            let scale = 0.3; // not a power of 2: the scaling rounds
            let f = attention_probs(q.as_tensor(), k.as_tensor(), &mask, scale, t).unwrap();
            let scores = q
                .as_tensor()
                .matmul(&k.as_tensor().t().unwrap())
                .unwrap()
                .reshape((b, g * n_rep, t, total))
                .unwrap();
            let c = masked_softmax(&scores, &mask, scale).unwrap();
            let what = format!("{b} x {g} x {r} by {total}");
            assert_eq!(f.dims(), c.dims(), "{what}");
            assert!(bits(&f) == bits(&c), "{what}: probabilities differ");
            let up = rand(f.dims(), 33);
            let grads = |y: &Tensor| {
                let gs = (y * up.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (
                    bits(gs.get(q.as_tensor()).unwrap()),
                    bits(gs.get(k.as_tensor()).unwrap()),
                )
            };
            let ((fq, fk), (cq, ck)) = (grads(&f), grads(&c));
            assert!(fq == cq, "{what}: the queries' gradients differ");
            assert!(fk == ck, "{what}: the keys' gradients differ");
        }
    }

    #[test]
    fn swiglu_matches_composed() {
        let a = rand(&[4, 9], 4);
        let b = rand(&[4, 9], 5);
        let f = swiglu(a.as_tensor(), b.as_tensor()).unwrap();
        let c = (candle_nn::ops::silu(a.as_tensor()).unwrap() * b.as_tensor()).unwrap();
        check(&[&a, &b], &f, &c, "swiglu");
    }

    #[test]
    fn rope_matches_composed_and_preserves_norms() {
        let (b, t, h, hd) = (2, 3, 4, 8);
        let x = rand(&[b, t, h, hd], 6);
        let ang: Vec<f32> = (0..b * t * hd / 2).map(|i| i as f32 * 0.37).collect();
        let cos = Tensor::from_vec(
            ang.iter().map(|a| a.cos()).collect(),
            (b * t, hd / 2),
            &Device::Cpu,
        )
        .unwrap();
        let sin = Tensor::from_vec(
            ang.iter().map(|a| a.sin()).collect(),
            (b * t, hd / 2),
            &Device::Cpu,
        )
        .unwrap();
        let f = rope(x.as_tensor(), &cos, &sin).unwrap();
        let c = rope_composed(x.as_tensor(), &cos, &sin).unwrap();
        check(&[&x], &f, &c, "rope");
        // A rotation keeps each head's norm.
        let n1 = x.as_tensor().sqr().unwrap().sum(D::Minus1).unwrap();
        let n2 = f.sqr().unwrap().sum(D::Minus1).unwrap().t().unwrap();
        close(&n1, &n2, 1e-4, "rope norm");
        // No tokens: an empty result, heads first.
        let none = Tensor::zeros((b, 0, h, hd), DType::F32, &Device::Cpu).unwrap();
        let tab = Tensor::zeros((0, hd / 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(rope(&none, &tab, &tab).unwrap().dims(), &[b, h, 0, hd]);
    }
}
