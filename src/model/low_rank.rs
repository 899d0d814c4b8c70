//! A linear map with LoRA adapters (Hu et al. 2021, eq. 3), `x W^T + sum_k s_k (x A_k^T) B_k^T`,
//! as one CPU operation with its own backward pass.
//!
//! Composed from candle ops, each adapter adds a `[rows, r]` product, a `[rows, out]` product
//! and a `[rows, out]` sum, and a training step's graph keeps all three alive until the
//! backward pass: 0.6 GB of fresh pages per SmolLM2 4 x 128 forward, each faulted in anew.
//! Here the adapters' products accumulate into the output of `x W^T` inside `gemm`, so the
//! graph keeps only the output; the backward recomputes the `[rows, r]` products, which are
//! small. `repnoise bench lora-step` (4 x 128): peak memory 2.08 -> 1.49 GiB, the same losses
//! (docs/BENCHMARKS.md).
//!
//! The adapters travel as one flat tensor (every `A_k` then `B_k`, row-major), because a
//! custom op takes at most three inputs; its gradient flows back through the concatenation to
//! each adapter. Other devices and dtypes, maps with a bias, maps of up to 16 outputs and
//! batches of up to 64 rows (decoding), for which `linear` has other forms of the product, keep
//! the composed form (`model::llama`); the tests compare this with that form written out,
//! values and gradients.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::model::gemm::{product_into, Operand};
use crate::model::ops::slice_f32;
use crate::util::error::Result;

/// A low-rank adapter on one linear map `W [out, in]`: the map becomes
/// `x W^T + scale * (x A^T) B^T` (LoRA, Hu et al. 2021), with `A [rank, in]`, `B [out, rank]`.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// Whether [`linear`] runs fused for these operands: f32 on the CPU throughout.
pub fn fusable(x: &Tensor, w: &Tensor, ads: &[Adapter]) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    !ads.is_empty()
        && f32_cpu(x)
        && f32_cpu(w)
        && ads.iter().all(|a| f32_cpu(&a.a) && f32_cpu(&a.b))
}

/// `x W^T + sum_k s_k (x A_k^T) B_k^T` for `x` `[rows, in]`, `w` `[out, in]` (any strides: a
/// variable, or the transposed view of an `[in, out]` matrix), each adapter's `a` `[r, in]`
/// and `b` `[out, r]`. Gradients reach `x`, `w` and the adapters that carry one. CPU f32 only
/// ([`fusable`]).
pub fn linear(x: &Tensor, w: &Tensor, ads: &[Adapter]) -> Result<Tensor> {
    let (_, din) = x.dims2()?;
    let (dout, win) = w.dims2()?;
    let mut flat = Vec::with_capacity(2 * ads.len());
    let mut shapes = Vec::with_capacity(ads.len());
    for ad in ads {
        let (r, ain) = ad.a.dims2()?;
        let (bout, br) = ad.b.dims2()?;
        if ain != din || win != din || bout != dout || br != r {
            return Err(crate::Error::msg(format!(
                "adapter shapes A {:?}, B {:?} do not fit a {dout} x {din} map",
                ad.a.dims(),
                ad.b.dims()
            )));
        }
        flat.push(ad.a.flatten_all()?);
        flat.push(ad.b.flatten_all()?);
        shapes.push((r, ad.scale as f32));
    }
    let ab = Tensor::cat(&flat, 0)?;
    Ok(x.contiguous()?
        .apply_op3(w, &ab, LowRankLinear { shapes })?)
}

/// The fused map: its inputs are `x`, `w` and the adapters' flat tensor; `shapes` holds each
/// adapter's rank and scale, in the flat tensor's order.
struct LowRankLinear {
    shapes: Vec<(usize, f32)>,
}

/// `s * lhs rhs` `[rows, r]`, for `lhs` `[rows, k]` and `rhs` `[k, r]`, scaled after the
/// product as the composed form's `(x A^T) * s`.
fn scaled_product(
    lhs: Operand,
    rhs: Operand,
    (rows, k, r): (usize, usize, usize),
    s: f32,
) -> Vec<f32> {
    let mut u = vec![0f32; rows * r];
    product_into(&mut u, (rows, r, k), false, lhs, rhs);
    u.iter_mut().for_each(|v| *v *= s);
    u
}

/// `lhs W + sum_j (s_j lhs D_j) U_j` `[rows, n]`, for `lhs` `[rows, k]`, `w` `[k, n]` and each
/// adapter's `(D_j [k, r_j], U_j [r_j, n], r_j, s_j)`. The map's output is this form (`x`,
/// `W^T`, `A^T`, `B^T`), and so is its input's gradient (`g`, `W`, `B`, `A`).
fn product_with_adapters<'a>(
    lhs: Operand,
    (rows, k, n): (usize, usize, usize),
    w: Operand,
    adapters: impl Iterator<Item = (Operand<'a>, Operand<'a>, usize, f32)>,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    product_into(&mut out, (rows, n, k), false, lhs, w);
    for (down, up, r, s) in adapters {
        let u = scaled_product(lhs, down, (rows, k, r), s);
        product_into(&mut out, (rows, n, r), true, Operand::rows_of(&u, r), up);
    }
    out
}

/// Each adapter's place in the flat tensor: its offset there, `A [r, din]`, `B [dout, r]`,
/// rank and scale, for a map of `din` inputs and `dout` outputs.
fn adapters<'a>(
    ab: &'a [f32],
    shapes: &'a [(usize, f32)],
    (din, dout): (usize, usize),
) -> impl Iterator<Item = (usize, Operand<'a>, Operand<'a>, usize, f32)> + 'a {
    shapes.iter().scan(0, move |off, &(r, s)| {
        let at = *off;
        *off += r * (din + dout);
        let a = Operand::rows_of(&ab[at..at + r * din], din);
        let b = Operand::rows_of(&ab[at + r * din..*off], r);
        Some((at, a, b, r, s))
    })
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "low-rank-linear"
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
        let (rows, din) = l1.shape().dims2()?;
        let dout = l2.shape().dims2()?.0;
        let x = Operand::rows_of(slice_f32(s1, l1, "low-rank-linear x")?, din);
        let w = Operand::strided(s2, l2, "low-rank-linear w")?;
        let ab = slice_f32(s3, l3, "low-rank-linear adapters")?;
        let adapters =
            adapters(ab, &self.shapes, (din, dout)).map(|(_, a, b, r, s)| (a.t(), b.t(), r, s));
        let out = product_with_adapters(x, (rows, din, dout), w.t(), adapters);
        Ok((CpuStorage::F32(out), Shape::from((rows, dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        ab: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let shapes = self.shapes.clone();
        let dx = if x.track_op() {
            Some(g.apply_op3_no_bwd(
                w,
                ab,
                &LowRankInputGrad {
                    shapes: shapes.clone(),
                },
            )?)
        } else {
            None
        };
        // The weight's gradient `g^T x`, in its own `[out, in]` layout (as the vendored
        // backward computes it for `x w^T`).
        let dw = if w.track_op() {
            Some(g.t()?.matmul(&x.detach())?)
        } else {
            None
        };
        let dab = if ab.track_op() {
            Some(g.apply_op3_no_bwd(x, ab, &LowRankAdapterGrad { shapes })?)
        } else {
            None
        };
        Ok((dx, dw, dab))
    }
}

/// The gradient of [`LowRankLinear`]'s input: `g W + sum_k (s_k g B_k) A_k`, from `g`, `w` and
/// the adapters.
struct LowRankInputGrad {
    shapes: Vec<(usize, f32)>,
}

impl CustomOp3 for LowRankInputGrad {
    fn name(&self) -> &'static str {
        "low-rank-linear-input-grad"
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
        let (rows, dout) = l1.shape().dims2()?;
        let din = l2.shape().dims2()?.1;
        let g = Operand::rows_of(slice_f32(s1, l1, "low-rank-linear grad")?, dout);
        let w = Operand::strided(s2, l2, "low-rank-linear w")?;
        let ab = slice_f32(s3, l3, "low-rank-linear adapters")?;
        let adapters = adapters(ab, &self.shapes, (din, dout)).map(|(_, a, b, r, s)| (b, a, r, s));
        let dx = product_with_adapters(g, (rows, dout, din), w, adapters);
        Ok((CpuStorage::F32(dx), Shape::from((rows, din))))
    }
}

/// The gradient of [`LowRankLinear`]'s adapters, laid out as their flat tensor: per adapter
/// `dA = (s g B)^T x` `[r, in]` and `dB = g^T (s x A^T)` `[out, r]`, from `g`, `x` and the
/// adapters.
struct LowRankAdapterGrad {
    shapes: Vec<(usize, f32)>,
}

impl CustomOp3 for LowRankAdapterGrad {
    fn name(&self) -> &'static str {
        "low-rank-linear-adapter-grad"
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
        let (rows, dout) = l1.shape().dims2()?;
        let din = l2.shape().dims2()?.1;
        let g = Operand::rows_of(slice_f32(s1, l1, "low-rank-linear grad")?, dout);
        let x = Operand::rows_of(slice_f32(s2, l2, "low-rank-linear x")?, din);
        let ab = slice_f32(s3, l3, "low-rank-linear adapters")?;
        let mut dab = vec![0f32; ab.len()];
        for (off, a, b, r, s) in adapters(ab, &self.shapes, (din, dout)) {
            let (da, db) = dab[off..off + r * (din + dout)].split_at_mut(r * din);
            let v = scaled_product(g, b, (rows, dout, r), s);
            let u = scaled_product(x, a.t(), (rows, din, r), s);
            product_into(da, (r, din, rows), false, Operand::rows_of(&v, r).t(), x);
            product_into(db, (dout, r, rows), false, g.t(), Operand::rows_of(&u, r));
        }
        Ok((CpuStorage::F32(dab), Shape::from(ab.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Var {
        let mut r = crate::util::rng::Rng::new(seed, "low-rank-test");
        Var::from_vec(r.normal_vec(shape.0 * shape.1, 1.0), shape, &Device::Cpu).unwrap()
    }

    /// The composed form `model::llama` runs elsewhere: `x W^T + sum_k ((x A_k^T) s_k) B_k^T`.
    fn composed(x: &Tensor, w: &Tensor, ads: &[Adapter]) -> Tensor {
        let mut y = x.matmul(&w.t().unwrap()).unwrap();
        for ad in ads {
            let z = (x.matmul(&ad.a.t().unwrap()).unwrap() * ad.scale)
                .unwrap()
                .matmul(&ad.b.t().unwrap())
                .unwrap();
            y = (y + z).unwrap();
        }
        y
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// Values and every gradient of the fused map against the composed one: a frozen adapter
    /// (rank 2, scale 0.5, as a security vector) under a trained one (rank 3, scale 2), through
    /// a loss that weights every output differently. With `train_w` the weight is trained and
    /// both adapters frozen (fine-tuning under a security vector); `relaid` gives the weight as
    /// the transposed view of an `[in, out]` matrix, as `Llama::inference` holds it.
    fn check(train_w: bool, relaid: bool, track_x: bool) {
        let (rows, din, dout) = (40, 24, 16);
        let x = rand((rows, din), 1);
        let w = rand((dout, din), 2);
        let w_t: Tensor = match (relaid, train_w) {
            (true, _) => w
                .as_tensor()
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .t()
                .unwrap(),
            (false, true) => w.as_tensor().clone(),
            (false, false) => w.as_tensor().detach(),
        };
        let (a1, b1, a2, b2) = (
            rand((2, din), 3),
            rand((dout, 2), 4),
            rand((3, din), 5),
            rand((dout, 3), 6),
        );
        let pick = |v: &Var| {
            if train_w {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            }
        };
        let ads = [
            Adapter {
                a: a1.as_tensor().detach(),
                b: b1.as_tensor().detach(),
                scale: 0.5,
            },
            Adapter {
                a: pick(&a2),
                b: pick(&b2),
                scale: 2.0,
            },
        ];
        let xt = if track_x {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let c = rand((rows, dout), 7).as_tensor().detach();
        let fused = linear(&xt, &w_t, &ads).unwrap();
        let reference = composed(&xt, &w_t, &ads);
        assert!(max_rel_diff(&fused, &reference) < 1e-6, "values differ");
        let gf = (&fused * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&reference * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut tracked = vec![];
        if track_x {
            tracked.push(("x", x.as_tensor()));
        }
        if train_w && !relaid {
            tracked.push(("w", w.as_tensor()));
        }
        if !train_w {
            tracked.push(("a2", a2.as_tensor()));
            tracked.push(("b2", b2.as_tensor()));
        }
        for (name, v) in tracked {
            let (f, r) = (gf.get(v), gr.get(v));
            let (Some(f), Some(r)) = (f, r) else {
                panic!(
                    "{name}: gradient fused {:?}, composed {:?}",
                    f.is_some(),
                    r.is_some()
                )
            };
            assert!(max_rel_diff(f, r) < 1e-5, "{name}: gradients differ");
        }
    }

    #[test]
    fn fused_adapters_match_the_composed_form_with_the_adapter_trained() {
        check(false, false, true);
    }

    #[test]
    fn fused_adapters_match_the_composed_form_with_the_weight_trained() {
        check(true, false, true);
    }

    #[test]
    fn fused_adapters_read_a_relaid_weight() {
        check(false, true, true);
    }

    #[test]
    fn fused_adapters_take_an_untracked_input() {
        check(false, false, false);
    }

    /// An adapter with `B = 0` (a fresh LoRA) leaves candle's `x W^T` bit for bit.
    #[test]
    fn a_zero_adapter_leaves_the_product_bit_for_bit() {
        let (rows, din, dout) = (80, 48, 40);
        let x = rand((rows, din), 11).as_tensor().detach();
        let w = rand((dout, din), 12).as_tensor().detach();
        let ad = Adapter {
            a: rand((4, din), 13).as_tensor().detach(),
            b: Tensor::zeros((dout, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
            scale: 2.0,
        };
        let fused: Vec<f32> = linear(&x, &w, &[ad])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let plain: Vec<f32> = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(fused
            .iter()
            .zip(&plain)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
