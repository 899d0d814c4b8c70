//! Models of a given shape with random weights (`repnoise init --config NAME|FILE --random`):
//! the shapes shipped in `configs/models/` (Llama-2-7B, the paper's defended model, and
//! Llama-3-8B) or any Hugging Face `config.json`, written as a Hugging Face directory so that a
//! 7B-shaped model can be made on the machine that measures it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::config::{parse_hf_config, ModelConfig};
use crate::model::load::save_safetensors_as;
use crate::model::params::random_tensors;
use crate::model::tokenizer::Tok;
use crate::{Error, Result};

/// The shipped shapes: name and `config.json` text.
pub const SHAPES: &[(&str, &str)] = &[
    (
        "llama-2-7b",
        include_str!("../../configs/models/llama-2-7b.json"),
    ),
    (
        "llama-3-8b",
        include_str!("../../configs/models/llama-3-8b.json"),
    ),
];

/// A shipped shape by name, or a `config.json` file.
pub fn resolve_shape(spec: &str) -> Result<ModelConfig> {
    if let Some((name, text)) = SHAPES.iter().find(|(n, _)| *n == spec) {
        return parse_hf_config(text, Path::new(&format!("configs/models/{name}.json")));
    }
    let path = Path::new(spec);
    if !path.exists() {
        let names: Vec<&str> = SHAPES.iter().map(|(n, _)| *n).collect();
        return Err(Error::file(
            path,
            format!(
                "neither a shipped shape ({}) nor a config.json file",
                names.join(", ")
            ),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    parse_hf_config(&text, path)
}

/// Write a model of `cfg`'s shape with random weights (as [`crate::model::params::Params::random`]:
/// the same seed gives the same weights) to `out` as a Hugging Face directory, the weights
/// stored as `store` (bf16 halves a 7B model's 27 GB), with the byte-level tokenizer
/// ([`Tok::byte_level`]) and the config's begin/end ids set to that tokenizer's. Holds one
/// f32 tensor at a time beside the stored copies. Returns the number of parameters written.
pub fn write_random(cfg: &ModelConfig, seed: u64, store: DType, out: &Path) -> Result<usize> {
    if !matches!(store, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::msg(format!(
            "--store-dtype {}: expected f32, bf16 or f16",
            store.as_str()
        )));
    }
    let tok = Tok::byte_level()?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::msg(format!("the byte-level tokenizer has no {t}")))
    };
    let mut cfg = cfg.clone();
    if cfg.vocab_size < tok.vocab_size() {
        return Err(Error::msg(format!(
            "vocab_size {} is below the byte-level tokenizer's {} tokens",
            cfg.vocab_size,
            tok.vocab_size()
        )));
    }
    cfg.bos_token_id = Some(id("<s>")?);
    cfg.eos_token_ids = vec![id("</s>")?];
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create directory: {e}")))?;
    let mut tensors = vec![];
    let mut n = 0;
    random_tensors(&cfg, seed, |name, shape, data| {
        n += data.len();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(store)?;
        tensors.push((name, t));
        Ok(())
    })?;
    save_safetensors_as(&out.join("model.safetensors"), &tensors, store)?;
    drop(tensors);
    tok.save(out)?;
    let mut gen = serde_json::json!({"_from_model_config": true});
    gen["bos_token_id"] = cfg.bos_token_id.into();
    gen["eos_token_id"] = cfg.eos_token_ids.clone().into();
    crate::util::io::write_json_atomic(&out.join("generation_config.json"), &gen)?;
    let mut hf = cfg.to_hf_json();
    hf["torch_dtype"] = match store {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    // config.json last: its presence marks a complete directory.
    crate::util::io::write_json_atomic(&out.join("config.json"), &hf)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped shapes have their publishers' parameter counts (the model cards'
    /// `num_parameters()`: Llama-2-7b-hf 6,738,415,616, Meta-Llama-3-8B 8,030,261,248).
    #[test]
    fn shipped_shapes_have_the_published_parameter_counts() {
        let c = resolve_shape("llama-2-7b").unwrap();
        assert_eq!((c.num_layers, c.num_kv_heads, c.head_dim), (32, 32, 128));
        assert_eq!(c.num_params(), 6_738_415_616);
        let c = resolve_shape("llama-3-8b").unwrap();
        assert_eq!((c.num_kv_heads, c.rope_theta), (8, 500000.0));
        assert_eq!(c.num_params(), 8_030_261_248);
        let e = resolve_shape("llama-9-1b").unwrap_err().to_string();
        assert!(e.contains("llama-2-7b, llama-3-8b"), "{e}");
    }
}
