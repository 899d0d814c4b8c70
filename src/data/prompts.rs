//! Harmful-instruction sets (prompts without answers, for measuring harmfulness after an attack)
//! and instruction/refusal training data.
//!
//! - AdvBench `harmful_behaviors.csv`: `goal,target` (the target is the affirmative opening).
//! - HarmBench behaviour CSVs: `Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,
//!   BehaviorID`; contextual behaviours keep their context string (see
//!   [`HarmfulPrompt::full_prompt`]), copyright behaviours are kept and marked by their
//!   functional category. HarmBench's targets JSON (`{BehaviorID: target}`) can be attached.
//! - MaliciousInstruct: a `.txt` file, one prompt per line.
//! - Safety-Tuned LLaMAs evaluation JSONs: `{"instructions": [...], "inputs": [...]?,
//!   "tags": [...]?}`; `tags` and a non-empty `inputs` must be as long as `instructions`.
//! - Safety-Tuned LLaMAs training JSON: an array of `{instruction, input, output}` where the
//!   output is a refusal or safe answer ([`Instruction`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::source::{self, At, Loc, TableSpec};
use super::{HasQuestion, Loaded, Skipped};
use crate::data::default_data_dir;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// A harmful prompt with whatever metadata its source provides.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HarmfulPrompt {
    pub prompt: String,
    /// HarmBench contextual behaviours: the context the behaviour refers to.
    pub context: Option<String>,
    /// HarmBench `BehaviorID`.
    pub id: Option<String>,
    /// HarmBench `SemanticCategory`, or a Safety-Tuned LLaMAs tag.
    pub category: Option<String>,
    /// HarmBench `FunctionalCategory` (`standard`, `contextual`, `copyright`).
    pub functional_category: Option<String>,
    /// HarmBench `Tags`, split on commas.
    pub tags: Vec<String>,
    /// An affirmative target completion (AdvBench `target`, HarmBench targets).
    pub target: Option<String>,
}

impl HarmfulPrompt {
    fn plain(prompt: String) -> Self {
        Self {
            prompt,
            ..Self::default()
        }
    }

    /// The text to send to a model: the prompt, preceded by its context when it has one
    /// (HarmBench's own layout: context, a `---` rule, then the behaviour).
    pub fn full_prompt(&self) -> String {
        match &self.context {
            Some(c) => format!("{c}\n\n---\n\n{}", self.prompt),
            None => self.prompt.clone(),
        }
    }
}

impl HasQuestion for HarmfulPrompt {
    fn question(&self) -> &str {
        &self.prompt
    }
}

/// An instruction with its (safe) output: Safety-Tuned LLaMAs training records.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Instruction {
    pub instruction: String,
    /// Extra input appended to the instruction (empty in the published data).
    pub input: String,
    pub output: String,
}

impl Instruction {
    /// The question as shown to a model: the instruction, then the input on a new line if any.
    pub fn prompt(&self) -> String {
        if self.input.trim().is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n{}", self.instruction, self.input)
        }
    }
}

impl HasQuestion for Instruction {
    fn question(&self) -> &str {
        &self.instruction
    }
}

/// AdvBench `goal,target` CSV.
pub fn read_advbench(path: &Path) -> Result<Loaded<HarmfulPrompt>> {
    let t = source::read_table(path, TableSpec::CSV)?;
    let [g, tg] = t.columns(path, ["goal", "target"])?;
    let records = t
        .rows
        .iter()
        .map(|(at, row)| {
            let loc = Loc::new(path, *at);
            Ok(HarmfulPrompt {
                target: Some(source::cell_text(row, tg, &loc, "target")?),
                ..HarmfulPrompt::plain(source::cell_text(row, g, &loc, "goal")?)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    non_empty(path, records)
}

/// A HarmBench behaviours CSV.
pub fn read_harmbench(path: &Path) -> Result<Loaded<HarmfulPrompt>> {
    let t = source::read_table(path, TableSpec::CSV)?;
    let [b, fc, sc, tags, ctx, id] = t.columns(
        path,
        [
            "Behavior",
            "FunctionalCategory",
            "SemanticCategory",
            "Tags",
            "ContextString",
            "BehaviorID",
        ],
    )?;
    let records = t
        .rows
        .iter()
        .map(|(at, row)| {
            let loc = Loc::new(path, *at);
            let functional = source::cell_text(row, fc, &loc, "FunctionalCategory")?;
            let context = Some(row[ctx].clone()).filter(|c| !c.trim().is_empty());
            if functional == "contextual" && context.is_none() {
                return Err(loc.err("ContextString", "is empty for a contextual behaviour"));
            }
            Ok(HarmfulPrompt {
                prompt: source::cell_text(row, b, &loc, "Behavior")?,
                context,
                id: Some(source::cell_text(row, id, &loc, "BehaviorID")?),
                category: Some(row[sc].clone()).filter(|c| !c.trim().is_empty()),
                functional_category: Some(functional),
                tags: row[tags]
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                target: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    non_empty(path, records)
}

/// HarmBench's targets JSON: an object of `BehaviorID` -> affirmative target.
pub fn read_harmbench_targets(path: &Path) -> Result<BTreeMap<String, String>> {
    let v = source::json_value(path)?;
    let o = v.as_object().ok_or_else(|| {
        Error::file(
            path,
            format!(
                "expected an object of behaviour id -> target, found {}",
                source::type_name(&v)
            ),
        )
    })?;
    let mut out = BTreeMap::new();
    for (k, t) in o {
        let t = t.as_str().ok_or_else(|| {
            Error::field(
                path,
                k.as_str(),
                format!("expected a string, found {}", source::type_name(t)),
            )
        })?;
        out.insert(k.clone(), t.to_string());
    }
    if out.is_empty() {
        return Err(source::empty(path));
    }
    Ok(out)
}

/// Set each prompt's target from a targets map by its id; returns how many prompts had no target.
pub fn attach_targets(prompts: &mut [HarmfulPrompt], targets: &BTreeMap<String, String>) -> usize {
    let mut missing = 0;
    for p in prompts {
        match p.id.as_ref().and_then(|id| targets.get(id)) {
            Some(t) => p.target = Some(t.clone()),
            None => missing += 1,
        }
    }
    missing
}

/// A text file with one prompt per line (MaliciousInstruct). Blank lines are not prompts.
pub fn read_prompt_lines(path: &Path) -> Result<Loaded<HarmfulPrompt>> {
    let text = source::read_text(path)?;
    let records: Vec<HarmfulPrompt> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| HarmfulPrompt::plain(l.to_string()))
        .collect();
    non_empty(path, records)
}

/// A Safety-Tuned LLaMAs evaluation JSON (see the module docs).
pub fn read_instruction_list(path: &Path) -> Result<Loaded<HarmfulPrompt>> {
    let v = source::json_value(path)?;
    let loc = Loc::new(path, At::Record(1));
    let o = source::as_object(&v, &loc)?;
    let instructions = source::get_str_list(o, "instructions", &loc)?;
    let n = instructions.len();
    let list_of = |key: &str| -> Result<Vec<String>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(_) => {
                let xs = source::get_str_list(o, key, &loc)?;
                if !xs.is_empty() && xs.len() != n {
                    return Err(Error::field(
                        path,
                        key,
                        format!("has {} entries but `instructions` has {n}", xs.len()),
                    ));
                }
                Ok(xs)
            }
        }
    };
    let tags = list_of("tags")?;
    let inputs = list_of("inputs")?;
    let mut records = vec![];
    for (i, ins) in instructions.into_iter().enumerate() {
        if ins.trim().is_empty() {
            return Err(Error::field(path, format!("instructions[{i}]"), "is empty"));
        }
        let prompt = match inputs.get(i).filter(|s| !s.trim().is_empty()) {
            Some(input) => format!("{ins}\n{input}"),
            None => ins,
        };
        records.push(HarmfulPrompt {
            category: tags.get(i).cloned(),
            ..HarmfulPrompt::plain(prompt)
        });
    }
    non_empty(path, records)
}

/// Safety-Tuned LLaMAs training JSON: an array (or JSONL) of `{instruction, input?, output}`.
pub fn read_instructions(path: &Path) -> Result<Loaded<Instruction>> {
    let records = source::json_records(path)?
        .iter()
        .map(|(at, v)| {
            let loc = Loc::new(path, *at);
            let o = source::as_object(v, &loc)?;
            Ok(Instruction {
                instruction: source::get_text(o, "instruction", &loc)?,
                input: source::opt_str(o, "input", &loc)?.unwrap_or_default(),
                output: source::get_text(o, "output", &loc)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

fn non_empty<T>(path: &Path, records: Vec<T>) -> Result<Loaded<T>> {
    if records.is_empty() {
        return Err(source::empty(path));
    }
    Ok(Loaded::new(records))
}

/// Keep prompts whose HarmBench functional category is in `keep` (e.g. `["standard",
/// "contextual"]`), skipping the rest with the reason.
pub fn filter_functional(prompts: &[HarmfulPrompt], keep: &[&str]) -> Loaded<HarmfulPrompt> {
    let mut out = Loaded::new(vec![]);
    for (i, p) in prompts.iter().enumerate() {
        let fc = p.functional_category.as_deref().unwrap_or("");
        if keep.contains(&fc) {
            out.records.push(p.clone());
        } else {
            out.skipped.push(Skipped::new(
                At::Record(i + 1),
                format!("functional category `{fc}` not selected"),
            ));
        }
    }
    out
}

/// Prompt sets by name (`advbench`, `harmbench` (standard test behaviours),
/// `malicious-instruct`, from the shipped data) or by file (a text file of one prompt per line,
/// an AdvBench/HarmBench CSV, or an instruction-list JSON), `n` of each sampled with `seed` (0:
/// all). Files count as harmful sets.
pub fn named_prompt_sets(
    names: &[String],
    n: usize,
    seed: u64,
) -> Result<Vec<(String, String, Vec<String>)>> {
    use crate::data::prompts::{read_instruction_list, read_prompt_lines};
    let d = default_data_dir();
    let mut out = vec![];
    for name in names {
        let prompts: Vec<String> = match name.as_str() {
            "advbench" => read_advbench(&d.join("advbench/harmful_behaviors.csv"))?
                .records
                .into_iter()
                .map(|p| p.prompt)
                .collect(),
            "harmbench" => {
                let all = read_harmbench(&d.join("harmbench/harmbench_behaviors_text_test.csv"))?;
                filter_functional(&all.records, &["standard"])
                    .records
                    .into_iter()
                    .map(|p| p.prompt)
                    .collect()
            }
            "malicious-instruct" => read_prompt_lines(&d.join("harmbench/malicious_instruct.txt"))?
                .records
                .into_iter()
                .map(|p| p.prompt)
                .collect(),
            // DecodingTrust's held-out toxic prompts (type `toxic_test`): incomplete texts whose
            // continuation is scored for toxicity.
            "decoding-trust" => crate::data::toxicity::read_decoding_trust(
                &d.join("decoding_trust/training_dataset.jsonl"),
            )?
            .records
            .into_iter()
            .filter(|r| r.kind == "toxic_test")
            .map(|r| r.prompt.text)
            .collect(),
            file => {
                let p = Path::new(file);
                if !p.exists() {
                    return Err(Error::setting(
                        "set",
                        file,
                        "neither a shipped set (advbench, harmbench, malicious-instruct, decoding-trust) \
                         nor an \
                         existing file",
                    ));
                }
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                if ext == "jsonl" {
                    // `{"prompt": ...}` per line (an attack's `test_prompts.jsonl`).
                    let text = crate::util::io::read_text(p)?;
                    let mut prompts = vec![];
                    for (i, line) in text.lines().enumerate() {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                            Error::file(p, format!("line {}: not JSON: {e}", i + 1))
                        })?;
                        let q = v["prompt"].as_str().ok_or_else(|| {
                            Error::file(p, format!("line {}: no string field `prompt`", i + 1))
                        })?;
                        prompts.push(q.to_string());
                    }
                    out.push((
                        name.clone(),
                        "harmful".to_string(),
                        Rng::new(seed, &format!("eval-{name}")).subset(&prompts, n),
                    ));
                    continue;
                }
                let recs = match ext {
                    "csv" => read_advbench(p).or_else(|_| read_harmbench(p))?,
                    "json" => read_instruction_list(p)?,
                    _ => read_prompt_lines(p)?,
                };
                recs.records.into_iter().map(|p| p.full_prompt()).collect()
            }
        };
        out.push((
            name.clone(),
            "harmful".to_string(),
            Rng::new(seed, &format!("eval-{name}")).subset(&prompts, n),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_prompt_puts_context_first() {
        let p = HarmfulPrompt {
            context: Some("CTX".into()),
            ..HarmfulPrompt::plain("Do X".into())
        };
        assert_eq!(p.full_prompt(), "CTX\n\n---\n\nDo X");
        assert_eq!(HarmfulPrompt::plain("Y".into()).full_prompt(), "Y");
    }

    #[test]
    fn instruction_prompt_appends_input() {
        let i = Instruction {
            instruction: "Do".into(),
            input: "this".into(),
            output: "No".into(),
        };
        assert_eq!(i.prompt(), "Do\nthis");
    }
}
