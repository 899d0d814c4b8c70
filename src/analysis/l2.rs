//! The L2 distance between two models' weights, by layer (paper §5: where a defence changed the
//! model).

use super::*;

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
pub(super) fn part_of(name: &str, num_layers: usize) -> Result<usize> {
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

pub(super) fn tensor_err(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("tensor `{name}`: {msg}"))
}

pub(super) fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// `(sum((b - a)^2), sum(a^2))` in f64, the same bits whatever the thread count: fixed chunks
/// summed in parallel, then the chunk sums in order (a rayon `reduce` combines partial sums in
/// an order that depends on the scheduling, which changed the last digits from run to run).
fn sums_of_squares(a: &[f32], b: &[f32]) -> (f64, f64) {
    const CHUNK: usize = 1 << 14;
    let parts: Vec<(f64, f64)> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| {
            a.iter().zip(b).fold((0.0, 0.0), |(d, n), (&p, &q)| {
                let (p, q) = (p as f64, q as f64);
                (d + (q - p) * (q - p), n + p * p)
            })
        })
        .collect();
    parts
        .iter()
        .fold((0.0, 0.0), |(d, n), &(x, y)| (d + x, n + y))
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
        let (d, n) = sums_of_squares(&xa, &xb);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums do not depend on how many threads share the work (the rayon `reduce` they
    /// replace did: its partial sums met in a scheduling-dependent order).
    #[test]
    fn sums_of_squares_are_the_same_on_any_thread_count() {
        let mut rng = crate::util::rng::Rng::new(3, "l2-test");
        let a = rng.normal_vec(300_001, 1.0);
        let b: Vec<f32> = a.iter().map(|&x| x + 1e-3 * x.sin()).collect();
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| sums_of_squares(&a, &b))
        };
        let one = on(1);
        for t in [2, 3, 5] {
            assert_eq!(on(t), one, "{t} threads");
        }
        let (d, n) = one;
        let exact_n: f64 = a.iter().map(|&p| (p as f64) * (p as f64)).sum();
        assert!((n - exact_n).abs() < 1e-9 * exact_n);
        assert!(d > 0.0 && d < 1e-5 * n);
    }
}
