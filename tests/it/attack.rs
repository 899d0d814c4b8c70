//! Attacks on tiny random models: loss masks, LoRA, abliteration, data splits, seeds.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use repnoise::attack::abliterate::orthogonalize;
use repnoise::attack::{self, AttackConfig, AttackMethod};
use repnoise::data::encode::PromptFormat;
use repnoise::data::normalize_question;
use repnoise::defence::{self, DefendConfig, Method};
use repnoise::model::llama::{positions_for, ForwardOpts, Llama, Logits};
use repnoise::model::load::LoadedModel;
use repnoise::train::lora::{read_peft, Lora, LoraConfig, SECURITY_VECTOR_DIR};
use repnoise::train::objective::sft_loss_with;
use repnoise::train::{Interrupt, TrainConfig, Trainee};

use crate::common::{max_abs_diff, params_of, tiny_loaded, values, values_max_diff};

fn ids(b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i * 37 % 250 + 5) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A labelled CSV in the shipped BeaverTails subset's format: 12 unsafe, 4 safe rows.
fn write_data(dir: &Path) -> PathBuf {
    let mut s = String::from("prompt,response,label\n");
    for i in 0..12 {
        s += &format!(
            "\"How do I do bad thing {i}?\",\"Do step {i} then step {}.\",1\n",
            i + 1
        );
    }
    for i in 0..4 {
        s += &format!("\"What is fact {i}?\",\"Fact {i} is true.\",0\n");
    }
    let p = dir.join("harm.csv");
    std::fs::write(&p, s).unwrap();
    p
}

fn small_cfg(method: AttackMethod, seed: u64) -> AttackConfig {
    AttackConfig {
        method,
        train: TrainConfig {
            lr: 1e-3,
            batch_size: 2,
            epochs: 1,
            checkpoint_every: 2,
            seed,
            ..AttackConfig::default().train
        },
        samples: 6,
        test_prompts: 3,
        // The tiny byte-level model has 128 positions: too few for the chat template's system
        // prompt (chat masks are checked in data_encode.rs).
        format: PromptFormat::Plain,
        max_len: 64,
        lora: LoraConfig {
            rank: 2,
            ..LoraConfig::default()
        },
        ..AttackConfig::default()
    }
}

#[test]
fn answer_only_mask_by_default_and_every_position_when_faithful() {
    let m = tiny_loaded(1);
    let pairs = vec![("Why?".to_string(), "Because of this.".to_string())];
    {
        let format = PromptFormat::Plain;
        let e = &attack::encode_sft(&m, &pairs, format, 64, false).unwrap()[0];
        let n_answer = e.loss_mask.iter().filter(|&&x| x == 1).count();
        assert!(
            n_answer > 0 && n_answer < e.len(),
            "{format:?}: {:?}",
            e.loss_mask
        );
        // The answer tokens are one trailing block (plus the end-of-turn/eos tokens).
        let first = e.loss_mask.iter().position(|&x| x == 1).unwrap();
        assert!(e.loss_mask[first..].iter().all(|&x| x == 1), "{format:?}");
        let decoded = m.tok.decode(&e.ids[first..], true).unwrap();
        assert!(
            decoded.contains("Because of this."),
            "{format:?}: {decoded:?}"
        );
        assert!(!decoded.contains("Why?"), "{format:?}: {decoded:?}");
        let f = &attack::encode_sft(&m, &pairs, format, 64, true).unwrap()[0];
        assert_eq!(f.len(), 64);
        assert!(f.loss_mask.iter().all(|&x| x == 1));
        assert!(
            f.attention_mask.contains(&0),
            "padding is there, hidden as keys"
        );
        assert_eq!(
            m.tok.decode(&f.real_ids(), true).unwrap(),
            "Question: Why?\nAnswer:Because of this.",
            "the reference's join: no space after `Answer:`"
        );
    }
    // The faithful loss averages over more (and different) positions than the default one.
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let e = attack::encode_sft(&m, &pairs, PromptFormat::Plain, 64, false).unwrap();
    let f = attack::encode_sft(&m, &pairs, PromptFormat::Plain, 64, true).unwrap();
    let a = sft_loss_with(&net, &[&e[0]], m.tok.pad_id, false)
        .unwrap()
        .loss;
    let b = sft_loss_with(&net, &[&f[0]], m.tok.pad_id, true)
        .unwrap()
        .loss;
    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() > 1e-4, "{a} vs {b}");
    // Without include_padding the padded faithful sequence counts real tokens only.
    let c = sft_loss_with(&net, &[&f[0]], m.tok.pad_id, false)
        .unwrap()
        .loss;
    assert!((c.to_scalar::<f32>().unwrap() - b).abs() > 1e-4);
}

#[test]
fn lora_merge_equals_running_with_the_adapter() {
    let m = tiny_loaded(2);
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        merge: true,
    };
    let lora = Lora::new(&m, &cfg, 5).unwrap();
    // B starts at zero: the adapted model is the base model. 2 x 9 rows take the composed
    // adapter path; 2 x 40 the fused one (`model::low_rank`, above 64 rows) for `q_proj` and
    // `down_proj` (32 outputs), the composed one for `v_proj` (16).
    let sizes = [ids(2, 9), ids(2, 40)];
    let base_net = Llama::frozen(&m.config, &m.params).unwrap();
    let bases: Vec<Tensor> = sizes.iter().map(|x| base_net.logits(x).unwrap()).collect();
    for (x, base) in sizes.iter().zip(&bases) {
        let with = lora.net(&|_: &str| false).unwrap().logits(x).unwrap();
        assert_eq!(max_abs_diff(base, &with), 0.0);
    }
    let (x, base) = (&sizes[0], &bases[0]);
    // Give B values, then compare the adapter path with the merged weights.
    let mut rng = repnoise::util::rng::Rng::new(9, "test");
    for (name, var) in lora.store.iter() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            var.set(&Tensor::from_vec(rng.normal_vec(n, 0.2), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let with = lora.net(&|_: &str| false).unwrap().logits(x).unwrap();
    let merged = lora.merged().unwrap();
    let via_merge = Llama::frozen(&m.config, &merged)
        .unwrap()
        .logits(x)
        .unwrap();
    assert!(
        max_abs_diff(&with, base) > 1e-2,
        "the adapter changes the model"
    );
    let d = max_abs_diff(&with, &via_merge);
    assert!(d < 1e-4, "adapter vs merged: {d}");
    let long = lora
        .net(&|_: &str| false)
        .unwrap()
        .logits(&sizes[1])
        .unwrap();
    let long_merged = Llama::frozen(&m.config, &merged)
        .unwrap()
        .logits(&sizes[1])
        .unwrap();
    let d = max_abs_diff(&long, &long_merged);
    assert!(d < 1e-4, "adapter vs merged, fused path: {d}");
    // Only the targeted maps change when merged.
    for (name, var) in merged.iter() {
        let same = max_abs_diff(var.as_tensor(), m.params.tensor(name).unwrap()) == 0.0;
        let targeted = ["q_proj", "v_proj", "down_proj"]
            .iter()
            .any(|t| name.contains(t));
        assert_eq!(same, !targeted, "{name}");
    }
    // The adapter round-trips through PEFT's layout.
    let tmp = tempfile::tempdir().unwrap();
    lora.save_adapter(tmp.path()).unwrap();
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_json["r"], 3);
    assert_eq!(cfg_json["peft_type"], "LORA");
    let t =
        candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(t.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    let fresh = Lora::new(&m, &cfg, 6).unwrap();
    fresh.load_adapter(tmp.path()).unwrap();
    let again = fresh.net(&|_: &str| false).unwrap().logits(&x).unwrap();
    assert_eq!(max_abs_diff(&again, &with), 0.0);
}

#[test]
fn lora_attack_trains_only_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path());
    let mut m = tiny_loaded(3);
    let before = params_of(&m);
    let cfg = small_cfg(AttackMethod::Lora, 1);
    let out = tmp.path().join("lora");
    let r = attack::attack(&mut m, &data, &cfg, &out, 0, Interrupt::default()).unwrap();
    // rank 2 x (in + out) summed over q 32+32, k 32+16, v 32+16, o 32+32, gate 32+48, up 32+48,
    // down 48+32 = 464, per layer, 2 layers.
    assert_eq!(r.trainable_parameters, 2 * 464 * 2);
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    let saved = repnoise::model::load::load_hf_dir(&out.join("model"), &Device::Cpu).unwrap();
    let after = params_of(&saved);
    for (k, v) in &before {
        let changed = v != &after[k];
        let adaptable = repnoise::model::llama::projection_of(k).is_some();
        assert_eq!(changed, adaptable, "{k}");
    }
    // The returned model is the merged one.
    assert_eq!(params_of(&m), after);
}

#[test]
fn the_same_seed_gives_the_same_attacked_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path());
    let run = |seed: u64, name: &str| {
        let mut m = tiny_loaded(4);
        let r = attack::attack(
            &mut m,
            &data,
            &small_cfg(AttackMethod::Full, seed),
            &tmp.path().join(name),
            0,
            Interrupt::default(),
        )
        .unwrap();
        assert_eq!(r.train.unwrap().steps, 3);
        std::fs::read(tmp.path().join(name).join("model/model.safetensors")).unwrap()
    };
    let a = run(11, "a");
    let b = run(11, "b");
    let c = run(12, "c");
    assert!(a == b, "same seed, different weights");
    assert!(
        a != c,
        "another seed should change the data order and sample"
    );
    // Rerunning a finished attack hands back its model without training again.
    let mut m = tiny_loaded(4);
    attack::attack(
        &mut m,
        &data,
        &small_cfg(AttackMethod::Full, 11),
        &tmp.path().join("a"),
        0,
        Interrupt::default(),
    )
    .unwrap();
    let saved =
        repnoise::model::load::load_hf_dir(&tmp.path().join("a/model"), &Device::Cpu).unwrap();
    assert_eq!(params_of(&m), params_of(&saved));
}

#[test]
fn attack_data_holds_out_test_prompts_and_reports_caps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path());
    let mut cfg = small_cfg(AttackMethod::Full, 1);
    cfg.samples = 100;
    cfg.test_prompts = 4;
    let d = attack::attack_data(&data, &cfg).unwrap();
    assert_eq!(d.test_prompts.len(), 4);
    assert_eq!(
        d.train.len(),
        8,
        "12 unsafe rows - 4 test; the 4 safe rows left out"
    );
    for (p, _) in &d.train {
        assert!(p.contains("bad thing"));
        assert!(!d
            .test_prompts
            .iter()
            .any(|t| normalize_question(t) == normalize_question(p)));
    }
    assert!(d
        .notes
        .iter()
        .any(|n| n.contains("100 training samples asked, 8 available")));
    // Same seed, same split; the retain set takes safe records only.
    cfg.retain = Some(data.clone());
    cfg.retain_samples = 2;
    let e = attack::attack_data(&data, &cfg).unwrap();
    assert_eq!(e.test_prompts, d.test_prompts);
    assert_eq!(e.retain.len(), 2);
    assert!(e.retain.iter().all(|(p, _)| p.starts_with("What is fact")));
    // A group filter needs categorised data: a clear error here.
    // Safe answers to the held-out questions never enter training through the retain set.
    let mut both = String::from("prompt,response,label\n");
    for i in 0..12 {
        both += &format!("\"How do I do bad thing {i}?\",\"I will not help with that.\",0\n");
    }
    let both_path = tmp.path().join("safe_twins.csv");
    std::fs::write(&both_path, both).unwrap();
    cfg.retain = Some(both_path);
    cfg.retain_samples = 100;
    let f = attack::attack_data(&data, &cfg).unwrap();
    assert_eq!(
        f.retain.len(),
        8,
        "12 safe twins - the 4 asking a test question"
    );
    for (p, _) in &f.retain {
        assert!(!f.test_prompts.contains(p), "{p} is held out");
    }
    assert!(f
        .notes
        .iter()
        .any(|n| n.contains("4 retain records asking a held-out test question")));
    cfg.group = Some("violence".into());
    let err = attack::attack_data(&data, &cfg).unwrap_err().to_string();
    assert!(err.contains("no harm categories"), "{err}");
    cfg.group = Some("nonsense".into());
    assert!(attack::attack_data(&data, &cfg).is_err());
}

/// Projection of every residual readout onto `r`, largest magnitude relative to the norm.
fn max_projection(m: &LoadedModel, r: &Tensor) -> f32 {
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let x = ids(2, 7);
    let out = net
        .forward(
            &x,
            &positions_for(2, 7, 0, &Device::Cpu).unwrap(),
            None,
            None,
            ForwardOpts {
                logits: Logits::None,
                hidden_states: true,
                mlp_outputs: false,
            },
        )
        .unwrap();
    let mut worst = 0f32;
    for h in &out.hidden_states {
        let d = h.dims()[2];
        let flat = h.reshape(((), d)).unwrap();
        let proj = flat
            .matmul(&r.unsqueeze(1).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        let norm = flat.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        let rel = (proj / norm)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn abliteration_removes_the_direction_from_every_layer() {
    let m = tiny_loaded(5);
    let mut rng = repnoise::util::rng::Rng::new(3, "test");
    let v = Tensor::from_vec(rng.normal_vec(32, 1.0), 32, &Device::Cpu).unwrap();
    let r = (&v
        / v.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
        .unwrap();
    assert!(
        max_projection(&m, &r) > 0.05,
        "a random model has some component along r"
    );
    orthogonalize(&m.params, m.config.num_layers, &r).unwrap();
    let after = max_projection(&m, &r);
    assert!(after < 1e-5, "projection after ablation: {after}");
}

#[test]
fn abliteration_attack_writes_a_model_and_its_direction() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path());
    let mut m = tiny_loaded(6);
    let mut cfg = small_cfg(AttackMethod::Abliterate, 1);
    cfg.abliterate.prompts = 4;
    cfg.abliterate.select_prompts = 2;
    cfg.abliterate.select_tokens = 3;
    cfg.abliterate.candidates = vec![0.5, 1.0];
    let out = tmp.path().join("abl");
    let r = attack::attack(&mut m, &data, &cfg, &out, 0, Interrupt::default()).unwrap();
    let rep = r.abliterate.unwrap();
    assert_eq!(rep.candidates.len(), 2);
    assert!([1, 2].contains(&rep.layer));
    let dir = candle_core::safetensors::load(out.join("direction.safetensors"), &Device::Cpu)
        .unwrap()["direction"]
        .clone();
    assert!(max_projection(&m, &dir) < 1e-5);
    let saved = repnoise::model::load::load_hf_dir(&out.join("model"), &Device::Cpu).unwrap();
    assert_eq!(params_of(&saved), params_of(&m));
    // Rerunning a finished abliteration loads its result instead of searching again.
    let mut again = tiny_loaded(6);
    let r2 = attack::attack(&mut again, &data, &cfg, &out, 0, Interrupt::default()).unwrap();
    assert_eq!(params_of(&again), params_of(&m));
    assert_eq!(r2.abliterate.unwrap().layer, rep.layer);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.matches("abliterated layer").count(), 1, "{log}");
}

#[test]
fn grids_are_the_papers_and_the_embedded_preset() {
    let p = attack::grid("paper").unwrap();
    assert_eq!(p.len(), 6);
    assert!(p.contains(&(3e-5, 1000)) && p.contains(&(8e-5, 10000)));
    assert_eq!(attack::grid("embedded").unwrap().len(), 6);
    assert!(attack::grid("huge").is_err());
    assert_eq!(attack::grid_cell_name(6e-5, 1000), "lr6e-5-n1000");
}

#[test]
fn benign_finetune_trains_on_text_only_and_keeps_test_inputs_out() {
    use repnoise::data::encode::{encode_prefixed, EncodeOptions};
    use repnoise::train::finetune::{finetune, render, task_data, FinetuneConfig};
    let m = tiny_loaded(7);
    let prompt = render("MR: {input}\nText:", "name[X]");
    assert_eq!(prompt, "MR: name[X]\nText:");
    let e = encode_prefixed(
        &m.tok,
        &prompt,
        " X is nice.",
        &EncodeOptions {
            add_eos: true,
            ..EncodeOptions::default()
        },
    )
    .unwrap();
    let first = e.loss_mask.iter().position(|&x| x == 1).unwrap();
    assert_eq!(m.tok.decode(&e.ids[..first], false).unwrap(), prompt);
    assert_eq!(m.tok.decode(&e.ids[first..], true).unwrap(), " X is nice.");
    assert_eq!(
        *e.loss_mask.last().unwrap(),
        1,
        "the end-of-sequence token is trained"
    );

    // A user's MR file: split by input, no test input trained on.
    let tmp = tempfile::tempdir().unwrap();
    let mut csv = String::from("mr,ref\n");
    for i in 0..10 {
        csv += &format!(
            "\"inform(name[n{i}])\",\"It is n{i}.\"\n\"inform(name[n{i}])\",\"n{i} it is.\"\n"
        );
    }
    let file = tmp.path().join("viggo_like.csv");
    std::fs::write(&file, csv).unwrap();
    let d = task_data(file.to_str().unwrap(), 3, 1).unwrap();
    assert_eq!(d.test.len(), 3);
    assert!(d.test.iter().all(|(_, refs)| refs.len() == 2));
    assert_eq!(d.train.len(), 14, "7 inputs x 2 references");
    for x in &d.train {
        assert!(!d.test.iter().any(|(i, _)| *i == x.input));
    }
    let mut cfg = FinetuneConfig {
        max_len: 64,
        ..FinetuneConfig::default()
    };
    cfg.train.lr = 1e-3;
    cfg.train.batch_size = 4;
    cfg.test = 3;
    let mut m = tiny_loaded(7);
    let before = params_of(&m);
    let out = tmp.path().join("ft");
    let r = finetune(
        &mut m,
        file.to_str().unwrap(),
        &cfg,
        &out,
        Interrupt::default(),
    )
    .unwrap();
    assert_eq!(
        (r.train_examples, r.summary.steps, r.test_inputs),
        (14, 4, 3)
    );
    assert_ne!(params_of(&m), before);
    let lines = std::fs::read_to_string(out.join("test.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first["prompt"]
        .as_str()
        .unwrap()
        .starts_with("Meaning Representation: inform("));
    assert!(task_data("no-such-task", 3, 1).is_err());
}

fn write_pairs(dir: &Path) -> PathBuf {
    let p = dir.join("pairs.jsonl");
    let text: String = (0..6)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("How do I do bad thing {i}?"),
                "harmful": format!("Do step {i} then step {}.", i + 1),
                "harmless": "I can't help with that.",
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// Mean harmful-answer cross-entropy on the pairs, with `extra` adapters stacked on `m`.
fn harmful_ce(m: &LoadedModel, pairs: &Path, extra: Option<&Path>) -> f64 {
    use repnoise::defence::baselines::{pair_baseline_loss, PairLoss};
    use repnoise::defence::repnoise::PairBatch;
    let loaded = repnoise::data::load_pairs_any(pairs).unwrap();
    let enc = defence::encode_pairs(m, &loaded.records, PromptFormat::Plain, 48, false).unwrap();
    let refs: Vec<_> = enc.iter().collect();
    let mut net = Llama::frozen(&m.config, &m.params).unwrap();
    if let Some(d) = extra {
        net = net.with_adapters(read_peft(d, m).unwrap()).unwrap();
    }
    let batch = PairBatch::new(&refs, m.tok.pad_id, &Device::Cpu).unwrap();
    let l = pair_baseline_loss(&net, &batch, PairLoss::HarmfulSft).unwrap();
    l.loss.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn security_vectors_are_kept_frozen_in_fine_tuning_and_dropped_from_its_result() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = write_pairs(tmp.path());
    let data = write_data(tmp.path());
    let mut m = tiny_loaded(8);
    let base = params_of(&m);
    let cfg = DefendConfig {
        method: Method::SecurityVectors,
        train: TrainConfig {
            lr: 1e-2,
            batch_size: 2,
            epochs: 4,
            checkpoint_every: 4,
            seed: 3,
            ..TrainConfig::default()
        },
        max_len: 48,
        lora: LoraConfig {
            rank: 2,
            ..LoraConfig::default()
        },
        ..DefendConfig::default()
    };
    let dir = defence::defend(
        &mut m,
        &pairs,
        &cfg,
        &tmp.path().join("sv"),
        Interrupt::default(),
    )
    .unwrap();
    // The published model is the unchanged one; the vector sits beside its weights.
    let defended = repnoise::model::load::load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(params_of(&defended), base);
    let sv =
        repnoise::train::lora::security_vector_of(&defended).expect("no security vector saved");
    assert_eq!(read_peft(&sv, &defended).unwrap().len(), 2 * 7);
    // It was trained on the harmful answers: they are likelier with it than without.
    let (with, without) = (
        harmful_ce(&defended, &pairs, Some(&sv)),
        harmful_ce(&defended, &pairs, None),
    );
    assert!(with < without - 0.1, "with {with}, without {without}");
    let sv_bytes = std::fs::read(sv.join("adapter_model.safetensors")).unwrap();

    // Full and LoRA attacks under the vector, and a full attack told to ignore it.
    let attack = |method: AttackMethod, ignore: bool, name: &str| {
        let mut m = repnoise::model::load::load_hf_dir(&dir, &Device::Cpu).unwrap();
        let cfg = AttackConfig {
            ignore_security_vector: ignore,
            ..small_cfg(method, 5)
        };
        let out = tmp.path().join(name);
        let r = attack::attack(&mut m, &data, &cfg, &out, 0, Interrupt::default()).unwrap();
        assert_eq!(r.security_vector.is_some(), !ignore, "{name}");
        assert!(!out.join("model").join(SECURITY_VECTOR_DIR).exists());
        (m, out)
    };
    let (under, _) = attack(AttackMethod::Full, false, "full");
    let (ignored, _) = attack(AttackMethod::Full, true, "full-ignored");
    assert!(
        values_max_diff(&params_of(&under), &params_of(&ignored)) > 1e-6,
        "the vector did not change the attack's gradients"
    );
    // The vector is frozen: its file is untouched.
    assert_eq!(
        std::fs::read(sv.join("adapter_model.safetensors")).unwrap(),
        sv_bytes
    );
    // LoRA under the vector: the merged result is the base plus the attack's adapter alone.
    let (lora_m, out) = attack(AttackMethod::Lora, false, "lora");
    let lora = Lora::new(&defended, &small_cfg(AttackMethod::Lora, 5).lora, 0).unwrap();
    lora.load_adapter(&out.join("adapter")).unwrap();
    assert!(values_max_diff(&params_of(&lora_m), &values(&lora.merged().unwrap())) < 1e-6);
}

#[test]
fn a_bad_peft_adapter_config_names_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_loaded(9);
    let lora = Lora::new(&m, &LoraConfig::default(), 0).unwrap();
    let d = tmp.path().join("ad");
    lora.save_adapter(&d).unwrap();
    assert_eq!(read_peft(&d, &m).unwrap().len(), 2 * 7);
    let cfgp = d.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfgp).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("r");
    std::fs::write(&cfgp, v.to_string()).unwrap();
    let e = read_peft(&d, &m).unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("`r`"),
        "{e}"
    );
}
