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

use candle_core::{Device, Tensor, D};

use crate::model::ops;
use crate::model::params::Params;
use crate::{Error, Result};

mod checkpoint;
pub use checkpoint::*;

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
