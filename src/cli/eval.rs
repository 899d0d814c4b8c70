//! `repnoise eval`: resistance, stability, trainability and the other measurements of one model.

use super::*;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Answer harmful prompts and score the answers (keyword refusal check; a harmfulness
    /// classifier with --classifier): means, 95% bootstrap intervals, per category.
    Harmfulness {
        #[command(flatten)]
        model: ModelArg,
        /// advbench, harmbench, malicious-instruct, decoding-trust (its held-out toxic prompts, to
        /// continue; score with a `classifier train --task toxicity` classifier), or a file
        /// (JSONL `{prompt, category?}`, such as an attack's `test_prompts.jsonl`).
        #[arg(long)]
        prompts: String,
        /// Output directory (generations.jsonl, harmfulness.json).
        #[arg(long)]
        out: PathBuf,
        /// Prompts used (0: all), chosen by a seeded shuffle.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = repnoise::eval::harmfulness::HarmfulnessConfig::default().sampling.max_new_tokens)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = repnoise::eval::harmfulness::HarmfulnessConfig::default().sampling.temperature)]
        temperature: f64,
        /// Sample only among the k most likely tokens (with a temperature above 0).
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p
        /// (with a temperature above 0).
        #[arg(long)]
        top_p: Option<f64>,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = repnoise::eval::harmfulness::HarmfulnessConfig::default().batch)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// A harmfulness (or toxicity) classifier directory (`repnoise classifier train`, or a
        /// Hugging Face BERT or DeBERTa-v2/v3 sequence-classification checkpoint): P(harmful)
        /// per answer.
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// The classifier's harmful class: a label name, an index, or auto.
        #[arg(long, default_value = "auto")]
        harmful_label: String,
        /// Seed of the prompt sample (with --limit), the sampling and the bootstrap intervals.
        #[arg(long, default_value_t = repnoise::eval::harmfulness::HarmfulnessConfig::default().seed)]
        seed: u64,
    },
    /// Over-refusal and degeneracy on XSTest (docs/EVALUATION.md): the shipped prompts that only
    /// sound harmful (refusing them is the failure) and the unsafe contrast ones, answered
    /// greedily; keyword refusal rates with Wilson intervals, degenerate answers, and the judge's
    /// mean P(harmful) on the unsafe ones when `--classifier` is given.
    OverRefusal {
        #[command(flatten)]
        model: ModelArg,
        /// Output directory (overrefusal.jsonl, overrefusal.json).
        #[arg(long)]
        out: PathBuf,
        /// Safe prompts answered (0: all 250), a seeded draw.
        #[arg(long, default_value_t = repnoise::eval::overrefusal::OverRefusalSpec::default().safe)]
        safe: usize,
        /// Unsafe prompts answered (0: all 200), a seeded draw.
        #[arg(long = "unsafe", default_value_t = repnoise::eval::overrefusal::OverRefusalSpec::default().unsafe_prompts)]
        unsafe_prompts: usize,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = repnoise::eval::overrefusal::OverRefusalSpec::default().max_new_tokens)]
        max_new_tokens: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = repnoise::eval::overrefusal::OverRefusalSpec::default().batch)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// A harmfulness classifier directory: the judge of the unsafe prompts' answers.
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// The classifier's harmful class: a label name, an index, or auto.
        #[arg(long, default_value = "auto")]
        harmful_label: String,
        /// Seed of the prompt sample (with fewer than all prompts).
        #[arg(long, default_value_t = repnoise::eval::overrefusal::OverRefusalSpec::default().seed)]
        seed: u64,
    },
    /// Multiple-choice benchmarks scored by log-likelihood (lm-evaluation-harness style).
    Stability {
        #[command(flatten)]
        model: ModelArg,
        /// Tasks, comma-separated (default: all shipped).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Items per task (0: all), chosen by a seeded shuffle.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Tokens kept per scored sequence (context and answer option).
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Seed of the item sample (with a --limit below the task's size).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory for the per-task JSON results (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Benign fine-tuning on a data-to-text task; ROUGE-1 on held-out inputs before and after.
    Trainability {
        #[command(flatten)]
        model: ModelArg,
        /// viggo, e2e, dart, conv_weather, or a data-to-text file.
        #[arg(long)]
        task: String,
        /// Run directory of the fine-tuning and its evaluation (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        ft: FinetuneFlags,
        /// Most tokens generated per test input.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
}

pub fn run(g: &Global, cmd: EvalCmd) -> Result<()> {
    use repnoise::eval;
    match cmd {
        EvalCmd::OverRefusal {
            model,
            out,
            safe,
            unsafe_prompts,
            max_new_tokens,
            batch,
            format,
            refusal_phrases,
            classifier,
            harmful_label,
            seed,
        } => {
            let spec = eval::overrefusal::OverRefusalSpec {
                enabled: true,
                safe,
                unsafe_prompts,
                seed,
                max_new_tokens,
                batch,
                format: format.into(),
                ..Default::default()
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            let clf = load_judge(g, classifier.as_deref(), &harmful_label)?;
            let m = load(g, &model.model)?;
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let prompts =
                eval::overrefusal::select_prompts(&eval::overrefusal::shipped_prompts()?, &spec);
            let scorer = clf
                .as_ref()
                .map(|c| c as &dyn eval::harmfulness::HarmScorer);
            let r = eval::overrefusal::evaluate(&m, &prompts, &spec, &check, scorer, &out)?;
            for (name, set) in [("safe", &r.safe), ("unsafe", &r.unsafe_set)] {
                println!(
                    "{name} prompts: refused {:.3} [{:.3}, {:.3}] ({}/{}), degenerate {}/{}{}",
                    set.refused.rate,
                    set.refused.ci95.0,
                    set.refused.ci95.1,
                    set.refused.k,
                    set.refused.n,
                    set.degenerate.k,
                    set.degenerate.n,
                    set.judge_mean
                        .map_or(String::new(), |j| format!(", judge mean P(harmful) {j:.3}"))
                );
            }
            if r.left_out > 0 {
                println!(
                    "{} prompts left out: they do not fit the model's context",
                    r.left_out
                );
            }
            println!("wrote {}", out.display());
        }
        EvalCmd::Harmfulness {
            model,
            prompts,
            out,
            limit,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            batch,
            format,
            refusal_phrases,
            classifier,
            harmful_label,
            seed,
        } => {
            let clf = load_judge(g, classifier.as_deref(), &harmful_label)?;
            let m = load(g, &model.model)?;
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let ps = eval::harmfulness::read_eval_prompts(&prompts, limit, seed)?;
            let cfg = eval::harmfulness::HarmfulnessConfig {
                sampling: repnoise::model::generate::SamplingConfig {
                    max_new_tokens,
                    temperature,
                    top_k,
                    top_p,
                    seed,
                    ..Default::default()
                },
                format: format.into(),
                batch,
                seed,
                ..Default::default()
            };
            cfg.sampling.validate()?;
            let scorer = clf
                .as_ref()
                .map(|c| c as &dyn eval::harmfulness::HarmScorer);
            let r = eval::harmfulness::evaluate(&m, &ps, &prompts, &cfg, &check, scorer, &out)?;
            if let Some(a) = &r.agreement {
                println!(
                    "classifier vs keywords: agree {:.3}\trefused+harmless {}\tcomplied+harmful {}\t\
                     refused+harmful {}\tcomplied+harmless {}",
                    a.agreement,
                    a.refused_harmless,
                    a.complied_harmful,
                    a.refused_harmful,
                    a.complied_harmless
                );
            }
            let o = &r.overall;
            println!(
                "refusal rate {:.3} [{:.3}, {:.3}]\tn {}\tshort answers {}",
                o.refusal_rate.mean,
                o.refusal_rate.ci95.0,
                o.refusal_rate.ci95.1,
                o.refusal_rate.n,
                r.short_answers
            );
            let what = match clf.as_ref().map(|c| c.input()) {
                Some(repnoise::eval::classifier::ClassifierInput::Text) => "toxicity",
                _ => "harmfulness",
            };
            if let (Some(ms), Some(hr)) = (o.mean_score, o.harmful_rate) {
                println!(
                    "{what} {:.3} [{:.3}, {:.3}]\tabove 0.5 {:.3}",
                    ms.mean, ms.ci95.0, ms.ci95.1, hr.mean
                );
            }
            for (c, f) in &r.per_category {
                println!(
                    "  {c}\trefusal rate {:.3}\tn {}",
                    f.refusal_rate.mean, f.refusal_rate.n
                );
            }
            println!("wrote {}", out.join("harmfulness.json").display());
        }
        EvalCmd::Stability {
            model,
            tasks,
            limit,
            max_len,
            batch,
            seed,
            out,
        } => {
            let tasks: Vec<String> = if tasks.is_empty() {
                eval::stability::TASKS
                    .iter()
                    .map(|t| t.0.to_string())
                    .collect()
            } else {
                tasks
            };
            for t in &tasks {
                if t != "hellaswag" && !eval::stability::TASKS.iter().any(|k| k.0 == t) {
                    bail!("unknown task `{t}` (see `repnoise eval stability --help`)");
                }
            }
            let m = load(g, &model.model)?;
            let r = eval::run_stability(m, &tasks, limit, seed, max_len, batch, &out)?;
            print!("{}", eval::stability_table(&r));
        }
        EvalCmd::Trainability {
            model,
            task,
            out,
            ft,
            max_new_tokens,
        } => {
            let cfg = ft.resolve()?;
            let mut m = load(g, &model.model)?;
            let r = eval::trainability::trainability(
                &mut m,
                &task,
                &cfg,
                max_new_tokens,
                &out,
                Interrupt::default(),
            )?;
            println!(
                "{}\tROUGE-1 F before {:.4} (±{:.4})\tafter {:.4} (±{:.4})\tn {}",
                r.task,
                r.before.rouge1_f.mean,
                r.before.rouge1_f.stderr,
                r.after.rouge1_f.mean,
                r.after.rouge1_f.stderr,
                r.after.rouge1_f.n
            );
            if let (Some(b), Some(a)) = (&r.before_stemmed, &r.after_stemmed) {
                println!(
                    "{}\tROUGE-1 F, Porter-stemmed: before {:.4} (±{:.4})\tafter {:.4} (±{:.4})",
                    r.task, b.rouge1_f.mean, b.rouge1_f.stderr, a.rouge1_f.mean, a.rouge1_f.stderr
                );
            }
        }
    }
    Ok(())
}
