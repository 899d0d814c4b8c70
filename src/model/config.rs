//! Model configuration: the file-facing `config.json` (Hugging Face) mirrored with `Option`s and
//! resolved once into [`ModelConfig`], a plain struct with no `Option`s that the model reads.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Decoder families supported by [`crate::model::llama::Llama`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama, Llama-2, SmolLM/SmolLM2 (optionally with attention biases).
    Llama,
    /// Qwen2: Llama layout with biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// The resolved configuration of a decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection too (Llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype activations are computed in (`--dtype`): f32 (the default), or bf16/f16 with
    /// the weights kept in f32 and cast on use (mixed precision). Not part of the file: a
    /// model's `config.json` says how it is stored, this says how it is run.
    #[serde(skip, default = "f32_dtype")]
    pub compute_dtype: candle_core::DType,
}

fn f32_dtype() -> candle_core::DType {
    candle_core::DType::F32
}

/// `--dtype`: the compute dtypes a model can run in.
pub fn parse_compute_dtype(s: &str) -> Result<candle_core::DType> {
    match s {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(Error::msg(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

impl ModelConfig {
    /// Check the invariants the model relies on; `origin` names the file for messages.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let f = |field: &str, msg: String| Err(Error::field(origin, field, msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return f(
                "num_attention_heads",
                "heads, key/value heads and layers must be positive".into(),
            );
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return f(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if self.head_dim % 2 != 0 || self.head_dim == 0 {
            return f(
                "head_dim",
                format!("{} must be even and positive", self.head_dim),
            );
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return f(
                "hidden_size",
                "vocab, hidden and intermediate sizes must be positive".into(),
            );
        }
        if !(self.rms_norm_eps > 0.0) {
            return f("rms_norm_eps", format!("{} must be > 0", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0) {
            return f("rope_theta", format!("{} must be > 0", self.rope_theta));
        }
        Ok(())
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let mut attn = d * q + 2 * d * kv + q * d;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += d;
        }
        let mlp = 3 * d * self.intermediate_size;
        let layer = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * layer + d
    }

    /// The `config.json` a Hugging Face `transformers` installation reads for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_architecture()],
            "model_type": self.arch.hf_model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let obj = v.as_object_mut().expect("json object literal");
        if self.arch == Arch::Llama {
            obj.insert("attention_bias".into(), self.qkv_bias.into());
            obj.insert("mlp_bias".into(), false.into());
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        v
    }
}

/// `config.json` as Hugging Face writes it (only the fields we read).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    rope_scaling: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn ids_of(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(xs)) => xs
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

/// Parse a Hugging Face `config.json` (its text and path, for messages).
pub fn parse_hf_config(text: &str, path: &Path) -> Result<ModelConfig> {
    let hf: HfConfig = serde_json::from_str(text)
        .map_err(|e| Error::file(path, format!("not a valid model config: {e}")))?;
    let model_type = hf.model_type.clone().unwrap_or_default();
    let arch = match model_type.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "" => {
            // Fall back on `architectures`.
            match hf.architectures.first().map(String::as_str) {
                Some("LlamaForCausalLM") => Arch::Llama,
                Some("Qwen2ForCausalLM") => Arch::Qwen2,
                other => {
                    return Err(Error::field(
                        path,
                        "model_type",
                        format!(
                            "missing, and architectures = {other:?} is not supported \
                             (supported: llama, qwen2)"
                        ),
                    ))
                }
            }
        }
        other => {
            return Err(Error::field(
                path,
                "model_type",
                format!("`{other}` is not supported (supported: llama, qwen2)"),
            ))
        }
    };
    if let Some(act) = &hf.hidden_act {
        if act != "silu" {
            return Err(Error::field(
                path,
                "hidden_act",
                format!("`{act}` is not supported (supported: silu)"),
            ));
        }
    }
    if hf.mlp_bias == Some(true) {
        return Err(Error::field(path, "mlp_bias", "true is not supported"));
    }
    if let Some(rs) = &hf.rope_scaling {
        if !rs.is_null() {
            return Err(Error::field(
                path,
                "rope_scaling",
                format!("{rs} is not supported (only unscaled rotary embeddings)"),
            ));
        }
    }
    let head_dim = hf.head_dim.unwrap_or(if hf.num_attention_heads > 0 {
        hf.hidden_size / hf.num_attention_heads
    } else {
        0
    });
    let attention_bias = hf.attention_bias.unwrap_or(false);
    let cfg = ModelConfig {
        arch,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta: hf.rope_theta.unwrap_or(10000.0),
        max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        qkv_bias: arch == Arch::Qwen2 || attention_bias,
        o_bias: arch == Arch::Llama && attention_bias,
        bos_token_id: ids_of(&hf.bos_token_id).first().copied(),
        eos_token_ids: ids_of(&hf.eos_token_id),
        compute_dtype: candle_core::DType::F32,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
      "vocab_size":49152,"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
      "num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000,
      "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn parses_smollm2_config_and_counts_params() {
        let c = parse_hf_config(SMOL, Path::new("config.json")).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(c.tie_word_embeddings);
        // SmolLM2-135M has 134,515,008 parameters.
        assert_eq!(c.num_params(), 134_515_008);
    }

    #[test]
    fn round_trips_through_hf_json() {
        let c = parse_hf_config(SMOL, Path::new("config.json")).unwrap();
        let back = parse_hf_config(&c.to_hf_json().to_string(), Path::new("config.json")).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let text = SMOL.replace(r#""hidden_size":576,"#, "");
        let e = parse_hf_config(&text, Path::new("/m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/m/config.json") && e.contains("hidden_size"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let text = SMOL.replace(r#""model_type":"llama""#, r#""model_type":"gpt_neox""#);
        let e = parse_hf_config(&text, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt_neox") && e.contains("model_type"), "{e}");
    }

    #[test]
    fn bad_head_split_is_rejected() {
        let text = SMOL.replace(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#);
        let e = parse_hf_config(&text, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
