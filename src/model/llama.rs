//! Llama-family decoder (Llama, Llama-2, SmolLM2, Qwen2) in f32 or mixed precision (bf16/f16
//! activations over f32 weights, [`ModelConfig::compute_dtype`]), built only from candle
//! operations whose backward pass reaches their inputs (no fused rms_norm, softmax_last_dim or
//! rope kernels: those silently drop gradients, see `shared/docs/STYLE.md`).
//!
//! One forward returns, on request, the logits at all positions (or the last), every layer's
//! residual stream ("hidden states") and every layer's MLP output: Representation Noising
//! (Rosati et al. 2024, §3) needs the MLP outputs for its noise term and the hidden states for its
//! logit-lens ascent term.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::model::config::ModelConfig;
use crate::model::low_rank;
pub use crate::model::low_rank::Adapter;
use crate::model::ops;
use crate::model::params::Params;
use crate::{Error, Result};

/// Additive mask value for disallowed attention: large and finite, so a query row whose keys are
/// all masked (a left-padding position) gives a uniform softmax instead of NaN.
pub const MASKED: f32 = -1e9;

/// Which logits a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Logits {
    /// No LM head at all (e.g. when only hidden states are needed).
    None,
    /// Only the last position of each row: `[b, 1, vocab]`.
    Last,
    /// Every position: `[b, t, vocab]`.
    #[default]
    All,
}

/// What a forward pass returns besides the logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOpts {
    pub logits: Logits,
    /// Return the residual stream after the embedding and after every layer (`num_layers + 1`
    /// tensors `[b, t, d]`, none normalised; `transformers` instead normalises the last one).
    pub hidden_states: bool,
    /// Return every layer's MLP output before it is added to the residual (`[b, t, d]` each).
    pub mlp_outputs: bool,
}

#[derive(Debug)]
pub struct ForwardOut {
    pub logits: Option<Tensor>,
    pub hidden_states: Vec<Tensor>,
    pub mlp_outputs: Vec<Tensor>,
    /// The residual stream after the last layer, before the final norm (`[b, t, d]`).
    pub residual: Tensor,
}

/// Keys and values of past positions, per layer (`[b, kv_heads, T, head_dim]`, after rotary).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Each layer's keys and values; `T` may exceed `len` (room reserved by [`Self::reserve`]).
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Make room for `extra` more positions, so later steps write into place instead of
    /// copying the whole cache each time.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        for layer in self.layers.iter_mut() {
            let Some((k, v)) = layer.as_ref() else {
                continue;
            };
            let grow = |x: &Tensor| -> Result<Tensor> {
                let (b, kvh, _, hd) = x.dims4()?;
                let buf = Tensor::zeros((b, kvh, self.len + extra, hd), x.dtype(), x.device())?;
                buf.slice_set(&x.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                Ok(buf)
            };
            *layer = Some((grow(k)?, grow(v)?));
        }
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of several caches, in order (`[b_i, kvh, T, hd]` each, same `T`).
    pub fn cat_rows(parts: Vec<KvCache>) -> Result<KvCache> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let n = parts.first().map_or(0, |p| p.layers.len());
        let mut layers = Vec::with_capacity(n);
        for li in 0..n {
            let mut ks = vec![];
            let mut vs = vec![];
            for p in &parts {
                let (k, v) = p.layers[li]
                    .as_ref()
                    .ok_or_else(|| Error::msg("KV concatenation of an empty cache"))?;
                ks.push(k);
                vs.push(v);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let len = parts[0].len;
        Ok(KvCache { layers, len })
    }

    /// A cache of `rows` sequences of `len` positions each, gathered from this single-row cache:
    /// row `r` position `j` takes cached position `index[r * len + j]` (`[1, kvh, T, hd]` ->
    /// `[rows, kvh, len, hd]`). Used to unpack a prefill of several prompts packed into one row.
    pub fn gather_rows(&self, index: &[u32], rows: usize, len: usize) -> Result<KvCache> {
        if index.len() != rows * len {
            return Err(Error::msg(format!(
                "KV gather: {} indices for {rows} rows of {len}",
                index.len()
            )));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (k, v) = layer
                .as_ref()
                .ok_or_else(|| Error::msg("KV gather from an empty cache"))?;
            let (k, v) = (k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?);
            if k.dim(0)? != 1 {
                return Err(Error::msg("KV gather needs a single-row cache"));
            }
            let idx = Tensor::new(index, k.device())?;
            let take = |x: &Tensor| -> Result<Tensor> {
                let (_, kvh, _, hd) = x.dims4()?;
                Ok(x.index_select(&idx, 2)? // [1, kvh, rows * len, hd]
                    .reshape((kvh, rows, len, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            layers.push(Some((take(&k)?, take(&v)?)));
        }
        Ok(KvCache { layers, len })
    }
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o: Tensor,
    o_bias: Option<Tensor>,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// Low-rank adapters, indexed like [`PROJECTIONS`] (several stack: a frozen security vector
    /// under a trained LoRA adapter).
    adapters: [Vec<Adapter>; 7],
}

/// The seven linear maps of a layer, by their Hugging Face names.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// `(layer, projection index)` of a weight name such as `model.layers.3.self_attn.q_proj.weight`.
pub fn projection_of(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let proj = rest.strip_suffix(".weight")?;
    let i = PROJECTIONS.iter().position(|p| *p == proj)?;
    Some((l.parse().ok()?, i))
}

/// The decoder. Built from a [`Params`] store it holds tensors that share storage with it:
/// built trainable they are the variables themselves (gradients flow to them), built frozen
/// they are detached views (or copies in another compute dtype). [`Llama::inference`] instead
/// takes the store and holds its own re-laid-out copies of the projection weights.
#[derive(Clone)]
pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[max_positions, head_dim / 2]` rotary tables.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// The dtype activations are computed in ([`ModelConfig::compute_dtype`]).
    dtype: DType,
    /// Added to each layer's attention output (after `o_proj`, before the residual add); see
    /// [`Llama::with_attention_offsets`].
    attn_offsets: Option<Vec<Tensor>>,
    /// Query rows per block of [`causal_blocks`]' attention (0: the whole sequence at once).
    query_block: usize,
}

/// [`linear`] plus the adapters' low-rank terms.
fn linear_ad(x: &Tensor, w: &Tensor, b: Option<&Tensor>, ads: &[Adapter]) -> Result<Tensor> {
    let (bsz, t, din) = x.dims3()?;
    // Fused on CPU in f32 (`model::low_rank`) for maps without a bias where `linear` computes
    // `x w^T` with gemm as the fused op does, so an adapter with `B = 0` leaves the output bit
    // for bit as it was.
    if b.is_none() && gemm_x_wt(bsz * t, w.dim(0)?) && low_rank::fusable(x, w, ads) {
        let y = low_rank::linear(&x.reshape((bsz * t, din))?, w, ads)?;
        return Ok(y.reshape((bsz, t, ()))?);
    }
    let mut y = linear(x, w, b)?;
    for ad in ads {
        // Mixed precision: weights stay f32 variables and are cast on use (PyTorch's autocast);
        // `to_dtype` is a cheap handle when the dtype already matches.
        let (a, bm) = (ad.a.to_dtype(x.dtype())?, ad.b.to_dtype(x.dtype())?);
        // The scale goes on the rank-wide product (`[rows, r]`), not on the output: one pass
        // over the output fewer, and candle's scalar multiply runs on one thread.
        let z = (x.reshape((bsz * t, din))?.matmul(&a.t()?)? * ad.scale)?.matmul(&bm.t()?)?;
        y = (y + z.reshape((bsz, t, ()))?)?;
    }
    Ok(y)
}

/// Up to this many rows (from `MAX_NARROW` up), [`linear`] computes `x w^T` for a weight
/// stored `[out, in]` as `(w x^T)^T`.
const WEIGHT_LEFT_MAX_ROWS: usize = 64;

/// Whether [`linear`] computes `x w^T` for a weight stored `[out, in]` as `(w x^T)^T`.
fn weight_on_the_left(rows: usize) -> bool {
    rows > candle_core::cpu_backend::dot_matmul::MAX_NARROW && rows <= WEIGHT_LEFT_MAX_ROWS
}

/// Whether [`linear`] computes `x w^T` (`rows` rows, `out` outputs, a weight stored
/// `[out, in]`) as gemm's product of `x` and `w^T` on the CPU: neither with the weight on the
/// left nor, at up to `MAX_NARROW` rows or outputs, as candle's dot products.
fn gemm_x_wt(rows: usize, out: usize) -> bool {
    !weight_on_the_left(rows) && rows.min(out) > candle_core::cpu_backend::dot_matmul::MAX_NARROW
}

/// `x w^T + b` for `x` `[b, t, in]`, `w` `[out, in]`, in `x`'s dtype. `w` may be the
/// transposed view of a contiguous `[in, out]` matrix ([`Llama::inference`]'s layout).
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (bsz, t, din) = x.dims3()?; // [b, t, in]
    let w = &w.to_dtype(x.dtype())?;
    let x = x.reshape((bsz * t, din))?;
    let rows = bsz * t;
    let wt = w.t()?;
    let y = if wt.is_contiguous() {
        // Stored transposed: `x wt` needs no transposing pack of the weight in gemm; from 24
        // rows up as quick or quicker than the forms below for SmolLM2's projections, at up
        // to 16 rows mixed (`cargo run --release --example bench_linear_rows`, column `x wt`).
        x.matmul(&wt)?
    } else if weight_on_the_left(rows) {
        // Up to `MAX_NARROW` rows (decoding), `x w^T` is a stream of dot products through the
        // weight on CPU (vendor/candle-core, `cpu_backend/dot_matmul.rs`). From there to 64
        // rows the weight as the left operand packs faster in gemm: measured 20-45% quicker
        // for SmolLM2's shapes at 32-64 rows, no different at 512 (same example).
        w.matmul(&x.t()?)?.t()?
    } else {
        x.matmul(&wt)?
    }; // [b*t, out]
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
    };
    Ok(y.reshape((bsz, t, ()))?)
}

/// Scaled dot-product attention of queries `q` `[b, h, t, hd]` over keys and values `[b, kvh,
/// T, hd]` with the additive mask `[b, 1, t, T]`: `[b, h, t, hd]`. Grouped-query attention
/// without copying keys and values per head: the `h / kvh` query heads that share a key/value
/// head are stacked as rows of one product (a view of `q` when it is contiguous).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (kvh, total) = (k.dim(1)?, k.dim(2)?);
    let n_rep = h / kvh;
    let q = q.contiguous()?.reshape((b, kvh, n_rep * t, hd))?;
    let probs = ops::attention_probs(&q, k, mask, scale, t)?; // softmax(q k^T * scale + mask)
    Ok(probs
        .reshape((b, kvh, n_rep * t, total))?
        .matmul(v)? // [b, kvh, n_rep * t, hd]
        .reshape((b, h, t, hd))?)
}

/// Query rows per block of [`causal_blocks`] (`Llama::with_query_block`). SmolLM2's scoring
/// (`repnoise bench score`) measured 5-13% quicker at 2 x 256 tokens, 9-14% at 1 x 384 and
/// 15-22% at 1 x 512 with blocks of 64, no different at 4 x 128 (blocks of 32 slower there in a
/// micro-benchmark: smaller products for the same per-call costs); docs/BENCHMARKS.md.
pub const QUERY_BLOCK: usize = 64;

/// A block of query rows and the keys they attend over: rows `start..start + rows`, keys
/// `0..keys`.
struct QueryBlock {
    start: usize,
    rows: usize,
    keys: usize,
    /// The mask's part for them, `[b, 1, rows, keys]`, contiguous.
    mask: Tensor,
}

/// Where a causal mask lets attention skip work: the queries split into blocks of `rows` (the
/// last with the rows left over), each
/// over the keys up to its last query's position, rounded up to a multiple of 8. The skipped keys
/// are masked for every query of the block, so their probabilities are exactly 0 and the blocks
/// give the whole computation's bits: each score is the same dot product; a row's softmax sums
/// its exponentials in 8 lanes (`model::vmath`), to which the skipped keys' zeros add nothing
/// (hence the multiple of 8); and gemm sums the values' product over the keys in order, in one
/// depth block up to `GEMM_MIN_KC` keys (the zeros' terms again add nothing). So blocks are
/// taken only where that holds: f32 on the CPU (the fused masked softmax), at most
/// `GEMM_MIN_KC` keys, a key count above `MAX_NARROW` (gemm rather than candle's dot products),
/// and a mask whose every query row has a key left open (`> MASKED / 2`: an all-masked row's
/// uniform softmax would spread over fewer keys) and every skipped key at [`MASKED`]. `None`:
/// the whole sequence at once. (Exact for finite scores and values: a skipped key's inf or NaN
/// would reach the whole computation's sums, and not the blocks'.)
fn causal_blocks(
    mask: &Tensor,
    past: usize,
    rows: usize,
    n_rep: usize,
) -> Result<Option<Vec<QueryBlock>>> {
    /// gemm-common's smallest depth block (`cache::kernel_params`: at least 512 or the depth).
    const GEMM_MIN_KC: usize = 512;
    let Ok((_, 1, t, total)) = mask.dims4() else {
        return Ok(None);
    };
    if rows == 0
        || t < 2 * rows
        || total > GEMM_MIN_KC
        || !mask.device().is_cpu()
        || mask.dtype() != DType::F32
    {
        return Ok(None);
    }
    // The scores' products take candle's dot products at up to `MAX_NARROW` rows or keys:
    // every block must take gemm, as the whole does (`t >= 2 * rows` rows and as many keys).
    let narrow = candle_core::cpu_backend::dot_matmul::MAX_NARROW;
    if n_rep * rows <= narrow {
        return Ok(None);
    }
    let n = t / rows;
    // (first row, rows, keys) of each block; the last block takes the rows left over.
    let spans: Vec<(usize, usize, usize)> = (0..n)
        .map(|i| {
            let start = i * rows;
            let rows = if i + 1 == n { t - start } else { rows };
            (
                start,
                rows,
                (past + start + rows).next_multiple_of(8).min(total),
            )
        })
        .collect();
    if spans.iter().any(|&(_, _, keys)| keys <= narrow) {
        return Ok(None);
    }
    let m = mask.flatten_all()?.to_vec1::<f32>()?;
    for (r, row) in m.chunks(total).enumerate() {
        let keys = spans[((r % t) / rows).min(n - 1)].2;
        let open = row[..keys].iter().any(|&x| x > MASKED / 2.0);
        if !open || row[keys..].iter().any(|&x| x != MASKED) {
            return Ok(None);
        }
    }
    let blocks = spans
        .into_iter()
        .map(|(start, rows, keys)| {
            let mask = mask
                .narrow(2, start, rows)?
                .narrow(3, 0, keys)?
                .contiguous()?;
            Ok(QueryBlock {
                start,
                rows,
                keys,
                mask,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(blocks))
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w` in `x`'s dtype (fused with its own backward on
/// CPU in f32; other dtypes reduce in f32, as `transformers` does).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    ops::rms_norm(x, &w.to_dtype(x.dtype())?, eps)
}

/// Additive attention mask `[b, 1, t, past + t]`: query `i` (absolute position `past + i`) sees
/// key `j` when `j <= past + i` and `key_valid[row][j]` (padding keys are hidden).
pub fn attention_mask(
    b: usize,
    t: usize,
    past: usize,
    key_valid: Option<&[Vec<bool>]>,
    device: &Device,
) -> Result<Tensor> {
    let total = past + t;
    let mut m = vec![0f32; b * t * total];
    for row in 0..b {
        let valid = key_valid.map(|kv| &kv[row]);
        if let Some(v) = valid {
            if v.len() != total {
                return Err(Error::msg(format!(
                    "attention mask row {row} has {} keys, expected {total}",
                    v.len()
                )));
            }
        }
        for i in 0..t {
            for j in 0..total {
                let ok = j <= past + i && valid.map_or(true, |v| v[j]);
                if !ok {
                    m[(row * t + i) * total + j] = MASKED;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, total), device)?)
}

/// `take(name)`, or an error naming the missing parameter.
fn need(take: &mut impl FnMut(&str) -> Result<Option<Tensor>>, name: &str) -> Result<Tensor> {
    take(name)?.ok_or_else(|| Error::msg(format!("parameter `{name}` is missing")))
}

impl Llama {
    /// Build from a parameter store; `trainable(name)` decides which tensors carry gradients
    /// (the rest are detached, i.e. frozen). In a compute dtype other than f32
    /// ([`ModelConfig::compute_dtype`]) the frozen weights are cast once here (a copy in that
    /// dtype beside the f32 store) and the trainable ones stay the f32 variables, cast on use.
    pub fn new(
        cfg: &ModelConfig,
        params: &Params,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let dtype = cfg.compute_dtype;
        Self::from_tensors(cfg, |name| {
            let Some(var) = params.get(name) else {
                return Ok(None);
            };
            let t = var.as_tensor();
            Ok(Some(if trainable(name) {
                t.clone()
            } else {
                t.detach().to_dtype(dtype)?
            }))
        })
    }

    /// Build from the tensors `take(name)` gives (`None` for a tensor the model lacks; only
    /// biases may be absent).
    fn from_tensors(
        cfg: &ModelConfig,
        mut take: impl FnMut(&str) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let dtype = cfg.compute_dtype;
        let take = &mut take;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let mut get = |name: &str| need(take, &format!("{p}.{name}"));
            let mut layer = Layer {
                input_norm: get("input_layernorm.weight")?,
                q: get("self_attn.q_proj.weight")?,
                k: get("self_attn.k_proj.weight")?,
                v: get("self_attn.v_proj.weight")?,
                q_bias: None,
                k_bias: None,
                v_bias: None,
                o: get("self_attn.o_proj.weight")?,
                o_bias: None,
                post_norm: get("post_attention_layernorm.weight")?,
                gate: get("mlp.gate_proj.weight")?,
                up: get("mlp.up_proj.weight")?,
                down: get("mlp.down_proj.weight")?,
                adapters: Default::default(),
            };
            let mut bias = |name: &str| take(&format!("{p}.self_attn.{name}_proj.bias"));
            layer.q_bias = bias("q")?;
            layer.k_bias = bias("k")?;
            layer.v_bias = bias("v")?;
            layer.o_bias = bias("o")?;
            layers.push(layer);
        }
        let embed = need(take, "model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            need(take, "lm_head.weight")?
        };
        let norm = need(take, "model.norm.weight")?;
        let device = embed.device().clone();
        let (cos, sin) = rope_tables(cfg, &device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            dtype,
            attn_offsets: None,
            query_block: QUERY_BLOCK,
        })
    }

    /// The same network with `offsets[l]` (`[b, t, d]`, the batch's shape) added to layer
    /// `l`'s attention output, after `o_proj` and before the residual add: the point where
    /// Vaccine (Huang et al. 2024) reads the gradient (offsets of zeros that are variables) and
    /// adds its perturbation (constants). One tensor per layer.
    pub fn with_attention_offsets(&self, offsets: Vec<Tensor>) -> Result<Self> {
        if offsets.len() != self.layers.len() {
            return Err(Error::msg(format!(
                "{} attention offsets for {} layers",
                offsets.len(),
                self.layers.len()
            )));
        }
        Ok(Self {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            layers: self.layers.clone(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            attn_offsets: Some(offsets),
            query_block: self.query_block,
        })
    }

    /// Attach low-rank adapters, keyed by the weight they adapt
    /// (`model.layers.N.self_attn.q_proj.weight`, ...); they add to any already attached.
    pub fn with_adapters(mut self, adapters: BTreeMap<String, Adapter>) -> Result<Self> {
        for (name, ad) in adapters {
            let (l, i) = projection_of(&name)
                .filter(|(l, _)| *l < self.layers.len())
                .ok_or_else(|| Error::msg(format!("no linear map `{name}` to adapt")))?;
            self.layers[l].adapters[i].push(ad);
        }
        Ok(self)
    }

    /// The same network computing attention without gradient in blocks of `rows` query rows
    /// where that gives the same numbers (`causal_blocks`; 0: the whole sequence at once). The
    /// default is [`QUERY_BLOCK`]; tests and benchmarks set others.
    pub fn with_query_block(mut self, rows: usize) -> Self {
        self.query_block = rows;
        self
    }

    /// All parameters trainable.
    pub fn trainable(cfg: &ModelConfig, params: &Params) -> Result<Self> {
        Self::new(cfg, params, |_| true)
    }

    /// All parameters frozen (inference: no autograd graph is kept alive).
    pub fn frozen(cfg: &ModelConfig, params: &Params) -> Result<Self> {
        Self::new(cfg, params, |_| false)
    }

    /// All parameters frozen, built from a store given up for it: each projection weight is
    /// re-laid out as a contiguous `[in, out]` matrix (its store tensor dropped before the next
    /// one is copied, so the peak is one tensor above the store's when nothing else holds it),
    /// which spares gemm the transposing pack of the weight in every product `x w^T`: SmolLM2's
    /// 4 x 128 forward 11-16% quicker, the same numbers; no gain at 16 x 96 (`cargo run
    /// --release --example bench_inference_layout -- bench/out/smollm2-hf`; docs/BENCHMARKS.md).
    /// For forward passes over many rows: decoding's products of up to 16 rows are quicker as
    /// dot products through the stored `[out, in]` rows (batch-8 generation measured 11-19%
    /// slower re-laid out), so generation keeps [`Llama::frozen`]; gradients through these
    /// weights would take the transposing pack instead.
    pub fn inference(cfg: &ModelConfig, params: Params) -> Result<Self> {
        let dtype = cfg.compute_dtype;
        let mut tensors = BTreeMap::new();
        for (name, var) in params.into_vars() {
            let t = var.as_tensor().detach().to_dtype(dtype)?;
            drop(var);
            let t = if projection_of(&name).is_some() {
                // A `[out, in]` view of contiguous `[in, out]` storage.
                t.t()?.contiguous()?.t()?
            } else {
                t
            };
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, |name| Ok(tensors.remove(name)))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The final RMSNorm (used by the logit lens), computed in the model's dtype; f32 out.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        let y = rms_norm(&h.to_dtype(self.dtype)?, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(y.to_dtype(DType::F32)?)
    }

    /// The LM head matrix `[vocab, d]` (the token embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits from a (normed) hidden state `[b, t, d]` -> `[b, t, vocab]`: the product in the
    /// model's dtype, the logits in f32.
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(linear(&h.to_dtype(self.dtype)?, &self.lm_head, None)?.to_dtype(DType::F32)?)
    }

    /// Forward pass.
    ///
    /// * `ids`: `[b, t]` u32 token ids.
    /// * `positions`: `[b, t]` u32 rotary positions (see [`positions_for`]).
    /// * `mask`: additive `[b, 1, t, past + t]` mask from [`attention_mask`]; `None` means plain
    ///   causal attention with no padding.
    /// * `cache`: when given, keys/values are appended to it and attention covers the cache.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        opts: ForwardOpts,
    ) -> Result<ForwardOut> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref() {
            if c.layers.len() != cfg.num_layers {
                return Err(Error::msg("KV cache built for another model"));
            }
        }
        let owned_mask;
        let mask = match mask {
            Some(m) => m,
            None => {
                owned_mask = attention_mask(b, t, past, None, &self.device)?;
                &owned_mask
            }
        };

        // Rotary tables gathered at each token's position: [b * t, hd / 2].
        let flat_pos = positions.flatten_all()?;
        let max_pos = flat_pos.max(0)?.to_scalar::<u32>()? as usize;
        if max_pos >= self.cos.dim(0)? {
            return Err(Error::msg(format!(
                "position {max_pos} is beyond the model's {} positions",
                self.cos.dim(0)?
            )));
        }
        // The angles in f32, then in the compute dtype (as `transformers`).
        let cos = self.cos.index_select(&flat_pos, 0)?.to_dtype(self.dtype)?;
        let sin = self.sin.index_select(&flat_pos, 0)?.to_dtype(self.dtype)?;

        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, cfg.hidden_size))?
            .to_dtype(self.dtype)?; // [b, t, d]
                                    // What the forward returns besides logits is f32 whatever the compute dtype: the
                                    // RepNoise loss, the logit lens and the MMD accumulate in f32.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mut hidden_states = Vec::new();
        let mut mlp_outputs = Vec::new();
        if opts.hidden_states {
            hidden_states.push(f32(&x)?);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        // Found at the first layer whose attention keeps no gradient (`None` until then).
        let mut blocks: Option<Option<Vec<QueryBlock>>> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let xn = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let q = linear_ad(&xn, &layer.q, layer.q_bias.as_ref(), &layer.adapters[0])?
                .reshape((b, t, h, hd))?;
            let k = linear_ad(&xn, &layer.k, layer.k_bias.as_ref(), &layer.adapters[1])?
                .reshape((b, t, kvh, hd))?;
            let v = linear_ad(&xn, &layer.v, layer.v_bias.as_ref(), &layer.adapters[2])?
                .reshape((b, t, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?; // [b, kvh, t, hd]
            let q = ops::rope(&q, &cos, &sin)?; // [b, h, t, hd]
            let k = ops::rope(&k, &cos, &sin)?; // [b, kvh, t, hd]
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => match &c.layers[li] {
                    // Room reserved: write in place, attend over the filled part.
                    Some((pk, pv)) if pk.dim(2)? >= past + t => {
                        pk.slice_set(&k, 2, past)?;
                        pv.slice_set(&v, 2, past)?;
                        (pk.narrow(2, 0, past + t)?, pv.narrow(2, 0, past + t)?)
                    }
                    Some((pk, pv)) => {
                        let k = Tensor::cat(&[&pk.narrow(2, 0, past)?, &k], 2)?.contiguous()?;
                        let v = Tensor::cat(&[&pv.narrow(2, 0, past)?, &v], 2)?.contiguous()?;
                        c.layers[li] = Some((k.clone(), v.clone()));
                        (k, v)
                    }
                    None => {
                        c.layers[li] = Some((k.clone(), v.clone()));
                        (k, v)
                    }
                },
                None => (k, v),
            };
            // Grouped-query attention without copying keys and values per head: the `n_rep`
            // query heads that share a key/value head are stacked as rows of one product.
            let no_grad = !(q.track_op() || k.track_op() || v.track_op());
            if no_grad && blocks.is_none() {
                blocks = Some(match self.dtype {
                    DType::F32 => causal_blocks(mask, past, self.query_block, h / kvh)?,
                    _ => None,
                });
            }
            let attn = match blocks.as_ref().and_then(Option::as_ref) {
                // No gradient to keep: the causal blocks' arithmetic, the same numbers.
                Some(blocks) if no_grad => {
                    let mut outs = Vec::with_capacity(blocks.len());
                    for blk in blocks {
                        let q = q.narrow(2, blk.start, blk.rows)?;
                        let (k, v) = (k.narrow(2, 0, blk.keys)?, v.narrow(2, 0, blk.keys)?);
                        outs.push(attention(&q, &k, &v, &blk.mask, scale)?);
                    }
                    Tensor::cat(&outs, 2)?
                }
                _ => attention(&q, &k, &v, mask, scale)?,
            } // [b, h, t, hd]
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
            let mut attn = linear_ad(&attn, &layer.o, layer.o_bias.as_ref(), &layer.adapters[3])?;
            if let Some(off) = &self.attn_offsets {
                attn = attn.broadcast_add(&off[li].to_dtype(attn.dtype())?)?;
            }
            x = (x + attn)?;

            // MLP block.
            let xn = rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps)?;
            let gate = linear_ad(&xn, &layer.gate, None, &layer.adapters[4])?;
            let up = linear_ad(&xn, &layer.up, None, &layer.adapters[5])?;
            let mlp = linear_ad(
                &ops::swiglu(&gate, &up)?,
                &layer.down,
                None,
                &layer.adapters[6],
            )?; // [b, t, d]
            if opts.mlp_outputs {
                mlp_outputs.push(f32(&mlp)?);
            }
            x = (x + mlp)?;
            if opts.hidden_states {
                hidden_states.push(f32(&x)?);
            }
        }
        if let Some(c) = cache {
            c.len = past + t;
        }
        let residual = f32(&x)?;
        let logits = match opts.logits {
            Logits::None => None,
            Logits::Last => {
                let last = x.narrow(1, t - 1, 1)?;
                Some(self.lm_head(&self.final_norm(&last)?)?)
            }
            Logits::All => Some(self.lm_head(&self.final_norm(&x)?)?),
        };
        Ok(ForwardOut {
            logits,
            hidden_states,
            mlp_outputs,
            residual,
        })
    }

    /// Logits `[b, t, vocab]` for unpadded rows of equal length starting at position 0.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = positions_for(b, t, 0, &self.device)?;
        let out = self.forward(ids, &pos, None, None, ForwardOpts::default())?;
        out.logits
            .ok_or_else(|| Error::msg("forward returned no logits"))
    }
}

/// Positions `past..past + t` for every row: `[b, t]` u32.
pub fn positions_for(b: usize, t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<u32> = (past..past + t).map(|p| p as u32).collect();
    let data: Vec<u32> = (0..b).flat_map(|_| row.iter().copied()).collect();
    Ok(Tensor::from_vec(data, (b, t), device)?)
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let n = cfg.max_position_embeddings.max(1);
    // As transformers: inv_freq and the angles in f32.
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?.to_dtype(DType::F32)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;

    fn config(dtype: DType) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            compute_dtype: dtype,
        }
    }

    /// Attention in causal blocks gives the whole computation's bits: every hidden state and
    /// the logits, for a plain causal mask, right padding (rows whose padded queries still see
    /// their real keys) and a prefix in the cache; blocks of 20 rows make the key counts
    /// (rounded up to a multiple of 8) differ from the queries' last positions, where a
    /// softmax row's sum would otherwise take its last elements in another order.
    #[test]
    fn attention_in_causal_blocks_gives_the_same_bits() {
        let mut cfg = config(DType::F32);
        cfg.max_position_embeddings = 128;
        let dev = Device::Cpu;
        let p = Params::random(&cfg, 5, &dev).unwrap();
        let whole = Llama::frozen(&cfg, &p).unwrap().with_query_block(0);
        let opts = ForwardOpts {
            logits: Logits::All,
            hidden_states: true,
            mlp_outputs: true,
        };
        let ids = |b: usize, t: usize| {
            let v: Vec<u32> = (0..b * t).map(|i| (i * 7 % 37) as u32 + 1).collect();
            Tensor::from_vec(v, (b, t), &dev).unwrap()
        };
        let bits = |o: &ForwardOut| -> Vec<u32> {
            let mut all = o.hidden_states.clone();
            all.extend(o.mlp_outputs.iter().cloned());
            all.push(o.logits.clone().unwrap());
            all.iter()
                .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(f32::to_bits)
                .collect()
        };
        let same = |a: Vec<u32>, b: Vec<u32>, what: &str| {
            assert_eq!(a.len(), b.len());
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(differ, 0, "{what}: {differ} of {} numbers differ", a.len());
        };
        for rows in [20, 24, 32] {
            let blocked = whole.clone().with_query_block(rows);
            // Plain causal, and right padding (row 1 has 50 real tokens, row 2 has 3).
            for (b, t, real) in [(2, 70, vec![70, 70]), (3, 64, vec![64, 50, 3])] {
                let kv: Vec<Vec<bool>> = real
                    .iter()
                    .map(|&r| (0..t).map(|j| j < r).collect())
                    .collect();
                let mask = attention_mask(b, t, 0, Some(&kv), &dev).unwrap();
                assert!(causal_blocks(&mask, 0, rows, 2).unwrap().is_some());
                let pos = positions_for(b, t, 0, &dev).unwrap();
                let run = |net: &Llama| {
                    bits(
                        &net.forward(&ids(b, t), &pos, Some(&mask), None, opts)
                            .unwrap(),
                    )
                };
                same(
                    run(&blocked),
                    run(&whole),
                    &format!("{rows} rows, {real:?}"),
                );
            }
            // A prefix of 11 tokens in the cache, then 70 more.
            let cached = attention_mask(2, 70, 11, None, &dev).unwrap();
            assert!(causal_blocks(&cached, 11, rows, 2).unwrap().is_some());
            let run = |net: &Llama| {
                let mut cache = KvCache::new(cfg.num_layers);
                let pos = positions_for(2, 11, 0, &dev).unwrap();
                net.forward(&ids(2, 11), &pos, None, Some(&mut cache), opts)
                    .unwrap();
                let pos = positions_for(2, 70, 11, &dev).unwrap();
                bits(
                    &net.forward(&ids(2, 70), &pos, None, Some(&mut cache), opts)
                        .unwrap(),
                )
            };
            same(
                run(&blocked),
                run(&whole),
                &format!("{rows} rows after a cached prefix"),
            );
        }
    }

    /// The blocks: each over the keys up to its last query (rounded up to a multiple of 8),
    /// the last block with the rows left over; none where blocks could change a number.
    #[test]
    fn causal_blocks_only_where_they_are_exact() {
        let dev = Device::Cpu;
        let spans = |mask: &Tensor, past: usize, rows: usize, n_rep: usize| {
            causal_blocks(mask, past, rows, n_rep).unwrap().map(|b| {
                b.iter()
                    .map(|q| (q.start, q.rows, q.keys))
                    .collect::<Vec<_>>()
            })
        };
        let causal = attention_mask(2, 70, 0, None, &dev).unwrap();
        assert_eq!(
            spans(&causal, 0, 20, 2),
            Some(vec![(0, 20, 24), (20, 20, 40), (40, 30, 70)])
        );
        let cached = attention_mask(1, 50, 5, None, &dev).unwrap();
        assert_eq!(
            spans(&cached, 5, 24, 1),
            Some(vec![(0, 24, 32), (24, 26, 55)])
        );
        // Too few rows for two blocks; products candle would take as dot products (at most
        // 16 query rows or keys); more keys than gemm's smallest depth block.
        assert_eq!(spans(&causal, 0, 36, 2), None);
        assert_eq!(spans(&causal, 0, 8, 2), None);
        assert_eq!(spans(&causal, 0, 12, 2), None);
        let long = attention_mask(1, 520, 0, None, &dev).unwrap();
        assert_eq!(spans(&long, 0, 64, 3), None);
        // Left padding: the padded queries see no key, and their uniform softmax would spread
        // over fewer keys in a block.
        let kv = vec![(0..70).map(|j| j >= 4).collect::<Vec<bool>>()];
        let left = attention_mask(1, 70, 0, Some(&kv), &dev).unwrap();
        assert_eq!(spans(&left, 0, 20, 2), None);
        // A mask letting a query see a later key.
        let mut m = causal.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        m[5 * 70 + 60] = 0.0;
        let open = Tensor::from_vec(m, (2, 1, 70, 70), &dev).unwrap();
        assert_eq!(spans(&open, 0, 20, 2), None);
    }

    /// `Llama::inference` holds every projection weight as the `[out, in]` view of `[in, out]`
    /// storage (on which `linear` takes the untransposed product), with the store's values in
    /// the compute dtype; `Llama::frozen` holds the store's own `[out, in]` layout. A network
    /// that silently kept the stored layout would pass the logits test in tests/it and fail
    /// this one.
    #[test]
    fn inference_lays_the_projections_out_in_out() {
        for dt in [DType::F32, DType::BF16] {
            let cfg = config(dt);
            let p = Params::random(&cfg, 3, &Device::Cpu).unwrap();
            let frozen = Llama::frozen(&cfg, &p).unwrap();
            let relaid = Llama::inference(&cfg, p).unwrap();
            for (f, r) in frozen.layers.iter().zip(&relaid.layers) {
                let pairs = [
                    (&f.q, &r.q),
                    (&f.k, &r.k),
                    (&f.v, &r.v),
                    (&f.o, &r.o),
                    (&f.gate, &r.gate),
                    (&f.up, &r.up),
                    (&f.down, &r.down),
                ];
                for (wf, wr) in pairs {
                    assert_eq!(wf.dims(), wr.dims());
                    assert!(wf.is_contiguous(), "frozen keeps the stored layout");
                    assert!(
                        wr.t().unwrap().is_contiguous() && !wr.is_contiguous(),
                        "{dt:?}: a projection weight not laid out [in, out]"
                    );
                    assert_eq!(wr.dtype(), dt);
                    let values = |w: &Tensor| w.to_dtype(DType::F32).unwrap().to_vec2::<f32>();
                    assert_eq!(
                        values(wf).unwrap(),
                        values(wr).unwrap(),
                        "{dt:?}: re-laid-out values differ"
                    );
                }
                assert!(r.input_norm.is_contiguous() && r.post_norm.is_contiguous());
            }
            assert!(relaid.embed.is_contiguous() && relaid.lm_head.is_contiguous());
        }
    }
}
