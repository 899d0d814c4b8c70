//! The vendored crates' patches (`vendor/patches`, `vendor/README.md`): each one's behaviour
//! checked against a reference (candle-core's tiled transposed copies, dot-product matmul
//! kernels, element-wise maps on rayon's pool, `backward_owned` and a transposed weight's gradient; gemm-common's packing of
//! strided operands).

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use repnoise::data::EncodedPair;
use repnoise::defence::repnoise::{repnoise_loss, PairBatch, RepNoiseConfig};
use repnoise::model::llama::Llama;
use repnoise::util::rng::Rng;

/// Identity op that raises `dropped` when the graph node holding it is freed, and, in its
/// backward, records whether `watch` (an op further down the graph) was freed by then.
struct Probe {
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watch: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    seen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl candle_core::CustomOp1 for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let v = s.as_slice::<f32>()?;
        let (a, b) = l.contiguous_offsets().expect("contiguous");
        Ok((
            candle_core::CpuStorage::F32(v[a..b].to_vec()),
            l.shape().clone(),
        ))
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(w) = &self.watch {
            let freed = w.load(std::sync::atomic::Ordering::SeqCst);
            self.seen.store(freed, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Some(grad.clone()))
    }
}

/// The patched candle copies transposed matrices (the layout of a weight gradient from the
/// product with `w.t()`) in tiles, on rayon's threads when large (`vendor/README.md`): every
/// element lands where the strided layout says, for single and batched matrices, views that
/// start inside their storage, and sizes that are not multiples of the tile.
#[test]
fn contiguous_copies_of_transposed_views_put_every_element_in_place() {
    let dev = Device::Cpu;
    let copied = |t: &Tensor| -> Vec<f32> {
        t.contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for (b, r, c) in [
        (1usize, 2usize, 3usize),
        (3, 33, 70),
        (1, 300, 257),
        (2, 5, 1),
    ] {
        let data: Vec<f32> = (0..b * r * c + 7).map(|i| i as f32).collect();
        // A [b, c, r] view starting 7 elements in, transposed to [b, r, c].
        let base = Tensor::from_vec(data.clone(), b * r * c + 7, &dev)
            .unwrap()
            .narrow(0, 7, b * r * c)
            .unwrap()
            .reshape((b, c, r))
            .unwrap();
        let t = base.transpose(1, 2).unwrap();
        assert!(!t.is_contiguous() || r == 1 || c == 1);
        let got = copied(&t);
        let mut want = Vec::with_capacity(b * r * c);
        for bi in 0..b {
            for i in 0..r {
                for j in 0..c {
                    want.push(data[7 + bi * r * c + j * r + i]);
                }
            }
        }
        assert_eq!(got, want, "b {b}, r {r}, c {c}");
        // A 2-D transpose of a row-strided matrix (a narrowed column range).
        let wide_data: Vec<f32> = (0..c * (r + 4)).map(|i| i as f32).collect();
        let wide = Tensor::from_vec(wide_data, (c, r + 4), &dev).unwrap();
        let view = wide.narrow(1, 2, r).unwrap().t().unwrap();
        let got = copied(&view);
        let want: Vec<f32> = (0..r)
            .flat_map(|i| (0..c).map(move |j| (j * (r + 4) + 2 + i) as f32))
            .collect();
        assert_eq!(got, want, "row-strided r {r}, c {c}");
    }
}

/// The element-wise maps' parallel path on rayon's pool (vendor/patches/candle-core-0002: upstream
/// ran it on candle's barrier pool): from 64k elements on, the work is cut into units of 16k
/// spread over the threads, each writing its own range of the output. Every element of a unary
/// map (contiguous, and a view starting inside its storage) and of a binary map (contiguous, a
/// broadcast row, a transposed left operand) lands where the element-by-element formula puts
/// it, at sizes just below, at and above the threshold and with a partial last unit, called from
/// outside the pool and from inside it (as the binary runs, `Device::with_context`).
#[test]
fn element_wise_maps_in_parallel_put_every_element_in_place() {
    let dev = Device::Cpu;
    let check = || {
        for (r, c) in [(64usize, 1023usize), (64, 1024), (65, 1024), (97, 1531)] {
            let n = r * c;
            let a: Vec<f32> = (0..n + 5).map(|i| (i % 977) as f32 * 0.25 - 60.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 311) as f32 * 0.5 + 1.0).collect();
            let row: Vec<f32> = (0..c).map(|j| j as f32 * 2.0).collect();
            let ta = Tensor::from_vec(a.clone(), n + 5, &dev).unwrap();
            let view = ta.narrow(0, 5, n).unwrap();
            let tb = Tensor::from_vec(b.clone(), (r, c), &dev).unwrap();
            let trow = Tensor::from_vec(row.clone(), (1, c), &dev).unwrap();
            let v = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };

            let got = v(view.exp().unwrap());
            let want: Vec<f32> = a[5..].iter().map(|x| x.exp()).collect();
            assert_eq!(got, want, "exp of a view, {r} x {c}");
            let got = v(ta.sqr().unwrap().narrow(0, 0, n).unwrap());
            let want: Vec<f32> = a[..n].iter().map(|x| x * x).collect();
            assert_eq!(got, want, "sqr, {r} x {c}");

            let a2 = view.reshape((r, c)).unwrap();
            let got = v((&a2 + &tb).unwrap());
            let want: Vec<f32> = (0..n).map(|i| a[5 + i] + b[i]).collect();
            assert_eq!(got, want, "add, {r} x {c}");
            let got = v(a2.broadcast_mul(&trow).unwrap());
            let want: Vec<f32> = (0..n).map(|i| a[5 + i] * row[i % c]).collect();
            assert_eq!(got, want, "broadcast row, {r} x {c}");
            // `a2^T` is a [c, r] view with strides [1, c]; minus a contiguous [c, r] matrix.
            let tb2 = tb.reshape((c, r)).unwrap();
            let got = v((a2.t().unwrap() - &tb2).unwrap());
            let want: Vec<f32> = (0..n)
                .map(|k| {
                    let (i, j) = (k / r, k % r);
                    a[5 + j * c + i] - b[k]
                })
                .collect();
            assert_eq!(got, want, "transposed left operand, {c} x {r}");
        }
    };
    check();
    Device::Cpu.with_context(check);
}

/// `len` values drawn uniformly from [-1, 1) by `rng`.
fn uniform_values(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect()
}

/// gemm-common's packing of an operand whose rows are far apart (vendor/patches/gemm-common-*:
/// 8 x 8 blocks transposed in AVX registers on x86-64 with AVX, patch 0004; elsewhere a block of
/// columns at a time when the row stride is a multiple of 2 KiB, patch 0001, or upstream's
/// gather): `x w^T` with `w` row-major, as every linear map passes it, equals the product with
/// `w^T` copied contiguous bit for bit (packing copies the same elements to the same places;
/// only the way they are read differs), and both equal a float64 reference. The weight's row
/// count takes every panel width the packing has (whole panels, one or two vectors left over,
/// an odd remainder: the 8 x 8 blocks' rows left over); its row stride is 512, 1536, 2048 or
/// 1541 floats, and a weight cut from a wider one (`k` = 1541 of a 2048 stride) leaves columns
/// after the last whole block.
/// (The activations `x^T` are not packed at these sizes, so the patched right-operand path is
/// not exercised here; the left-operand path is the one every linear map takes.)
#[test]
fn gemm_packs_strided_operands_as_it_packs_contiguous_ones() {
    let dev = Device::Cpu;
    // (rows of x, k, rows of w, row stride of w)
    for (m, k, n, stride) in [
        (96usize, 1536usize, 576usize, 1536usize),
        (96, 1536, 592, 1536),
        (96, 512, 608, 512),
        (96, 1541, 581, 2048),
        (96, 1541, 576, 1541),
        (200, 1024, 70, 2048),
    ] {
        let mut rng = Rng::new((k * stride) as u64, "gemm packing test");
        let mut values = |len: usize| uniform_values(&mut rng, len);
        let x = Tensor::from_vec(values(m * k), (m, k), &dev).unwrap();
        let wide = Tensor::from_vec(values(n * stride), (n, stride), &dev).unwrap();
        let w = wide.narrow(1, 0, k).unwrap();
        assert_eq!(w.stride(), &[stride, 1]);
        let strided = x.matmul(&w.t().unwrap()).unwrap();
        let packed = x.matmul(&w.t().unwrap().contiguous().unwrap()).unwrap();
        let (s, c) = (
            strided.to_vec2::<f32>().unwrap(),
            packed.to_vec2::<f32>().unwrap(),
        );
        assert_eq!(
            s, c,
            "{m}x{k}x{n} (stride {stride}): the strided and contiguous products differ"
        );
        let (xv, wv) = (x.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k).map(|l| xv[i][l] as f64 * wv[j][l] as f64).sum();
                let tol = 1e-5 * k as f64;
                assert!(
                    (s[i][j] as f64 - r).abs() <= tol,
                    "{m}x{k}x{n} [{i}, {j}]: {} against {r}",
                    s[i][j]
                );
            }
        }
    }
}

/// gemm-common's threads taking a product's jobs from a shared counter (vendor/patches/
/// gemm-common-0002-*): whatever the share a grab takes, from upstream's fixed split (divisor 0)
/// through guided shares (divisors 1 and 2, the default) to one job at a time (a huge divisor),
/// the product is the same bit for bit (each job is computed once, by the same kernel, over the
/// same depth blocks in the same order), and it equals a float64 reference. The shapes span
/// several row blocks, depth blocks and ragged edges; the third has a weight of few enough rows
/// (gemm's left operand once it has turned the product round) that gemm packs it once up front
/// instead of per thread.
#[test]
fn gemm_jobs_shared_out_from_a_counter_give_the_fixed_split_product() {
    let dev = Device::Cpu;
    let before = gemm_common::gemm::get_job_share_divisor();
    for (m, k, n) in [
        (1300usize, 1100usize, 700usize),
        (97, 2051, 389),
        (1000, 900, 90),
    ] {
        let mut rng = Rng::new((m * k + n) as u64, "gemm jobs test");
        let mut values = |len: usize| uniform_values(&mut rng, len);
        let x = Tensor::from_vec(values(m * k), (m, k), &dev).unwrap();
        let w = Tensor::from_vec(values(n * k), (n, k), &dev).unwrap();
        let mut products = vec![];
        for divisor in [0, 1, 2, 1_000_000] {
            gemm_common::gemm::set_job_share_divisor(divisor);
            let y = x.matmul(&w.t().unwrap()).unwrap();
            products.push((divisor, y.to_vec2::<f32>().unwrap()));
        }
        for (divisor, y) in &products[1..] {
            assert!(
                *y == products[0].1,
                "{m}x{k}x{n}: the shares of divisor {divisor} differ from the fixed split"
            );
        }
        let (xv, wv) = (x.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let y = &products[3].1;
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k).map(|l| xv[i][l] as f64 * wv[j][l] as f64).sum();
                assert!(
                    (y[i][j] as f64 - r).abs() <= 1e-5 * k as f64,
                    "{m}x{k}x{n} [{i}, {j}]: {} against {r}",
                    y[i][j]
                );
            }
        }
    }
    gemm_common::gemm::set_job_share_divisor(before);
}

/// The dot-product kernel behind few-row or few-column f32 products (vendor/candle-core,
/// `cpu_backend/dot_matmul.rs`), each variant this CPU can run, against a float64 reference on
/// ragged shapes: both orientations, padded rows and columns, batches, a shared right operand.
#[test]
fn dot_product_matmul_kernels_match_a_float64_reference() {
    use candle_core::cpu_backend::dot_matmul::{check_bounds, kernel_names, run_named, Operands};
    let values =
        |len: usize, seed: u64| uniform_values(&mut Rng::new(seed, "dot-matmul test"), len);
    let names = kernel_names();
    assert!(names.contains(&"plain"), "{names:?}");
    // (b, m, n, k, lhs row padding, rhs column padding, which operand the batches share).
    // k % 16 and k % 8 take every tail length class the kernels mask (0, 1, 3, 6, 7, 8, 15).
    for (b, m, n, k, pad_l, pad_r, shared) in [
        (1usize, 3usize, 37usize, 19usize, 0usize, 0usize, ""),
        (1, 41, 5, 70, 3, 0, ""),
        (2, 1, 130, 64, 0, 7, ""),
        (3, 8, 9, 33, 1, 2, "rhs"),
        (1, 16, 300, 576, 0, 0, ""),
        (2, 300, 2, 17, 5, 0, ""),
        (2, 5, 23, 24, 0, 1, "lhs"),
        (1, 2, 64, 31, 2, 0, ""),
        (3, 7, 6, 40, 0, 0, "rhs"),
    ] {
        let (lhs_rs, rhs_cs) = (k + pad_l, k + pad_r);
        let a_skip = if shared == "lhs" { 0 } else { m * lhs_rs };
        let b_skip = if shared == "rhs" { 0 } else { n * rhs_cs };
        let p = Operands {
            b,
            m,
            n,
            k,
            a_skip,
            b_skip,
            lhs_rs,
            rhs_cs,
        };
        // Slices that end exactly at the last element read on each side.
        let end_l = (b - 1) * a_skip + (m - 1) * lhs_rs + k;
        let end_r = (b - 1) * b_skip + (n - 1) * rhs_cs + k;
        let lhs = values(end_l, 1);
        let rhs = values(end_r, 2);
        assert!(check_bounds(&p, end_l, end_r));
        assert!(!check_bounds(&p, end_l - 1, end_r));
        assert!(!check_bounds(&p, end_l, end_r - 1));
        for name in &names {
            let got = run_named(name, p, &lhs, &rhs).unwrap();
            for s in 0..b {
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| {
                                lhs[s * a_skip + i * lhs_rs + l] as f64
                                    * rhs[s * b_skip + j * rhs_cs + l] as f64
                            })
                            .sum();
                        let g = got[s * m * n + i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                            "{name} kernel, (b, m, n, k) {:?}, element ({s}, {i}, {j}): {g} vs {want}",
                            (b, m, n, k)
                        );
                    }
                }
            }
        }
    }
    // A destination whose size would wrap is refused before anything is read or written.
    let huge = Operands {
        b: usize::MAX / 2,
        m: 4,
        n: 4,
        k: 16,
        a_skip: 0,
        b_skip: 0,
        lhs_rs: 0,
        rhs_cs: 0,
    };
    assert!(!check_bounds(&huge, 64, 64));
    let dev = Device::Cpu;
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    // `matmul` takes the kernel (bit for bit the selected one's results) for decoding's
    // attention layout: queries `[b, kvh, n_rep, hd]` against a key cache with room to spare,
    // narrowed to the filled positions and transposed.
    if names[0] != "plain" {
        let q = Tensor::from_vec(values(2 * 3 * 3 * 64, 5), (2, 3, 3, 64), &dev).unwrap();
        let cache = Tensor::from_vec(values(2 * 3 * 20 * 64, 6), (2, 3, 20, 64), &dev).unwrap();
        let keys = cache.narrow(2, 0, 13).unwrap();
        let got = flat(&q.matmul(&keys.t().unwrap()).unwrap());
        let p = Operands {
            b: 6,
            m: 3,
            n: 13,
            k: 64,
            a_skip: 3 * 64,
            b_skip: 20 * 64,
            lhs_rs: 64,
            rhs_cs: 64,
        };
        assert_eq!(
            got,
            run_named(names[0], p, &flat(&q), &flat(&cache)).unwrap()
        );
        // A weight shared by a batch of few-row inputs (`broadcast_matmul`): folded into one
        // product of 2 x 3 rows, the same bits as the kernel on the stacked rows.
        let x = Tensor::from_vec(values(2 * 3 * 48, 7), (2, 3, 48), &dev).unwrap();
        let w = Tensor::from_vec(values(40 * 48, 8), (40, 48), &dev).unwrap();
        let got = flat(&x.broadcast_matmul(&w.t().unwrap()).unwrap());
        let p = Operands {
            b: 1,
            m: 6,
            n: 40,
            k: 48,
            a_skip: 0,
            b_skip: 0,
            lhs_rs: 48,
            rhs_cs: 48,
        };
        assert_eq!(got, run_named(names[0], p, &flat(&x), &flat(&w)).unwrap());
    }
    // Through `matmul`: decoding's `x w^T` with 3 rows (the kernel) agrees with gemm's
    // many-row product (rows 0..3 of 40).
    let w = Tensor::from_vec(values(50 * 96, 3), (50, 96), &dev).unwrap();
    let x = Tensor::from_vec(values(40 * 96, 4), (40, 96), &dev).unwrap();
    let few = x.narrow(0, 0, 3).unwrap().matmul(&w.t().unwrap()).unwrap();
    let many = x.matmul(&w.t().unwrap()).unwrap().narrow(0, 0, 3).unwrap();
    let diff = (few - many).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
}

/// `backward_owned` (the patched candle's backward that releases each node once its gradient
/// is passed on, what the training loop calls) gives every parameter the gradient `backward`
/// gives, on the full RepNoise loss (fused LM head, MMD, custom ops).
#[test]
fn backward_owned_gives_the_gradients_of_backward() {
    let m = tiny_loaded(4);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let cfg = RepNoiseConfig::default();
    let (a, _) = repnoise_loss(&net, &pb, &cfg, &mut Rng::new(0, "n")).unwrap();
    let (b, _) = repnoise_loss(&net, &pb, &cfg, &mut Rng::new(0, "n")).unwrap();
    assert_eq!(scalar(&a), scalar(&b));
    let ga = a.backward().unwrap();
    let gb = b.backward_owned().unwrap();
    let mut compared = 0;
    for (name, var) in m.params.iter() {
        let (x, y) = (ga.get(var.as_tensor()), gb.get(var.as_tensor()));
        assert_eq!(x.is_some(), y.is_some(), "{name}");
        if let (Some(x), Some(y)) = (x, y) {
            let (x, y): (Vec<f32>, Vec<f32>) = (
                x.flatten_all().unwrap().to_vec1().unwrap(),
                y.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(x, y, "{name}");
            compared += 1;
        }
    }
    assert!(compared > 10, "only {compared} gradients");
}

/// `backward_owned` (the patched candle's backward, what the training loops call) frees each
/// graph node once its gradient is passed on: in `x -> lower -> upper -> sum`, the `upper`
/// node is gone by the time `lower`'s backward runs, whereas `backward(&self)` (the caller
/// still holding the loss) keeps it to the end. Both give the same gradient.
#[test]
fn backward_owned_frees_nodes_during_the_pass() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let run = |owned: bool| {
        let x = candle_core::Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let upper_dropped = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicBool::new(false));
        let lower = x
            .as_tensor()
            .apply_op1(Probe {
                dropped: Arc::new(AtomicBool::new(false)),
                watch: Some(upper_dropped.clone()),
                seen: seen.clone(),
            })
            .unwrap();
        let upper = (lower * 2.0)
            .unwrap()
            .apply_op1(Probe {
                dropped: upper_dropped.clone(),
                watch: None,
                seen: Arc::new(AtomicBool::new(false)),
            })
            .unwrap();
        let loss = upper.sqr().unwrap().sum_all().unwrap();
        drop(upper);
        let grads = if owned {
            loss.backward_owned().unwrap()
        } else {
            loss.backward().unwrap()
        };
        let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        (seen.load(Ordering::SeqCst), g)
    };
    let (freed_owned, g_owned) = run(true);
    let (freed_held, g_held) = run(false);
    assert!(freed_owned, "backward_owned kept the upper node to the end");
    assert!(!freed_held, "backward freed a node the caller still holds");
    // d/dx (2x)^2 = 8x.
    assert_eq!(g_owned, vec![8.0, -16.0, 24.0]);
    assert_eq!(g_owned, g_held);
}

/// `x w^T` (every linear map, attention's `q k^T`): the patched backward sends the weight's
/// gradient `g^T x` to `w` itself instead of to the transposed view. Checked against the
/// formula in f64, in 2-D and in 4-D (batched, as attention), with the view also feeding a
/// second term (both paths must add up), and the activation `x` must not be kept alive by the
/// gradient store once the pass is over (the weight's gradient is detached).
#[test]
fn matmul_by_a_transposed_weight_gives_the_weight_its_gradient() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dev = Device::Cpu;
    for dims in [vec![5usize, 4, 3], vec![2, 3, 5, 4, 6]] {
        // dims: batch..., rows, inner, cols: x [.., rows, inner], w [.., cols, inner].
        let n = dims.len();
        let (rows, inner, cols) = (dims[n - 3], dims[n - 2], dims[n - 1]);
        let batch: Vec<usize> = dims[..n - 3].to_vec();
        let nb: usize = batch.iter().product();
        let vals = |len: usize, salt: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + salt * 13) % 11) as f32 / 4.0 - 1.2)
                .collect()
        };
        let xs = vals(nb * rows * inner, 1);
        let ws = vals(nb * cols * inner, 2);
        let shape = |a: usize, b: usize| [batch.clone(), vec![a, b]].concat();
        let w = candle_core::Var::from_vec(ws.clone(), shape(cols, inner), &dev).unwrap();
        let x0 = candle_core::Var::from_vec(xs.clone(), shape(rows, inner), &dev).unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let x = x0
            .as_tensor()
            .apply_op1(Probe {
                dropped: dropped.clone(),
                watch: None,
                seen: Arc::new(AtomicBool::new(false)),
            })
            .unwrap();
        let wt = w.as_tensor().t().unwrap();
        let y = x.matmul(&wt).unwrap();
        // loss = sum(y^2) / 2 + 0.5 * sum(w^T): dL/dw = (y^T x) + 0.5.
        let loss = ((y.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
            + (wt.sum_all().unwrap() * 0.5).unwrap())
        .unwrap();
        drop((x, wt, y));
        let grads = loss.backward_owned().unwrap();
        assert!(
            dropped.load(Ordering::SeqCst),
            "{dims:?}: the gradient store keeps the activation alive"
        );
        let got: Vec<f32> = grads
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = vec![0f64; nb * cols * inner];
        for b in 0..nb {
            let xb = &xs[b * rows * inner..];
            let wb = &ws[b * cols * inner..];
            for c in 0..cols {
                for i in 0..inner {
                    let mut acc = 0.5f64;
                    for r in 0..rows {
                        let yrc: f64 = (0..inner)
                            .map(|k| xb[r * inner + k] as f64 * wb[c * inner + k] as f64)
                            .sum();
                        acc += yrc * xb[r * inner + i] as f64;
                    }
                    want[(b * cols + c) * inner + i] = acc;
                }
            }
        }
        assert_eq!(got.len(), want.len());
        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{dims:?}: dw[{j}] = {g}, expected {e}"
            );
        }
    }
}

/// A batch of products each too small for gemm to thread, or of at least four products per
/// thread above that size (vendor/candle-core, `MatMul`: the batch runs its products in
/// parallel, one thread each) gives each product as computed alone, bit for bit: decoding's
/// and prefill's attention shapes, the values a narrowed view of a larger cache as in
/// `model::llama`, a left operand shared by every product (batch stride 0), a batch too small
/// as a whole to be shared out, and one of too few large products.
#[test]
fn batches_of_products_in_parallel_give_each_product_as_alone() {
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    if threads < 2 {
        // The batch then takes the loop, and the products below check only that.
        eprintln!("one thread: the batched products' parallel path is not exercised");
    }
    let threshold = gemm_common::gemm::get_threading_threshold();
    // (batch, m, k, n, rows of the cache the values are a view of, lhs shared by the batch).
    for (b, m, k, n, cap, shared_lhs) in [
        (192usize, 3usize, 100usize, 64usize, 120usize, false),
        (57, 5, 33, 70, 33, false),
        (40, 7, 50, 60, 64, true),
        (2, 3, 100, 64, 100, false),
        // Products gemm would share among threads, each on one thread instead when there are
        // enough of them (prefill's and training's attention: 3 x 128 query rows by 64 or
        // 128), and too few of them for that.
        (4 * threads.max(2), 384, 64, 128, 128, false),
        (4 * threads.max(2), 384, 128, 64, 130, true),
        (3, 384, 64, 128, 64, false),
    ] {
        let mut rng = Rng::new((b * m + k * n) as u64, "batched products test");
        let mut values = |len: usize| uniform_values(&mut rng, len);
        let p = if shared_lhs {
            Tensor::from_vec(values(m * k), (1, m, k), &dev)
                .unwrap()
                .broadcast_as((b, m, k))
                .unwrap()
        } else {
            Tensor::from_vec(values(b * m * k), (b, m, k), &dev).unwrap()
        };
        let cache = Tensor::from_vec(values(b * cap * n), (b, cap, n), &dev).unwrap();
        let v = cache.narrow(1, 0, k).unwrap();
        let per_product = m * n * k;
        let parallel =
            per_product * b >= threshold && (per_product < threshold || b >= 4 * threads);
        assert_eq!(parallel, b > 3, "the shapes meant to cover both paths");
        let y = p.matmul(&v).unwrap().to_vec3::<f32>().unwrap();
        for (i, yi) in y.iter().enumerate() {
            let alone = p
                .get(i)
                .unwrap()
                .matmul(&v.get(i).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert!(
                *yi == alone,
                "{b}x{m}x{k}x{n}: product {i} differs from its own"
            );
        }
        let (pv, vv) = (p.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        for i in 0..b {
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| pv[i][r][l] as f64 * vv[i][l][c] as f64)
                        .sum();
                    assert!((y[i][r][c] as f64 - want).abs() <= 1e-5 * k as f64);
                }
            }
        }
    }
}

/// A batch-invariant right operand folds the left operand's batches into the rows of one
/// product only when those rows are evenly spaced (vendor/candle-core, `MatMul`): a left
/// operand transposed in its last two dims, and a batch of single rows taken across a larger
/// matrix (`[1, b, k]` transposed to `[b, 1, k]`, rows `b * k` apart), are multiplied batch by
/// batch. Upstream folded both, reading the wrong rows (the first) or past the operand's end
/// (the second). Checked against each product alone and against the sum in f64.
#[test]
fn a_shared_right_operand_folds_only_evenly_spaced_rows() {
    let dev = Device::Cpu;
    let (b, m, k, n) = (6usize, 5usize, 40usize, 48usize);
    let mut rng = Rng::new(11, "fold test");
    let mut values = |len: usize| uniform_values(&mut rng, len);
    let rhs = Tensor::from_vec(values(k * n), (1, k, n), &dev).unwrap();
    let transposed = Tensor::from_vec(values(b * k * m), (b, k, m), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let single_rows = Tensor::from_vec(values(b * k), (1, b, k), &dev)
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    let contiguous = Tensor::from_vec(values(b * m * k), (b, m, k), &dev).unwrap();
    for lhs in [transposed, single_rows, contiguous] {
        let (bb, mm, _) = lhs.dims3().unwrap();
        let y = lhs
            .matmul(&rhs.broadcast_as((bb, k, n)).unwrap())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let (lv, rv) = (lhs.to_vec3::<f32>().unwrap(), rhs.to_vec3::<f32>().unwrap());
        for i in 0..bb {
            let alone = lhs
                .get(i)
                .unwrap()
                .matmul(&rhs.get(0).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert!(
                y[i] == alone,
                "{:?}: product {i} differs from its own",
                lhs.stride()
            );
            for r in 0..mm {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| lv[i][r][l] as f64 * rv[0][l][c] as f64)
                        .sum();
                    assert!(
                        (y[i][r][c] as f64 - want).abs() <= 1e-5 * k as f64,
                        "{:?}: [{i}][{r}][{c}] = {}, expected {want}",
                        lhs.stride(),
                        y[i][r][c]
                    );
                }
            }
        }
    }
}
