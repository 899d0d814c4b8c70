//! The runner: an experiment as numbered stages, each cached on disk under a key of its settings
//! and resumed after an interruption, in one locked run directory.
//!
//! Over 700 lines for one reason: [`run`] is the experiment's stages in their order (numbered
//! comments), read top to bottom as the paper's loop; split into functions it would scatter that
//! order over the file.

use super::*;

/// Options of one invocation.
pub struct RunOptions {
    pub cache: PathBuf,
    pub device: Device,
    pub command: String,
    /// Go on past an aligned model that misses its over-refusal or knowledge targets.
    pub ignore_align_targets: bool,
    /// The dtype every model of the run computes in (`--dtype`; f32 by default).
    pub dtype: candle_core::DType,
}

impl RunOptions {
    /// The cache key of a stage that runs a model: its settings, and the compute dtype when it
    /// is not f32 (so f32 keys, and the runs made before `--dtype` existed, are unchanged, and
    /// a bf16 run never reuses an f32 result).
    pub fn stage_key(&self, mut v: Value) -> String {
        if self.dtype != candle_core::DType::F32 {
            if let Value::Object(m) = &mut v {
                m.insert("dtype".into(), Value::from(self.dtype.as_str()));
            }
        }
        key_of(&v)
    }
}

pub(super) struct Stages {
    path: PathBuf,
    list: Vec<StageTime>,
    total: usize,
    done: usize,
    t0: Instant,
}

impl Stages {
    fn run<T>(&mut self, name: &str, cached: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.done += 1;
        let t = Instant::now();
        if !cached {
            eprintln!(
                "[{}/{} {:>5.0}s] {name}",
                self.done,
                self.total,
                self.t0.elapsed().as_secs_f64()
            );
        }
        let v = f()?;
        let st = StageTime {
            stage: name.to_string(),
            seconds: t.elapsed().as_secs_f64(),
            cached,
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            use std::io::Write;
            let _ = writeln!(f, "{}", serde_json::to_string(&st).unwrap_or_default());
        }
        self.list.push(st);
        Ok(v)
    }

    /// A stage whose earlier result the caller read back (`found`), or `make`'s.
    fn resume<T>(
        &mut self,
        name: &str,
        found: Option<T>,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let cached = found.is_some();
        self.run(name, cached, || match found {
            Some(v) => Ok(v),
            None => make(),
        })
    }

    /// A stage whose result is the JSON value at `path`: read back when an earlier invocation
    /// wrote it, else `make`'s, written there atomically ([`crate::util::io::cached`], timed).
    fn json<T: Serialize + serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        path: &Path,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.resume(name, read_json(path), || {
            let v = make()?;
            write_json_atomic(path, &v)?;
            Ok(v)
        })
    }
}

pub(super) fn load(spec: &str, opts: &RunOptions) -> Result<LoadedModel> {
    let mut m = crate::model::load::load(spec, &opts.cache, &opts.device)?;
    m.config.compute_dtype = opts.dtype;
    Ok(m)
}

/// Hold `OUT/.lock` (an advisory `flock`, released when the returned file is dropped or the
/// process dies) so that a second process on the same run directory stops at once, naming the
/// first, instead of colliding with it over checkpoints hours later.
pub fn lock_run_dir(out: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let path = out.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::file(&path, format!("cannot open the run directory's lock: {e}")))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(Error::file(
            out,
            format!(
                "this run directory is in use by another process ({}); wait for it to finish \
                 or stop it, or choose another --out",
                match holder.trim() {
                    "" => "process unknown".to_string(),
                    h => h.to_string(),
                }
            ),
        ));
    }
    let me = format!(
        "pid {}: {}",
        std::process::id(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = f.write_all(me.as_bytes());
    let _ = f.flush();
    Ok(f)
}

/// Run (or resume) an experiment in `out`: every stage, then `results.json` (the report is
/// `report::write_report`'s, from the returned results).
pub fn run(exp: &Experiment, out: &Path, opts: &RunOptions) -> Result<Results> {
    exp.validate().map_err(Error::msg)?;
    let t0 = Instant::now();
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create experiment directory: {e}")))?;
    let _lock = lock_run_dir(out)?;
    let toml_text = toml::to_string(exp)
        .map_err(|e| Error::msg(format!("cannot write the experiment as TOML: {e}")))?;
    write_atomic(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let n_arms = exp.arms().len();
    let cells = exp.cells();
    let n_attacks = n_arms * cells.len() * exp.seeds.len();
    let mut st = Stages {
        path: out.join("stages.jsonl"),
        list: vec![],
        total: 6 + 6 * n_arms + n_attacks,
        done: 0,
        t0,
    };
    let check = RefusalCheck::load(None)?;

    // 1. The split.
    let split_key = split_key(exp);
    let split_path = out.join(format!("split-{split_key}.json"));
    let split: DataSplit = {
        let found = read_json::<DataSplit>(&split_path).filter(|s| s.attack_file.exists());
        st.resume("split the harmful data", found, || {
            let s = split_data(exp, out, &split_key)?;
            write_json_atomic(&split_path, &s)?;
            Ok(s)
        })?
    };

    // 2. The aligned model.
    let (aligned_dir, align_report) = match &exp.align {
        None => (exp.model.clone(), None),
        Some(cfg) => {
            // The alignment measures refusals on the test questions and never trains on a
            // held-out one.
            let mut cfg = cfg.clone();
            cfg.harmful_eval_questions =
                Some(split.test.iter().map(|p| p.prompt.clone()).collect());
            cfg.harmful_validation_questions =
                Some(split.validation.iter().map(|p| p.prompt.clone()).collect());
            cfg.exclude_questions = split
                .test
                .iter()
                .chain(&split.validation)
                .map(|p| p.prompt.clone())
                .collect();
            // No question of any partition (defence and attack ones too) is trained on: with
            // the attack partition capped, the partitions' questions are named (the file's
            // other questions may be trained on); otherwise the whole file is excluded.
            if exp.attack_questions > 0 {
                let attack = read_harmful_qa(&split.attack_file)?;
                cfg.exclude_questions.extend(
                    split
                        .defence
                        .iter()
                        .map(|d| d.0.clone())
                        .chain(attack.records.into_iter().map(|r| r.prompt)),
                );
            } else {
                cfg.exclude_files = vec![data_path(exp)];
            }
            let key = opts.stage_key(json!({"model": exp.model, "align": cfg}));
            let dir = out.join(format!("align-{key}"));
            let done = dir.join("report.json").exists() && dir.join("DONE").exists();
            let rep = st.run("align the model", done, || {
                if done {
                    return Ok(read_json::<Value>(&dir.join("report.json")));
                }
                let mut m = load(&exp.model, opts)?;
                let r = crate::defence::align::align(&mut m, &cfg, &dir, Interrupt::default())?;
                Ok(Some(serde_json::to_value(&r).unwrap_or(Value::Null)))
            })?;
            // Every later number would be about a broken model: stop unless told to go on.
            if let Some(r) = rep.as_ref().and_then(|v| {
                serde_json::from_value::<crate::defence::align::AlignReport>(v.clone()).ok()
            }) {
                let fails = crate::defence::align::gate_failures(&r, cfg.targets.gate_margin);
                if !fails.is_empty() {
                    let msg = format!(
                        "the aligned model ({}) misses its targets: {}",
                        dir.display(),
                        fails.join("; ")
                    );
                    if opts.ignore_align_targets {
                        eprintln!("warning: {msg}; going on (--ignore-align-targets)");
                    } else {
                        return Err(Error::msg(format!(
                            "{msg}. Every later result would be about this model; fix the \
                             [align] settings, or pass --ignore-align-targets to go on anyway \
                             (or raise align.targets.gate_margin)"
                        )));
                    }
                }
            }
            (dir.join("model").display().to_string(), rep)
        }
    };

    // 3. The classifier.
    let (clf_dir, clf_report) = match &exp.classifier.path {
        Some(p) => (p.clone(), read_json::<Value>(&p.join("report.json"))),
        None => {
            let c = &exp.classifier;
            // The held-out questions (test and validation) are excluded from the judge's data.
            let exclude: Vec<String> = split
                .test
                .iter()
                .chain(&split.validation)
                .map(|p| p.prompt.clone())
                .collect();
            let key = key_of(&json!({"encoder": c.encoder, "samples": c.samples,
                "refusals": c.refusals, "test_fraction": c.test_fraction, "train": c.train,
                "disjoint": c.disjoint, "disjoint_samples": c.disjoint_samples,
                "xstest": c.xstest, "xstest_holdout": c.xstest_holdout, "split": split_key}));
            let dir = out.join(format!("classifier-{key}"));
            let done = dir.join("report.json").exists();
            st.run("train the harmfulness classifier", done, || {
                if !done {
                    let enc = crate::eval::classifier::resolve_encoder(&c.encoder, &opts.cache)?;
                    let mut run = crate::eval::classifier::TrainRun::new(
                        enc,
                        crate::data::default_data_dir(),
                        dir.clone(),
                        opts.command.clone(),
                    );
                    run.samples = c.samples;
                    run.refusals = c.refusals;
                    run.disjoint = c.disjoint;
                    run.disjoint_samples = c.disjoint_samples;
                    run.xstest = c.xstest;
                    run.xstest_holdout = c.xstest_holdout.clone();
                    run.exclude_questions = exclude.clone();
                    run.test_fraction = c.test_fraction;
                    run.train = c.train.clone();
                    crate::eval::classifier::run_train(&run, &opts.device, &mut |l| {
                        eprintln!("  {l}")
                    })?;
                }
                Ok(())
            })?;
            let rep = read_json::<Value>(&dir.join("report.json"));
            (dir, rep)
        }
    };
    let label: HarmfulLabel = exp
        .classifier
        .harmful_label
        .as_deref()
        .unwrap_or("auto")
        .parse()?;
    let clf = load_classifier(&clf_dir, &label, &opts.device)?;

    // 4. Defence pairs: given, or made from the aligned model's refusals.
    let (pairs_path, pairs_key) = match &exp.pairs.file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::file(p, format!("cannot read pairs: {e}")))?;
            (p.clone(), key_of(&json!({"file": p, "text": text})))
        }
        None => {
            let key = opts.stage_key(json!({"model": aligned_dir, "split": split_key,
                "pairs": exp.pairs}));
            (out.join(format!("pairs-{key}.jsonl")), key)
        }
    };
    let n_pairs = {
        let done = pairs_path.exists();
        st.run("defence pairs (the aligned model's refusals)", done, || {
            if !done {
                let m = load(&aligned_dir, opts)?;
                let recs: Vec<HarmfulQa> = split
                    .defence
                    .iter()
                    .map(|(p, r)| HarmfulQa {
                        prompt: p.clone(),
                        response: r.clone(),
                        categories: None,
                        is_safe: false,
                        refusal: None,
                    })
                    .collect();
                let (pairs, rejected) = crate::defence::align::make_refusal_pairs(
                    &m,
                    &recs,
                    &check,
                    exp.pairs.format,
                    exp.pairs.tokens,
                    16,
                )?;
                eprintln!(
                    "  {} pairs; {rejected} answers the refusal check did not accept left out",
                    pairs.len()
                );
                if pairs.is_empty() {
                    return Err(Error::msg(
                        "the aligned model refused none of the defence questions: no pairs \
                         (is the model aligned?)",
                    ));
                }
                crate::util::io::write_jsonl_atomic(&pairs_path, &pairs)?;
            }
            Ok(())
        })?;
        std::fs::read_to_string(&pairs_path)
            .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    };

    // 5. Defences: each trained once per defence seed.
    let arms = exp.arms();
    let mut model_dirs: BTreeMap<String, (String, String, Option<f64>)> = BTreeMap::new();
    model_dirs.insert("none".into(), (aligned_dir.clone(), "none".into(), None));
    for arm in arms.iter().filter(|a| a.defence != "none") {
        let d = exp
            .defences
            .iter()
            .find(|d| d.name == arm.defence)
            .expect("arms come from the defences");
        let mut cfg = d.config.clone();
        if let Some(seed) = arm.seed {
            cfg.train.seed = seed;
        }
        let (d_pairs, d_pairs_key) = match &d.withhold {
            None => (pairs_path.clone(), pairs_key.clone()),
            Some(g) => withheld_pairs(exp, &pairs_path, &pairs_key, g, out)?,
        };
        let key =
            opts.stage_key(json!({"model": aligned_dir, "pairs": d_pairs_key, "defend": cfg}));
        let dir = out.join("defences").join(format!("{}-{key}", d.name));
        let done = dir.join("DONE").exists();
        st.run(&format!("defence {}", arm.label()), done, || {
            if !done {
                let mut m = load(&aligned_dir, opts)?;
                crate::defence::defend(&mut m, &d_pairs, &cfg, &dir, Interrupt::default())?;
            }
            Ok(())
        })?;
        let secs = read_json::<Value>(&dir.join("DONE")).and_then(|v| v["seconds"].as_f64());
        model_dirs.insert(
            arm.id(),
            (
                dir.join("model").display().to_string(),
                d.config.method.to_string(),
                secs,
            ),
        );
    }

    // 6. The held-out items of the primary metric: the evaluated partition's questions with
    // their reference harmful answers and the aligned model's refusals.
    let (eval_prompts, eval_answers) = split.held_out(exp.evaluate_on);
    let judge_prompts: Vec<EvalPrompt> = match exp.eval.judge_prompts {
        0 => eval_prompts.to_vec(),
        n => eval_prompts.iter().take(n).cloned().collect(),
    };
    let hcfg = &exp.heldout.config;
    let heldout: Option<(Vec<HeldoutItem>, HeldoutEncoded, String)> = if exp.heldout.enabled {
        let n = match exp.heldout.prompts {
            0 => eval_prompts.len(),
            n => n.min(eval_prompts.len()),
        };
        let key = opts.stage_key(json!({"model": aligned_dir, "split": split_key,
            "on": exp.evaluate_on, "heldout": hcfg, "prompts": exp.heldout.prompts}));
        let path = out.join(format!("heldout-{key}.json"));
        let (items, notes): (Vec<HeldoutItem>, Vec<String>) =
            st.json("held-out refusals (the aligned model)", &path, || {
                let m = load(&aligned_dir, opts)?;
                heldout_items(&m, &eval_prompts[..n], &eval_answers[..n], hcfg, &check)
            })?;
        for n in &notes {
            eprintln!("  {n}");
        }
        let tok_model = load(&aligned_dir, opts)?;
        let enc = crate::eval::heldout::encode(&tok_model.tok, &items, hcfg)?;
        Some((items, enc, key))
    } else {
        None
    };

    // 7. Pre-attack evaluations.
    let harm_cfg = &exp.eval.harmfulness;
    // XSTest prompts the alignment trained or chose its settings on are left out.
    let xs_used: Vec<String> = Path::new(&aligned_dir)
        .parent()
        .and_then(|d| read_json::<crate::defence::align::AlignData>(&d.join("data.json")))
        .map(|d| d.xstest_used)
        .unwrap_or_default();
    let xs_prompts = if exp.overrefusal.enabled {
        let all: Vec<_> = crate::eval::overrefusal::shipped_prompts()?
            .into_iter()
            .filter(|p| !xs_used.contains(&p.id))
            .collect();
        crate::eval::overrefusal::select_prompts(&all, &exp.overrefusal)
    } else {
        vec![]
    };
    let mut defence_results = vec![];
    for arm in &arms {
        let id = arm.id();
        let name = &arm.defence;
        let first_seed = arm.is_first_seed(exp);
        let (mdir, method, secs) = model_dirs[&id].clone();
        let edir = out.join("eval").join(&id);
        let hkey = opts.stage_key(json!({"model": mdir, "split": split_key, "eval": harm_cfg,
            "classifier": clf_dir, "on": exp.evaluate_on, "judge_prompts": exp.eval.judge_prompts}));
        let hdir = edir.join(format!("harm-{hkey}"));
        let (harm, rows): (HarmReport, Vec<crate::eval::harmfulness::Scored>) = {
            // `evaluate_rows` writes the report and the generations into `hdir` itself.
            let found = read_json::<HarmReport>(&hdir.join("harmfulness.json"))
                .zip(crate::eval::harmfulness::read_generations(&hdir).ok());
            st.resume(&format!("harmfulness of {}", arm.label()), found, || {
                let m = load(&mdir, opts)?;
                crate::eval::harmfulness::evaluate_rows(
                    &m,
                    &judge_prompts,
                    &format!("held-out {} prompts", exp.evaluate_on),
                    harm_cfg,
                    &check,
                    Some(&clf),
                    &hdir,
                )
            })?
        };
        let heldout_scores = match &heldout {
            None => None,
            Some((_, enc, hk)) => {
                let path = edir.join(format!("heldout-{hk}.json"));
                Some(st.json::<HeldoutScores>(
                    &format!("held-out loss of {}", arm.label()),
                    &path,
                    || {
                        let m = load(&mdir, opts)?;
                        let net = crate::model::llama::Llama::inference(&m.config, m.params)?;
                        crate::eval::heldout::score(&net, enc, hcfg.batch)
                    },
                )?)
            }
        };
        let overrefusal = if exp.overrefusal.enabled {
            let okey = opts.stage_key(json!({"model": mdir, "spec": exp.overrefusal,
                "classifier": clf_dir, "left_out": xs_used}));
            let odir = edir.join(format!("overrefusal-{okey}"));
            // `evaluate` writes its report into `odir` itself.
            let found = read_json::<OverRefusal>(&odir.join("overrefusal.json"));
            Some(st.resume(
                &format!("XSTest over-refusal of {}", arm.label()),
                found,
                || {
                    let m = load(&mdir, opts)?;
                    crate::eval::overrefusal::evaluate(
                        &m,
                        &xs_prompts,
                        &exp.overrefusal,
                        &check,
                        Some(&clf),
                        &odir,
                    )
                },
            )?)
        } else {
            None
        };
        let mut stability = vec![];
        let wants = |list: &Vec<String>| first_seed && (list.is_empty() || list.contains(name));
        if !exp.eval.stability_tasks.is_empty() && wants(&exp.eval.stability_on) {
            let skey = opts.stage_key(json!({"model": mdir, "tasks": exp.eval.stability_tasks,
                "limit": exp.eval.stability_limit, "max_len": exp.eval.stability_max_len,
                "seed": exp.split_seed}));
            let sdir = edir.join(format!("stability-{skey}"));
            // `run_stability` writes its report into `sdir` itself.
            let found = read_json::<Value>(&sdir.join("stability.json"))
                .and_then(|v| serde_json::from_value::<Vec<TaskResult>>(v["tasks"].clone()).ok());
            stability = st.resume(&format!("stability of {}", arm.label()), found, || {
                let m = load(&mdir, opts)?;
                crate::eval::run_stability(
                    m,
                    &exp.eval.stability_tasks,
                    exp.eval.stability_limit,
                    exp.split_seed,
                    exp.eval.stability_max_len,
                    8,
                    &sdir,
                )
            })?;
        }
        let mut trainability = None;
        if let Some(task) = &exp.eval.trainability_task {
            if wants(&exp.eval.trainability_on) {
                let ft = &exp.eval.trainability;
                let key = opts.stage_key(json!({"model": mdir, "task": task, "ft": ft,
                    "tokens": exp.eval.trainability_tokens}));
                let tdir = edir.join(format!("trainability-{key}"));
                let tpath = tdir.join("trainability.json");
                // `trainability` writes its report into `tdir` itself.
                let found = read_json::<TrainabilityReport>(&tpath);
                trainability =
                    Some(
                        st.resume(&format!("trainability of {}", arm.label()), found, || {
                            let mut m = load(&mdir, opts)?;
                            let r = crate::eval::trainability::trainability(
                                &mut m,
                                task,
                                ft,
                                exp.eval.trainability_tokens,
                                &tdir,
                                Interrupt::default(),
                            )?;
                            // The fine-tuned model is not needed again.
                            let _ = std::fs::remove_dir_all(tdir.join("finetune").join("model"));
                            Ok(r)
                        })?,
                    );
            }
        }
        defence_results.push(DefenceResult {
            name: name.clone(),
            seed: arm.seed,
            method,
            model_dir: PathBuf::from(&mdir),
            train_seconds: secs,
            harm: harm.overall.clone(),
            agreement: harm.agreement.clone(),
            judge: rows.iter().map(|r| r.score).collect(),
            refused: rows.iter().map(|r| r.refused).collect(),
            heldout: heldout_scores,
            stability,
            trainability,
            overrefusal,
            over_refuses: false,
        });
    }
    flag_over_refusal(&mut defence_results, exp.overrefusal.flag_margin);

    // 8. Analyses of the defended models (the first seed of each).
    let mut analyses = vec![];
    if exp.analysis.enabled {
        let an = &exp.analysis;
        let pairs = crate::data::load_pairs_any(&pairs_path)?.records;
        let pairs = crate::analysis::select_pairs(&pairs, an.pairs, an.seed);
        let aligned = load(&aligned_dir, opts)?;
        for arm in arms
            .iter()
            .filter(|a| a.is_first_seed(exp) && (an.on.is_empty() || an.on.contains(&a.defence)))
        {
            let name = &arm.defence;
            let (mdir, _, _) = model_dirs[&arm.id()].clone();
            let key = opts.stage_key(
                json!({"model": mdir, "aligned": aligned_dir, "pairs": pairs_key,
                "analysis": an}),
            );
            let path = out.join("analysis").join(format!("{name}-{key}.json"));
            let a: ModelAnalysis = st.json(&format!("analyses of {name}"), &path, || {
                let m = load(&mdir, opts)?;
                analyse(name, &m, &aligned, &pairs, an)
            })?;
            analyses.push(a);
        }
    }

    // 9. Attacks: every arm x cell x attack seed, with the held-out metrics along the way.
    let mut attack_results = vec![];
    for arm in &arms {
        let id = arm.id();
        let (mdir, _, _) = model_dirs[&id].clone();
        let before = defence_results
            .iter()
            .find(|d| d.name == arm.defence && d.seed == arm.seed)
            .and_then(|d| d.heldout.clone());
        // Loaded once, when the first attack on it runs; each attack trains a copy.
        let mut defended: Option<LoadedModel> = None;
        for a in &exp.attacks {
            let akey = opts.stage_key(json!({"model": mdir, "data": split_key, "attack": a.config,
                "eval": harm_cfg, "classifier": clf_dir, "on": exp.evaluate_on,
                "judge_prompts": exp.eval.judge_prompts, "eval_steps": a.eval_steps,
                "heldout": heldout.as_ref().map(|h| &h.2)}));
            for cell in cells.iter().filter(|c| c.attack == a.name) {
                for &seed in &exp.seeds {
                    let dir = out
                        .join("attacks")
                        .join(&id)
                        .join(format!("{}-{akey}", a.name))
                        .join(cell.dir_name(seed));
                    let label = format!("attack {} with {} seed {seed}", arm.label(), cell.label());
                    let fresh = !dir.join("result.json").exists();
                    let r: AttackResult = st.json(&label, &dir.join("result.json"), || {
                        if defended.is_none() {
                            defended = Some(load(&mdir, opts)?);
                        }
                        let base = defended.as_ref().expect("loaded above");
                        let ctx = AttackCtx {
                            arm,
                            spec: a,
                            cell,
                            seed,
                            split: &split,
                            prompts: &judge_prompts,
                            exp,
                            check: &check,
                            clf: &clf,
                            heldout: heldout.as_ref().map(|h| &h.1),
                            before: before.as_ref(),
                        };
                        attack_one(&ctx, base, &dir)
                    })?;
                    // Once its result is written (a kill before leaves them for the rerun),
                    // and only by the invocation that made them.
                    if fresh && !exp.keep_attacked_models {
                        let _ = std::fs::remove_dir_all(dir.join("model"));
                        let _ = std::fs::remove_dir_all(dir.join("adapter"));
                    }
                    attack_results.push(r);
                }
            }
        }
    }

    // 10. The overlap audit: every pair of partitions and the questions they share.
    let audit = overlap_audit(&split, &aligned_dir, clf_dir.as_path(), &pairs_path);

    let names = exp.defence_names();
    let cell_summaries = summarise_cells(&names, &cells, &attack_results, &exp.heldout);
    // Each held-out question's harm categories (the evaluated partition's records).
    let item_categories: Vec<Option<crate::data::HarmCategories>> = heldout
        .as_ref()
        .map(|h| {
            h.0.iter()
                .map(|it| {
                    let p = eval_prompts.iter().find(|p| p.prompt == it.prompt)?;
                    let cats: Vec<crate::data::HarmCategory> =
                        p.categories.iter().filter_map(|c| c.parse().ok()).collect();
                    Some(crate::data::HarmCategories::from_slice(&cats))
                })
                .collect()
        })
        .unwrap_or_default();
    let durability = summarise_durability(exp, &defence_results, &attack_results, &item_categories);
    let results = Results {
        audit,
        durability,
        experiment: exp.clone(),
        out: out.to_path_buf(),
        split_notes: split.notes.clone(),
        align: align_report,
        classifier: clf_report,
        pairs: n_pairs,
        defences: defence_results,
        attacks: attack_results,
        cells: cell_summaries,
        analyses,
        stages: st.list.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        all_stages: std::fs::read_to_string(&st.path)
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str::<StageTime>(l).ok())
                    .collect()
            })
            .unwrap_or_default(),
        environment: crate::train::environment(),
        command: opts.command.clone(),
    };
    write_json_atomic(&out.join("results.json"), &results)?;
    Ok(results)
}

/// Flag every defended model whose XSTest safe-prompt refusal rate exceeds the aligned
/// (undefended) model's by more than `margin`.
pub fn flag_over_refusal(results: &mut [DefenceResult], margin: f64) {
    let Some(aligned) = results
        .iter()
        .find(|d| d.name == "none")
        .and_then(|d| d.overrefusal.clone())
    else {
        return;
    };
    for d in results.iter_mut().filter(|d| d.name != "none") {
        d.over_refuses = d
            .overrefusal
            .as_ref()
            .is_some_and(|o| crate::eval::overrefusal::over_refuses(o, &aligned, margin));
    }
}

pub(super) fn load_classifier(
    dir: &Path,
    label: &HarmfulLabel,
    device: &Device,
) -> Result<Classifier> {
    Classifier::load(dir, label, device)
}

/// What one attack needs besides the model and its directory.
pub(super) struct AttackCtx<'a> {
    arm: &'a Arm,
    spec: &'a AttackSpec,
    cell: &'a Cell,
    seed: u64,
    split: &'a DataSplit,
    /// The prompts the attacked model answers for the judge and the keyword check.
    prompts: &'a [EvalPrompt],
    exp: &'a Experiment,
    check: &'a RefusalCheck,
    clf: &'a Classifier,
    heldout: Option<&'a HeldoutEncoded>,
    /// The defended model's held-out scores (step 0 of the curve).
    before: Option<&'a HeldoutScores>,
}

pub(super) fn attack_one(
    c: &AttackCtx,
    defended: &LoadedModel,
    dir: &Path,
) -> Result<AttackResult> {
    let t0 = Instant::now();
    let exp = c.exp;
    let mut cfg = c.spec.config.clone();
    cfg.test_prompts = 0; // the experiment's own held-out prompts are used
    cfg.train.seed = c.seed;
    // Scored in memory; written only when the experiment keeps attacked models.
    cfg.train.save_model = exp.keep_attacked_models;
    if c.cell.samples > 0 {
        cfg.train.lr = c.cell.lr;
        cfg.samples = c.cell.samples;
    }
    let mut m = defended.deep_clone()?;
    let mut curve: Vec<CurvePoint> = c
        .before
        .map(|b| CurvePoint {
            step: 0,
            scores: b.clone(),
        })
        .into_iter()
        .collect();
    // Every listed step after 0, and the attack's last.
    let mut steps: Vec<usize> = c
        .spec
        .eval_steps
        .iter()
        .copied()
        .filter(|&s| s > 0)
        .collect();
    steps.push(crate::attack::LAST_STEP);
    let batch = exp.heldout.config.batch;
    let rep = match c.heldout {
        Some(enc) if cfg.method != crate::attack::AttackMethod::Abliterate => {
            let mut f = |step: usize, net: &crate::model::llama::Llama| -> Result<()> {
                if curve.iter().all(|p| p.step != step) {
                    let scores = crate::eval::heldout::score(net, enc, batch)?;
                    curve.push(CurvePoint { step, scores });
                }
                Ok(())
            };
            crate::attack::attack_with_probe(
                &mut m,
                &c.split.attack_file,
                &cfg,
                dir,
                0,
                Interrupt::default(),
                Some((&steps, &mut f)),
            )?
        }
        _ => {
            let r = crate::attack::attack(
                &mut m,
                &c.split.attack_file,
                &cfg,
                dir,
                0,
                Interrupt::default(),
            )?;
            if let Some(enc) = c.heldout {
                // Abliteration: one point, after the edit.
                let net = crate::model::llama::Llama::frozen(&m.config, &m.params)?;
                let scores = crate::eval::heldout::score(&net, enc, batch)?;
                curve.push(CurvePoint { step: 1, scores });
            }
            r
        }
    };
    curve.sort_by_key(|p| p.step);
    let (harm, rows) = crate::eval::harmfulness::evaluate_rows(
        &m,
        c.prompts,
        &format!("held-out {} prompts", exp.evaluate_on),
        &exp.eval.harmfulness,
        c.check,
        Some(c.clf),
        &dir.join("harm"),
    )?;
    let l2_from_defended = if Some(&c.seed) == exp.seeds.first() && c.arm.is_first_seed(exp) {
        Some(crate::analysis::l2_by_layer(
            &defended.params,
            &m.params,
            m.config.num_layers,
        )?)
    } else {
        None
    };
    Ok(AttackResult {
        defence: c.arm.defence.clone(),
        defence_seed: c.arm.seed,
        cell: c.cell.clone(),
        seed: c.seed,
        harm: harm.overall,
        judge: rows.iter().map(|r| r.score).collect(),
        refused: rows.iter().map(|r| r.refused).collect(),
        steps: rep.train.as_ref().map(|t| t.steps),
        curve,
        l2_from_defended,
        final_loss: rep
            .train
            .as_ref()
            .and_then(|t| t.final_terms.get("loss").copied()),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// L2 distance from the aligned model, logit lens, PCA and probes of one model.
pub fn analyse(
    name: &str,
    m: &LoadedModel,
    aligned: &LoadedModel,
    pairs: &[crate::data::pairs::Pair],
    an: &AnalysisSpec,
) -> Result<ModelAnalysis> {
    use crate::analysis::{self, Pool};
    let l2 = if name == "none" {
        None
    } else {
        Some(analysis::l2_by_layer(
            &aligned.params,
            &m.params,
            m.config.num_layers,
        )?)
    };
    let samples = analysis::encode_samples(m, pairs, an.format, an.max_len)?;
    let lens = analysis::logit_lens(m, &samples.harmful, 8)?;
    let acts_h = analysis::mean_activations(m, &samples.harmful, None, Pool::Answer, 8)?;
    let acts_s = analysis::mean_activations(m, &samples.harmless, None, Pool::Answer, 8)?;
    let last = acts_h.len() - 1;
    let mut rows = acts_h[last].clone();
    rows.extend(acts_s[last].iter().cloned());
    let pca = analysis::pca(&rows, 2)?;
    let probes = analysis::probes_by_layer(&acts_h, &acts_s, &an.probe_seeds)?;
    Ok(ModelAnalysis {
        defence: name.to_string(),
        l2_from_aligned: l2,
        logit_lens: lens,
        pca,
        pca_harmful: acts_h[last].len(),
        probes,
    })
}
