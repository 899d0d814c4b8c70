//! `repnoise analyze`: the paper's analyses of what a defence did to a model.

use super::*;

#[derive(Subcommand)]
pub enum AnalyzeCmd {
    /// L2 distance between two models' weights, per decoder layer (plus embeddings, final norm
    /// and LM head rows in the JSON).
    L2 {
        /// The reference model (relative distances divide by its norm).
        #[arg(long)]
        a: String,
        /// The compared model.
        #[arg(long)]
        b: String,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Plot the relative distance |b - a| / |a| instead of |b - a|.
        #[arg(long)]
        relative: bool,
    },
    /// Logit lens: mean log-probability of the answers read out at every layer; one line per
    /// model (repeat --model).
    LogitLens {
        /// A model (Hugging Face directory, GGUF file or embedded name); repeatable.
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Which answers are scored.
        #[arg(long, value_enum, default_value = "harmful")]
        answer: AnswerArg,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// PCA of the mean activations of harmful and harmless samples at one hidden state.
    Pca {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Hidden state (0 = embeddings; default: the last layer's output).
        #[arg(long)]
        layer: Option<usize>,
        /// Tokens averaged per sample.
        #[arg(long, value_enum, default_value = "answer")]
        pool: repnoise::analysis::Pool,
        /// Components kept.
        #[arg(long, default_value_t = 2)]
        components: usize,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Logistic-regression probes separating harmful from harmless mean activations at every
    /// hidden state: held-out accuracy over seeded 80/20 splits.
    Probes {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        pairs: PairsFlags,
        /// Split seeds, comma-separated: one probe per seed and layer.
        #[arg(long, value_delimiter = ',',
              default_values_t = repnoise::experiment::AnalysisSpec::default().probe_seeds)]
        seeds: Vec<u64>,
        /// Which tokens' hidden states a probe reads (their mean): answer or all.
        #[arg(long, value_enum, default_value = "answer")]
        pool: repnoise::analysis::Pool,
        /// L2 penalty of the probe.
        #[arg(long)]
        l2: Option<f64>,
        /// Directory for the JSON and the figure (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The pairs an analysis uses, after --limit.
pub fn analysis_pairs(p: &PairsFlags) -> Result<Vec<repnoise::data::pairs::Pair>> {
    let loaded = repnoise::data::load_pairs_any(&p.pairs)
        .with_context(|| format!("reading pairs {}", p.pairs.display()))?;
    if !loaded.skipped.is_empty() {
        eprintln!(
            "{}: {} records skipped (no pair)",
            p.pairs.display(),
            loaded.skipped.len()
        );
    }
    Ok(repnoise::analysis::select_pairs(
        &loaded.records,
        p.limit,
        p.seed,
    ))
}

/// What every analysis report records about its inputs.
pub fn analysis_header(name: &str, p: Option<&PairsFlags>, n_pairs: usize) -> serde_json::Value {
    let mut v = serde_json::json!({
        "analysis": name,
        "command": std::env::args().collect::<Vec<_>>(),
        "environment": repnoise::train::environment(),
    });
    if let Some(p) = p {
        v["pairs"] = serde_json::json!({
            "file": p.pairs,
            "used": n_pairs,
            "limit": p.limit,
            "seed": p.seed,
            "format": PromptFormat::from(p.format),
            "max_len": p.max_len,
        });
    }
    v
}

pub fn run(g: &Global, cmd: AnalyzeCmd) -> Result<()> {
    use repnoise::analysis;
    match cmd {
        AnalyzeCmd::L2 {
            a,
            b,
            out,
            relative,
        } => {
            let ma = load(g, &a)?;
            let mb = load(g, &b)?;
            if ma.config.num_layers != mb.config.num_layers {
                bail!(
                    "`{a}` has {} layers and `{b}` {}: not the same architecture",
                    ma.config.num_layers,
                    mb.config.num_layers
                );
            }
            let rows = analysis::l2_by_layer(&ma.params, &mb.params, ma.config.num_layers)
                .with_context(|| format!("comparing `{a}` with `{b}`"))?;
            let svg = analysis::plot_l2(&[(format!("{b} vs {a}"), rows.clone())], relative)?;
            let mut report = analysis_header("l2", None, 0);
            report["models"] = serde_json::json!({"a": ma.source, "b": mb.source});
            report["rows"] = serde_json::to_value(&rows)?;
            let (j, s) = analysis::write_outputs(&out, "l2", &report, &svg)?;
            for r in &rows {
                println!("{}\t{:.6e}\t{:.6e}", r.part, r.l2, r.relative);
            }
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::LogitLens {
            models,
            pairs,
            answer,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let mut runs = vec![];
            let mut results = vec![];
            for spec in &models {
                let m = load(g, spec)?;
                let samples =
                    analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
                let sides: Vec<(&str, &Vec<repnoise::data::Encoded>)> = match answer {
                    AnswerArg::Harmful => vec![("harmful", &samples.harmful)],
                    AnswerArg::Harmless => vec![("harmless", &samples.harmless)],
                    AnswerArg::Both => vec![
                        ("harmful", &samples.harmful),
                        ("harmless", &samples.harmless),
                    ],
                };
                for (side, seqs) in sides {
                    let lp = analysis::logit_lens(&m, seqs, pairs.batch)
                        .with_context(|| format!("logit lens of `{spec}` ({side} answers)"))?;
                    let name = if answer == AnswerArg::Both {
                        format!("{spec} ({side})")
                    } else {
                        spec.clone()
                    };
                    println!(
                        "{name}\t{}",
                        lp.iter()
                            .map(|v| format!("{v:.4}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    results.push(serde_json::json!({
                        "model": spec,
                        "source": m.source,
                        "answers": side,
                        "samples": seqs.len(),
                        "answer_tokens": seqs.iter().map(|e| e.loss_mask.iter().filter(|&&x| x == 1).count()).sum::<usize>(),
                        "mean_logprob_by_hidden_state": lp,
                    }));
                    runs.push((name, lp));
                }
            }
            let svg = analysis::plot_logit_lens(&runs)?;
            let mut report = analysis_header("logit-lens", Some(&pairs), ps.len());
            report["models"] = serde_json::json!(models);
            report["results"] = serde_json::json!(results);
            let (j, s) = analysis::write_outputs(&out, "logit-lens", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::Pca {
            model,
            pairs,
            layer,
            pool,
            components,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let m = load(g, &model.model)?;
            let layer = layer.unwrap_or(m.config.num_layers);
            let samples = analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
            let acts = |seqs| analysis::mean_activations(&m, seqs, Some(layer), pool, pairs.batch);
            let mut x = acts(&samples.harmful)?.remove(0);
            let n_harmful = x.len();
            x.extend(acts(&samples.harmless)?.remove(0));
            let p = analysis::pca(&x, components)?;
            let title = format!("PCA of hidden state {layer} ({})", model.model);
            let svg = analysis::plot_pca(&p, n_harmful, &title)?;
            println!(
                "explained variance ratio: {}",
                p.explained_variance_ratio
                    .iter()
                    .map(|v| format!("{v:.4}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut report = analysis_header("pca", Some(&pairs), ps.len());
            report["models"] = serde_json::json!([model.model]);
            report["source"] = serde_json::json!(m.source);
            report["layer"] = serde_json::json!(layer);
            report["pool"] = serde_json::json!(pool);
            report["n_harmful"] = serde_json::json!(n_harmful);
            report["n_harmless"] = serde_json::json!(x.len() - n_harmful);
            report["pca"] = serde_json::to_value(&p)?;
            let (j, s) = analysis::write_outputs(&out, "pca", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
        AnalyzeCmd::Probes {
            model,
            pairs,
            seeds,
            pool,
            l2,
            out,
        } => {
            let ps = analysis_pairs(&pairs)?;
            let m = load(g, &model.model)?;
            let samples = analysis::encode_samples(&m, &ps, pairs.format.into(), pairs.max_len)?;
            let harmful =
                analysis::mean_activations(&m, &samples.harmful, None, pool, pairs.batch)?;
            let harmless =
                analysis::mean_activations(&m, &samples.harmless, None, pool, pairs.batch)?;
            let mut cfg = analysis::ProbeConfig::default();
            if let Some(l2) = l2 {
                cfg.l2 = l2;
            }
            let probes = analysis::probes_by_layer_with(&harmful, &harmless, &seeds, &cfg)?;
            for p in &probes {
                println!("{}\t{:.4}\t{:.4}", p.layer, p.mean_acc, p.se);
            }
            let svg = analysis::plot_probes(&[(model.model.clone(), probes.clone())])?;
            let mut report = analysis_header("probes", Some(&pairs), ps.len());
            report["models"] = serde_json::json!([model.model]);
            report["source"] = serde_json::json!(m.source);
            report["seeds"] = serde_json::json!(seeds);
            report["pool"] = serde_json::json!(pool);
            report["probe"] = serde_json::to_value(&cfg)?;
            report["n_harmful"] = serde_json::json!(samples.harmful.len());
            report["n_harmless"] = serde_json::json!(samples.harmless.len());
            report["layers"] = serde_json::to_value(&probes)?;
            let (j, s) = analysis::write_outputs(&out, "probes", &report, &svg)?;
            eprintln!("wrote {} and {}", j.display(), s.display());
        }
    }
    Ok(())
}
