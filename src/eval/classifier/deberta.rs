//! DeBERTa-v2 and DeBERTa-v3 sequence classifiers, for scoring only (the paper's harmfulness
//! classifier is a DeBERTa-v3 one). A Hugging Face directory: `config.json` with
//! `model_type: "deberta-v2"` (v3 checkpoints use it too), `model.safetensors` and
//! `tokenizer.json`. The network is candle-transformers' `debertav2` (inference, no dropout);
//! its logits match `transformers` on tiny random checkpoints of both styles
//! (`tests/reference/deberta_classifier.py`). Refused with an error naming the field: a
//! convolution layer after the first block (`conv_kernel_size`, as in deberta-v2-xlarge), which
//! that network cannot run, and more than one pass over the encoder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::debertav2::{Config, DebertaV2SeqClassificationModel};

use crate::{Error, Result};

/// A loaded DeBERTa-v2/v3 sequence classifier.
pub struct DebertaClassifier {
    net: DebertaV2SeqClassificationModel,
    tokenizer: tokenizers::Tokenizer,
    /// Class names by index (`id2label`).
    pub labels: Vec<String>,
    pub pad_id: u32,
    pub max_position_embeddings: usize,
    /// Absolute positions added to the input (`position_biased_input`): the network adds them
    /// without broadcasting over the batch, so such a model scores one row at a time.
    one_row_at_a_time: bool,
    pub source: PathBuf,
}

/// Whether the directory's `config.json` names a DeBERTa-v2 model (`model_type`).
pub fn is_deberta_dir(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let text = crate::util::io::read_text(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    Ok(v.get("model_type").and_then(|m| m.as_str()) == Some("deberta-v2"))
}

impl DebertaClassifier {
    /// Load a `DebertaV2ForSequenceClassification` directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = crate::util::io::read_text(&cfg_path)?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::file(&cfg_path, format!("not a DeBERTa-v2 configuration: {e}")))?;
        check_config(&config, &cfg_path)?;
        let labels = label_names(&config, &cfg_path)?;
        let st_path = dir.join("model.safetensors");
        if !st_path.is_file() {
            return Err(Error::file(
                &st_path,
                "missing: the directory needs model.safetensors (pickle checkpoints are refused)",
            ));
        }
        let tensors = read_tensors(&st_path, device)?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let net = DebertaV2SeqClassificationModel::load(vb.pp("deberta"), &config, None)
            .map_err(|e| Error::file(&st_path, format!("does not fit config.json: {e}")))?;
        let tok_path = dir.join("tokenizer.json");
        let tok_text = crate::util::io::read_text(&tok_path)?;
        let tokenizer = crate::eval::classifier::bert::tokenizer_from_json(&tok_text, &tok_path)?;
        Ok(Self {
            net,
            tokenizer,
            labels,
            pad_id: config.pad_token_id.unwrap_or(0) as u32,
            max_position_embeddings: config.max_position_embeddings,
            one_row_at_a_time: config.position_biased_input,
            source: dir.to_path_buf(),
        })
    }

    /// Token ids of a text with the tokenizer's special tokens, at most `max_len` long.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        crate::eval::classifier::bert::encode(&self.tokenizer, text, max_len)
    }

    /// Class logits `[rows, classes]` of right-padded rows of token ids.
    pub fn logits(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        if self.one_row_at_a_time && rows.len() > 1 {
            let each = rows
                .iter()
                .map(|r| self.batch_logits(std::slice::from_ref(r)))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&each, 0)?);
        }
        self.batch_logits(rows)
    }

    fn batch_logits(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let device = &self.net.device;
        let (ids, valid) = crate::eval::classifier::bert::pad_batch(rows, self.pad_id, device)?;
        let mask: Vec<u8> = valid.iter().flatten().map(|&v| v as u8).collect();
        let mask = Tensor::from_vec(mask, ids.dims(), device)?;
        Ok(self.net.forward(&ids, None, Some(mask))?)
    }

    /// P(class `class`) of each row (softmax over classes; sigmoid for a one-logit head).
    pub fn probs(&self, rows: &[Vec<u32>], class: usize) -> Result<Vec<f32>> {
        crate::eval::classifier::bert::class_probs(&self.logits(rows)?, class)
    }
}

fn check_config(c: &Config, path: &Path) -> Result<()> {
    if c.conv_kernel_size.is_some_and(|k| k > 0) {
        return Err(Error::field(
            path,
            "conv_kernel_size",
            "DeBERTa-v2's convolution layer (deberta-v2-xlarge and larger) is not supported",
        ));
    }
    let positive = [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("intermediate_size", c.intermediate_size),
        ("max_position_embeddings", c.max_position_embeddings),
    ];
    for (name, v) in positive {
        if v == 0 {
            return Err(Error::field(path, name, "must be at least 1"));
        }
    }
    if c.attention_head_size.is_none() && c.hidden_size % c.num_attention_heads != 0 {
        return Err(Error::field(
            path,
            "num_attention_heads",
            format!(
                "{} does not divide hidden_size {}",
                c.num_attention_heads, c.hidden_size
            ),
        ));
    }
    if c.pooler_hidden_size.is_some_and(|p| p != c.hidden_size) {
        return Err(Error::field(
            path,
            "pooler_hidden_size",
            format!("must equal hidden_size {}", c.hidden_size),
        ));
    }
    if c.pooler_hidden_size.is_none() || c.pooler_hidden_act.is_none() {
        return Err(Error::field(
            path,
            "pooler_hidden_size",
            "a sequence classifier's config names pooler_hidden_size and pooler_hidden_act",
        ));
    }
    Ok(())
}

/// Class names in index order; every index from 0 must be named once.
fn label_names(c: &Config, path: &Path) -> Result<Vec<String>> {
    let Some(map) = &c.id2label else {
        return Err(Error::field(
            path,
            "id2label",
            "missing: a classifier names its classes",
        ));
    };
    let mut labels = vec![String::new(); map.len()];
    for (&i, name) in map {
        match labels.get_mut(i as usize) {
            Some(slot) => *slot = name.clone(),
            None => {
                return Err(Error::field(
                    path,
                    "id2label",
                    format!("class {i} is out of range for {} classes", map.len()),
                ))
            }
        }
    }
    if labels.is_empty() {
        return Err(Error::field(path, "id2label", "names no class"));
    }
    Ok(labels)
}

/// Every tensor of a safetensors file, names as stored.
fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    crate::model::load::for_each_safetensor(path, device, |key, t| {
        out.insert(key, t);
        Ok(())
    })?;
    Ok(out)
}
