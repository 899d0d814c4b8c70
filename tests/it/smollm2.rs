//! Integration tests on the real embedded model (SmolLM2-135M-Instruct, fetched once into the
//! cache). Reference values come from tests/reference/make_reference.py (PyTorch + transformers
//! dequantizing the same GGUF); see that script for how they were made.

use candle_core::Device;
use repnoise::model::chat::{self, Message};
use repnoise::model::generate::{self, SamplingConfig};
use repnoise::model::llama::Llama;
use repnoise::model::load::{self, LoadedModel};

fn smollm2() -> LoadedModel {
    load::load(
        "smollm2-135m-instruct",
        &repnoise::model::assets::default_cache_dir(),
        &Device::Cpu,
    )
    .expect("the embedded model loads (needs pip and the package registry on first use)")
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[test]
fn tokenizer_and_logprobs_match_the_reference() {
    let m = smollm2();
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let r: Reference =
        serde_json::from_str(include_str!("../reference/smollm2_reference.json")).unwrap();
    for c in &r.cases {
        let ids = m.tok.encode(&c.text).unwrap();
        assert_eq!(ids, c.ids, "tokenization of {:?}", c.text);
        let lps = generate::token_logprobs(&net, &ids).unwrap();
        assert_eq!(lps.len(), c.logprobs.len());
        for (i, (a, b)) in lps.iter().zip(&c.logprobs).enumerate() {
            assert!((a - b).abs() < 2e-3, "token {i}: {a} vs reference {b}");
        }
    }
}

#[test]
fn answers_the_capital_of_france() {
    let m = smollm2();
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let prompt = chat::render(
        &m.tok,
        &[Message::user("What is the capital of France?")],
        true,
    )
    .unwrap()
    .ids;
    let cfg = SamplingConfig {
        max_new_tokens: 20,
        ..Default::default()
    };
    let out = generate::generate(&net, &[prompt], m.tok.pad_id, &m.tok.stop_ids, &cfg).unwrap();
    let text = m.tok.decode(&out[0], true).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn converted_directory_reloads_with_identical_logits() {
    let m = smollm2();
    let dir = tempfile::tempdir().unwrap();
    load::save_hf_dir(dir.path(), &m.config, &m.params, &m.tok).unwrap();
    let back = load::load_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.config, m.config);
    let text = "<|im_start|>user\nName 3 colours.<|im_end|>\n";
    let ids = m.tok.encode(text).unwrap();
    assert_eq!(back.tok.encode(text).unwrap(), ids);
    let a = generate::token_logprobs(&Llama::frozen(&m.config, &m.params).unwrap(), &ids).unwrap();
    let b = generate::token_logprobs(&Llama::frozen(&back.config, &back.params).unwrap(), &ids)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(back.tok.chat_template, m.tok.chat_template);
}

#[derive(serde::Deserialize)]
struct LossReference {
    pad_id: u32,
    cases: Vec<LossCase>,
}

#[derive(serde::Deserialize)]
struct LossCase {
    pairs: String,
    max_len: usize,
    hidden_states: usize,
    harmful_ids: Vec<Vec<u32>>,
    harmless_ids: Vec<Vec<u32>>,
    mask_positions: usize,
    harmless_ce: f64,
    harmful_ce: f64,
    ascent: f64,
}

/// `repnoise loss --faithful` against the authors' published arithmetic
/// (`representation_noising/loss.py`, reproduced in PyTorch by
/// tests/reference/make_repnoise_loss_reference.py), within 1e-4 relative, on three cases: the
/// fixture pairs and five BeaverTails pairs cut at 40 and at 128 tokens. The lens sum is divided
/// by `len(hidden_states)` = L + 1 although it has L + 2 readouts; dividing by L + 2 gives
/// `harmful_ce` about 3% low and fails here.
#[test]
fn faithful_repnoise_loss_matches_the_reference() {
    use repnoise::data::encode::PromptFormat;
    use repnoise::defence::repnoise::RepNoiseConfig;
    let r: LossReference =
        serde_json::from_str(include_str!("../reference/repnoise_loss_reference.json")).unwrap();
    let m = smollm2();
    assert_eq!(m.tok.pad_id, r.pad_id);
    assert_eq!(r.cases.len(), 3);
    let cfg = RepNoiseConfig {
        faithful: true,
        ..RepNoiseConfig::default()
    };
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    for c in &r.cases {
        let what = format!("{} at max_len {}", c.pairs, c.max_len);
        assert_eq!(c.hidden_states, m.config.num_layers + 1, "{what}");
        let pairs = repnoise::data::read_pairs(std::path::Path::new(&c.pairs))
            .unwrap()
            .records;
        let enc = repnoise::defence::encode_pairs(&m, &pairs, PromptFormat::Plain, c.max_len, true)
            .unwrap();
        for (i, e) in enc.iter().enumerate() {
            assert_eq!(
                e.harmful.real_ids(),
                c.harmful_ids[i],
                "{what}: pair {i} harmful ids"
            );
            assert_eq!(
                e.harmless.real_ids(),
                c.harmless_ids[i],
                "{what}: pair {i} harmless ids"
            );
        }
        let t = repnoise::defence::loss_terms(&m, &pairs, PromptFormat::Plain, c.max_len, &cfg, 42)
            .unwrap();
        assert!(
            rel(t.harmless_ce, c.harmless_ce) < 1e-4,
            "{what}: harmless_ce {} vs {}",
            t.harmless_ce,
            c.harmless_ce
        );
        assert!(
            rel(t.harmful_ce, c.harmful_ce) < 1e-4,
            "{what}: harmful_ce {} vs {}",
            t.harmful_ce,
            c.harmful_ce
        );
        assert!(
            rel((1.0 + t.harmful_ce).ln(), c.ascent) < 1e-4,
            "{what}: ascent"
        );
        assert_eq!(t.mask_positions, c.mask_positions, "{what}");
        let want = t.harmless_ce + 0.001 * t.noise_mmd - (1.0 + t.harmful_ce).ln();
        assert!(
            (t.loss - want).abs() < 1e-4,
            "{what}: loss {} vs {want}",
            t.loss
        );
    }
    let c = &r.cases[0];
    let pairs = repnoise::data::read_pairs(std::path::Path::new(&c.pairs))
        .unwrap()
        .records;
    let t = repnoise::defence::loss_terms(&m, &pairs, PromptFormat::Plain, c.max_len, &cfg, 42)
        .unwrap();
    // The default mode fixes the quirks: no constant term, no padding trained on, so the
    // refusal's cross-entropy is lower.
    let d = repnoise::defence::loss_terms(
        &m,
        &pairs,
        PromptFormat::Plain,
        c.max_len,
        &RepNoiseConfig::default(),
        42,
    )
    .unwrap();
    assert!(
        d.harmless_ce < t.harmless_ce - 0.5,
        "default {} vs faithful {}",
        d.harmless_ce,
        t.harmless_ce
    );
}

/// Attention in causal blocks (`Llama::with_query_block`, on by default for forward passes
/// without gradient) gives the whole computation's bits on the real model: SmolLM2's three
/// query heads per key/value head and 64-wide heads, over 200 tokens (blocks of 64, the last
/// of 72) with one row right padded.
#[test]
fn attention_in_causal_blocks_is_exact_on_smollm2() {
    use candle_core::Tensor;
    use repnoise::model::llama::{attention_mask, positions_for, ForwardOpts, Logits};
    let mut m = smollm2();
    let net = Llama::inference(&m.config, std::mem::take(&mut m.params)).unwrap();
    let (b, t) = (2, 200);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 40_000) as u32 + 5).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let kv: Vec<Vec<bool>> = (0..b)
        .map(|r| (0..t).map(|j| r == 0 || j < 150).collect())
        .collect();
    let mask = attention_mask(b, t, 0, Some(&kv), &Device::Cpu).unwrap();
    let pos = positions_for(b, t, 0, &Device::Cpu).unwrap();
    let opts = ForwardOpts {
        logits: Logits::Last,
        hidden_states: true,
        mlp_outputs: false,
    };
    let bits = |net: &Llama| -> Vec<u32> {
        let o = net.forward(&ids, &pos, Some(&mask), None, opts).unwrap();
        [o.hidden_states.last().unwrap().clone(), o.logits.unwrap()]
            .iter()
            .flat_map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
    };
    let (blocked, whole) = (bits(&net), bits(&net.clone().with_query_block(0)));
    let differ = blocked.iter().zip(&whole).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} numbers differ", whole.len());
}
