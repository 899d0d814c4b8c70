//! PCA of mean activations of harmful and harmless answers (paper §5: are they still separable?).

use super::*;

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

pub(super) fn as_matrix(x: &[Vec<f32>], what: &str) -> Result<(usize, usize, Vec<f64>)> {
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
