//! Linear probes by layer: how well a logistic regression tells harmful from harmless activations
//! (held-out accuracy, stratified split, seeded).

use super::*;

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
pub(super) fn stratified_split(n: usize, frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let n_test = ((n as f64 * frac).round() as usize).clamp(1, n - 1);
    let test = idx[..n_test].to_vec();
    let train = idx[n_test..].to_vec();
    (train, test)
}

pub(super) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Rows `[n][d]` and labels (1.0 positive) of a logistic regression problem.
pub(super) struct Problem {
    pub(super) x: Vec<f64>,
    pub(super) y: Vec<f64>,
    pub(super) n: usize,
    pub(super) d: usize,
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
    pub(super) fn grad(&self, w: &[f64], b: f64, l2: f64) -> (Vec<f64>, f64) {
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
pub(super) fn fit_logistic(p: &Problem, cfg: &ProbeConfig) -> (Vec<f64>, f64, usize) {
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
