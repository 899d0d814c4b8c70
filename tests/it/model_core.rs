//! Model core on tiny random models: caching, saving, formats, gradients, training, errors.

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use repnoise::model::chat::{self, Message};
use repnoise::model::config::Arch;
use repnoise::model::generate::{self, SamplingConfig};
use repnoise::model::llama::{positions_for, ForwardOpts, KvCache, Llama, Logits};
use repnoise::model::load;
use repnoise::model::loss::masked_next_token_ce;
use repnoise::train::optim::{AdamW, AdamWConfig};

fn ids(rows: &[&[u32]]) -> Tensor {
    Tensor::new(
        rows.to_vec().iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

const SEQ: [u32; 10] = [5, 77, 12, 200, 9, 31, 150, 3, 44, 260];

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for (arch, tie) in [(Arch::Llama, true), (Arch::Qwen2, false)] {
        let cfg = tiny_config(arch, tie);
        let p = tiny_params(&cfg, 1);
        let m = Llama::frozen(&cfg, &p).unwrap();
        let full = m.logits(&ids(&[&SEQ])).unwrap(); // [1, 10, V]
        let mut cache = KvCache::new(cfg.num_layers);
        let opts = ForwardOpts {
            logits: Logits::All,
            ..Default::default()
        };
        // Prefill 4 tokens, then one at a time.
        let mut pieces = vec![];
        let pre = ids(&[&SEQ[..4]]);
        let out = m
            .forward(
                &pre,
                &positions_for(1, 4, 0, &Device::Cpu).unwrap(),
                None,
                Some(&mut cache),
                opts,
            )
            .unwrap();
        pieces.push(out.logits.unwrap());
        for i in 4..SEQ.len() {
            let step = ids(&[&SEQ[i..i + 1]]);
            let pos = positions_for(1, 1, i, &Device::Cpu).unwrap();
            let out = m
                .forward(&step, &pos, None, Some(&mut cache), opts)
                .unwrap();
            pieces.push(out.logits.unwrap());
        }
        let inc = Tensor::cat(&pieces, 1).unwrap();
        let d = max_abs_diff(&full, &inc);
        assert!(d < 1e-4, "{arch:?}: cached decoding differs by {d}");
    }
}

/// `Llama::inference` re-lays every projection weight out as `[in, out]`: the same network, so
/// the same logits as `Llama::frozen` on the store (within float rounding: at few rows the
/// stored layout's products are dot products, gemm's order elsewhere), at decoding's,
/// the middle and a prefill's row counts, with and without biases, in f32 and bf16. A weight
/// re-laid out but read as stored (the square q/o maps of the tiny model would not fail on
/// shape) fails it.
#[test]
fn inference_layout_gives_the_frozen_logits() {
    use candle_core::DType;
    for (arch, tie, dt) in [
        (Arch::Llama, true, DType::F32),
        (Arch::Qwen2, false, DType::F32),
        (Arch::Llama, true, DType::BF16),
    ] {
        let mut cfg = tiny_config(arch, tie);
        cfg.compute_dtype = dt;
        // bf16 products round each output to 8 bits of mantissa: a few units in the last
        // place of the logits' scale.
        let tol = if dt == DType::BF16 { 2e-2 } else { 1e-5 };
        let p = tiny_params(&cfg, 11);
        let stored = Llama::frozen(&cfg, &p).unwrap();
        let relaid = Llama::inference(&cfg, p.deep_clone().unwrap()).unwrap();
        for (b, t) in [(1usize, 3usize), (3, 9), (4, 24)] {
            let rows: Vec<Vec<u32>> = (0..b)
                .map(|r| (0..t).map(|i| SEQ[(r + i) % SEQ.len()]).collect())
                .collect();
            let x = Tensor::new(rows, &Device::Cpu).unwrap();
            let (a, c) = (stored.logits(&x).unwrap(), relaid.logits(&x).unwrap());
            let scale = max_abs(&a);
            let d = max_abs_diff(&a, &c);
            assert!(
                scale > 0.1 && d <= tol * scale,
                "{arch:?} {dt:?} {b}x{t}: re-laid-out logits differ by {d} (largest logit {scale})"
            );
        }
    }
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    let cfg = tiny_config(Arch::Llama, true);
    let p = tiny_params(&cfg, 2);
    let m = Llama::frozen(&cfg, &p).unwrap();
    let prompts = vec![SEQ[..3].to_vec(), SEQ.to_vec(), SEQ[2..8].to_vec()];
    let sc = SamplingConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let batched = generate::generate(&m, &prompts, 2, &[], &sc).unwrap();
    // Greedy picks on the logits' device; top-1 sampling picks the same on the host.
    let top1 = SamplingConfig {
        temperature: 1.0,
        top_k: Some(1),
        ..sc.clone()
    };
    assert_eq!(
        generate::generate(&m, &prompts, 2, &[], &top1).unwrap(),
        batched
    );
    for (i, pr) in prompts.iter().enumerate() {
        let single = generate::generate(&m, &[pr.clone()], 2, &[], &sc).unwrap();
        assert_eq!(batched[i], single[0], "row {i}");
    }
    // And greedy generation agrees with argmax over the full forward.
    let mut seq = prompts[1].clone();
    for _ in 0..8 {
        let l = m
            .logits(
                &Tensor::new(seq.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let last = l.squeeze(0).unwrap().get(seq.len() - 1).unwrap();
        seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(&seq[prompts[1].len()..], batched[1].as_slice());
}

/// Prompts sharing a prefix (as a chat template's system turn) are prefilled packed, the prefix
/// once; 50 rows of 24-41 tokens need two packs of at most 1024 tokens. Each row must still
/// decode exactly as it would alone.
#[test]
fn generation_with_a_shared_prefix_over_two_packs_equals_one_by_one() {
    let cfg = tiny_config(Arch::Llama, true);
    let p = tiny_params(&cfg, 3);
    let m = Llama::frozen(&cfg, &p).unwrap();
    let prefix = [1u32, 9, 30, 200, 17, 5, 88, 41, 3, 2];
    let prompts: Vec<Vec<u32>> = (0..50u32)
        .map(|r| {
            let mut v = prefix.to_vec();
            v.extend((0..14 + r % 18).map(|j| 10 + (r * 7 + j * 13) % 250));
            v
        })
        .collect();
    let total: usize = prompts.iter().map(|p| p.len() - prefix.len()).sum();
    assert!(
        total + prefix.len() > 1024,
        "the test needs two packs ({total})"
    );
    let sc = SamplingConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let batched = generate::generate(&m, &prompts, 0, &[], &sc).unwrap();
    for (i, pr) in prompts.iter().enumerate().step_by(3) {
        let single = generate::generate(&m, &[pr.clone()], 0, &[], &sc).unwrap();
        assert_eq!(batched[i], single[0], "row {i}");
    }
    // A stop token ends one row while the others go on.
    let stop = batched[5][2];
    let stopped = generate::generate(&m, &prompts, 0, &[stop], &sc).unwrap();
    assert_eq!(stopped[5].last(), Some(&stop));
    assert!(stopped[5].len() <= 3);
}

#[test]
fn saved_hf_dir_reloads_with_identical_logits() {
    for (arch, tie) in [
        (Arch::Llama, true),
        (Arch::Llama, false),
        (Arch::Qwen2, false),
    ] {
        let cfg = tiny_config(arch, tie);
        let p = tiny_params(&cfg, 3);
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(dir.path(), &cfg, &p);
        let back = load::load_hf_dir(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.config, cfg);
        let a = Llama::frozen(&cfg, &p)
            .unwrap()
            .logits(&ids(&[&SEQ]))
            .unwrap();
        let b = Llama::frozen(&back.config, &back.params)
            .unwrap()
            .logits(&ids(&[&SEQ]))
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{arch:?} tie={tie}");
        assert_eq!(back.tok.chat_template.as_deref(), Some(SMOL_TEMPLATE));
        assert_eq!(
            back.tok.encode("<|im_start|>hello 12").unwrap(),
            tiny_tok().encode("<|im_start|>hello 12").unwrap()
        );
    }
}

#[test]
fn gguf_and_safetensors_of_the_same_weights_agree() {
    for (arch, tie) in [
        (Arch::Llama, true),
        (Arch::Llama, false),
        (Arch::Qwen2, false),
    ] {
        let cfg = tiny_config(arch, tie);
        let p = tiny_params(&cfg, 4);
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_gguf(&gguf, &cfg, &p);
        let hf = dir.path().join("hf");
        write_tiny_hf(&hf, &cfg, &p);
        let g = load::load(gguf.to_str().unwrap(), dir.path(), &Device::Cpu).unwrap();
        let h = load::load(hf.to_str().unwrap(), dir.path(), &Device::Cpu).unwrap();
        assert_eq!(g.config.tie_word_embeddings, tie);
        for name in h.params.names() {
            let d = max_abs_diff(
                g.params.tensor(name).unwrap(),
                h.params.tensor(name).unwrap(),
            );
            assert_eq!(d, 0.0, "{arch:?}: {name} differs");
        }
        let a = Llama::frozen(&g.config, &g.params)
            .unwrap()
            .logits(&ids(&[&SEQ]))
            .unwrap();
        let b = Llama::frozen(&h.config, &h.params)
            .unwrap()
            .logits(&ids(&[&SEQ]))
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let text = "<|im_start|>user\nthe 2024 theme<|im_end|>";
        assert_eq!(g.tok.encode(text).unwrap(), h.tok.encode(text).unwrap());
    }
}

fn lm_loss(m: &Llama, batch: &Tensor) -> Tensor {
    let (b, t) = batch.dims2().unwrap();
    let logits = m.logits(batch).unwrap();
    let mask = Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    masked_next_token_ce(&logits, batch, &mask).unwrap()
}

#[test]
fn every_trainable_tensor_receives_a_gradient_and_frozen_ones_none() {
    for (arch, tie) in [
        (Arch::Llama, false),
        (Arch::Llama, true),
        (Arch::Qwen2, false),
    ] {
        let cfg = tiny_config(arch, tie);
        let p = tiny_params(&cfg, 5);
        let frozen = |n: &str| n.starts_with("model.layers.0.");
        let m = Llama::new(&cfg, &p, |n| !frozen(n)).unwrap();
        let loss = lm_loss(&m, &ids(&[&SEQ, &[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]));
        let grads = loss.backward().unwrap();
        for (name, var) in p.iter() {
            let g = grads.get(var.as_tensor());
            if frozen(name) {
                assert!(g.is_none(), "{arch:?}: frozen {name} got a gradient");
                continue;
            }
            let g = g.unwrap_or_else(|| panic!("{arch:?}: {name} has no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{arch:?}: {name} gradient norm {norm}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    // The gradient of one norm weight and one projection entry against central differences.
    let cfg = tiny_config(Arch::Llama, true);
    let p = tiny_params(&cfg, 6);
    // Weights 10x the init scale: larger gradients, so f32 differences resolve them.
    for (_, var) in p.iter() {
        if var.rank() == 2 {
            var.set(&(var.as_tensor() * 10.0).unwrap()).unwrap();
        }
    }
    let batch = ids(&[&SEQ]);
    let m = Llama::trainable(&cfg, &p).unwrap();
    let grads = lm_loss(&m, &batch).backward().unwrap();
    // For each tensor, the entry with the largest gradient (f32 differences need a clear signal).
    for name in [
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let var = p.get(name).unwrap();
        let gv = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let idx = (0..gv.len())
            .max_by(|&a, &b| gv[a].abs().total_cmp(&gv[b].abs()))
            .unwrap();
        let g = gv[idx];
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eps = 1e-2f32;
        let eval = |delta: f32| {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = lm_loss(&Llama::frozen(&cfg, &p).unwrap(), &batch)
                .to_scalar::<f32>()
                .unwrap();
            l as f64
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(orig, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = (fd - g as f64).abs() / (fd.abs().max(1e-3));
        assert!(
            rel < 2e-2,
            "{name}[{idx}]: autograd {g} vs finite difference {fd}"
        );
    }
}

fn train_steps(seed: u64, steps: usize) -> (Vec<f32>, repnoise::model::params::Params) {
    let cfg = tiny_config(Arch::Llama, true);
    let p = tiny_params(&cfg, seed);
    let mut opt = AdamW::new(
        &p,
        |_| true,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let batch = ids(&[&SEQ, &[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]);
    let mut losses = vec![];
    for _ in 0..steps {
        let m = Llama::trainable(&cfg, &p).unwrap();
        let loss = lm_loss(&m, &batch);
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        let norm = opt.grad_norm(&grads).unwrap();
        let coef = repnoise::train::optim::clip_coefficient(norm, Some(1.0));
        opt.step(&grads, 1e-2, coef).unwrap();
    }
    let m = Llama::frozen(&cfg, &p).unwrap();
    losses.push(lm_loss(&m, &batch).to_scalar::<f32>().unwrap());
    (losses, p)
}

#[test]
fn one_adamw_step_lowers_the_loss() {
    let (losses, _) = train_steps(7, 1);
    assert!(losses[1] < losses[0], "loss {} -> {}", losses[0], losses[1]);
}

#[test]
fn same_seed_same_numbers() {
    let (la, pa) = train_steps(8, 3);
    let (lb, pb) = train_steps(8, 3);
    let (lc, _) = train_steps(9, 3);
    assert_eq!(la, lb);
    assert_ne!(la, lc);
    for name in pa.names() {
        assert_eq!(
            max_abs_diff(pa.tensor(name).unwrap(), pb.tensor(name).unwrap()),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn chat_render_masks_only_assistant_replies() {
    let tok = tiny_tok();
    let msgs = [
        Message::user("hi"),
        Message::assistant("the end"),
        Message::user("q"),
    ];
    let r = chat::render(&tok, &msgs, false).unwrap();
    let masked: Vec<u32> = r
        .ids
        .iter()
        .zip(&r.assistant_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&masked, false).unwrap(), "the end<|im_end|>");
    // Everything before the reply, including the assistant header, is unmasked.
    let first = r.assistant_mask.iter().position(|&m| m == 1).unwrap();
    assert!(tok
        .decode(&r.ids[..first], false)
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    assert_eq!(r.text, tok.decode(&r.ids, false).unwrap());
    // Digits are single pre-tokens (SmolLM2's Digits pre-tokenizer): "2024" is four tokens.
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    // The generation prompt ends with the assistant header.
    let g = chat::render(&tok, &[Message::user("x")], true).unwrap();
    assert!(g.text.ends_with("<|im_start|>assistant\n"));
    assert!(g.assistant_mask.iter().all(|&m| m == 0));
}

/// `repnoise init --config FILE --random` writes a loadable Hugging Face directory of that
/// shape: the weights of `Params::random` with the same seed (rounded to the stored dtype), a
/// byte-level tokenizer whose ids fit the vocabulary, a chat template that renders; the same
/// seed writes the same bytes; `--random` is required and an unknown shape is named.
#[test]
fn init_writes_a_random_model_of_the_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Arch::Llama, false);
    cfg.vocab_size = 300; // the byte-level tokenizer has 260 tokens
    let cfg_path = tmp.path().join("shape.json");
    std::fs::write(&cfg_path, cfg.to_hf_json().to_string()).unwrap();
    let init = |out: &str, store: &str| {
        repnoise()
            .args([
                "init",
                "--random",
                "--seed",
                "3",
                "--store-dtype",
                store,
                "--config",
            ])
            .arg(&cfg_path)
            .arg("--out")
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    for (dir, store, tol) in [("a", "bf16", 1e-2f32), ("f", "f32", 0.0)] {
        let o = init(dir, store);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m = load::load_hf_dir(&tmp.path().join(dir), &Device::Cpu).unwrap();
        assert_eq!(m.config.num_params(), cfg.num_params());
        assert_eq!(m.stored_dtype, store);
        let want = repnoise::model::params::Params::random(&cfg, 3, &Device::Cpu).unwrap();
        let got = values(&m.params);
        for (name, w) in values(&want) {
            let g = &got[&name];
            let off = w
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(off <= tol, "{name} ({store}): off by {off}");
        }
        let ids = chat::render(&m.tok, &[Message::user("hello there")], true)
            .unwrap()
            .ids;
        assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
        let net = Llama::frozen(&m.config, &m.params).unwrap();
        let logits = net
            .logits(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(logits.dims()[2], cfg.vocab_size);
    }
    assert!(init("b", "bf16").status.success());
    let bytes = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(
        bytes("a"),
        bytes("b"),
        "the same seed writes the same weights"
    );

    let o = repnoise()
        .args(["init", "--config", "llama-2-7b", "--out"])
        .arg(tmp.path().join("c"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--random"));
    let o = repnoise()
        .args(["init", "--random", "--config", "llama-9-1b", "--out"])
        .arg(tmp.path().join("c"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("llama-2-7b, llama-3-8b"),
        "{err}"
    );
}
