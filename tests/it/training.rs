//! The defences' losses and the shared training loop on tiny random models: MMD against hand
//! values, cross-entropy rows against full masked logits, each method's loss, gradients reaching
//! exactly the unfrozen parameters, resume equal to an uninterrupted run, NaN stops.

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use repnoise::data::encode::{encode_qa, EncodeOptions, PromptFormat};
use repnoise::data::{EncodedPair, Pair};
use repnoise::defence::baselines::{
    pair_baseline_loss, pair_baseline_loss_with, BaselineConfig, PairLoss,
};
use repnoise::defence::repnoise::{mmd, repnoise_loss, PairBatch, RepNoiseConfig};
use repnoise::defence::{self, DefendConfig, Method};
use repnoise::model::llama::Llama;
use repnoise::train::objective::{
    full_logits_ce, opening_unlikelihood, sft_loss, Batch, CeRows, LossTokens,
};
use repnoise::train::{self, Freeze, Interrupt, RunDir, StepLoss, TrainConfig};
use repnoise::util::rng::Rng;

fn pairs() -> Vec<Pair> {
    crate::common::tiny_pairs()
}

/// Brute-force biased MMD with five Gaussian kernels, in f64.
fn mmd_reference(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
    let z: Vec<&Vec<f64>> = x.iter().chain(y).collect();
    let m = z.len();
    let d =
        |a: &Vec<f64>, b: &Vec<f64>| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f64>();
    let mut sum = 0.0;
    for a in &z {
        for b in &z {
            sum += d(a, b);
        }
    }
    let base = sum / (m * m - m) as f64 / 4.0;
    let k = |a: &Vec<f64>, b: &Vec<f64>| {
        (0..5)
            .map(|i| (-d(a, b) / (base * 2f64.powi(i))).exp())
            .sum::<f64>()
    };
    let mean = |p: &[Vec<f64>], q: &[Vec<f64>]| {
        let mut s = 0.0;
        for a in p {
            for b in q {
                s += k(a, b);
            }
        }
        s / (p.len() * q.len()) as f64
    };
    mean(x, x) + mean(y, y) - mean(x, y) - mean(y, x)
}

#[test]
fn mmd_matches_hand_computed_values() {
    let dev = Device::Cpu;
    // One point each at distance 1: base = (2 / 2) / 4 = 1/4, K_xx = K_yy = 5,
    // K_xy = sum_i exp(-1 / (2^i / 4)).
    let x = Tensor::new(&[[0f32, 0.]], &dev).unwrap();
    let y = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
    let kxy: f64 = (0..5).map(|i| (-4.0 / 2f64.powi(i)).exp()).sum();
    let want = 10.0 - 2.0 * kxy;
    let got = scalar(&mmd(&x, &y).unwrap());
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Identical samples: zero.
    assert!(scalar(&mmd(&x, &x).unwrap()).abs() < 1e-6);
    // Random points against the brute-force definition.
    let mut rng = Rng::new(3, "mmd");
    let xs: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..7).map(|_| rng.normal()).collect())
        .collect();
    let ys: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..7).map(|_| 2.0 * rng.normal() + 0.5).collect())
        .collect();
    let t = |v: &[Vec<f64>]| {
        Tensor::new(
            v.iter()
                .map(|r| r.iter().map(|&a| a as f32).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            &dev,
        )
        .unwrap()
    };
    let got = scalar(&mmd(&t(&xs), &t(&ys)).unwrap());
    let want = mmd_reference(&xs, &ys);
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
}

#[test]
fn ce_rows_equal_full_masked_logits_in_both_modes() {
    let m = tiny_loaded(1);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, true);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let batch = &pb.harmful;
    for faithful in [false, true] {
        let mask: Vec<Vec<u8>> = if faithful {
            pb.pair_mask.clone()
        } else {
            pb.pair_mask
                .iter()
                .zip(&batch.real)
                .map(|(p, r)| p.iter().zip(r).map(|(a, b)| a & b).collect())
                .collect()
        };
        let rows = if faithful {
            CeRows::faithful(&batch.ids_v, &mask)
        } else {
            CeRows::standard(&batch.ids_v, &mask)
        };
        let out = batch.forward(&net, false, false).unwrap();
        let fast = rows.ce(&net, &out.hidden_states[0], false).unwrap();
        let slow = full_logits_ce(&net, batch, &mask, faithful).unwrap();
        let (a, b) = (scalar(&fast), scalar(&slow));
        assert!(
            (a - b).abs() < 1e-4 * b.abs().max(1.0),
            "faithful={faithful}: {a} vs {b}"
        );
        let ga = fast.backward().unwrap();
        let gb = slow.backward().unwrap();
        let w = m
            .params
            .tensor("model.layers.1.mlp.down_proj.weight")
            .unwrap();
        let diff = (ga.get(w).unwrap() - gb.get(w).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-5,
            "faithful={faithful}: gradient differs by {diff}"
        );
    }
}

/// The refusal-opening unlikelihood against its definition, built one unpadded sequence at a
/// time from the model's full logits (`full_logits_ce`, no fused LM head): per sequence
/// `-ln(1 - p)` with `p` the product of the opening tokens' probabilities, averaged; value and
/// gradients (the fused head's backward then sees unequal row gradients, and the batch pads).
#[test]
fn opening_unlikelihood_matches_its_definition() {
    let m = tiny_loaded(6);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let opts = EncodeOptions {
        format: PromptFormat::Plain,
        max_len: Some(64),
        ..EncodeOptions::default()
    };
    // Openings of one, two and one answer tokens after prompts of different lengths.
    let seqs: Vec<repnoise::data::Encoded> =
        [("the cat sat", "he", 1), ("hi", "the", 2), ("a b", "t", 1)]
            .iter()
            .map(|(p, a, k)| {
                let e = encode_qa(&m.tok, p, a, &opts).unwrap();
                let start = e.loss_mask.iter().position(|&x| x == 1).unwrap();
                let end = start + k;
                let mut mask = vec![0u8; end];
                mask[start..end].iter_mut().for_each(|x| *x = 1);
                repnoise::data::Encoded {
                    ids: e.ids[..end].to_vec(),
                    loss_mask: mask,
                    attention_mask: vec![1; end],
                }
            })
            .collect();
    let refs: Vec<&repnoise::data::Encoded> = seqs.iter().collect();
    let (fast, p_mean) = opening_unlikelihood(&net, &refs, m.tok.pad_id).unwrap();

    let mut terms = vec![];
    let mut ps = vec![];
    for e in &seqs {
        let batch = Batch::new(&[e], m.tok.pad_id, &Device::Cpu).unwrap();
        let n = e.loss_mask.iter().filter(|&&x| x == 1).count();
        let nll = (full_logits_ce(&net, &batch, &[e.loss_mask.clone()], false).unwrap() * n as f64)
            .unwrap();
        let p = nll.neg().unwrap().exp().unwrap();
        ps.push(scalar(&p));
        terms.push(p.affine(-1.0, 1.0).unwrap().log().unwrap().neg().unwrap());
    }
    let slow = (Tensor::stack(&terms, 0).unwrap().sum_all().unwrap() / terms.len() as f64).unwrap();
    let (a, b) = (scalar(&fast), scalar(&slow));
    assert!(a > 0.0 && (a - b).abs() < 1e-4 * b, "{a} vs {b}");
    let want_p = ps.iter().sum::<f64>() / ps.len() as f64;
    assert!(
        (p_mean - want_p).abs() < 1e-4 * want_p,
        "{p_mean} vs {want_p}"
    );
    let (ga, gb) = (fast.backward().unwrap(), slow.backward().unwrap());
    for name in [
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let w = m.params.tensor(name).unwrap();
        let (x, y) = (ga.get(w).unwrap(), gb.get(w).unwrap());
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let diff = max(&(x - y).unwrap());
        assert!(
            max(y) > 0.0 && diff < 1e-3 * max(y),
            "{name}: gradient differs by {diff} (scale {})",
            max(y)
        );
    }
}

#[test]
fn repnoise_terms_combine_as_the_formula_says() {
    let m = tiny_loaded(2);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let cfg = RepNoiseConfig {
        alpha: 0.7,
        beta: 0.3,
        ..RepNoiseConfig::default()
    };
    let (loss, t) = repnoise_loss(&net, &pb, &cfg, &mut Rng::new(0, "n")).unwrap();
    let want = t.harmless_ce + 0.3 * t.noise_mmd - 0.7 * (1.0 + t.harmful_ce).ln();
    assert!((scalar(&loss) - want).abs() < 1e-4);
    assert!(t.noise_mmd > 0.0 && t.harmful_ce > 0.0 && t.harmless_ce > 0.0);
    // Same seed, same noise, same value.
    let (_, t2) = repnoise_loss(&net, &pb, &cfg, &mut Rng::new(0, "n")).unwrap();
    assert_eq!(t.noise_mmd, t2.noise_mmd);
    // Ablations drop their term.
    let no_noise = RepNoiseConfig {
        no_noise: true,
        ..cfg.clone()
    };
    let (l, t3) = repnoise_loss(&net, &pb, &no_noise, &mut Rng::new(0, "n")).unwrap();
    assert_eq!(t3.noise_mmd, 0.0);
    assert!((scalar(&l) - (t3.harmless_ce - 0.7 * (1.0 + t3.harmful_ce).ln())).abs() < 1e-4);
    let no_ascent = RepNoiseConfig {
        no_ascent: true,
        ..cfg.clone()
    };
    let (l, t4) = repnoise_loss(&net, &pb, &no_ascent, &mut Rng::new(0, "n")).unwrap();
    assert!((scalar(&l) - (t4.harmless_ce + 0.3 * t4.noise_mmd)).abs() < 1e-4);
    // The last layer alone is the model's own cross-entropy, not the lens average.
    let last = RepNoiseConfig {
        ascent_last_layer_only: true,
        ..cfg.clone()
    };
    let (_, t5) = repnoise_loss(&net, &pb, &last, &mut Rng::new(0, "n")).unwrap();
    let (_, base) = pair_baseline_loss(&net, &pb, PairLoss::Adversarial)
        .map(|s| ((), s.terms))
        .unwrap();
    assert!((t5.harmful_ce - base["harmful_ce"]).abs() < 1e-4);
    assert!((t5.harmful_ce - t.harmful_ce).abs() > 1e-3);
    // No mask: the prompt counts too, so more positions are covered.
    let nm = RepNoiseConfig {
        no_mask: true,
        ..cfg
    };
    let (_, t6) = repnoise_loss(&net, &pb, &nm, &mut Rng::new(0, "n")).unwrap();
    assert!((t6.harmful_ce - t.harmful_ce).abs() > 1e-4);
}

#[test]
fn baseline_losses() {
    let m = tiny_loaded(3);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let adv = pair_baseline_loss(&net, &pb, PairLoss::Adversarial).unwrap();
    let (s, h) = (adv.terms["harmless_ce"], adv.terms["harmful_ce"]);
    assert!((scalar(&adv.loss) - (s - h)).abs() < 1e-5);
    let sft = pair_baseline_loss(&net, &pb, PairLoss::SafetySft).unwrap();
    assert!((scalar(&sft.loss) - s).abs() < 1e-5);
    let ga = pair_baseline_loss(&net, &pb, PairLoss::GradientAscent).unwrap();
    assert!((scalar(&ga.loss) + h).abs() < 1e-5);
    // SFT on question/answer sequences is the answer-masked next-token cross-entropy.
    let opts = EncodeOptions::default();
    let e = encode_qa(&m.tok, "q?", "an answer", &opts).unwrap();
    let e2 = encode_qa(&m.tok, "longer question?", "ok", &opts).unwrap();
    let got = sft_loss(&net, &[&e, &e2], m.tok.pad_id).unwrap();
    let batch = Batch::new(&[&e, &e2], m.tok.pad_id, &Device::Cpu).unwrap();
    let t = batch.dims().1;
    let mask: Vec<Vec<u8>> = [&e, &e2]
        .iter()
        .map(|x| {
            let mut v = x.loss_mask.clone();
            v.resize(t, 0);
            v
        })
        .collect();
    let want = full_logits_ce(&net, &batch, &mask, false).unwrap();
    assert!((scalar(&got.loss) - scalar(&want)).abs() < 1e-5);
}

#[test]
fn gradient_reaches_every_unfrozen_parameter_and_no_frozen_one() {
    let m = tiny_loaded(4);
    let freeze = Freeze::parse(&["0".to_string()], m.config.num_layers).unwrap();
    let net = Llama::new(&m.config, &m.params, |n| freeze.trainable(n)).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let (loss, _) =
        repnoise_loss(&net, &pb, &RepNoiseConfig::default(), &mut Rng::new(1, "n")).unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in m.params.iter() {
        let g = grads.get(var.as_tensor());
        if freeze.trainable(name) {
            let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "zero gradient for {name}");
            checked += 1;
        } else {
            assert!(g.is_none(), "frozen {name} got a gradient");
        }
    }
    assert!(checked > 5);
}

/// The tiny defence pairs as a JSONL file in `dir`.
pub(crate) fn write_pairs(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("pairs.jsonl");
    let text: String = pairs()
        .iter()
        .map(|p| {
            serde_json::json!({"prompt": p.prompt, "harmful": p.harmful, "harmless": p.harmless})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn defend_cfg() -> DefendConfig {
    DefendConfig {
        method: Method::Repnoise,
        train: TrainConfig {
            lr: 1e-3,
            batch_size: 2,
            epochs: 3,
            checkpoint_every: 2,
            seed: 7,
            ..TrainConfig::default()
        },
        repnoise: RepNoiseConfig {
            beta: 0.1,
            ..RepNoiseConfig::default()
        },
        max_len: 48,
        ..DefendConfig::default()
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = write_pairs(tmp.path());
    let cfg = defend_cfg();
    let mut a = tiny_loaded(5);
    let out_a = tmp.path().join("a");
    defence::defend(&mut a, &pairs, &cfg, &out_a, Interrupt::default()).unwrap();
    let metrics_a = std::fs::read_to_string(out_a.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics_a.lines().count(), 6);
    assert!(out_a.join("model/config.json").exists() && out_a.join("DONE").exists());

    // Crash after 3 steps (checkpoint at 2), then resume.
    let mut b = tiny_loaded(5);
    let out_b = tmp.path().join("b");
    let e = defence::defend(
        &mut b,
        &pairs,
        &cfg,
        &out_b,
        Interrupt {
            after_steps: Some(3),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("interrupted"), "{e}");
    assert!(out_b.join("checkpoints/step-000002/COMPLETE").exists());
    assert!(!out_b.join("DONE").exists());
    // A newer checkpoint without its completion marker (a crash while writing it) is never
    // loaded: its weights are garbage here, and the run resumes from step 2.
    let partial = out_b.join("checkpoints/step-000004");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"half a checkpoint").unwrap();
    let mut b = tiny_loaded(5);
    defence::defend(&mut b, &pairs, &cfg, &out_b, Interrupt::default()).unwrap();
    let done: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_b.join("DONE")).unwrap()).unwrap();
    assert_eq!(done["resumed_from"], 2);
    assert_eq!(params_of(&a), params_of(&b));
    let metrics_b = std::fs::read_to_string(out_b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics_b
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Running a finished run again hands back its trained weights.
    let mut again = tiny_loaded(5);
    defence::defend(&mut again, &pairs, &cfg, &out_b, Interrupt::default()).unwrap();
    assert_eq!(params_of(&again), params_of(&b));
    // The saved model reloads with the trained weights.
    let reloaded = repnoise::model::load::load_hf_dir(&out_b.join("model"), &Device::Cpu).unwrap();
    assert_eq!(params_of(&reloaded), params_of(&b));
    // Another configuration in the same directory is refused, naming what differs.
    let mut other = defend_cfg();
    other.train.lr = 5e-4;
    let e = defence::defend(
        &mut tiny_loaded(5),
        &pairs,
        &other,
        &out_b,
        Interrupt::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("defend.train.lr"), "{e}");
}

/// A non-finite loss, gradient or weight stops the run naming the step and the tensor; the
/// checkpoint before it stays loadable and the same run resumes from it.
#[test]
fn non_finite_loss_gradient_or_weight_stops_naming_step_and_tensor() {
    let tok = tiny_loaded(6).tok.clone();
    let e = encode_qa(&tok, "q", "a b c", &EncodeOptions::default()).unwrap();
    let cfg = TrainConfig {
        batch_size: 1,
        checkpoint_every: 2,
        ..TrainConfig::default()
    };
    let victim = "model.layers.1.mlp.down_proj.weight";
    // Fault 0: the loss is NaN at step 3. Fault 1: the loss is finite but the gradient of
    // `victim` is NaN (sqrt'(0) is infinite, times the zero of w - w).
    for fault in 0..2 {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = tiny_loaded(6);
        let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 1})).unwrap();
        let w = m.params.tensor(victim).unwrap().clone();
        let err = train::train(&run, &mut m, 5, &cfg, Interrupt::default(), |net, ctx| {
            let l = sft_loss(net, &[&e], tok.pad_id)?;
            if ctx.step != 3 {
                return Ok(l);
            }
            let loss = match fault {
                0 => (l.loss * f64::NAN)?,
                _ => (l.loss + (&w - &w)?.sqr()?.sum_all()?.sqrt()?)?,
            };
            Ok(StepLoss {
                loss,
                terms: l.terms,
            })
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("step 3"), "{err}");
        match fault {
            0 => assert!(err.contains("the loss is NaN"), "{err}"),
            _ => assert!(
                err.contains("gradient norm is NaN") && err.contains(victim),
                "{err}"
            ),
        }
        assert!(err.contains("checkpoints"), "{err}");
        assert!(tmp.path().join("checkpoints/step-000002/COMPLETE").exists());
        assert!(!tmp.path().join("DONE").exists());
        let log = std::fs::read_to_string(tmp.path().join("log.txt")).unwrap();
        assert!(log.contains("step 3"), "{log}");
        // The kept checkpoint loads: the same run resumes from it and finishes.
        let mut again = tiny_loaded(6);
        let s = train::train(&run, &mut again, 5, &cfg, Interrupt::default(), |net, _| {
            sft_loss(net, &[&e], tok.pad_id)
        })
        .unwrap();
        assert_eq!(s.resumed_from, Some(2));
    }
    // Fault 2: a learning rate beyond f32's range turns every updated weight infinite.
    let tmp = tempfile::tempdir().unwrap();
    let mut m = tiny_loaded(6);
    let run = RunDir::open(tmp.path(), &serde_json::json!({"t": 2})).unwrap();
    let huge = TrainConfig {
        lr: 1e39,
        warmup_ratio: 0.0,
        ..cfg
    };
    let err = train::train(&run, &mut m, 5, &huge, Interrupt::default(), |net, _| {
        sft_loss(net, &[&e], tok.pad_id)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 0") && err.contains("NaN or infinite values in `model."),
        "{err}"
    );
}

#[test]
fn random_init_writes_a_random_model() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = tiny_loaded(7);
    let before = params_of(&m);
    let cfg = DefendConfig {
        method: Method::RandomInit,
        ..DefendConfig::default()
    };
    let dir = defence::defend(
        &mut m,
        std::path::Path::new(""),
        &cfg,
        &tmp.path().join("r"),
        Interrupt::default(),
    )
    .unwrap();
    let r = repnoise::model::load::load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_ne!(params_of(&r), before);
    assert_eq!(r.config, m.config);
}

#[test]
fn refusal_pairs_keep_only_accepted_refusals() {
    use repnoise::data::HarmfulQa;
    use repnoise::eval::refusal::RefusalCheck;
    let m = tiny_loaded(9);
    let records: Vec<HarmfulQa> = (0..3)
        .map(|i| HarmfulQa {
            prompt: format!("question {i}?"),
            response: format!("harmful answer {i}"),
            categories: None,
            is_safe: false,
            refusal: None,
        })
        .collect();
    let accept_all = RefusalCheck {
        phrases: vec![String::new()],
        window_chars: 240,
    };
    let (pairs, rejected) = repnoise::defence::align::make_refusal_pairs(
        &m,
        &records,
        &accept_all,
        PromptFormat::Plain,
        4,
        2,
    )
    .unwrap();
    assert_eq!((pairs.len(), rejected), (3, 0));
    assert_eq!(pairs[1]["prompt"], "question 1?");
    assert_eq!(pairs[1]["harmful"], "harmful answer 1");
    let never = RefusalCheck {
        phrases: vec!["\u{1f6ab}never produced\u{1f6ab}".into()],
        window_chars: 240,
    };
    let (pairs, rejected) = repnoise::defence::align::make_refusal_pairs(
        &m,
        &records,
        &never,
        PromptFormat::Plain,
        4,
        2,
    )
    .unwrap();
    assert_eq!((pairs.len(), rejected), (0, 3));
}

#[test]
fn pairs_load_from_every_pair_bearing_format() {
    use repnoise::data::load_pairs_any;
    let f = |n: &str| std::path::PathBuf::from("tests/fixtures/data").join(n);
    let dt = load_pairs_any(&f("decoding_trust_refusals.json")).unwrap();
    assert!(!dt.records.is_empty());
    let bt = load_pairs_any(&f("beavertails_refusals.json")).unwrap();
    assert!(!bt.records.is_empty());
    assert!(bt.records.iter().all(|p| p.harmful != p.harmless));
    let own = load_pairs_any(std::path::Path::new("tests/fixtures/pairs/small.jsonl")).unwrap();
    assert_eq!(own.records.len(), 4);
    let e = load_pairs_any(&f("advbench.csv")).unwrap_err().to_string();
    assert!(e.contains("advbench.csv") && e.contains("no pairs"), "{e}");
}

/// The reference code's baseline settings: the adversarial loss weighs the harmful answer by
/// 0.1 (`CE(refusal) - 0.1 CE(harmful)`, each the reference's masked cross-entropy), and `tokens = "sequence"` trains every
/// position of the padded sequence, question and padding included (the reference's
/// `labels=input_ids`), which is the full-logits cross-entropy with an all-ones mask.
#[test]
fn reference_baseline_settings() {
    let m = tiny_loaded(3);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let reference = BaselineConfig::reference();
    assert_eq!(reference.adversarial_weight, 0.1);
    let adv = pair_baseline_loss_with(&net, &pb, PairLoss::Adversarial, &reference).unwrap();
    let (s, h) = (adv.terms["harmless_ce"], adv.terms["harmful_ce"]);
    assert!((scalar(&adv.loss) - (s - 0.1 * h)).abs() < 1e-5);
    // The reference's `adversarial_loss` (training.py, `compute_loss`): `masked_token_ce_loss`
    // on both sides with the raw pair mask (`~eq(harmful ids, harmless ids)`): logits at an
    // unmasked position zeroed, labels outside the mask (or id 0) ignored. `full_logits_ce`
    // with `faithful` computes exactly that from the model's full logits.
    let want_s = scalar(&full_logits_ce(&net, &pb.harmless, &pb.pair_mask, true).unwrap());
    let want_h = scalar(&full_logits_ce(&net, &pb.harmful, &pb.pair_mask, true).unwrap());
    assert!((s - want_s).abs() < 1e-5, "{s} vs {want_s}");
    assert!((h - want_h).abs() < 1e-5, "{h} vs {want_h}");
    let plain = pair_baseline_loss(&net, &pb, PairLoss::Adversarial).unwrap();
    assert!(
        (plain.terms["harmful_ce"] - h).abs() > 1e-4,
        "the default takes the answer's real tokens with the plain cross-entropy"
    );

    let (rows, t) = pb.harmless.dims();
    let ones = vec![vec![1u8; t]; rows];
    let sft = pair_baseline_loss_with(&net, &pb, PairLoss::SafetySft, &reference).unwrap();
    let want = full_logits_ce(&net, &pb.harmless, &ones, false).unwrap();
    assert!((scalar(&sft.loss) - scalar(&want)).abs() < 1e-5);
    let answer_only = pair_baseline_loss(&net, &pb, PairLoss::SafetySft).unwrap();
    assert!((scalar(&answer_only.loss) - scalar(&want)).abs() > 1e-3);
    let ga = pair_baseline_loss_with(&net, &pb, PairLoss::GradientAscent, &reference).unwrap();
    let want = full_logits_ce(&net, &pb.harmful, &ones, false).unwrap();
    assert!((scalar(&ga.loss) + scalar(&want)).abs() < 1e-5);

    let bad = BaselineConfig {
        adversarial_weight: 0.0,
        tokens: LossTokens::Answer,
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("adversarial_weight"));
}

/// `preset = "reference"` in a defence's table starts from the reference's settings for its
/// method, the table's own keys over them; `max_grad_norm = false` turns clipping off and
/// survives a round trip through TOML.
#[test]
fn presets_and_clipping_off_in_files() {
    use repnoise::defence::Preset;
    let exp = repnoise::experiment::Experiment::from_toml_str(
        r#"
name = "p"
seeds = [1]
[[defences]]
name = "adv"
[defences.config]
method = "adversarial"
preset = "reference"
[defences.config.train]
lr = 3e-5
[[defences]]
name = "sv"
[defences.config]
method = "security-vectors"
preset = "reference"
[[defences]]
name = "rn"
[defences.config]
method = "repnoise"
"#,
        "presets.toml",
    )
    .unwrap();
    let adv = &exp.defences[0].config;
    assert_eq!(adv.train.lr, 3e-5, "the table's own key wins");
    assert_eq!((adv.train.batch_size, adv.train.epochs), (4, 4));
    assert_eq!(adv.train.max_grad_norm, None);
    assert_eq!(adv.baseline.adversarial_weight, 0.1);
    assert_eq!(adv.format, PromptFormat::Plain);
    let sv = &exp.defences[1].config;
    assert_eq!(
        *sv,
        DefendConfig::preset(Method::SecurityVectors, Preset::Reference)
    );
    assert_eq!((sv.lora.rank, sv.lora.alpha, sv.train.lr), (8, 32.0, 1e-3));
    assert_eq!(sv.lora.targets, vec!["q_proj", "v_proj"]);
    let rn = &exp.defences[2].config;
    assert_eq!(rn.train.max_grad_norm, Some(1.0), "no preset: the defaults");
    let reference_rn = DefendConfig::preset(Method::Repnoise, Preset::Reference);
    assert!(reference_rn.repnoise.faithful && reference_rn.max_len == 128);

    let err = repnoise::experiment::Experiment::from_toml_str(
        "name = \"p\"\nseeds = [1]\n[[defences]]\nname = \"a\"\n[defences.config]\npreset = \"papers\"\n",
        "bad.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.toml") && err.contains("preset"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("d.toml");
    std::fs::write(
        &f,
        "method = \"safety-sft\"\n[train]\nmax_grad_norm = false\n",
    )
    .unwrap();
    let c = DefendConfig::from_toml(&f).unwrap();
    assert_eq!(c.train.max_grad_norm, None);
    let back: DefendConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    std::fs::write(&f, "method = \"safety-sft\"\npreset = \"reference\"\n").unwrap();
    let c = DefendConfig::from_toml(&f).unwrap();
    assert_eq!(c.baseline.tokens, LossTokens::Sequence);
    assert_eq!(c.max_len, 256);
    // The command line's method picks the preset a file names.
    std::fs::write(&f, "preset = \"reference\"\n").unwrap();
    let c = DefendConfig::from_toml_for(&f, Some(Method::Adversarial)).unwrap();
    assert_eq!(
        c,
        DefendConfig::preset(Method::Adversarial, Preset::Reference)
    );
    assert_eq!((c.train.batch_size, c.train.epochs), (4, 4));
    std::fs::write(&f, "[train]\nmax_grad_norm = true\n").unwrap();
    let err = DefendConfig::from_toml(&f).unwrap_err().to_string();
    assert!(
        err.contains("max_grad_norm") && err.contains("d.toml"),
        "{err}"
    );
    // A string is named with what is expected, and the line.
    std::fs::write(&f, "[train]\nmax_grad_norm = \"x\"\n").unwrap();
    let err = DefendConfig::from_toml(&f).unwrap_err().to_string();
    assert!(
        err.contains("or false for no clipping") && err.contains("line 2"),
        "{err}"
    );
    std::fs::write(&f, "[train]\nmax_grad_norm = 2\n").unwrap();
    assert_eq!(
        DefendConfig::from_toml(&f).unwrap().train.max_grad_norm,
        Some(2.0)
    );
}

/// A reference-preset safety-SFT defence runs end to end on a tiny model (full-sequence loss
/// over pairs padded to max_len, no clipping).
#[test]
fn reference_preset_defence_runs() {
    use repnoise::defence::Preset;
    let tmp = tempfile::tempdir().unwrap();
    let pairs = write_pairs(tmp.path());
    for method in [
        Method::SafetySft,
        Method::Adversarial,
        Method::SecurityVectors,
    ] {
        let mut cfg = DefendConfig::preset(method, Preset::Reference);
        cfg.max_len = 40;
        cfg.train.batch_size = 2;
        cfg.train.epochs = 1;
        let mut m = tiny_loaded(6);
        let out = tmp.path().join(format!("{method}"));
        defence::defend(&mut m, &pairs, &cfg, &out, Interrupt::default()).unwrap();
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert!(!metrics.is_empty(), "{method}");
        assert!(out.join("DONE").exists(), "{method}");
    }
}

/// Vaccine's step (git-disl/Vaccine 8937f68, `VaccineTrainer.training_step`): the perturbation is
/// `rho` times the gradient at the layers' attention outputs over its norm across all layers, so
/// to first order it raises the refusals' cross-entropy by `rho * |g|` (the directional
/// derivative along `g / |g|`): checked against the unperturbed safety-SFT loss at two small
/// budgets. Offsets of zeros change nothing, and a vanishing budget gives safety-SFT's loss.
#[test]
fn vaccine_perturbs_along_the_attention_gradient() {
    use repnoise::defence::baselines::{vaccine_loss, VaccineConfig};
    let m = tiny_loaded(8);
    let net = Llama::trainable(&m.config, &m.params).unwrap();
    let enc = encoded(&m, false);
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let pb = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let bl = BaselineConfig::default();
    let sft = scalar(
        &pair_baseline_loss(&net, &pb, PairLoss::SafetySft)
            .unwrap()
            .loss,
    );

    let (b, t) = pb.harmless.dims();
    let zeros: Vec<Tensor> = (0..m.config.num_layers)
        .map(|_| {
            Tensor::zeros(
                (b, t, m.config.hidden_size),
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    let with_zeros = net.with_attention_offsets(zeros).unwrap();
    let z = scalar(
        &pair_baseline_loss(&with_zeros, &pb, PairLoss::SafetySft)
            .unwrap()
            .loss,
    );
    assert_eq!(z, sft, "zero offsets change nothing");

    let tiny = vaccine_loss(&net, &pb, &VaccineConfig { rho: 1e-7 }, &bl).unwrap();
    assert!((scalar(&tiny.loss) - sft).abs() < 1e-5);
    assert!((tiny.terms["unperturbed_ce"] - sft).abs() < 1e-6);
    let g = tiny.terms["attention_grad_norm"];
    assert!(g > 0.0);
    for rho in [1e-3, 3e-3] {
        let v = vaccine_loss(&net, &pb, &VaccineConfig { rho }, &bl).unwrap();
        let rise = scalar(&v.loss) - sft;
        let want = rho * g;
        assert!(
            (rise - want).abs() < 0.05 * want,
            "rho {rho}: the loss rose by {rise}, to first order {want}"
        );
        assert_eq!(v.terms["attention_grad_norm"], g);
    }
    assert!(VaccineConfig { rho: 0.0 }.validate().is_err());
}

/// `--method vaccine` trains a LoRA adapter with Vaccine's two-pass step and writes the merged
/// model: it loads as a plain model, differs from the starting one, and its adapter sits
/// beside it. The reference preset is the Vaccine authors' recipe.
#[test]
fn vaccine_defence_writes_a_merged_model() {
    use repnoise::defence::Preset;
    let r = DefendConfig::preset(Method::Vaccine, Preset::Reference);
    assert_eq!(
        (
            r.train.lr,
            r.train.weight_decay,
            r.lora.rank,
            r.lora.alpha,
            r.vaccine.rho
        ),
        (1e-3, 0.1, 8, 4.0, 2.0)
    );
    let tmp = tempfile::tempdir().unwrap();
    let pairs = write_pairs(tmp.path());
    let mut cfg = r;
    cfg.max_len = 40;
    cfg.train.batch_size = 2;
    cfg.train.epochs = 1;
    let mut m = tiny_loaded(9);
    let before = values(&m.params);
    let out = tmp.path().join("vaccine");
    let dir = defence::defend(&mut m, &pairs, &cfg, &out, Interrupt::default()).unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("attention_grad_norm"), "{metrics}");
    let merged = repnoise::model::load::load_hf_dir(&dir, &Device::Cpu).unwrap();
    let diff = values_max_diff(&before, &values(&merged.params));
    assert!(diff > 0.0, "the merged adapter changed the weights");
    assert!(dir
        .with_file_name("adapter")
        .join("adapter_model.safetensors")
        .exists());
}
