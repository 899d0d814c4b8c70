//! The analyses: L2 by layer, logit lens, mean activations, PCA, linear probes, and the CLI.

use candle_core::{Device, Tensor};
use repnoise::analysis::{self, Pool, ProbeConfig};
use repnoise::data::encode::PromptFormat;
use repnoise::data::pairs::Pair;
use repnoise::model::config::Arch;
use repnoise::model::llama::Llama;
use repnoise::train::objective::sft_loss;
use repnoise::util::rng::Rng;

use crate::common::{tiny_config, tiny_loaded, tiny_params, write_tiny_hf};

fn pairs() -> Vec<Pair> {
    let mut v = crate::common::tiny_pairs();
    v.push(Pair {
        prompt: "the thing".into(),
        harmful: "here is the thing, step by step".into(),
        harmless: "I'd rather not.".into(),
        categories: None,
    });
    v
}

#[test]
fn l2_is_zero_for_identical_models_and_only_where_a_layer_changed() {
    let m = tiny_loaded(1);
    let n = m.config.num_layers;
    let same = m.params.deep_clone().unwrap();
    let rows = analysis::l2_by_layer(&m.params, &same, n).unwrap();
    // Tied embeddings: embeddings, each layer, final norm.
    assert_eq!(rows.len(), n + 2);
    assert!(
        rows.iter().all(|r| r.l2 == 0.0 && r.relative == 0.0),
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r.norm_a > 0.0));

    let mut changed = m.params.deep_clone().unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let w = changed.tensor(name).unwrap().clone();
    changed.insert(name, (w.clone() + 0.01).unwrap()).unwrap();
    let rows = analysis::l2_by_layer(&m.params, &changed, n).unwrap();
    for r in &rows {
        if r.layer == Some(1) {
            let want = 0.01 * (w.elem_count() as f64).sqrt();
            assert!((r.l2 - want).abs() < 1e-5 * want, "{r:?} vs {want}");
            assert!(r.relative > 0.0 && (r.relative - r.l2 / r.norm_a).abs() < 1e-12);
        } else {
            assert_eq!(r.l2, 0.0, "{r:?}");
        }
    }
    assert_eq!(
        rows.iter().find(|r| r.part == "layer 1").unwrap().tensors,
        9
    );
}

#[test]
fn l2_names_the_tensor_that_does_not_match() {
    let cfg = tiny_config(Arch::Llama, false);
    let a = tiny_params(&cfg, 1);
    // Untied: an lm_head row.
    let rows = analysis::l2_by_layer(&a, &tiny_params(&cfg, 2), cfg.num_layers).unwrap();
    let parts: Vec<&str> = rows.iter().map(|r| r.part.as_str()).collect();
    assert_eq!(
        parts,
        ["embeddings", "layer 0", "layer 1", "final_norm", "lm_head"]
    );
    assert!(rows.iter().all(|r| r.l2 > 0.0));

    let mut b = a.deep_clone().unwrap();
    b.insert(
        "model.layers.0.self_attn.q_proj.weight",
        Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let e = analysis::l2_by_layer(&a, &b, cfg.num_layers)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("shape"),
        "{e}"
    );

    let tied = tiny_params(&tiny_config(Arch::Llama, true), 1);
    let e = analysis::l2_by_layer(&a, &tied, cfg.num_layers)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    let e = analysis::l2_by_layer(&tied, &a, cfg.num_layers)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    // A model with more layers than the comparison knows of.
    let e = analysis::l2_by_layer(&a, &a, 1).unwrap_err().to_string();
    assert!(e.contains("model.layers.1."), "{e}");
}

#[test]
fn logit_lens_last_state_is_minus_the_sft_loss() {
    let m = tiny_loaded(3);
    let s = analysis::encode_samples(&m, &pairs(), PromptFormat::Plain, 64).unwrap();
    assert_eq!(s.harmful.len(), 5);
    // Batches of 2 (uneven lengths, padding) against one batch of all five.
    let lens = analysis::logit_lens(&m, &s.harmful, 2).unwrap();
    assert_eq!(lens.len(), m.config.num_layers + 1);
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let refs: Vec<_> = s.harmful.iter().collect();
    let ce = sft_loss(&net, &refs, m.tok.pad_id).unwrap().terms["ce"];
    let last = *lens.last().unwrap();
    assert!(
        (last + ce).abs() < 1e-4 * ce.abs().max(1.0),
        "lens {last} vs -ce {}",
        -ce
    );
    // The batch size does not change the numbers.
    let one = analysis::logit_lens(&m, &s.harmful, 1).unwrap();
    let all = analysis::logit_lens(&m, &s.harmful, 16).unwrap();
    for ((a, b), c) in lens.iter().zip(&one).zip(&all) {
        assert!((a - b).abs() < 1e-4 && (a - c).abs() < 1e-4, "{a} {b} {c}");
    }
    // Readouts of different hidden states differ, and all are log-probabilities.
    assert!(lens.iter().all(|v| v.is_finite() && *v < 0.0), "{lens:?}");
    assert!((lens[0] - last).abs() > 1e-6, "{lens:?}");
    // Harmless answers score differently.
    let other = analysis::logit_lens(&m, &s.harmless, 2).unwrap();
    assert!((other[2] - lens[2]).abs() > 1e-6);
}

#[test]
fn mean_activations_do_not_depend_on_padding_and_pool_the_right_tokens() {
    let m = tiny_loaded(4);
    let s = analysis::encode_samples(&m, &pairs(), PromptFormat::Plain, 64).unwrap();
    let d = m.config.hidden_size;
    let all = analysis::mean_activations(&m, &s.harmful, None, Pool::Answer, 3).unwrap();
    assert_eq!(all.len(), m.config.num_layers + 1);
    assert!(all
        .iter()
        .all(|l| l.len() == 5 && l.iter().all(|r| r.len() == d)));
    let single = analysis::mean_activations(&m, &s.harmful, Some(2), Pool::Answer, 1).unwrap();
    assert_eq!(single.len(), 1);
    for (a, b) in single[0].iter().zip(&all[2]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    // Layer 0 is the embedding: its answer mean is the mean of the answer tokens' embeddings.
    let e0 = &s.harmful[0];
    let emb = m.params.tensor("model.embed_tokens.weight").unwrap();
    let ids: Vec<u32> = e0
        .ids
        .iter()
        .zip(&e0.loss_mask)
        .filter(|(_, &k)| k == 1)
        .map(|(i, _)| *i)
        .collect();
    let want: Vec<f32> = emb
        .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (x, y) in all[0][0].iter().zip(&want) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // Pooling over every token gives something else.
    let every = analysis::mean_activations(&m, &s.harmful, Some(0), Pool::All, 3).unwrap();
    assert!(every[0][0]
        .iter()
        .zip(&all[0][0])
        .any(|(x, y)| (x - y).abs() > 1e-4));
    let e = analysis::mean_activations(&m, &s.harmful, Some(9), Pool::All, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer"), "{e}");
}

/// Four points `c + a u + b w`, a in {3, -3}, b in {1, -1}: sample variances 12 along u and 4/3
/// along w, so PC1 = u with ratio 12 / (12 + 4/3) = 0.9; embedded in `d` dimensions.
fn known_pca_data(d: usize) -> Vec<Vec<f32>> {
    let u = [0.6f64, 0.8, 0.0];
    let w = [-0.8f64, 0.6, 0.0];
    let c = [5.0f64, -2.0, 1.0];
    let mut out = vec![];
    for (a, b) in [(3.0, 1.0), (3.0, -1.0), (-3.0, 1.0), (-3.0, -1.0)] {
        let mut r = vec![0f32; d];
        for j in 0..3 {
            r[j] = (c[j] + a * u[j] + b * w[j]) as f32;
        }
        r[d - 1] += 0.5; // a constant offset in the last coordinate (zero variance)
        out.push(r);
    }
    out
}

#[test]
fn pca_recovers_a_known_direction_and_variance_ratio() {
    // d = 4 <= n = 4 uses the covariance; d = 10 > n the Gram matrix.
    for d in [4, 10] {
        let x = known_pca_data(d);
        let p = analysis::pca(&x, 5).unwrap();
        assert_eq!(p.components.len(), 3, "k capped at n - 1");
        let c1 = &p.components[0];
        let mut want = vec![0.0; d];
        want[0] = 0.6;
        want[1] = 0.8;
        for (a, b) in c1.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "d={d}: {c1:?}");
        }
        let c2 = &p.components[1];
        assert!(
            (c2[0] - 0.8).abs() < 1e-5 && (c2[1] + 0.6).abs() < 1e-5,
            "{c2:?}"
        );
        assert!((p.explained_variance_ratio[0] - 0.9).abs() < 1e-6, "{p:?}");
        assert!((p.explained_variance_ratio[1] - 0.1).abs() < 1e-6);
        assert!(p.explained_variance_ratio[2].abs() < 1e-6);
        assert!((p.explained_variance[0] - 12.0).abs() < 1e-4);
        // Projections: +-3 along PC1, +-1 along PC2.
        for (r, (a, b)) in
            p.projections
                .iter()
                .zip([(3.0, -1.0), (3.0, 1.0), (-3.0, -1.0), (-3.0, 1.0)])
        {
            assert!((r[0] - a).abs() < 1e-5 && (r[1] - b).abs() < 1e-5, "{r:?}");
        }
        assert!((p.mean[0] - 5.0).abs() < 1e-6);
    }
    assert!(analysis::pca(&[vec![1.0, 2.0]], 1).is_err());
    assert!(analysis::pca(&[vec![1.0, 2.0], vec![1.0]], 1).is_err());
    assert!(analysis::pca(&[vec![1.0, f32::NAN], vec![1.0, 2.0]], 1).is_err());
}

#[test]
fn pca_of_noisy_data_finds_the_dominant_direction() {
    // 200 points: N(0, 3^2) along a random unit direction plus N(0, 0.1^2) isotropic noise.
    let d = 16;
    let mut rng = Rng::new(7, "test");
    let mut dir: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
    let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
    dir.iter_mut().for_each(|v| *v /= norm);
    let x: Vec<Vec<f32>> = (0..200)
        .map(|_| {
            let t = 3.0 * rng.normal();
            dir.iter()
                .map(|u| (t * u + 0.1 * rng.normal()) as f32)
                .collect()
        })
        .collect();
    let p = analysis::pca(&x, 2).unwrap();
    let dot: f64 = p.components[0].iter().zip(&dir).map(|(a, b)| a * b).sum();
    assert!(dot.abs() > 0.999, "{dot}");
    // Expected ratio 9 / (9 + 16 * 0.01) ~ 0.983.
    assert!(
        (p.explained_variance_ratio[0] - 0.983).abs() < 0.01,
        "{p:?}"
    );
}

fn gaussian(n: usize, d: usize, shift: f64, rng: &mut Rng) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            (0..d)
                .map(|j| (rng.normal() + if j == 0 { shift } else { 0.0 }) as f32)
                .collect()
        })
        .collect()
}

#[test]
fn probe_separates_separable_data_and_is_at_chance_on_identical_distributions() {
    let mut rng = Rng::new(11, "test");
    let d = 12;
    // Separable along feature 0 (means +-6 with unit noise: a gap of 12 sigma).
    let pos = gaussian(50, d, 6.0, &mut rng);
    let neg = gaussian(50, d, -6.0, &mut rng);
    for seed in 1..=3 {
        let r = analysis::linear_probe(&pos, &neg, seed, &ProbeConfig::default()).unwrap();
        assert_eq!(r.test_acc, 1.0, "{r:?}");
        assert_eq!((r.n_train, r.n_test), (80, 20));
    }
    // Identical distributions: held-out accuracy near chance on average over seeds.
    let a = gaussian(100, d, 0.0, &mut rng);
    let b = gaussian(100, d, 0.0, &mut rng);
    let seeds: Vec<u64> = (1..=10).collect();
    let accs: Vec<f64> = seeds
        .iter()
        .map(|&s| {
            analysis::linear_probe(&a, &b, s, &ProbeConfig::default())
                .unwrap()
                .test_acc
        })
        .collect();
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((mean - 0.5).abs() < 0.12, "{accs:?}");

    // Per layer: layer 0 separable, layer 1 not.
    let layers =
        analysis::probes_by_layer(&[pos.clone(), a.clone()], &[neg.clone(), b], &seeds).unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0].mean_acc, 1.0);
    assert_eq!(layers[0].se, 0.0);
    assert!((layers[1].mean_acc - mean).abs() < 1e-12);
    assert!(layers[1].se > 0.0 && layers[1].accs.len() == 10);
    // Seeded: the same seed gives the same numbers.
    let again = analysis::probes_by_layer(&[a.clone()], &[a.clone()], &[5, 6]).unwrap();
    assert_eq!(
        again,
        analysis::probes_by_layer(&[a.clone()], &[a.clone()], &[5, 6]).unwrap()
    );
    // Too few samples, mismatched widths: errors, not panics.
    assert!(analysis::linear_probe(&pos[..1], &neg, 1, &ProbeConfig::default()).is_err());
    let narrow = gaussian(10, d - 1, 0.0, &mut rng);
    assert!(analysis::linear_probe(&pos, &narrow, 1, &ProbeConfig::default()).is_err());
}

#[test]
fn analysis_plots_name_their_series() {
    let m = tiny_loaded(5);
    let rows = analysis::l2_by_layer(&m.params, &tiny_loaded(6).params, 2).unwrap();
    let svg = analysis::plot_l2(&[("defended vs base".into(), rows)], false).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("defended vs base"));
    let svg = analysis::plot_logit_lens(&[("m1".into(), vec![-5.0, -3.0, -1.0])]).unwrap();
    assert!(svg.contains("m1") && svg.contains("Logit lens"));
    let p = analysis::pca(&known_pca_data(3), 2).unwrap();
    let svg = analysis::plot_pca(&p, 2, "PCA test").unwrap();
    assert!(svg.contains("harmful") && svg.contains("harmless") && svg.contains("PC1 (90.0%"));
}

#[test]
fn analyze_cli_writes_json_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tiny_hf(&a, &cfg, &tiny_params(&cfg, 1));
    write_tiny_hf(&b, &cfg, &tiny_params(&cfg, 2));
    let pairs = "tests/fixtures/pairs/small.jsonl";
    let out = tmp.path().join("out");
    let run = |args: &[&str]| {
        let o = crate::common::repnoise()
            .arg("analyze")
            .args(args)
            .args(if args[0] == "l2" {
                &[][..]
            } else {
                &["--format", "plain", "--max-len", "64"][..]
            })
            .env("REPNOISE_CACHE", tmp.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let (a, b, o) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    run(&["l2", "--a", a, "--b", b, "--out", o]);
    run(&[
        "logit-lens",
        "--model",
        a,
        "--model",
        b,
        "--pairs",
        pairs,
        "--limit",
        "3",
        "--out",
        o,
    ]);
    run(&["pca", "--model", a, "--pairs", pairs, "--out", o]);
    run(&[
        "probes", "--model", a, "--pairs", pairs, "--seeds", "1,2", "--out", o,
    ]);
    for name in ["l2", "logit-lens", "pca", "probes"] {
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("{name}.json"))).unwrap())
                .unwrap();
        assert_eq!(j["analysis"], name);
        assert!(j["command"].as_array().unwrap().len() > 3);
        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{name}");
    }
    let lens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("logit-lens.json")).unwrap()).unwrap();
    assert_eq!(lens["results"].as_array().unwrap().len(), 2);
    assert_eq!(lens["pairs"]["used"], 3);
    assert_eq!(
        lens["results"][0]["mean_logprob_by_hidden_state"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let probes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("probes.json")).unwrap()).unwrap();
    assert_eq!(probes["layers"].as_array().unwrap().len(), 3);
    assert_eq!(probes["seeds"], serde_json::json!([1, 2]));
}
