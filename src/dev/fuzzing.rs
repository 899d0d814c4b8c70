//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` for `cargo fuzz`, and the seeded
//! mutation test that CI runs): each feeds arbitrary bytes to one reader of untrusted input. An
//! `Err` is the right answer to garbage; a panic, an abort or a huge allocation is a bug.
//!
//! The readers take paths (they name the file in their errors), so each body writes the bytes to
//! a file in a per-process scratch directory first.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;

use crate::data::mc::EthicsTask;
use crate::data::stats::{load, DatasetKind};

/// A scratch directory for this process (removed by the OS's tmp cleaning, not by us: a fuzzer
/// is usually killed rather than stopped).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("repnoise-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch directory");
        d
    })
}

fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).expect("fuzz scratch write");
    p
}

/// A GGUF model file.
pub fn gguf(bytes: &[u8]) {
    let p = put("model.gguf", bytes);
    let _ = crate::model::gguf::load(&p, &Device::Cpu);
}

/// `model.safetensors` in a Hugging Face directory whose `config.json` and `tokenizer.json` are
/// valid (a two-layer Llama with a 260-token byte-level vocabulary), so the weights file is read.
pub fn safetensors(bytes: &[u8]) {
    let dir = hf_dir();
    std::fs::write(dir.join("model.safetensors"), bytes).expect("fuzz scratch write");
    let _ = crate::model::load::load_hf_dir(dir, &Device::Cpu);
}

/// A valid `model.safetensors` for [`safetensors`]'s directory (the seed of its corpus).
pub fn safetensors_seed() -> Vec<u8> {
    let dir = hf_dir();
    let text = std::fs::read_to_string(dir.join("config.json")).expect("fuzz config");
    let cfg =
        crate::model::config::parse_hf_config(&text, &dir.join("config.json")).expect("config");
    let tensors: Vec<(String, candle_core::Tensor)> = crate::model::params::expected_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
            let t = candle_core::Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor");
            (name, t)
        })
        .collect();
    let p = scratch().join("seed.safetensors");
    crate::model::load::save_safetensors(&p, &tensors).expect("fuzz seed");
    std::fs::read(&p).expect("fuzz seed")
}

fn hf_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch().join("hf");
        std::fs::create_dir_all(&d).expect("fuzz scratch directory");
        let cfg = serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": 260, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": true,
        });
        std::fs::write(d.join("config.json"), cfg.to_string()).expect("fuzz config");
        std::fs::write(
            d.join("tokenizer.json"),
            crate::model::tokenizer::byte_tokenizer(),
        )
        .expect("fuzz tokenizer");
        d
    })
}

/// The formats [`dataset`] picks from with its first byte: a reader and a file extension.
pub const DATASET_FORMATS: &[(DatasetKind, &str)] = &[
    (DatasetKind::HarmfulQa, "jsonl"),
    (DatasetKind::HarmfulQa, "json"),
    (DatasetKind::HarmfulQa, "csv"),
    (DatasetKind::HarmfulQa, "parquet"),
    (DatasetKind::Pairs, "jsonl"),
    (DatasetKind::Instructions, "json"),
    (DatasetKind::AdvBench, "csv"),
    (DatasetKind::HarmBench, "csv"),
    (DatasetKind::HarmBenchTargets, "json"),
    (DatasetKind::PromptLines, "txt"),
    (DatasetKind::InstructionList, "json"),
    (DatasetKind::DecodingTrust, "jsonl"),
    (DatasetKind::MrText, "csv"),
    (DatasetKind::DartJson, "json"),
    (DatasetKind::WebNlgXml, "xml"),
    (DatasetKind::ConvWeather, "tsv"),
    (DatasetKind::Cacapo, "csv"),
    (DatasetKind::TruthfulQa, "csv"),
    (DatasetKind::Arc, "jsonl"),
    (DatasetKind::Winogrande, "jsonl"),
    (DatasetKind::Mmlu, "jsonl"),
    (DatasetKind::Ethics(EthicsTask::Commonsense), "csv"),
    (DatasetKind::CrowsPairs, "csv"),
    (DatasetKind::Hellaswag, "jsonl"),
];

/// Every dataset reader: the first byte picks the format ([`DATASET_FORMATS`]), the rest is
/// the file.
pub fn dataset(bytes: &[u8]) {
    let Some((&first, rest)) = bytes.split_first() else {
        return;
    };
    let (kind, ext) = DATASET_FORMATS[first as usize % DATASET_FORMATS.len()];
    let p = put(&format!("data.{ext}"), rest);
    let _ = load(&p, kind);
}

/// The configuration parsers: defend, attack and experiment TOML, and a model's `config.json`.
pub fn config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(d) = toml::from_str::<crate::defence::DefendConfig>(text) {
        let _ = d.train.validate();
    }
    if let Ok(a) = toml::from_str::<crate::attack::AttackConfig>(text) {
        let _ = a.train.validate();
    }
    let _ = crate::experiment::Experiment::from_toml_str(text, "fuzz");
    if let Ok(c) = crate::model::config::parse_hf_config(text, Path::new("config.json")) {
        let _ = c.validate(Path::new("config.json"));
    }
}
