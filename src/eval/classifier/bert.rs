//! BERT encoder (Devlin et al. 2019) in f32 for the harmfulness classifier (paper Section 4:
//! harmfulness is scored by a fine-tuned sequence classifier): word, position and token-type
//! embeddings, post-LayerNorm transformer layers with exact (erf) GELU, attention with a padding
//! mask, mean pooling (sentence-transformers) or the CLS pooler of `BertForSequenceClassification`;
//! a classification head reads either ([`Pooling`]).
//!
//! Built only from candle operations whose backward pass reaches their inputs: layer norm is
//! composed from elementary ops (candle's `ops::layer_norm` and `LayerNorm` fast path have no
//! backward, see `shared/docs/STYLE.md`), softmax is [`crate::model::ops::softmax_last`] (fused with its
//! own backward). Weights live in a [`Params`] store under the `BertForSequenceClassification`
//! names (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`, ...), so the
//! same store trains, saves and loads. Dropout is not applied (training is deterministic).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use serde_json::{Map, Value};

use crate::model::ops;
use crate::model::params::Params;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Additive mask value for padding keys (finite, so no row is ever all `-inf`).
const MASKED: f32 = -1e9;

/// The activation between the two MLP maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * Phi(x)` (`gelu` in `transformers`).
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::GeluErf => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        }
    }
}

/// How a text's features are read off the last hidden states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The first token's state (`[CLS]`), as `BertForSequenceClassification` reads it.
    #[default]
    Cls,
    /// The mean over the real (non-padding) tokens, as sentence-transformers encoders such as
    /// all-MiniLM-L6-v2 were trained to be read.
    Mean,
}

impl Pooling {
    /// The name in configs and `config.json` (`cls`, `mean`).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(Error::setting("pooling", other, "expected cls or mean")),
        }
    }
}

/// The features a classification head reads: `pooling` of the hidden states averaged over the
/// last `layers` layers (1: the last hidden states only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Readout {
    pub pooling: Pooling,
    pub layers: usize,
}

impl Readout {
    /// `BertForSequenceClassification`'s: the last layer's `[CLS]` state.
    pub const CLS: Readout = Readout {
        pooling: Pooling::Cls,
        layers: 1,
    };
}

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

/// LayerNorm over the last dimension, composed from elementary ops so gradients reach the
/// input, the weight and the bias: `(x - mean) / sqrt(var + eps) * w + b` (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// `x W^T + b` for `x [b, t, in]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (bsz, t, din) = x.dims3()?;
    let y = x
        .reshape((bsz * t, din))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?; // [b*t, out]
    Ok(y.reshape((bsz, t, ()))?)
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Dense {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

/// The encoder (and, when the store has them, the pooler and the classification head). Tensors
/// share storage with the [`Params`] store: trainable ones are the variables themselves, frozen
/// ones detached views.
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    pos: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<Dense>,
    classifier: Option<Dense>,
    device: Device,
}

impl Bert {
    /// Build from a store; `trainable(name)` decides which tensors carry gradients.
    pub fn new(
        cfg: &BertConfig,
        params: &Params,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            let t = params.tensor(name)?;
            Ok(if trainable(name) {
                t.clone()
            } else {
                t.detach()
            })
        };
        let dense = |p: &str| -> Result<Dense> {
            Ok(Dense {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
            })
        };
        let norm = |p: &str| -> Result<Norm> {
            Ok(Norm {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            layers.push(Layer {
                q: dense(&format!("{p}.attention.self.query"))?,
                k: dense(&format!("{p}.attention.self.key"))?,
                v: dense(&format!("{p}.attention.self.value"))?,
                attn_out: dense(&format!("{p}.attention.output.dense"))?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: dense(&format!("{p}.intermediate.dense"))?,
                out: dense(&format!("{p}.output.dense"))?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let pooler = match params.get("bert.pooler.dense.weight") {
            Some(_) => Some(dense("bert.pooler.dense")?),
            None => None,
        };
        let classifier = match params.get("classifier.weight") {
            Some(_) => Some(dense("classifier")?),
            None => None,
        };
        let word = get("bert.embeddings.word_embeddings.weight")?;
        let device = word.device().clone();
        Ok(Self {
            cfg: cfg.clone(),
            word,
            pos: get("bert.embeddings.position_embeddings.weight")?,
            token_type: get("bert.embeddings.token_type_embeddings.weight")?,
            emb_norm: norm("bert.embeddings.LayerNorm")?,
            layers,
            pooler,
            classifier,
            device,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
        })
    }

    /// The last hidden states `[b, t, d]` of right- or left-padded `ids [b, t]`, with
    /// `valid[row][j]` false at padding (token type 0 everywhere).
    pub fn encode(&self, ids: &Tensor, valid: &[Vec<bool>]) -> Result<Tensor> {
        let x = self.embed_tokens(ids, valid)?;
        self.run_layers(&x, valid, 0..self.cfg.num_hidden_layers)
    }

    /// The embedding layer's output `[b, t, d]` (word + position + token type 0, LayerNorm):
    /// the input of layer 0. Checks the ids against the positions and the mask.
    pub fn embed_tokens(&self, ids: &Tensor, valid: &[Vec<bool>]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        if t > cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "{t} tokens exceed the encoder's {} positions",
                cfg.max_position_embeddings
            )));
        }
        if valid.len() != b || valid.iter().any(|r| r.len() != t) {
            return Err(Error::msg(format!(
                "padding mask does not match ids [{b}, {t}]"
            )));
        }
        let words = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?; // [b, t, d]
        let pos = self.pos.narrow(0, 0, t)?.unsqueeze(0)?; // [1, t, d]
        let typ = self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?; // [1, 1, d]
        let x = words.broadcast_add(&pos)?.broadcast_add(&typ)?;
        layer_norm(&x, &self.emb_norm.w, &self.emb_norm.b, cfg.layer_norm_eps)
    }

    /// Run the transformer layers `layers` (a range of layer indices) on hidden states
    /// `x [b, t, d]` with padding mask `valid`: `run_layers(embed_tokens(..), .., 0..n)` is
    /// [`Bert::encode`], and a frozen lower part can be computed once and the top layers run on
    /// its output.
    pub fn run_layers(
        &self,
        x: &Tensor,
        valid: &[Vec<bool>],
        layers: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let cfg = &self.cfg;
        let (h, hd) = (cfg.num_attention_heads, cfg.head_dim());
        if layers.end > self.layers.len() {
            return Err(Error::msg(format!(
                "layers {layers:?}: the encoder has {}",
                self.layers.len()
            )));
        }
        if valid.len() != b || valid.iter().any(|r| r.len() != t) {
            return Err(Error::msg(format!(
                "padding mask does not match hidden states [{b}, {t}, {d}]"
            )));
        }
        let mask: Vec<f32> = valid
            .iter()
            .flat_map(|r| r.iter().map(|&ok| if ok { 0.0 } else { MASKED }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, t), &self.device)?; // [b, 1, 1, t]
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.clone();
        for layer in &self.layers[layers] {
            let heads = |dense: &Dense| -> Result<Tensor> {
                Ok(linear(&x, &dense.w, &dense.b)?
                    .reshape((b, t, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()?) // [b, h, t, hd]
            };
            let (q, k, v) = (heads(&layer.q)?, heads(&layer.k)?, heads(&layer.v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?; // [b, h, t, t]
            let probs = ops::softmax_last(&scores)?;
            let ctx = probs
                .matmul(&v)? // [b, h, t, hd]
                .transpose(1, 2)?
                .reshape((b, t, d))?;
            let attn = linear(&ctx, &layer.attn_out.w, &layer.attn_out.b)?;
            x = layer_norm(
                &(x + attn)?,
                &layer.attn_norm.w,
                &layer.attn_norm.b,
                cfg.layer_norm_eps,
            )?;
            let inter = self.act(&linear(&x, &layer.inter.w, &layer.inter.b)?)?; // [b, t, i]
            let out = linear(&inter, &layer.out.w, &layer.out.b)?;
            x = layer_norm(
                &(x + out)?,
                &layer.out_norm.w,
                &layer.out_norm.b,
                cfg.layer_norm_eps,
            )?;
        }
        Ok(x)
    }

    /// Mean of the hidden states over real tokens (sentence-transformers pooling): `[b, d]`.
    pub fn mean_pool(&self, hidden: &Tensor, valid: &[Vec<bool>]) -> Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        let m: Vec<f32> = valid
            .iter()
            .flat_map(|r| r.iter().map(|&ok| if ok { 1.0 } else { 0.0 }))
            .collect();
        let m = Tensor::from_vec(m, (b, t, 1), &self.device)?;
        let counts = m.sum(1)?.clamp(1e-9, f64::INFINITY)?; // [b, 1]
        Ok(hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&counts)?)
    }

    /// Sentence embeddings of rows of ids: mean-pooled last hidden states `[b, d]`.
    pub fn embed(&self, ids: &Tensor, valid: &[Vec<bool>]) -> Result<Tensor> {
        let hidden = self.encode(ids, valid)?;
        self.mean_pool(&hidden, valid)
    }

    /// Sentence features `[b, d]` of hidden states `[b, t, d]`: the `[CLS]` state or the mean
    /// over real tokens ([`Pooling`]).
    pub fn pool(&self, hidden: &Tensor, valid: &[Vec<bool>], pooling: Pooling) -> Result<Tensor> {
        match pooling {
            Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?), // [b, d]
            Pooling::Mean => self.mean_pool(hidden, valid),
        }
    }

    /// Class logits `[b, num_labels]` of sentence features `[b, d]`: the pooler
    /// (`tanh(W x + b)`) then the linear classifier.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        let (Some(pooler), Some(head)) = (&self.pooler, &self.classifier) else {
            return Err(no_head());
        };
        let pooled = features
            .matmul(&pooler.w.t()?)?
            .broadcast_add(&pooler.b)?
            .tanh()?; // [b, d]
        Ok(pooled.matmul(&head.w.t()?)?.broadcast_add(&head.b)?) // [b, n]
    }

    /// The hidden states `[b, t, d]` averaged over the last `layers` layers (1: the last
    /// hidden states, [`Bert::encode`]).
    pub fn encode_averaged(
        &self,
        ids: &Tensor,
        valid: &[Vec<bool>],
        layers: usize,
    ) -> Result<Tensor> {
        let n = self.cfg.num_hidden_layers;
        if layers == 0 || layers > n {
            return Err(Error::msg(format!(
                "cannot average the last {layers} layers of an encoder with {n}"
            )));
        }
        let x = self.embed_tokens(ids, valid)?;
        let mut x = self.run_layers(&x, valid, 0..n + 1 - layers)?;
        let mut sum = x.clone();
        for l in n + 1 - layers..n {
            x = self.run_layers(&x, valid, l..l + 1)?;
            sum = (sum + &x)?;
        }
        Ok(if layers == 1 {
            sum
        } else {
            (sum / layers as f64)?
        })
    }

    /// Sentence features `[b, d]` as `readout` says: its pooling of the hidden states averaged
    /// over its top layers.
    pub fn features(&self, ids: &Tensor, valid: &[Vec<bool>], readout: Readout) -> Result<Tensor> {
        let hidden = self.encode_averaged(ids, valid, readout.layers)?;
        self.pool(&hidden, valid, readout.pooling)
    }

    /// Class logits `[b, num_labels]` as `BertForSequenceClassification`: the pooler
    /// (`tanh(W h_[CLS] + b)`) on the first token, then the linear classifier.
    pub fn classify(&self, ids: &Tensor, valid: &[Vec<bool>]) -> Result<Tensor> {
        self.classify_pooled(ids, valid, Readout::CLS)
    }

    /// Class logits `[b, num_labels]` with the pooler and classifier applied to the features
    /// `readout` gives ([`Readout::CLS`] is [`Bert::classify`]).
    pub fn classify_pooled(
        &self,
        ids: &Tensor,
        valid: &[Vec<bool>],
        readout: Readout,
    ) -> Result<Tensor> {
        if self.pooler.is_none() || self.classifier.is_none() {
            return Err(no_head());
        }
        self.head(&self.features(ids, valid, readout)?)
    }
}

fn no_head() -> Error {
    Error::msg(
        "this checkpoint has no pooler and classification head \
         (`bert.pooler.dense`, `classifier`): it is an encoder, not a classifier",
    )
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

/// P(class `class`) from class logits `[b, n]` (the head of this encoder or of DeBERTa's):
/// softmax over classes, sigmoid for one logit.
pub fn class_probs(logits: &Tensor, class: usize) -> Result<Vec<f32>> {
    let probs = if logits.dim(1)? == 1 {
        candle_nn::ops::sigmoid(logits)?
    } else {
        candle_nn::ops::softmax(logits, candle_core::D::Minus1)?
    };
    Ok(probs.narrow(1, class, 1)?.flatten_all()?.to_vec1()?)
}
