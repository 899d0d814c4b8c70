//! Mixed precision (`--dtype bf16|f16`) on the CPU: every fused f32 op against the composed ops
//! that bf16/f16 (and CUDA) run, forward and gradient; a tiny model's forward, KV-cache decoding
//! and gradients in bf16/f16 against f32; f16 loss scaling in the training loop; a resume in
//! another dtype refused. The same comparisons on a CUDA device when one is present.

use crate::common::*;

use candle_core::{DType, Device, Tensor, Var};
use repnoise::data::encode::{encode_qa, EncodeOptions};
use repnoise::model::config::{Arch, ModelConfig};
use repnoise::model::llama::{
    attention_mask, positions_for, ForwardOpts, KvCache, Llama, Logits, MASKED,
};
use repnoise::model::ops;
use repnoise::train::objective::sft_loss;
use repnoise::train::{self, Interrupt, LossScaler, RunDir, TrainConfig};
use repnoise::util::rng::Rng;

fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
    let n = shape.iter().product();
    let v = Rng::new(seed, "precision").normal_vec(n, std as f64);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest difference relative to the reference's largest magnitude (both moved to the CPU, f32).
fn rel_err(a: &Tensor, reference: &Tensor) -> f32 {
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, r) = (f(a), f(reference));
    max_abs_diff(&a, &r) / max_abs(&r).max(1e-12)
}

/// Cosine similarity of two tensors' values.
fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let v = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (v(a), v(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let n = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    dot / (n(&a) * n(&b))
}

/// The tolerance on a result relative to its scale: a few roundings of the dtype's epsilon.
fn tol(dt: DType) -> f32 {
    match dt {
        DType::BF16 => 2e-2, // epsilon 2^-8
        DType::F16 => 3e-3,  // epsilon 2^-11
        _ => 1e-5,
    }
}

/// The ops of a layer, each as `f(inputs) -> output`, with the inputs it is checked on.
type OpCase = (&'static str, Vec<Tensor>, Box<dyn Fn(&[Tensor]) -> Tensor>);

fn op_cases() -> Vec<OpCase> {
    let (b, t, h, hd) = (2, 5, 4, 8);
    let angles: Vec<f32> = (0..b * t * hd / 2).map(|i| 0.37 * i as f32).collect();
    let cos = Tensor::from_vec(
        angles.iter().map(|a| a.cos()).collect(),
        (b * t, hd / 2),
        &Device::Cpu,
    )
    .unwrap();
    let sin = Tensor::from_vec(
        angles.iter().map(|a| a.sin()).collect(),
        (b * t, hd / 2),
        &Device::Cpu,
    )
    .unwrap();
    let mut mask = vec![0f32; b * t * t];
    for r in 0..b {
        for i in 0..t {
            for j in i + 1..t {
                mask[(r * t + i) * t + j] = MASKED;
            }
        }
    }
    mask[0] = MASKED; // a padded key in the first row
    let mask = Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).unwrap();
    vec![
        (
            "rms_norm",
            vec![
                randn(&[b, t, 32], 1, 1.0),
                (randn(&[32], 2, 0.3) + 1.0).unwrap(),
            ],
            Box::new(|x: &[Tensor]| {
                ops::rms_norm(&x[0], &x[1].to_dtype(x[0].dtype()).unwrap(), 1e-5).unwrap()
            }),
        ),
        (
            "masked_softmax",
            vec![randn(&[b, h, t, t], 3, 2.0)],
            Box::new(move |x: &[Tensor]| {
                let m = mask.to_device(x[0].device()).unwrap();
                ops::masked_softmax(&x[0], &m, 0.35).unwrap()
            }),
        ),
        (
            "swiglu",
            vec![randn(&[b, t, 48], 4, 1.5), randn(&[b, t, 48], 5, 1.0)],
            Box::new(|x: &[Tensor]| ops::swiglu(&x[0], &x[1]).unwrap()),
        ),
        (
            "rope",
            vec![randn(&[b, t, h, hd], 6, 1.0)],
            Box::new(move |x: &[Tensor]| {
                let dt = x[0].dtype();
                let d = x[0].device();
                let c = cos.to_device(d).unwrap().to_dtype(dt).unwrap();
                let s = sin.to_device(d).unwrap().to_dtype(dt).unwrap();
                ops::rope(&x[0], &c, &s).unwrap()
            }),
        ),
    ]
}

/// An op's output and the gradients of `sum(out * r)` (r fixed, random) for its inputs, with
/// the inputs given as f32 variables on `dev` and cast to `dt` before the op.
fn op_with_grads(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    dev: &Device,
    dt: DType,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(&x.to_device(dev).unwrap()).unwrap())
        .collect();
    let cast: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().to_dtype(dt).unwrap())
        .collect();
    let out = f(&cast);
    assert_eq!(out.dtype(), dt, "the op keeps its input's dtype");
    let out = out.to_dtype(DType::F32).unwrap();
    let r = randn(out.dims(), 99, 1.0).to_device(dev).unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("a gradient reaches every input")
                .clone()
        })
        .collect();
    (out, g)
}

/// Each fused CPU op (f32) against the composed ops bf16 and f16 run (the path CUDA takes),
/// forward and gradients, within a few roundings of the dtype.
#[test]
fn fused_ops_agree_with_the_composed_ops_in_bf16_and_f16() {
    for (name, inputs, f) in op_cases() {
        let (out32, g32) = op_with_grads(&*f, &inputs, &Device::Cpu, DType::F32);
        for dt in [DType::BF16, DType::F16] {
            let (out, g) = op_with_grads(&*f, &inputs, &Device::Cpu, dt);
            let e = rel_err(&out, &out32);
            assert!(
                e < tol(dt),
                "{name} in {dt:?}: output off by {e} of its scale"
            );
            assert!(
                e > 0.0,
                "{name} in {dt:?}: identical to f32, so not computed in {dt:?}"
            );
            for (i, (a, b)) in g.iter().zip(&g32).enumerate() {
                assert_eq!(a.dtype(), DType::F32, "gradients reach the f32 variables");
                let e = rel_err(a, b);
                assert!(
                    e < 2.0 * tol(dt),
                    "{name} in {dt:?}: gradient {i} off by {e}"
                );
            }
        }
    }
}

fn with_dtype(cfg: &ModelConfig, dt: DType) -> ModelConfig {
    ModelConfig {
        compute_dtype: dt,
        ..cfg.clone()
    }
}

fn tiny_ids(b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % vocab) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A tiny model's forward in bf16/f16 against f32: logits, every hidden state and MLP output
/// (all returned in f32), with padding (a masked key) in the batch.
#[test]
fn mixed_precision_forward_agrees_with_f32() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = tiny_config(arch, arch == Arch::Llama);
        let p = tiny_params(&cfg, 3);
        let (b, t) = (2, 9);
        let ids = tiny_ids(b, t, cfg.vocab_size);
        let pos = positions_for(b, t, 0, &Device::Cpu).unwrap();
        let mut valid = vec![vec![true; t]; b];
        valid[1][0] = false;
        let mask = attention_mask(b, t, 0, Some(&valid), &Device::Cpu).unwrap();
        let opts = ForwardOpts {
            logits: Logits::All,
            hidden_states: true,
            mlp_outputs: true,
        };
        let run = |dt| {
            Llama::frozen(&with_dtype(&cfg, dt), &p)
                .unwrap()
                .forward(&ids, &pos, Some(&mask), None, opts)
                .unwrap()
        };
        let r = run(DType::F32);
        for dt in [DType::BF16, DType::F16] {
            let o = run(dt);
            let logits = o.logits.as_ref().unwrap();
            assert_eq!(logits.dtype(), DType::F32);
            let e = rel_err(logits, r.logits.as_ref().unwrap());
            assert!(
                e < 2.0 * tol(dt) && e > 0.0,
                "{arch:?} {dt:?}: logits off by {e}"
            );
            for (l, (a, c)) in o.hidden_states.iter().zip(&r.hidden_states).enumerate() {
                assert_eq!(a.dtype(), DType::F32);
                let e = rel_err(a, c);
                assert!(
                    e < 2.0 * tol(dt),
                    "{arch:?} {dt:?}: hidden state {l} off by {e}"
                );
            }
            for (l, (a, c)) in o.mlp_outputs.iter().zip(&r.mlp_outputs).enumerate() {
                let e = rel_err(a, c);
                assert!(
                    e < 2.0 * tol(dt),
                    "{arch:?} {dt:?}: MLP output {l} off by {e}"
                );
            }
        }
    }
}

/// Decoding with the KV cache in bf16 gives the logits of a full bf16 forward over the same
/// tokens (the cache holds keys and values in the compute dtype).
#[test]
fn bf16_kv_cache_decoding_matches_a_full_bf16_forward() {
    let cfg = with_dtype(&tiny_config(Arch::Llama, true), DType::BF16);
    let net = Llama::frozen(&cfg, &tiny_params(&cfg, 4)).unwrap();
    let ids = tiny_ids(1, 8, cfg.vocab_size);
    let full = net.logits(&ids).unwrap(); // [1, 8, vocab]
    let mut cache = KvCache::new(cfg.num_layers);
    let last_only = ForwardOpts {
        logits: Logits::Last,
        ..Default::default()
    };
    let prompt = ids.narrow(1, 0, 5).unwrap();
    net.forward(
        &prompt,
        &positions_for(1, 5, 0, &Device::Cpu).unwrap(),
        None,
        Some(&mut cache),
        last_only,
    )
    .unwrap();
    for i in 5..8 {
        let step = net
            .forward(
                &ids.narrow(1, i, 1).unwrap(),
                &positions_for(1, 1, i, &Device::Cpu).unwrap(),
                None,
                Some(&mut cache),
                last_only,
            )
            .unwrap()
            .logits
            .unwrap();
        let want = full.narrow(1, i, 1).unwrap();
        let e = rel_err(&step, &want);
        assert!(
            e < tol(DType::BF16),
            "position {i}: cached decoding off by {e}"
        );
    }
}

/// Training in mixed precision: the loss's gradients land on the f32 weights (and on LoRA's f32
/// adapters), in f32, pointing where the f32 gradients point.
#[test]
fn mixed_precision_gradients_reach_the_f32_weights_and_agree_with_f32() {
    let m = tiny_loaded(8);
    let e = encode_qa(
        &m.tok,
        "a question here",
        "an answer of some length",
        &EncodeOptions::default(),
    )
    .unwrap();
    let grads_in = |dt| {
        let cfg = with_dtype(&m.config, dt);
        let net = Llama::trainable(&cfg, &m.params).unwrap();
        let l = sft_loss(&net, &[&e], m.tok.pad_id).unwrap();
        let g = l.loss.backward().unwrap();
        m.params
            .iter()
            .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).cloned()))
            .collect::<Vec<_>>()
    };
    let g32 = grads_in(DType::F32);
    for dt in [DType::BF16, DType::F16] {
        let g = grads_in(dt);
        for ((name, a), (_, b)) in g.iter().zip(&g32) {
            let a = a
                .as_ref()
                .unwrap_or_else(|| panic!("{dt:?}: no gradient for {name}"));
            let b = b.as_ref().unwrap();
            assert_eq!(a.dtype(), DType::F32, "{name}");
            let c = cosine(a, b);
            let min = if dt == DType::BF16 { 0.99 } else { 0.999 };
            assert!(
                c > min,
                "{dt:?}: gradient of {name} has cosine {c} with f32's"
            );
        }
    }
    // LoRA under bf16: the adapters (f32 variables) get gradients.
    let mut bf = tiny_loaded(8);
    bf.config.compute_dtype = DType::BF16;
    let lora = repnoise::train::lora::Lora::new(&bf, &Default::default(), 1).unwrap();
    use repnoise::train::Trainee;
    let net = lora.net(&|_| true).unwrap();
    assert_eq!(net.dtype(), DType::BF16);
    let g = sft_loss(&net, &[&e], bf.tok.pad_id)
        .unwrap()
        .loss
        .backward()
        .unwrap();
    let n = lora
        .store
        .iter()
        .filter(|(_, v)| {
            g.get(v.as_tensor())
                .is_some_and(|t| t.dtype() == DType::F32)
        })
        .count();
    assert_eq!(
        n,
        lora.store.len(),
        "every adapter matrix gets an f32 gradient"
    );
}

#[test]
fn loss_scaler_follows_gradscaler_defaults() {
    let mut s = LossScaler::new(DType::BF16);
    assert!(!s.active && s.scale == 1.0);
    assert!(
        s.update(true) && !s.update(false),
        "off: a step applies when finite"
    );
    let mut s = LossScaler::new(DType::F16);
    assert_eq!(s.scale, 65536.0);
    assert!(!s.update(false));
    assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
        assert!(s.update(true));
    }
    assert_eq!(s.scale, 32768.0);
    assert!(s.update(true));
    assert_eq!((s.scale, s.good_steps), (65536.0, 0));
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// f16 training scales the loss: an overflowing step is skipped (weights unchanged, scale
/// halved) and the run goes on; each step's scale is on its metrics line, and a resume picks
/// the scale up from there.
#[test]
fn f16_training_skips_overflowing_steps_and_resumes_its_loss_scale() {
    let mut m = tiny_loaded(9);
    m.config.compute_dtype = DType::F16;
    let e = encode_qa(&m.tok, "q", "a b c", &EncodeOptions::default()).unwrap();
    let cfg = TrainConfig {
        batch_size: 1,
        checkpoint_every: 2,
        ..TrainConfig::default()
    };
    let before = params_of(&m);
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 1})).unwrap();
    let pad = m.tok.pad_id;
    // Step 0's loss, times 1e30, is finite in f32 but its gradient overflows f16.
    let res = train::train(
        &run,
        &mut m,
        1,
        &cfg,
        Interrupt {
            after_steps: Some(1),
        },
        |net, ctx| {
            let mut l = sft_loss(net, &[&e], pad)?;
            if ctx.step == 0 {
                l.loss = (l.loss * 1e30)?;
            }
            Ok(l)
        },
    );
    let _ = res; // a one-example run of one step finishes, or is interrupted after it
    let lines = metrics(tmp.path());
    assert_eq!(lines[0]["skipped"], true, "{:?}", lines[0]);
    assert_eq!(lines[0]["loss_scale"], 65536.0);
    assert_eq!(lines[0]["loss_scale_next"], 32768.0);
    assert_eq!(lines[0]["dtype"], "f16");
    assert_eq!(
        params_of(&m),
        before,
        "a skipped step leaves the weights as they were"
    );

    // An overflow in the forward itself (an infinite loss) is skipped the same way in f16,
    // where in f32 it stops the run.
    for (dt, skips) in [(DType::F16, true), (DType::F32, false)] {
        let mut m = tiny_loaded(9);
        m.config.compute_dtype = dt;
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 3})).unwrap();
        let r = train::train(
            &run,
            &mut m,
            1,
            &cfg,
            Interrupt {
                after_steps: Some(1),
            },
            |net, _| {
                let mut l = sft_loss(net, &[&e], pad)?;
                l.loss = (l.loss * f64::INFINITY)?;
                Ok(l)
            },
        );
        if skips {
            let lines = metrics(tmp.path());
            assert_eq!(lines[0]["skipped"], true, "{:?}", lines[0]);
            assert_eq!(params_of(&m), before);
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("not finite"), "{e}");
        }
    }

    // A longer run: steps after the overflow apply at the halved scale; interrupted after a
    // checkpoint and resumed, it continues from the scale on the checkpoint's metrics line.
    let mut m = tiny_loaded(9);
    m.config.compute_dtype = DType::F16;
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 2})).unwrap();
    let loss = |net: &Llama, ctx: &mut train::StepCtx| {
        let mut l = sft_loss(net, &[&e], pad)?;
        if ctx.step == 0 {
            l.loss = (l.loss * 1e30)?;
        }
        Ok(l)
    };
    let n = 4;
    let err = train::train(
        &run,
        &mut m,
        n,
        &cfg,
        Interrupt {
            after_steps: Some(3),
        },
        loss,
    );
    assert!(err.is_err());
    let mut m2 = tiny_loaded(9);
    m2.config.compute_dtype = DType::F16;
    train::train(&run, &mut m2, n, &cfg, Interrupt::default(), loss).unwrap();
    let lines = metrics(tmp.path());
    let scales: Vec<f64> = lines
        .iter()
        .map(|l| l["loss_scale"].as_f64().unwrap())
        .collect();
    assert_eq!(scales, vec![65536.0, 32768.0, 32768.0, 32768.0]);
    let skipped: Vec<bool> = lines
        .iter()
        .map(|l| l["skipped"].as_bool().unwrap())
        .collect();
    assert_eq!(skipped, vec![true, false, false, false]);
    assert_ne!(params_of(&m2), before, "the later steps trained");
}

/// Checkpoints made in one dtype are not resumed in another.
#[test]
fn resuming_in_another_dtype_is_refused() {
    let m = tiny_loaded(10);
    let e = encode_qa(&m.tok, "q", "a b c", &EncodeOptions::default()).unwrap();
    let cfg = TrainConfig {
        batch_size: 1,
        checkpoint_every: 2,
        ..TrainConfig::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 1})).unwrap();
    let pad = m.tok.pad_id;
    let loss = |net: &Llama, _: &mut train::StepCtx| sft_loss(net, &[&e], pad);
    let mut a = tiny_loaded(10);
    assert!(train::train(
        &run,
        &mut a,
        4,
        &cfg,
        Interrupt {
            after_steps: Some(3)
        },
        loss
    )
    .is_err());
    let mut b = tiny_loaded(10);
    b.config.compute_dtype = DType::BF16;
    let err = train::train(&run, &mut b, 4, &cfg, Interrupt::default(), loss)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--dtype f32") && err.contains("bf16"), "{err}");
    // Finished, it is not handed back to a run in another dtype either.
    train::train(&run, &mut a, 4, &cfg, Interrupt::default(), loss).unwrap();
    let err = train::train(&run, &mut b, 4, &cfg, Interrupt::default(), loss)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--dtype f32"), "{err}");
}

/// On a CUDA device (a `cuda` build on a machine with a GPU): every op and the tiny model's
/// forward against the CPU, in f32 (1e-4) and bf16/f16 (the dtype's tolerance). Elsewhere the
/// test says it is skipped and passes.
#[test]
fn cuda_agrees_with_the_cpu_when_a_gpu_is_present() {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    for (name, inputs, f) in op_cases() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let (cpu, gc) = op_with_grads(&*f, &inputs, &Device::Cpu, dt);
            let (gpu, gg) = op_with_grads(&*f, &inputs, &dev, dt);
            let t = if dt == DType::F32 { 1e-4 } else { tol(dt) };
            let e = rel_err(&gpu, &cpu);
            assert!(e < t, "{name} {dt:?} on CUDA: off by {e}");
            for (a, b) in gg.iter().zip(&gc) {
                let e = rel_err(a, b);
                assert!(e < 2.0 * t, "{name} {dt:?} on CUDA: gradient off by {e}");
            }
        }
    }
    let cfg = tiny_config(Arch::Llama, true);
    let p = tiny_params(&cfg, 3);
    let ids = tiny_ids(2, 9, cfg.vocab_size);
    for dt in [DType::F32, DType::BF16] {
        let c = with_dtype(&cfg, dt);
        let cpu = Llama::frozen(&c, &p).unwrap().logits(&ids).unwrap();
        let mut pg = repnoise::model::params::Params::new();
        for (n, v) in p.iter() {
            pg.insert(n.clone(), v.as_tensor().to_device(&dev).unwrap())
                .unwrap();
        }
        let gpu = Llama::frozen(&c, &pg)
            .unwrap()
            .logits(&ids.to_device(&dev).unwrap())
            .unwrap();
        let t = if dt == DType::F32 {
            1e-4
        } else {
            2.0 * tol(dt)
        };
        let e = rel_err(&gpu, &cpu);
        assert!(e < t, "tiny model {dt:?} on CUDA: logits off by {e}");
    }
}
