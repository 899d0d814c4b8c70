//! The tests' shared helpers: tiny random models and tokenizers, encoded pairs, and the one way
//! to run the binary.
#![allow(dead_code)]

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use repnoise::model::config::{Arch, ModelConfig};
use repnoise::model::params::{expected_shapes, Params};
use repnoise::model::tokenizer::Tok;

/// The `repnoise` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_repnoise");

/// A command that runs the `repnoise` binary.
pub fn repnoise() -> std::process::Command {
    std::process::Command::new(BIN)
}

pub const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-to-unicode table.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Vocabulary: 3 specials, 256 bytes, then merges "h e" -> "he", "Ġ t" -> "Ġt".
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = vec!["h e".to_string(), "Ġ t".to_string()];
    tokens.push("he".into());
    tokens.push("Ġt".into());
    types.extend([1, 1]);
    (tokens, types, merges)
}

pub fn tiny_tokenizer_description() -> repnoise::model::gguf::GgufTokenizer {
    let (tokens, token_types, merges) = tiny_vocab();
    repnoise::model::gguf::GgufTokenizer {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types,
        merges,
        bos_id: Some(1),
        eos_id: Some(2),
        pad_id: Some(2),
        chat_template: Some(SMOL_TEMPLATE.into()),
        add_bos: None,
    }
}

pub fn tiny_tok() -> Tok {
    Tok::from_gguf(&tiny_tokenizer_description(), Path::new("tiny.gguf")).unwrap()
}

pub fn tiny_config(arch: Arch, tie: bool) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 264,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: tie,
        qkv_bias: arch == Arch::Qwen2,
        o_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        compute_dtype: candle_core::DType::F32,
    }
}

pub fn tiny_params(cfg: &ModelConfig, seed: u64) -> Params {
    let mut p = Params::random(cfg, seed, &Device::Cpu).unwrap();
    // Non-trivial norms and biases, so the tests see them matter.
    let mut rng = repnoise::util::rng::Rng::new(seed, "test-perturb");
    for (name, shape) in expected_shapes(cfg) {
        if name.ends_with("norm.weight") || name.ends_with(".bias") {
            let n: usize = shape.iter().product();
            let base = if name.ends_with(".bias") { 0.0 } else { 1.0 };
            let data: Vec<f32> = rng.normal_vec(n, 0.1).iter().map(|x| x + base).collect();
            p.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    p
}

/// Write a tiny model as a GGUF file, permuting q/k rows as llama.cpp does for Llama.
pub fn write_tiny_gguf(path: &Path, cfg: &ModelConfig, params: &Params) {
    let desc = tiny_tokenizer_description();
    let arch = cfg.arch.hf_model_type();
    let a = |k: &str| format!("{arch}.{k}");
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (a("block_count"), Value::U32(cfg.num_layers as u32)),
        (
            a("context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (a("attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (
            a("attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("vocab_size"), Value::U32(cfg.vocab_size as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                desc.tokens
                    .iter()
                    .map(|t| Value::String(t.clone()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(desc.token_types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                desc.merges
                    .iter()
                    .map(|t| Value::String(t.clone()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(SMOL_TEMPLATE.into()),
        ),
    ];
    let gguf_name = |hf: &str| -> String {
        if hf == "model.embed_tokens.weight" {
            return "token_embd.weight".into();
        }
        if hf == "model.norm.weight" {
            return "output_norm.weight".into();
        }
        if hf == "lm_head.weight" {
            return "output.weight".into();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (l, tail) = rest.split_once('.').unwrap();
        let (module, kind) = tail.rsplit_once('.').unwrap();
        let g = match module {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            m => panic!("{m}"),
        };
        format!("blk.{l}.{g}.{kind}")
    };
    let permute = |t: &Tensor, n_head: usize| -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    };
    let mut qts: Vec<(String, QTensor)> = vec![];
    for (name, _) in expected_shapes(cfg) {
        let mut t = params.tensor(&name).unwrap().clone();
        if cfg.arch == Arch::Llama && name.ends_with("q_proj.weight") {
            t = permute(&t, cfg.num_heads);
        }
        if cfg.arch == Arch::Llama && name.ends_with("k_proj.weight") {
            t = permute(&t, cfg.num_kv_heads);
        }
        qts.push((
            gguf_name(&name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// Write a tiny model as a Hugging Face directory.
pub fn write_tiny_hf(dir: &Path, cfg: &ModelConfig, params: &Params) {
    repnoise::model::load::save_hf_dir(dir, cfg, params, &tiny_tok()).unwrap();
}

/// A tiny random Llama with tied embeddings and the tiny tokenizer, ready to train.
pub fn tiny_loaded(seed: u64) -> repnoise::model::load::LoadedModel {
    let cfg = tiny_config(Arch::Llama, true);
    repnoise::model::load::LoadedModel {
        params: tiny_params(&cfg, seed),
        config: cfg,
        tok: tiny_tok(),
        source: "tiny".into(),
        stored_dtype: "f32".into(),
    }
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Largest magnitude of an f32 tensor's elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every parameter's values, by name.
pub fn params_of(
    m: &repnoise::model::load::LoadedModel,
) -> std::collections::BTreeMap<String, Vec<f32>> {
    values(&m.params)
}

/// Every tensor of a store, flattened.
pub fn values(p: &Params) -> std::collections::BTreeMap<String, Vec<f32>> {
    p.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

/// Largest absolute difference between two stores' values (same names).
pub fn values_max_diff(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Four short defence pairs for tiny-model tests.
pub fn tiny_pairs() -> Vec<repnoise::data::pairs::Pair> {
    use repnoise::data::pairs::Pair;
    let p = |q: &str, h: &str, s: &str| Pair {
        prompt: q.into(),
        harmful: h.into(),
        harmless: s.into(),
        categories: None,
    };
    vec![
        p("How to x?", "Do x like this and that.", "No."),
        p(
            "Tell me y",
            "Sure: y",
            "I won't tell you y, sorry about that.",
        ),
        p("zz?", "zz is done by a b c d", "I cannot."),
        p("Help with w", "w w w", "Not w."),
    ]
}

/// The tiny pairs encoded for `m` (plain format, 64 tokens), as the defences train on them.
pub fn encoded(
    m: &repnoise::model::load::LoadedModel,
    faithful: bool,
) -> Vec<repnoise::data::EncodedPair> {
    repnoise::defence::encode_pairs(
        m,
        &tiny_pairs(),
        repnoise::data::encode::PromptFormat::Plain,
        64,
        faithful,
    )
    .unwrap()
}

/// A scalar tensor's value as f64.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
