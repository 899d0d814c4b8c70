//! GGUF files (llama.cpp's format): configuration from the metadata, weights dequantized to f32
//! for training, and the tokenizer's vocabulary, merges and chat template.
//!
//! llama.cpp stores Llama's q/k projection rows permuted for its interleaved rotary layout; the
//! model here (like `transformers`) uses the half-split layout, so loading undoes that
//! permutation. Tied embeddings show as a missing `output.weight`.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::model::config::{Arch, ModelConfig};
use crate::model::params::Params;
use crate::{Error, Result};

/// What a GGUF file says about its tokenizer.
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model` (`gpt2` for byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre` (the pre-tokenizer name, e.g. `smollm`).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.add_bos_token`, when the file says.
    pub add_bos: Option<bool>,
}

/// Everything read from a GGUF file.
pub struct GgufModel {
    pub config: ModelConfig,
    pub params: Params,
    pub tokenizer: GgufTokenizer,
}

/// Turn an f32 stored value into the decimal it was written from (1e-5, not 9.99999974e-6).
fn f32_to_decimal(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| Error::field(self.path, key, "missing from the GGUF metadata"))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| x as usize)
            .map_err(|e| Error::field(self.path, key, format!("not an integer: {e}")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.md.contains_key(key) {
            Ok(Some(self.usize(key)?))
        } else {
            Ok(None)
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f32_to_decimal)
            .or_else(|_| v.to_f64())
            .map_err(|e| Error::field(self.path, key, format!("not a number: {e}")))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_bool()
                .map(Some)
                .map_err(|e| Error::field(self.path, key, format!("not a boolean: {e}"))),
        }
    }
    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| Error::field(self.path, key, format!("not a string: {e}")))
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .get(key)?
            .to_vec()
            .map_err(|e| Error::field(self.path, key, format!("not an array: {e}")))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string().cloned().map_err(|e| {
                    Error::field(
                        self.path,
                        format!("{key}[{i}]"),
                        format!("not a string: {e}"),
                    )
                })
            })
            .collect()
    }
}

/// Undo llama.cpp's q/k row permutation: rows ordered `(head, half, 2)` back to `(head, 2, half)`.
fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Map a GGUF tensor name to its Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Read a GGUF model file: config, f32 weights (on `device`) and tokenizer description.
pub fn load(path: &Path, device: &Device) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::file(path, format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch_name = meta.string("general.architecture")?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::field(
                path,
                "general.architecture",
                format!("`{other}` is not supported (supported: llama, qwen2)"),
            ))
        }
    };
    let a = |k: &str| format!("{arch_name}.{k}");
    let tokenizer = read_tokenizer(&meta)?;
    let hidden = meta.usize(&a("embedding_length"))?;
    let heads = meta.usize(&a("attention.head_count"))?;
    let kv_heads = meta
        .opt_usize(&a("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = match meta.opt_usize(&a("attention.key_length"))? {
        Some(h) => h,
        None => hidden / heads.max(1),
    };
    let vocab = match meta.opt_usize(&a("vocab_size"))? {
        Some(v) => v,
        None => tokenizer.tokens.len(),
    };
    let tie = !content.tensor_infos.contains_key("output.weight");
    let has_bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let has_o_bias = content.tensor_infos.contains_key("blk.0.attn_output.bias");
    let config = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta.usize(&a("feed_forward_length"))?,
        num_layers: meta.usize(&a("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta.f64(&a("attention.layer_norm_rms_epsilon"))?,
        rope_theta: if content.metadata.contains_key(&a("rope.freq_base")) {
            meta.f64(&a("rope.freq_base"))?
        } else {
            10000.0
        },
        max_position_embeddings: meta.opt_usize(&a("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: tie,
        qkv_bias: has_bias,
        o_bias: has_o_bias,
        bos_token_id: tokenizer.bos_id,
        eos_token_ids: tokenizer.eos_id.into_iter().collect(),
        compute_dtype: candle_core::DType::F32,
    };
    config.validate(path)?;

    let mut params = Params::new();
    let wanted: std::collections::HashMap<String, Vec<usize>> =
        crate::model::params::expected_shapes(&config)
            .into_iter()
            .collect();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            // rope_freqs and similar derived tables are recomputed, not loaded.
            if name.starts_with("rope_") {
                continue;
            }
            return Err(Error::tensor(path, name, "unknown GGUF tensor name"));
        };
        // The header's shape must be the config's before anything is read or allocated: a
        // header can claim any size (and dimensions whose product overflows).
        let dims = content.tensor_infos[name].shape.dims();
        match wanted.get(&hf) {
            Some(w) if w.as_slice() == dims => {}
            Some(w) => {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("the header gives shape {dims:?}, the config wants {w:?}"),
                ))
            }
            None => return Err(Error::tensor(path, name, "not a tensor of this model")),
        }
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::tensor(path, name, format!("unreadable: {e}")))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| Error::tensor(path, name, format!("cannot dequantize: {e}")))?;
        if arch == Arch::Llama {
            if name.starts_with("blk.") && name.ends_with("attn_q.weight") {
                t = unpermute_qk(&t, heads)?;
            } else if name.starts_with("blk.") && name.ends_with("attn_k.weight") {
                t = unpermute_qk(&t, kv_heads)?;
            }
        }
        params.insert(hf, t.to_device(device)?)?;
    }
    params.check_against(&config, path)?;
    Ok(GgufModel {
        config,
        params,
        tokenizer,
    })
}

fn read_tokenizer(meta: &Meta) -> Result<GgufTokenizer> {
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let token_types = match meta.md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| Error::field(meta.path, "tokenizer.ggml.token_type", e.to_string()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    if token_types.len() != tokens.len() {
        return Err(Error::field(
            meta.path,
            "tokenizer.ggml.token_type",
            format!("{} entries for {} tokens", token_types.len(), tokens.len()),
        ));
    }
    let merges = if meta.md.contains_key("tokenizer.ggml.merges") {
        meta.strings("tokenizer.ggml.merges")?
    } else {
        vec![]
    };
    let id = |k: &str| -> Result<Option<u32>> { Ok(meta.opt_usize(k)?.map(|x| x as u32)) };
    Ok(GgufTokenizer {
        model,
        pre: meta.string("tokenizer.ggml.pre").ok(),
        tokens,
        token_types,
        merges,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        pad_id: id("tokenizer.ggml.padding_token_id")?,
        chat_template: meta.string("tokenizer.chat_template").ok(),
        add_bos: meta.opt_bool("tokenizer.ggml.add_bos_token")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, half, cols).swapaxes(1, 2)
        let (n_head, hd, cols) = (2usize, 4usize, 3usize);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (rows, cols), &Device::Cpu).unwrap();
        let permuted = hf
            .reshape((n_head, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            hf.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_qk(&permuted, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn stored_f32_becomes_its_decimal() {
        assert_eq!(f32_to_decimal(1e-5f32), 1e-5f64);
        assert_eq!(f32_to_decimal(100000.0f32), 100000.0f64);
    }
}
