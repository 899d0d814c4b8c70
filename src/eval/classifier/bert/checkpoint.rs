//! A BERT checkpoint on disk: its `config.json` resolved ([`BertConfig`]), its tensors under the
//! `BertForSequenceClassification` names, its tokenizer, and writing one back ([`save_dir`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::*;
use crate::util::rng::Rng;

/// A resolved BERT configuration (from `config.json`; no optional fields).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub hidden_act: Activation,
    /// Class names by index (`id2label`); empty for a plain encoder config.
    pub id2label: Vec<String>,
}

fn get_usize(o: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<usize>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| Error::field(path, key, format!("expected a whole number, got {v}"))),
    }
}

fn need_usize(o: &Map<String, Value>, key: &str, path: &Path) -> Result<usize> {
    match get_usize(o, key, path)? {
        Some(0) => Err(Error::field(path, key, "must be positive")),
        Some(n) => Ok(n),
        None => Err(Error::field(
            path,
            key,
            "missing (a BERT config.json needs it)",
        )),
    }
}

impl BertConfig {
    /// Parse a Hugging Face BERT `config.json`; errors name `path` and the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        if let Some(mt) = o.get("model_type") {
            match mt.as_str() {
                Some("bert") => {}
                Some(other) => {
                    return Err(Error::field(
                        path,
                        "model_type",
                        format!(
                            "{other:?} is not supported: only BERT checkpoints (`bert`) load \
                             (DeBERTa-v2, RoBERTa and others are not implemented)"
                        ),
                    ))
                }
                None => return Err(Error::field(path, "model_type", "expected a string")),
            }
        }
        if let Some(p) = o.get("position_embedding_type") {
            if p.as_str() != Some("absolute") {
                return Err(Error::field(
                    path,
                    "position_embedding_type",
                    format!("{p} is not supported (only \"absolute\")"),
                ));
            }
        }
        let hidden_act = match o.get("hidden_act") {
            None => Activation::GeluErf,
            Some(a) => match a.as_str() {
                Some("gelu") => Activation::GeluErf,
                Some("gelu_new") | Some("gelu_pytorch_tanh") => Activation::GeluTanh,
                Some("relu") => Activation::Relu,
                _ => {
                    return Err(Error::field(
                        path,
                        "hidden_act",
                        format!("{a} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"),
                    ))
                }
            },
        };
        let layer_norm_eps = match o.get("layer_norm_eps") {
            None => 1e-12,
            Some(e) => match e.as_f64() {
                Some(x) if x > 0.0 => x,
                _ => {
                    return Err(Error::field(
                        path,
                        "layer_norm_eps",
                        format!("expected a positive number, got {e}"),
                    ))
                }
            },
        };
        let hidden_size = need_usize(o, "hidden_size", path)?;
        let num_attention_heads = need_usize(o, "num_attention_heads", path)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(Error::field(
                path,
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let id2label = parse_id2label(o, path)?;
        if let Some(n) = get_usize(o, "num_labels", path)? {
            if !id2label.is_empty() && n != id2label.len() {
                return Err(Error::field(
                    path,
                    "num_labels",
                    format!("{n} does not match id2label's {} labels", id2label.len()),
                ));
            }
        }
        let pad = get_usize(o, "pad_token_id", path)?.unwrap_or(0);
        Ok(BertConfig {
            vocab_size: need_usize(o, "vocab_size", path)?,
            hidden_size,
            num_hidden_layers: need_usize(o, "num_hidden_layers", path)?,
            num_attention_heads,
            intermediate_size: need_usize(o, "intermediate_size", path)?,
            max_position_embeddings: get_usize(o, "max_position_embeddings", path)?.unwrap_or(512),
            type_vocab_size: get_usize(o, "type_vocab_size", path)?.unwrap_or(2),
            layer_norm_eps,
            pad_token_id: u32::try_from(pad)
                .map_err(|_| Error::field(path, "pad_token_id", "too large"))?,
            hidden_act,
            id2label,
        })
    }

    /// Read and parse `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = crate::util::io::read_text(&path)?;
        Self::parse(&text, &path)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// A `BertForSequenceClassification` `config.json` that `transformers` loads.
    pub fn to_hf_json(&self) -> Value {
        let id2label: Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
            .collect();
        let label2id: Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), Value::from(i)))
            .collect();
        serde_json::json!({
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "hidden_act": self.hidden_act.name(),
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02,
            "position_embedding_type": "absolute",
            "problem_type": "single_label_classification",
            "id2label": id2label,
            "label2id": label2id,
            "torch_dtype": "float32",
        })
    }
}

/// `id2label` as a list indexed by class (keys must be exactly `0..n`).
fn parse_id2label(o: &Map<String, Value>, path: &Path) -> Result<Vec<String>> {
    let Some(v) = o.get("id2label") else {
        return Ok(vec![]);
    };
    let m = v
        .as_object()
        .ok_or_else(|| Error::field(path, "id2label", "expected an object {\"0\": name, ...}"))?;
    let mut out = vec![None; m.len()];
    for (k, name) in m {
        let i: usize = k.parse().ok().filter(|&i| i < m.len()).ok_or_else(|| {
            Error::field(
                path,
                format!("id2label.{k}"),
                format!("keys must be the class indices 0..{}", m.len()),
            )
        })?;
        let name = name
            .as_str()
            .ok_or_else(|| Error::field(path, format!("id2label.{k}"), "expected a string"))?;
        out[i] = Some(name.to_string());
    }
    out.into_iter()
        .enumerate()
        .map(|(i, n)| n.ok_or_else(|| Error::field(path, "id2label", format!("no label {i}"))))
        .collect()
}

/// The names and shapes of the encoder's tensors (`bert.` prefix), then the pooler's when
/// `pooler`, then the classification head's when `num_labels > 0`.
pub fn expected_shapes(
    cfg: &BertConfig,
    pooler: bool,
    num_labels: usize,
) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let e = "bert.embeddings";
    let mut out = vec![
        (
            format!("{e}.word_embeddings.weight"),
            vec![cfg.vocab_size, d],
        ),
        (
            format!("{e}.position_embeddings.weight"),
            vec![cfg.max_position_embeddings, d],
        ),
        (
            format!("{e}.token_type_embeddings.weight"),
            vec![cfg.type_vocab_size, d],
        ),
        (format!("{e}.LayerNorm.weight"), vec![d]),
        (format!("{e}.LayerNorm.bias"), vec![d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("bert.encoder.layer.{l}");
        for (name, shape) in [
            ("attention.self.query.weight", vec![d, d]),
            ("attention.self.query.bias", vec![d]),
            ("attention.self.key.weight", vec![d, d]),
            ("attention.self.key.bias", vec![d]),
            ("attention.self.value.weight", vec![d, d]),
            ("attention.self.value.bias", vec![d]),
            ("attention.output.dense.weight", vec![d, d]),
            ("attention.output.dense.bias", vec![d]),
            ("attention.output.LayerNorm.weight", vec![d]),
            ("attention.output.LayerNorm.bias", vec![d]),
            ("intermediate.dense.weight", vec![i, d]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![d, i]),
            ("output.dense.bias", vec![d]),
            ("output.LayerNorm.weight", vec![d]),
            ("output.LayerNorm.bias", vec![d]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    if pooler {
        out.push(("bert.pooler.dense.weight".into(), vec![d, d]));
        out.push(("bert.pooler.dense.bias".into(), vec![d]));
    }
    if num_labels > 0 {
        out.push(("classifier.weight".into(), vec![num_labels, d]));
        out.push(("classifier.bias".into(), vec![num_labels]));
    }
    out
}

/// The store name of a checkpoint key: sentence-transformers and `BertModel` checkpoints have
/// no `bert.` prefix; old TensorFlow conversions call LayerNorm's parameters `gamma`/`beta`.
pub fn canonical_name(key: &str) -> String {
    let key = if key.starts_with("bert.") || key.starts_with("classifier.") {
        key.to_string()
    } else {
        format!("bert.{key}")
    };
    if let Some(stem) = key.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = key.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        key
    }
}

/// Random parameters as `transformers` initialises BERT: N(0, 0.02) matrices and embeddings,
/// zero biases, unit LayerNorm weights. Seeded.
pub fn random_params(
    cfg: &BertConfig,
    pooler: bool,
    num_labels: usize,
    seed: u64,
    device: &Device,
) -> Result<Params> {
    let mut rng = Rng::new(seed, "init");
    let mut p = Params::new();
    for (name, shape) in expected_shapes(cfg, pooler, num_labels) {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("LayerNorm.weight") {
            vec![1f32; n]
        } else if name.ends_with(".bias") {
            vec![0f32; n]
        } else {
            rng.normal_vec(n, 0.02)
        };
        p.insert(name, Tensor::from_vec(data, shape, device)?)?;
    }
    Ok(p)
}

/// A BERT checkpoint read from a directory.
pub struct BertCheckpoint {
    pub config: BertConfig,
    pub params: Params,
    /// Whether the checkpoint has `bert.pooler.dense`.
    pub has_pooler: bool,
    /// Number of classes of its `classifier` head (0 when it has none).
    pub num_labels: usize,
    /// The `tokenizer.json` text, kept verbatim so a saved classifier carries it unchanged.
    pub tokenizer_json: String,
    pub dir: PathBuf,
}

/// Load `config.json`, `model.safetensors` and `tokenizer.json` from a BERT directory (a
/// `BertModel`, a sentence-transformers model or a `BertForSequenceClassification`).
pub fn load_dir(dir: &Path, device: &Device) -> Result<BertCheckpoint> {
    let config = BertConfig::from_dir(dir)?;
    let st_path = dir.join("model.safetensors");
    if !st_path.is_file() {
        return Err(Error::file(
            &st_path,
            "missing: the directory needs model.safetensors (pickle checkpoints are refused)",
        ));
    }
    let mut params = Params::new();
    crate::model::load::for_each_safetensor(&st_path, device, |key, t| {
        let name = canonical_name(&key);
        if !name.ends_with("position_ids") {
            params.insert(name, t)?;
        }
        Ok(())
    })?;
    let has_pooler = params.get("bert.pooler.dense.weight").is_some();
    let num_labels = match params.get("classifier.weight") {
        Some(w) => w.dims().first().copied().unwrap_or(0),
        None => 0,
    };
    if num_labels > 0 && !config.id2label.is_empty() && config.id2label.len() != num_labels {
        return Err(Error::tensor(
            &st_path,
            "classifier.weight",
            format!(
                "has {num_labels} classes but config.json's id2label names {}",
                config.id2label.len()
            ),
        ));
    }
    let expected = expected_shapes(&config, has_pooler, num_labels);
    for (name, shape) in &expected {
        match params.get(name) {
            None => return Err(Error::tensor(&st_path, name, "missing from the checkpoint")),
            Some(v) if v.dims() != shape.as_slice() => {
                return Err(Error::tensor(
                    &st_path,
                    name,
                    format!("has shape {:?}, config.json needs {:?}", v.dims(), shape),
                ))
            }
            _ => {}
        }
    }
    // Keep only what the model uses (e.g. drop MLM heads), so every stored tensor is trained.
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut kept = Params::new();
    for (name, var) in params.iter() {
        if wanted.contains(name.as_str()) {
            kept.insert(name.clone(), var.as_tensor().clone())?;
        }
    }
    let tj = dir.join("tokenizer.json");
    let tokenizer_json = std::fs::read_to_string(&tj).map_err(|e| {
        Error::file(
            &tj,
            format!("cannot read (the directory needs a fast tokenizer.json): {e}"),
        )
    })?;
    Ok(BertCheckpoint {
        config,
        params: kept,
        has_pooler,
        num_labels,
        tokenizer_json,
        dir: dir.to_path_buf(),
    })
}

/// A BERT tokenizer built from `tokenizer.json` text, with the file's own padding and
/// truncation switched off (we pad per batch and truncate to our own limit).
pub fn tokenizer_from_json(text: &str, origin: &Path) -> Result<tokenizers::Tokenizer> {
    let mut tok: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e| Error::file(origin, format!("not a valid tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| Error::file(origin, format!("cannot reset truncation: {e}")))?;
    Ok(tok)
}

/// Token ids of `text` with the tokenizer's special tokens (`[CLS] ... [SEP]`), at most
/// `max_len` long: the text is cut, the final `[SEP]` kept.
pub fn encode(tok: &tokenizers::Tokenizer, text: &str, max_len: usize) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| Error::msg(format!("tokenizer failed on {text:?}: {e}")))?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() > max_len && max_len >= 2 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    Ok(ids)
}

/// Right-padded ids `[b, t]` and the validity mask of a batch of rows (`t` = longest row).
pub fn pad_batch(
    rows: &[Vec<u32>],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Vec<Vec<bool>>)> {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad_id, t - r.len()));
        valid.push((0..t).map(|j| j < r.len()).collect());
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, valid))
}

/// Save a store as a `BertForSequenceClassification` directory: `model.safetensors` (f32),
/// `tokenizer.json` (verbatim) and `config.json` with `extra` keys added (written last: its
/// presence marks a complete directory).
pub fn save_dir(
    dir: &Path,
    cfg: &BertConfig,
    params: &Params,
    tokenizer_json: &str,
    extra: &[(&str, Value)],
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    crate::model::load::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    crate::util::io::write_atomic(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    let mut config = cfg.to_hf_json();
    for (k, v) in extra {
        config[*k] = v.clone();
    }
    crate::util::io::write_json_atomic(&dir.join("config.json"), &config)
}
