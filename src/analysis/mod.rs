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

mod l2;
mod lens;
mod pca;
mod probes;

pub use l2::*;
pub use lens::*;
pub use pca::*;
pub use probes::*;

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
