//! The experiment's data: its partitions (test, validation, defence, attack), disjoint by normalised
//! question, and the defence pairs a `withhold` leaves out.

use super::*;

/// The key of an experiment's split: every setting that moves a partition (the partitions are
/// taken in one seeded order, so a larger validation partition moves the defence and attack ones).
pub(super) fn split_key(exp: &Experiment) -> String {
    let mut v = json!({"data": exp.data, "seed": exp.split_seed,
        "test": exp.test_prompts, "validation": exp.validation_prompts,
        "defence": exp.pairs.questions, "group": exp.pairs.group,
        "attack": exp.attack_questions});
    // Only when set, so that the keys of earlier runs stay as they were.
    if !exp.keep_repeats.is_empty() {
        let mut k = exp.keep_repeats.clone();
        k.sort();
        v["keep_repeats"] = json!(k);
    }
    key_of(&v)
}

/// The defence pairs without the questions of harm-category group `group` (by primary category:
/// a pair's own categories where its file has them, else those of its question and answer's
/// record in the experiment's data), written once beside the pairs file: a defence's
/// `withhold`. Returns the file and its key.
pub(super) fn withheld_pairs(
    exp: &Experiment,
    pairs: &Path,
    pairs_key: &str,
    group: &str,
    out: &Path,
) -> Result<(PathBuf, String)> {
    let g: crate::data::HarmGroup = group.parse()?;
    let data = data_path(exp);
    // Generated pairs' key already names the data (through the split); a given file's does not.
    let key = match &exp.pairs.file {
        None => key_of(&json!({"pairs": pairs_key, "withhold": group})),
        Some(_) => key_of(&json!({"pairs": pairs_key, "withhold": group, "data": data})),
    };
    let path = out.join(format!("pairs-{key}.jsonl"));
    if path.exists() {
        return Ok((path, key));
    }
    let loaded = crate::data::load_pairs_any(pairs)?;
    let mut cats: Option<HashMap<(String, String), crate::data::HarmCategories>> = None;
    let (mut kept, mut left) = (vec![], 0usize);
    for (i, p) in loaded.records.iter().enumerate() {
        let c = match p.categories {
            Some(c) => c,
            None => {
                if cats.is_none() {
                    cats = Some(
                        read_harmful_qa(&data)?
                            .records
                            .into_iter()
                            .filter_map(|r| Some(((r.prompt, r.response), r.categories?)))
                            .collect(),
                    );
                }
                let q = (p.prompt.clone(), p.harmful.clone());
                *cats.as_ref().and_then(|m| m.get(&q)).ok_or_else(|| {
                    Error::file(
                        pairs,
                        format!(
                            "pair {}: the question {:?} with this answer has no harm categories, \
                             in the pair or in {} (a defence's `withhold` needs them)",
                            i + 1,
                            q.0,
                            data.display()
                        ),
                    )
                })?
            }
        };
        if g.matches(c, crate::data::GroupMatch::Primary) {
            left += 1;
        } else {
            let mut v = json!({"prompt": p.prompt, "harmful": p.harmful, "harmless": p.harmless});
            if let Some(c) = p.categories {
                v["category"] = json!(c);
            }
            kept.push(v);
        }
    }
    if kept.is_empty() {
        return Err(Error::file(
            pairs,
            format!("withhold = {group:?} leaves no defence pair ({left} withheld)"),
        ));
    }
    eprintln!(
        "  defence pairs without group {group}: {} kept, {left} withheld",
        kept.len()
    );
    crate::util::io::write_jsonl_atomic(&path, &kept)?;
    Ok((path, key))
}

/// The partitions of the harmful data, in memory: test prompts, validation prompts, defence
/// questions and attack questions, disjoint by normalised question (see [`split_data`]).
pub struct Partitions {
    pub test: Vec<HarmfulQa>,
    pub validation: Vec<HarmfulQa>,
    pub defence: Vec<HarmfulQa>,
    pub attack: Vec<HarmfulQa>,
    pub notes: Vec<String>,
}

/// The harmful data file an experiment reads (its `data`, else the shipped subset).
pub fn data_path(exp: &Experiment) -> PathBuf {
    exp.data
        .clone()
        .unwrap_or_else(crate::attack::default_attack_data)
}

/// Split the experiment's harmful data (nothing is written): [`split_data`] and `--check`.
pub fn partitions(exp: &Experiment) -> Result<Partitions> {
    let path = data_path(exp);
    if !path.exists() {
        return Err(Error::file(
            &path,
            "the experiment's harmful data file (`data`) does not exist (docs/REPNOISE.md, \
             \"Running the paper's configurations\", says where the paper's data comes from)",
        ));
    }
    let loaded = read_harmful_qa(&path)?;
    let mut notes = vec![];
    let total = loaded.records.len();
    let harmful: Vec<HarmfulQa> = loaded.records.into_iter().filter(|r| !r.is_safe).collect();
    notes.push(format!(
        "{}: {total} records ({} skipped), {} with unsafe answers",
        path.display(),
        loaded.skipped.len(),
        harmful.len()
    ));
    let repeats = |p: &str| exp.keep_repeats.iter().any(|k| k == p);
    let splits = split_disjoint(
        &harmful,
        &[
            SplitSpec::count("test", exp.test_prompts),
            SplitSpec::count("validation", exp.validation_prompts),
            SplitSpec::count("defence", exp.pairs.questions).with_repeats(repeats("defence")),
            match exp.attack_questions {
                0 => SplitSpec::rest("attack"),
                n => SplitSpec::count("attack", n),
            }
            .with_repeats(repeats("attack")),
        ],
        Duplicates::KeepFirst,
        exp.split_seed,
    )
    .map_err(|e| Error::file(&path, e.to_string()))?;
    let get = |n: &str| splits.get(n).unwrap_or_default().to_vec();
    let (test, validation) = (get("test"), get("validation"));
    let (mut defence, attack) = (get("defence"), get("attack"));
    if let Some(g) = &exp.pairs.group {
        let group: crate::data::HarmGroup = g.parse()?;
        let f = crate::data::filter_group(&defence, group, crate::data::GroupMatch::Primary)?;
        notes.push(format!(
            "defence questions of group {g}: {} kept, {} in other categories left out",
            f.records.len(),
            f.skipped.len()
        ));
        defence = f.records;
    }
    if test.len() < exp.test_prompts
        || validation.len() < exp.validation_prompts
        || (exp.pairs.group.is_none() && defence.len() < exp.pairs.questions)
        || attack.len() < exp.attack_questions
    {
        return Err(Error::file(
            &path,
            format!(
                "too few harmful questions (records, in a partition that keeps repeats): {} \
                 test, {} validation, {} defence and {} attack asked (test_prompts, validation_prompts, pairs.questions, \
                 attack_questions), {}, {}, {} and {} available",
                exp.test_prompts,
                exp.validation_prompts,
                exp.pairs.questions,
                exp.attack_questions,
                test.len(),
                validation.len(),
                defence.len(),
                attack.len()
            ),
        ));
    }
    let need = exp.largest_attack();
    if attack.len() < need {
        notes.push(format!(
            "{} attack records left for up to {need} samples: the larger attacks use all",
            attack.len()
        ));
    }
    notes.push(format!(
        "{} held-out test prompts, {} validation prompts, {} defence {}, {} attack {} \
         (disjoint by question; {} repeated records dropped)",
        test.len(),
        validation.len(),
        defence.len(),
        if repeats("defence") {
            format!("records ({} questions)", distinct_questions(&defence))
        } else {
            "questions".into()
        },
        attack.len(),
        if repeats("attack") {
            format!("records ({} questions)", distinct_questions(&attack))
        } else {
            "questions".into()
        },
        splits.duplicates_dropped
    ));
    Ok(Partitions {
        test,
        validation,
        defence,
        attack,
        notes,
    })
}

/// The split of the harmful data into test prompts, validation prompts, defence questions and
/// attack questions, disjoint by normalised question; the attack's records are written to a file
/// of their own. `key` names the attack file (`OUT/data/attack-<key>.jsonl`), so splits of other
/// settings never share it.
pub fn split_data(exp: &Experiment, out: &Path, key: &str) -> Result<DataSplit> {
    let Partitions {
        test,
        validation,
        defence,
        attack,
        notes,
    } = partitions(exp)?;
    let attack_file = out.join("data").join(format!("attack-{key}.jsonl"));
    std::fs::create_dir_all(out.join("data"))
        .map_err(|e| Error::file(out, format!("cannot create data directory: {e}")))?;
    let rows: Vec<Value> = attack
        .iter()
        .map(|r| {
            // The categories go along, so that an attack can train on one group of them.
            let mut v = json!({"prompt": r.prompt, "response": r.response, "is_safe": false});
            if let Some(c) = r.categories {
                v["category"] = json!(c);
            }
            v
        })
        .collect();
    crate::util::io::write_jsonl_atomic(&attack_file, &rows)?;
    let cats = |r: &HarmfulQa| -> Vec<String> {
        r.categories
            .map(|c| c.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default()
    };
    let prompts = |rs: &[HarmfulQa]| -> Vec<EvalPrompt> {
        rs.iter()
            .map(|r| EvalPrompt {
                prompt: r.prompt.clone(),
                categories: cats(r),
            })
            .collect()
    };
    let answers =
        |rs: &[HarmfulQa]| -> Vec<String> { rs.iter().map(|r| r.response.clone()).collect() };
    Ok(DataSplit {
        test: prompts(&test),
        test_answers: answers(&test),
        validation: prompts(&validation),
        validation_answers: answers(&validation),
        defence: defence
            .iter()
            .map(|r| (r.prompt.clone(), r.response.clone()))
            .collect(),
        attack_file,
        attack_records: attack.len(),
        notes,
    })
}

pub(super) fn distinct_questions(rs: &[HarmfulQa]) -> usize {
    rs.iter()
        .map(|r| crate::data::split::normalize_question(&r.prompt))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}
