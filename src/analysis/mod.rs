//! The paper's analyses of what a defence did to a model (Rosati et al. 2024, §5 and appendix):
//! the L2 distance between weights by layer, the logit lens (mean log-probability of the answer
//! tokens read out at every layer's residual stream), PCA of mean activations of harmful and
//! harmless samples, and per-layer linear probes separating them. Plots go through
//! [`crate::util::plot`]. Everything here is inference only (frozen model, no gradients) and seeded.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::attack::encode_sft;
use crate::data::encode::PromptFormat;
use crate::data::pairs::Pair;
use crate::data::Encoded;
use crate::eval::stats::mean_se;
use crate::model::llama::Llama;
use crate::model::load::LoadedModel;
use crate::model::params::Params;
use crate::train::objective::{answer_masks, Batch, CeRows};
use crate::util::plot::{self, Series};
use crate::util::rng::Rng;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// L2 distance by layer
// ---------------------------------------------------------------------------------------------

/// The weight distance of one part of the model (embeddings, one decoder layer, final norm, LM
/// head, or tensors of no known part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerDistance {
    /// `embeddings`, `layer N`, `final_norm`, `lm_head` or `other`.
    pub part: String,
    /// The decoder layer, for `layer N` rows.
    pub layer: Option<usize>,
    /// `sqrt(sum over the part's tensors of sum((b - a)^2))`.
    pub l2: f64,
    /// `sqrt(sum of a^2)` over the same tensors.
    pub norm_a: f64,
    /// `l2 / norm_a` (0 when both are 0).
    pub relative: f64,
    /// Number of tensors in the part.
    pub tensors: usize,
}

/// Which row of [`l2_by_layer`] a tensor belongs to: 0 embeddings, 1 + i layer i, then final
/// norm, LM head and other.
fn part_of(name: &str, num_layers: usize) -> Result<usize> {
    if name.starts_with("model.embed_tokens.") {
        return Ok(0);
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let l: usize = rest
            .split('.')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| tensor_err(name, "cannot read the layer index"))?;
        if l >= num_layers {
            return Err(Error::tensor(
                "",
                name,
                format!("layer {l} is beyond the {num_layers} layers compared"),
            ));
        }
        return Ok(1 + l);
    }
    if name.starts_with("model.norm.") {
        return Ok(num_layers + 1);
    }
    if name.starts_with("lm_head.") {
        return Ok(num_layers + 2);
    }
    Ok(num_layers + 3)
}

fn tensor_err(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("tensor `{name}`: {msg}"))
}

fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// Per part of the model (embeddings, each of `num_layers` decoder layers, final norm, LM head
/// when untied, other tensors when any) the L2 norm of `b - a` and its size relative to `a`.
/// Both stores must hold the same tensor names with the same shapes; an error names the first
/// tensor that differs.
pub fn l2_by_layer(a: &Params, b: &Params, num_layers: usize) -> Result<Vec<LayerDistance>> {
    if let Some(n) = b.names().find(|n| a.get(n).is_none()) {
        return Err(tensor_err(n, "present in the second model only"));
    }
    let nrows = num_layers + 4;
    let mut sq_diff = vec![0f64; nrows];
    let mut sq_a = vec![0f64; nrows];
    let mut count = vec![0usize; nrows];
    for (name, va) in a.iter() {
        let vb = b
            .get(name)
            .ok_or_else(|| tensor_err(name, "present in the first model only"))?;
        if va.dims() != vb.dims() {
            return Err(Error::tensor(
                "",
                name,
                format!(
                    "shape {:?} in the first model, {:?} in the second",
                    va.dims(),
                    vb.dims()
                ),
            ));
        }
        let row = part_of(name, num_layers)?;
        let (xa, xb) = (flat_f32(va.as_tensor())?, flat_f32(vb.as_tensor())?);
        let (d, n) = xa
            .par_iter()
            .zip(xb.par_iter())
            .map(|(&p, &q)| {
                let (p, q) = (p as f64, q as f64);
                ((q - p) * (q - p), p * p)
            })
            .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));
        sq_diff[row] += d;
        sq_a[row] += n;
        count[row] += 1;
    }
    let mut out = vec![];
    for row in 0..nrows {
        let (part, layer) = match row {
            0 => ("embeddings".to_string(), None),
            r if r <= num_layers => (format!("layer {}", r - 1), Some(r - 1)),
            r if r == num_layers + 1 => ("final_norm".to_string(), None),
            r if r == num_layers + 2 => ("lm_head".to_string(), None),
            _ => ("other".to_string(), None),
        };
        // Decoder layers always get a row; the other parts only when they hold tensors.
        if count[row] == 0 && layer.is_none() {
            continue;
        }
        let l2 = sq_diff[row].sqrt();
        let norm_a = sq_a[row].sqrt();
        let relative = if l2 == 0.0 { 0.0 } else { l2 / norm_a };
        out.push(LayerDistance {
            part,
            layer,
            l2,
            norm_a,
            relative,
            tensors: count[row],
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Encoding and the forward passes
// ---------------------------------------------------------------------------------------------

/// Harmful (prompt + harmful answer) and harmless (prompt + harmless answer) samples of the same
/// pairs, each with its answer-token mask.
#[derive(Clone, Debug)]
pub struct Samples {
    pub harmful: Vec<Encoded>,
    pub harmless: Vec<Encoded>,
}

/// At most `limit` pairs (0: all), chosen by a shuffle seeded by `seed`, kept in file order.
pub fn select_pairs(pairs: &[Pair], limit: usize, seed: u64) -> Vec<Pair> {
    Rng::new(seed, "analysis-sample").subset(pairs, limit)
}

/// Tokenise each pair twice, as the attack tokenises QA pairs ([`encode_sft`]: chat template or
/// plain format, answer-only mask, at most `max_len` tokens). A sample whose answer is cut off
/// entirely by `max_len` is left out.
pub fn encode_samples(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
) -> Result<Samples> {
    let side = |f: fn(&Pair) -> &String| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|p| (p.prompt.clone(), f(p).clone()))
            .collect()
    };
    let encode = |what: &str, qa: Vec<(String, String)>| {
        encode_sft(model, &qa, format, max_len, false)
            .map_err(|e| Error::msg(format!("{what} samples ({format:?} format): {e}")))
    };
    Ok(Samples {
        harmful: encode("harmful", side(|p| &p.harmful))?,
        harmless: encode("harmless", side(|p| &p.harmless))?,
    })
}

fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::setting("batch_size", 0, "must be at least 1"));
    }
    Ok(())
}

/// Logit lens: the mean log-probability of the answer tokens (the tokens the SFT loss is taken
/// on) when each hidden state is read out through the final norm and the LM head, averaged over
/// every answer token of `seqs`. One value per hidden state: `[0]` reads the embeddings, `[i]`
/// the residual after layer `i`; the last equals minus the model's own SFT loss on `seqs`.
pub fn logit_lens(model: &LoadedModel, seqs: &[Encoded], batch_size: usize) -> Result<Vec<f64>> {
    check_batch_size(batch_size)?;
    let net = Llama::frozen(&model.config, &model.params)?;
    let n_states = model.config.num_layers + 1;
    let mut sums = vec![0f64; n_states];
    let mut tokens = 0usize;
    for chunk in seqs.chunks(batch_size) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.tok.pad_id, net.device())?;
        let (_, t) = batch.dims();
        let rows = CeRows::standard(&batch.ids_v, &answer_masks(&refs, t, false));
        let n = rows.count();
        if n == 0 {
            continue;
        }
        let out = batch.forward(&net, true, false)?;
        for (s, h) in sums.iter_mut().zip(&out.hidden_states) {
            let ce = rows.ce(&net, h, false)?.to_dtype(candle_core::DType::F64)?;
            *s -= ce.to_scalar::<f64>()? * n as f64;
        }
        tokens += n;
    }
    if tokens == 0 {
        return Err(Error::msg(
            "logit lens: no answer token to score (every answer was cut off or empty)",
        ));
    }
    Ok(sums.into_iter().map(|s| s / tokens as f64).collect())
}

/// Which tokens a sequence's activations are averaged over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// The answer tokens (the loss mask).
    #[default]
    Answer,
    /// Every real (non-padding) token, prompt and template included.
    All,
}

/// The mean residual-stream activation of each sequence over its `pool` tokens, per hidden
/// state: `[layer][sample][dim]`. `layer = None` gives every hidden state (`num_layers + 1`
/// entries, `[0]` the embeddings); `Some(l)` gives the one entry for hidden state `l`.
pub fn mean_activations(
    model: &LoadedModel,
    seqs: &[Encoded],
    layer: Option<usize>,
    pool: Pool,
    batch_size: usize,
) -> Result<Vec<Vec<Vec<f32>>>> {
    check_batch_size(batch_size)?;
    let n_states = model.config.num_layers + 1;
    let wanted: Vec<usize> = match layer {
        None => (0..n_states).collect(),
        Some(l) if l < n_states => vec![l],
        Some(l) => {
            return Err(Error::setting(
                "layer",
                l,
                format!("the model has hidden states 0..={}", n_states - 1),
            ))
        }
    };
    let net = Llama::frozen(&model.config, &model.params)?;
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(seqs.len()); wanted.len()];
    for (c, chunk) in seqs.chunks(batch_size).enumerate() {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.tok.pad_id, net.device())?;
        let (b, t) = batch.dims();
        let sel = match pool {
            Pool::Answer => answer_masks(&refs, t, false),
            Pool::All => batch.real.clone(),
        };
        let mut weights = Vec::with_capacity(b * t);
        for (r, m) in sel.iter().enumerate() {
            let k = m.iter().filter(|&&x| x == 1).count();
            if k == 0 {
                return Err(Error::msg(format!(
                    "sample {} has no {} token to average over",
                    c * batch_size + r + 1,
                    if pool == Pool::Answer {
                        "answer"
                    } else {
                        "real"
                    }
                )));
            }
            weights.extend(m.iter().map(|&x| x as f32 / k as f32));
        }
        let w = Tensor::from_vec(weights, (b, t, 1), net.device())?;
        let fwd = batch.forward(&net, true, false)?;
        for (slot, &l) in out.iter_mut().zip(&wanted) {
            let h = &fwd.hidden_states[l]; // [b, t, d]
            let mean = h.broadcast_mul(&w)?.sum(D::Minus2)?; // [b, d]
            slot.extend(mean.to_vec2::<f32>()?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// PCA
// ---------------------------------------------------------------------------------------------

/// A principal component analysis of centred data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pca {
    /// The mean that was subtracted, `[d]`.
    pub mean: Vec<f64>,
    /// Unit principal directions, largest variance first, `[k][d]`; each is signed so that its
    /// largest-magnitude entry is positive.
    pub components: Vec<Vec<f64>>,
    /// Variance along each component (sample variance, `n - 1` denominator).
    pub explained_variance: Vec<f64>,
    /// Each component's share of the total variance.
    pub explained_variance_ratio: Vec<f64>,
    /// The centred samples projected on the components, `[n][k]`.
    pub projections: Vec<Vec<f64>>,
}

fn as_matrix(x: &[Vec<f32>], what: &str) -> Result<(usize, usize, Vec<f64>)> {
    let n = x.len();
    let d = x.first().map_or(0, |r| r.len());
    if n == 0 || d == 0 {
        return Err(Error::msg(format!("{what}: no data")));
    }
    let mut flat = Vec::with_capacity(n * d);
    for (i, r) in x.iter().enumerate() {
        if r.len() != d {
            return Err(Error::msg(format!(
                "{what}: row {} has {} values, row 1 has {d}",
                i + 1,
                r.len()
            )));
        }
        if let Some(j) = r.iter().position(|v| !v.is_finite()) {
            return Err(Error::msg(format!(
                "{what}: row {} has a non-finite value at {}",
                i + 1,
                j + 1
            )));
        }
        flat.extend(r.iter().map(|&v| v as f64));
    }
    Ok((n, d, flat))
}

/// PCA of the rows of `x` (`n` samples of dimension `d`, centred here) with `k` components,
/// `k` capped at `min(n - 1, d)`. The eigen decomposition is nalgebra's symmetric one, of the
/// `d x d` covariance or, when `d > n`, of the `n x n` Gram matrix (same components).
pub fn pca(x: &[Vec<f32>], k: usize) -> Result<Pca> {
    use nalgebra::{DMatrix, SymmetricEigen};
    let (n, d, mut flat) = as_matrix(x, "pca")?;
    if n < 2 {
        return Err(Error::msg("pca: needs at least two samples"));
    }
    if k == 0 {
        return Err(Error::setting("k", 0, "at least one component"));
    }
    let k = k.min(n - 1).min(d);
    let mut mean = vec![0f64; d];
    for r in flat.chunks(d) {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n as f64;
        }
    }
    for r in flat.chunks_mut(d) {
        for (v, m) in r.iter_mut().zip(&mean) {
            *v -= m;
        }
    }
    let xc = DMatrix::from_row_slice(n, d, &flat);
    let denom = (n - 1) as f64;
    let total: f64 = flat.iter().map(|v| v * v).sum::<f64>() / denom;
    let (values, vectors) = if d <= n {
        let cov = (xc.transpose() * &xc) / denom; // [d, d]
        let e = SymmetricEigen::new(cov);
        (e.eigenvalues, e.eigenvectors)
    } else {
        let gram = (&xc * xc.transpose()) / denom; // [n, n]
        let e = SymmetricEigen::new(gram);
        // v = X^T u / |X^T u|: the covariance eigenvector with the same eigenvalue.
        let mut v = xc.transpose() * e.eigenvectors; // [d, n]
        for mut c in v.column_iter_mut() {
            let norm = c.norm();
            if norm > 1e-12 {
                c /= norm;
            } else {
                c.fill(0.0);
            }
        }
        (e.eigenvalues, v)
    };
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[j].total_cmp(&values[i]));
    let mut components = Vec::with_capacity(k);
    let mut explained_variance = Vec::with_capacity(k);
    for &i in order.iter().take(k) {
        let mut c: Vec<f64> = vectors.column(i).iter().copied().collect();
        let big = c
            .iter()
            .copied()
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
            .unwrap_or(0.0);
        if big < 0.0 {
            c.iter_mut().for_each(|v| *v = -*v);
        }
        components.push(c);
        explained_variance.push(values[i].max(0.0));
    }
    let explained_variance_ratio = explained_variance
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    let projections = flat
        .chunks(d)
        .map(|r| {
            components
                .iter()
                .map(|c| c.iter().zip(r).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect();
    Ok(Pca {
        mean,
        components,
        explained_variance,
        explained_variance_ratio,
        projections,
    })
}

// ---------------------------------------------------------------------------------------------
// Linear probes
// ---------------------------------------------------------------------------------------------

/// Logistic-regression probe settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// L2 penalty `l2 / 2 * |w|^2` added to the mean log-loss (the bias is not penalised).
    pub l2: f64,
    /// Share of each class held out for the accuracy.
    pub test_fraction: f64,
    /// Gradient steps at most (accelerated gradient descent, step `1 / L`).
    pub max_iters: usize,
    /// Stop when the gradient norm falls below this.
    pub tol: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            l2: 1e-3,
            test_fraction: 0.2,
            max_iters: 500,
            tol: 1e-6,
        }
    }
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Held-out accuracy.
    pub test_acc: f64,
    pub train_acc: f64,
    pub n_train: usize,
    pub n_test: usize,
    /// Gradient steps taken.
    pub iters: usize,
}

/// Held-out probe accuracy at one hidden state, over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerProbe {
    /// Hidden-state index (`0` the embeddings, `i` the output of layer `i`).
    pub layer: usize,
    pub mean_acc: f64,
    /// Standard error of the mean over seeds (NaN, written as null, for one seed).
    pub se: f64,
    /// The accuracy of each seed, in the order given.
    pub accs: Vec<f64>,
}

/// Split each class's indices into (train, test), `frac` of each class held out (at least one
/// sample each side).
fn stratified_split(n: usize, frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let n_test = ((n as f64 * frac).round() as usize).clamp(1, n - 1);
    let test = idx[..n_test].to_vec();
    let train = idx[n_test..].to_vec();
    (train, test)
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Rows `[n][d]` and labels (1.0 positive) of a logistic regression problem.
struct Problem {
    x: Vec<f64>,
    y: Vec<f64>,
    n: usize,
    d: usize,
}

impl Problem {
    fn scores(&self, w: &[f64], b: f64) -> Vec<f64> {
        self.x
            .chunks(self.d)
            .map(|r| r.iter().zip(w).map(|(a, c)| a * c).sum::<f64>() + b)
            .collect()
    }

    fn accuracy(&self, w: &[f64], b: f64) -> f64 {
        let s = self.scores(w, b);
        let right = s
            .iter()
            .zip(&self.y)
            .filter(|(z, y)| (**z > 0.0) == (**y > 0.5))
            .count();
        right as f64 / self.n as f64
    }

    /// Gradient of the mean log-loss plus `l2 / 2 |w|^2` at `(w, b)`: `(grad_w, grad_b)`.
    fn grad(&self, w: &[f64], b: f64, l2: f64) -> (Vec<f64>, f64) {
        let s = self.scores(w, b);
        let mut gw: Vec<f64> = w.iter().map(|v| l2 * v).collect();
        let mut gb = 0.0;
        let inv = 1.0 / self.n as f64;
        for ((r, z), y) in self.x.chunks(self.d).zip(&s).zip(&self.y) {
            let e = (sigmoid(*z) - y) * inv;
            gb += e;
            for (g, v) in gw.iter_mut().zip(r) {
                *g += e * v;
            }
        }
        (gw, gb)
    }

    /// Largest eigenvalue of `A^T A / n` for `A = [x, 1]` (power iteration, deterministic start).
    fn max_eig(&self) -> f64 {
        let mut v = vec![1.0 / ((self.d + 1) as f64).sqrt(); self.d + 1];
        let mut lambda = 0.0;
        for _ in 0..50 {
            let (w, b) = v.split_at(self.d);
            let s = self.scores(w, b[0]);
            let mut out = vec![0f64; self.d + 1];
            for (r, z) in self.x.chunks(self.d).zip(&s) {
                for (o, a) in out.iter_mut().zip(r) {
                    *o += z * a;
                }
                out[self.d] += z;
            }
            out.iter_mut().for_each(|o| *o /= self.n as f64);
            let norm = out.iter().map(|o| o * o).sum::<f64>().sqrt();
            if norm == 0.0 {
                return 0.0;
            }
            lambda = norm;
            v = out.into_iter().map(|o| o / norm).collect();
        }
        lambda
    }
}

/// Fit an L2-regularised logistic regression by accelerated gradient descent (Nesterov, step
/// `1 / L` with `L` the loss's smoothness bound): `(w, b, steps)`.
fn fit_logistic(p: &Problem, cfg: &ProbeConfig) -> (Vec<f64>, f64, usize) {
    let lip = 0.25 * p.max_eig() * 1.1 + cfg.l2 + 1e-12;
    let step = 1.0 / lip;
    let (mut w, mut b) = (vec![0f64; p.d], 0f64);
    let (mut yw, mut yb) = (w.clone(), b);
    let mut t = 1f64;
    let mut iters = 0;
    for it in 0..cfg.max_iters {
        iters = it + 1;
        let (gw, gb) = p.grad(&yw, yb, cfg.l2);
        let gnorm = (gw.iter().map(|g| g * g).sum::<f64>() + gb * gb).sqrt();
        if gnorm < cfg.tol {
            w = yw;
            b = yb;
            break;
        }
        let nw: Vec<f64> = yw.iter().zip(&gw).map(|(y, g)| y - step * g).collect();
        let nb = yb - step * gb;
        let nt = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
        let mom = (t - 1.0) / nt;
        yw = nw.iter().zip(&w).map(|(a, o)| a + mom * (a - o)).collect();
        yb = nb + mom * (nb - b);
        w = nw;
        b = nb;
        t = nt;
    }
    (w, b, iters)
}

/// A logistic-regression probe separating `x_pos` from `x_neg` (rows of equal length): a seeded,
/// per-class `(1 - test_fraction) / test_fraction` split, features standardised with the
/// training split's mean and deviation, and the held-out accuracy. Needs two samples per class.
pub fn linear_probe(
    x_pos: &[Vec<f32>],
    x_neg: &[Vec<f32>],
    seed: u64,
    cfg: &ProbeConfig,
) -> Result<ProbeResult> {
    if x_pos.len() < 2 || x_neg.len() < 2 {
        return Err(Error::msg(format!(
            "probe: needs at least two samples per class ({} positive, {} negative)",
            x_pos.len(),
            x_neg.len()
        )));
    }
    if !(cfg.test_fraction > 0.0 && cfg.test_fraction < 1.0) {
        return Err(Error::setting(
            "test_fraction",
            cfg.test_fraction,
            "must be strictly between 0 and 1",
        ));
    }
    let (_, d, pos) = as_matrix(x_pos, "probe (positive samples)")?;
    let (_, dn, neg) = as_matrix(x_neg, "probe (negative samples)")?;
    if dn != d {
        return Err(Error::msg(format!(
            "probe: positive samples have {d} features, negative ones {dn}"
        )));
    }
    let mut rng = Rng::new(seed, "probe-split");
    let (tr_p, te_p) = stratified_split(x_pos.len(), cfg.test_fraction, &mut rng);
    let (tr_n, te_n) = stratified_split(x_neg.len(), cfg.test_fraction, &mut rng);
    let gather = |ip: &[usize], ineg: &[usize]| -> Problem {
        let mut x = Vec::with_capacity((ip.len() + ineg.len()) * d);
        let mut y = vec![];
        for &i in ip {
            x.extend_from_slice(&pos[i * d..(i + 1) * d]);
            y.push(1.0);
        }
        for &i in ineg {
            x.extend_from_slice(&neg[i * d..(i + 1) * d]);
            y.push(0.0);
        }
        Problem {
            n: y.len(),
            x,
            y,
            d,
        }
    };
    let mut train = gather(&tr_p, &tr_n);
    let mut test = gather(&te_p, &te_n);
    // Standardise with the training split's statistics.
    let mut mu = vec![0f64; d];
    for r in train.x.chunks(d) {
        for (m, v) in mu.iter_mut().zip(r) {
            *m += v / train.n as f64;
        }
    }
    let mut sd = vec![0f64; d];
    for r in train.x.chunks(d) {
        for ((s, v), m) in sd.iter_mut().zip(r).zip(&mu) {
            *s += (v - m).powi(2) / train.n as f64;
        }
    }
    let sd: Vec<f64> = sd
        .into_iter()
        .map(|v| if v.sqrt() > 1e-12 { v.sqrt() } else { 1.0 })
        .collect();
    for p in [&mut train, &mut test] {
        for r in p.x.chunks_mut(d) {
            for ((v, m), s) in r.iter_mut().zip(&mu).zip(&sd) {
                *v = (*v - m) / s;
            }
        }
    }
    let (w, b, iters) = fit_logistic(&train, cfg);
    Ok(ProbeResult {
        test_acc: test.accuracy(&w, b),
        train_acc: train.accuracy(&w, b),
        n_train: train.n,
        n_test: test.n,
        iters,
    })
}

/// [`probes_by_layer_with`] with the default [`ProbeConfig`].
pub fn probes_by_layer(
    acts_harmful: &[Vec<Vec<f32>>],
    acts_harmless: &[Vec<Vec<f32>>],
    seeds: &[u64],
) -> Result<Vec<LayerProbe>> {
    probes_by_layer_with(acts_harmful, acts_harmless, seeds, &ProbeConfig::default())
}

/// A probe per layer (`acts_*[layer][sample][dim]`, as [`mean_activations`] returns them) and per
/// seed, harmful as the positive class: the mean held-out accuracy over seeds and its standard
/// error. Layers run in parallel; the numbers do not depend on it.
pub fn probes_by_layer_with(
    acts_harmful: &[Vec<Vec<f32>>],
    acts_harmless: &[Vec<Vec<f32>>],
    seeds: &[u64],
    cfg: &ProbeConfig,
) -> Result<Vec<LayerProbe>> {
    if acts_harmful.len() != acts_harmless.len() {
        return Err(Error::msg(format!(
            "probes: {} harmful layers but {} harmless ones",
            acts_harmful.len(),
            acts_harmless.len()
        )));
    }
    if seeds.is_empty() {
        return Err(Error::setting("seeds", "[]", "at least one seed"));
    }
    (0..acts_harmful.len())
        .into_par_iter()
        .map(|l| {
            let accs = seeds
                .iter()
                .map(|&s| {
                    linear_probe(&acts_harmful[l], &acts_harmless[l], s, cfg)
                        .map(|r| r.test_acc)
                        .map_err(|e| Error::msg(format!("layer {l}: {e}")))
                })
                .collect::<Result<Vec<f64>>>()?;
            let m = mean_se(&accs);
            Ok(LayerProbe {
                layer: l,
                mean_acc: m.mean,
                se: m.stderr,
                accs,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Plots and output
// ---------------------------------------------------------------------------------------------

/// L2 distance per decoder layer, one line per compared pair of models (`relative`: divided by
/// the first model's norm).
pub fn plot_l2(runs: &[(String, Vec<LayerDistance>)], relative: bool) -> Result<String> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(name, rows)| Series {
            name: name.clone(),
            points: rows
                .iter()
                .filter_map(|r| {
                    let v = if relative { r.relative } else { r.l2 };
                    r.layer.map(|l| (l as f64, v))
                })
                .collect(),
        })
        .collect();
    let (title, y) = if relative {
        ("Relative weight distance by layer", "|b - a| / |a|")
    } else {
        ("Weight distance (L2) by layer", "|b - a|")
    };
    plot::line_chart(title, "decoder layer", y, &series)
}

/// Logit lens: mean answer log-probability per hidden state, one line per model (or answer set).
pub fn plot_logit_lens(runs: &[(String, Vec<f64>)]) -> Result<String> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(name, v)| Series {
            name: name.clone(),
            points: v.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect(),
        })
        .collect();
    plot::line_chart(
        "Logit lens: answer log-probability by layer",
        "hidden state (0 = embeddings)",
        "mean log-probability",
        &series,
    )
}

/// The first two principal components, harmful samples (the first `n_harmful` rows of the PCA)
/// against harmless ones (the rest).
pub fn plot_pca(pca: &Pca, n_harmful: usize, title: &str) -> Result<String> {
    let pt = |r: &Vec<f64>| {
        (
            r.first().copied().unwrap_or(0.0),
            r.get(1).copied().unwrap_or(0.0),
        )
    };
    let n_harmful = n_harmful.min(pca.projections.len());
    let groups = vec![
        Series::new(
            "harmful",
            pca.projections[..n_harmful].iter().map(pt).collect(),
        ),
        Series::new(
            "harmless",
            pca.projections[n_harmful..].iter().map(pt).collect(),
        ),
    ];
    let axis = |i: usize| match pca.explained_variance_ratio.get(i) {
        Some(r) => format!("PC{} ({:.1}% of variance)", i + 1, 100.0 * r),
        None => format!("PC{}", i + 1),
    };
    plot::scatter(title, &axis(0), &axis(1), &groups)
}

/// Held-out probe accuracy by hidden state, one line per model.
pub fn plot_probes(runs: &[(String, Vec<LayerProbe>)]) -> Result<String> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(name, v)| Series {
            name: name.clone(),
            points: v.iter().map(|p| (p.layer as f64, p.mean_acc)).collect(),
        })
        .collect();
    plot::line_chart(
        "Linear probe accuracy (harmful vs harmless) by layer",
        "hidden state (0 = embeddings)",
        "held-out accuracy",
        &series,
    )
}

/// Write `DIR/<name>.json` and `DIR/<name>.svg` atomically; returns their paths.
pub fn write_outputs(
    dir: &Path,
    name: &str,
    report: &impl Serialize,
    svg: &str,
) -> Result<(PathBuf, PathBuf)> {
    let json = dir.join(format!("{name}.json"));
    let svg_path = dir.join(format!("{name}.svg"));
    crate::util::io::write_json_atomic(&json, report)?;
    crate::util::io::write_atomic(&svg_path, svg.as_bytes())?;
    Ok((json, svg_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_classified_and_out_of_range_layers_named() {
        assert_eq!(part_of("model.embed_tokens.weight", 2).unwrap(), 0);
        assert_eq!(part_of("model.layers.1.mlp.up_proj.weight", 2).unwrap(), 2);
        assert_eq!(part_of("model.norm.weight", 2).unwrap(), 3);
        assert_eq!(part_of("lm_head.weight", 2).unwrap(), 4);
        assert_eq!(part_of("something.else", 2).unwrap(), 5);
        let e = part_of("model.layers.7.mlp.up_proj.weight", 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.layers.7.mlp.up_proj.weight"), "{e}");
    }

    #[test]
    fn split_is_seeded_disjoint_and_stratified() {
        let (tr, te) = stratified_split(10, 0.2, &mut Rng::new(1, "probe-split"));
        assert_eq!((tr.len(), te.len()), (8, 2));
        let mut all: Vec<usize> = tr.iter().chain(&te).copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let again = stratified_split(10, 0.2, &mut Rng::new(1, "probe-split"));
        assert_eq!((tr, te), again);
        // Never an empty side.
        assert_eq!(stratified_split(2, 0.01, &mut Rng::new(0, "x")).1.len(), 1);
        assert_eq!(stratified_split(2, 0.99, &mut Rng::new(0, "x")).0.len(), 1);
    }

    #[test]
    fn select_pairs_is_seeded_and_keeps_order() {
        let p = |i: usize| Pair {
            prompt: format!("q{i}"),
            harmful: "a".into(),
            harmless: "b".into(),
            categories: None,
        };
        let pairs: Vec<Pair> = (0..20).map(p).collect();
        let a = select_pairs(&pairs, 5, 3);
        assert_eq!(a, select_pairs(&pairs, 5, 3));
        assert_eq!(a.len(), 5);
        assert_ne!(a, select_pairs(&pairs, 5, 4));
        let idx: Vec<usize> = a.iter().map(|p| p.prompt[1..].parse().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(select_pairs(&pairs, 0, 3).len(), 20);
    }

    #[test]
    fn logistic_fit_reaches_the_optimum_of_a_tiny_problem() {
        // Symmetric 1-D problem: optimum has b = 0 and a w that zeroes the gradient.
        let p = Problem {
            x: vec![1.0, 2.0, -1.0, -2.0, 0.5, -0.5],
            y: vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
            n: 6,
            d: 1,
        };
        let cfg = ProbeConfig {
            l2: 0.1,
            max_iters: 5000,
            tol: 1e-10,
            ..Default::default()
        };
        let (w, b, _) = fit_logistic(&p, &cfg);
        let (gw, gb) = p.grad(&w, b, cfg.l2);
        assert!(gw[0].abs() < 1e-8 && gb.abs() < 1e-8, "{gw:?} {gb}");
    }
}
