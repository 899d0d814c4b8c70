//! Dataset detection, loading any supported file, and per-file statistics (`repnoise data
//! stats`): record and skip counts, distinct questions, and counts per split, category and label.
//!
//! Detection uses the extension, then the header (CSV) or the keys of the first record (JSON,
//! JSONL, Parquet); see [`DatasetKind::detect`]. A file that matches nothing is an error that
//! says what was found.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

use super::harmful::{read_harmful_qa, HarmfulQa};
use super::mc::{self, EthicsTask};
use super::nlg::{self, DataToText};
use super::pairs::{read_pairs, Pair};
use super::prompts::{self, HarmfulPrompt, Instruction};
use super::source::{self, FileFormat, TableSpec};
use super::split::normalize_question;
use super::toxicity::{self, ToxicityRecord};
use super::{HasQuestion, Loaded, Skipped};
use crate::{Error, Result};

/// Every kind of file the data layer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// BeaverTails-style or prompt/response/label harmful QA.
    HarmfulQa,
    /// Defence pairs `{prompt, harmful, harmless}`.
    Pairs,
    /// Instruction/output records (Safety-Tuned LLaMAs training).
    Instructions,
    AdvBench,
    HarmBench,
    HarmBenchTargets,
    /// One prompt per line (MaliciousInstruct).
    PromptLines,
    /// `{"instructions": [...]}` (Safety-Tuned LLaMAs evaluation).
    InstructionList,
    DecodingTrust,
    /// `mr,ref` CSV (ViGGO, E2E NLG).
    MrText,
    DartJson,
    /// WebNLG-style XML (DART test, CACAPO).
    WebNlgXml,
    ConvWeather,
    Cacapo,
    TruthfulQa,
    Arc,
    Winogrande,
    Mmlu,
    Ethics(EthicsTask),
    CrowsPairs,
    Hellaswag,
}

impl DatasetKind {
    /// Names accepted by [`FromStr`] (ETHICS as `ethics-<task>`).
    pub const NAMES: &'static [&'static str] = &[
        "harmful-qa",
        "pairs",
        "instructions",
        "advbench",
        "harmbench",
        "harmbench-targets",
        "prompt-lines",
        "instruction-list",
        "decoding-trust",
        "mr-text",
        "dart-json",
        "webnlg-xml",
        "conv-weather",
        "cacapo",
        "truthfulqa",
        "arc",
        "winogrande",
        "mmlu",
        "ethics-commonsense",
        "ethics-deontology",
        "ethics-justice",
        "ethics-utilitarianism",
        "ethics-virtue",
        "crows-pairs",
        "hellaswag",
    ];

    pub fn name(self) -> String {
        match self {
            Self::HarmfulQa => "harmful-qa".into(),
            Self::Pairs => "pairs".into(),
            Self::Instructions => "instructions".into(),
            Self::AdvBench => "advbench".into(),
            Self::HarmBench => "harmbench".into(),
            Self::HarmBenchTargets => "harmbench-targets".into(),
            Self::PromptLines => "prompt-lines".into(),
            Self::InstructionList => "instruction-list".into(),
            Self::DecodingTrust => "decoding-trust".into(),
            Self::MrText => "mr-text".into(),
            Self::DartJson => "dart-json".into(),
            Self::WebNlgXml => "webnlg-xml".into(),
            Self::ConvWeather => "conv-weather".into(),
            Self::Cacapo => "cacapo".into(),
            Self::TruthfulQa => "truthfulqa".into(),
            Self::Arc => "arc".into(),
            Self::Winogrande => "winogrande".into(),
            Self::Mmlu => "mmlu".into(),
            Self::Ethics(t) => format!("ethics-{}", t.name()),
            Self::CrowsPairs => "crows-pairs".into(),
            Self::Hellaswag => "hellaswag".into(),
        }
    }

    /// Detect a file's kind from its extension and content.
    pub fn detect(path: &Path) -> Result<Self> {
        let fmt = FileFormat::from_path(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let kind = match fmt {
            FileFormat::Tsv => Some(Self::ConvWeather),
            FileFormat::Text => Some(Self::PromptLines),
            FileFormat::Xml => Some(if name.contains("cacapo") {
                Self::Cacapo
            } else {
                Self::WebNlgXml
            }),
            FileFormat::Csv => {
                let text = source::read_text(path)?;
                let first = text.lines().next().unwrap_or("");
                let head = source::parse_table(path, first, TableSpec::CSV_NO_HEADER)?
                    .rows
                    .first()
                    .map(|(_, r)| r.iter().map(|h| h.trim().to_string()).collect::<Vec<_>>())
                    .unwrap_or_default();
                let has = |k: &str| head.iter().any(|h| h == k);
                if has("prompt") && has("response") {
                    Some(Self::HarmfulQa)
                } else if has("goal") && has("target") {
                    Some(Self::AdvBench)
                } else if has("Behavior") && has("BehaviorID") {
                    Some(Self::HarmBench)
                } else if has("mr") && has("ref") && !name.contains("cacapo") {
                    Some(Self::MrText)
                } else if has("Question") && has("Best Answer") {
                    Some(Self::TruthfulQa)
                } else if has("sent_more") && has("sent_less") {
                    Some(Self::CrowsPairs)
                } else if name.contains("cacapo") {
                    Some(Self::Cacapo)
                } else {
                    EthicsTask::detect(path, &head).map(Self::Ethics)
                }
            }
            FileFormat::Json | FileFormat::Jsonl | FileFormat::Parquet => {
                let (first, whole_file) = first_json_record(path, fmt)?;
                match &first {
                    Value::Object(o) if whole_file && o.contains_key("instructions") => {
                        Some(Self::InstructionList)
                    }
                    Value::Object(o)
                        if whole_file
                            && !o.is_empty()
                            && o.values().all(Value::is_string)
                            && !o.contains_key("prompt") =>
                    {
                        Some(Self::HarmBenchTargets)
                    }
                    Value::Object(o) => {
                        let has = |k: &str| o.contains_key(k);
                        if has("harmful") && has("harmless") {
                            Some(Self::Pairs)
                        } else if has("continuation") && has("type") {
                            Some(Self::DecodingTrust)
                        } else if has("prompt") && has("response") {
                            Some(Self::HarmfulQa)
                        } else if has("instruction") && has("output") {
                            Some(Self::Instructions)
                        } else if has("query") && has("choices") && has("gold") {
                            Some(Self::Arc)
                        } else if has("context_options") {
                            Some(Self::Winogrande)
                        } else if has("answer_a") && has("correct_answer") {
                            Some(Self::Mmlu)
                        } else if has("endings") {
                            Some(Self::Hellaswag)
                        } else if has("tripleset") {
                            Some(Self::DartJson)
                        } else if nlg::CACAPO_INPUT_KEYS.iter().any(|k| has(k))
                            && nlg::CACAPO_TARGET_KEYS.iter().any(|k| has(k))
                        {
                            Some(Self::Cacapo)
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            }
        };
        kind.ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "cannot tell which dataset this is from its columns or keys; name the kind \
                     explicitly (one of: {})",
                    Self::NAMES.join(", ")
                ),
            )
        })
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let all = [
            Self::HarmfulQa,
            Self::Pairs,
            Self::Instructions,
            Self::AdvBench,
            Self::HarmBench,
            Self::HarmBenchTargets,
            Self::PromptLines,
            Self::InstructionList,
            Self::DecodingTrust,
            Self::MrText,
            Self::DartJson,
            Self::WebNlgXml,
            Self::ConvWeather,
            Self::Cacapo,
            Self::TruthfulQa,
            Self::Arc,
            Self::Winogrande,
            Self::Mmlu,
            Self::CrowsPairs,
            Self::Hellaswag,
        ];
        all.into_iter()
            .chain(EthicsTask::ALL.map(Self::Ethics))
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                Error::setting(
                    "dataset kind",
                    s,
                    format!("expected one of: {}", Self::NAMES.join(", ")),
                )
            })
    }
}

/// The first record of a JSON/JSONL/Parquet file, and whether it is the whole file (a `.json`
/// file holding one object rather than an array of records).
fn first_json_record(path: &Path, fmt: FileFormat) -> Result<(Value, bool)> {
    let mut whole_file = false;
    let v = match fmt {
        FileFormat::Json => match source::json_value(path)? {
            Value::Array(items) => items.into_iter().next(),
            other => {
                whole_file = true;
                Some(other)
            }
        },
        FileFormat::Jsonl => {
            let text = source::read_text(path)?;
            match text.lines().enumerate().find(|(_, l)| !l.trim().is_empty()) {
                Some((i, l)) => Some(serde_json::from_str(l).map_err(|e| {
                    Error::field(
                        path,
                        format!("line {}", i + 1),
                        format!("invalid JSON: {e}"),
                    )
                })?),
                None => None,
            }
        }
        _ => source::parquet_values(path)?
            .into_iter()
            .next()
            .map(|(_, v)| v),
    };
    v.map(|v| (v, whole_file))
        .ok_or_else(|| source::empty(path))
}

/// A loaded file of any kind.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyDataset {
    HarmfulQa(Loaded<HarmfulQa>),
    Pairs(Loaded<Pair>),
    Instructions(Loaded<Instruction>),
    /// AdvBench, HarmBench, MaliciousInstruct, instruction lists.
    Prompts(Loaded<HarmfulPrompt>),
    HarmBenchTargets(BTreeMap<String, String>),
    DecodingTrust(Loaded<ToxicityRecord>),
    /// ViGGO, E2E, DART (one example per reference), CACAPO.
    DataToText(Loaded<DataToText>),
    ConvWeather(Loaded<nlg::WeatherExample>),
    TruthfulQa(Loaded<mc::TruthfulQaItem>),
    Arc(Loaded<mc::ArcItem>),
    Winogrande(Loaded<mc::WinograndeItem>),
    Mmlu(Loaded<mc::MmluItem>),
    Ethics(Loaded<mc::EthicsItem>),
    CrowsPairs(Loaded<mc::CrowsPair>),
    Hellaswag(Loaded<mc::HellaswagItem>),
}

/// Load a file as `kind`.
pub fn load(path: &Path, kind: DatasetKind) -> Result<AnyDataset> {
    use DatasetKind as K;
    let triples = |l: Loaded<nlg::TripleEntry>| Loaded {
        records: nlg::triple_examples(&l.records),
        skipped: l.skipped,
    };
    Ok(match kind {
        K::HarmfulQa => AnyDataset::HarmfulQa(read_harmful_qa(path)?),
        K::Pairs => AnyDataset::Pairs(read_pairs(path)?),
        K::Instructions => AnyDataset::Instructions(prompts::read_instructions(path)?),
        K::AdvBench => AnyDataset::Prompts(prompts::read_advbench(path)?),
        K::HarmBench => AnyDataset::Prompts(prompts::read_harmbench(path)?),
        K::HarmBenchTargets => AnyDataset::HarmBenchTargets(prompts::read_harmbench_targets(path)?),
        K::PromptLines => AnyDataset::Prompts(prompts::read_prompt_lines(path)?),
        K::InstructionList => AnyDataset::Prompts(prompts::read_instruction_list(path)?),
        K::DecodingTrust => AnyDataset::DecodingTrust(toxicity::read_decoding_trust(path)?),
        K::MrText => AnyDataset::DataToText(nlg::read_mr_csv(path)?),
        K::DartJson => AnyDataset::DataToText(triples(nlg::read_dart_json(path)?)),
        K::WebNlgXml => AnyDataset::DataToText(triples(nlg::read_webnlg_xml(path)?)),
        K::ConvWeather => AnyDataset::ConvWeather(nlg::read_conv_weather(path)?),
        K::Cacapo => AnyDataset::DataToText(nlg::read_cacapo(path)?),
        K::TruthfulQa => AnyDataset::TruthfulQa(mc::read_truthfulqa(path)?),
        K::Arc => AnyDataset::Arc(mc::read_arc(path)?),
        K::Winogrande => AnyDataset::Winogrande(mc::read_winogrande(path)?),
        K::Mmlu => AnyDataset::Mmlu(mc::read_mmlu(path)?),
        K::Ethics(t) => AnyDataset::Ethics(mc::read_ethics(path, Some(t))?),
        K::CrowsPairs => AnyDataset::CrowsPairs(mc::read_crows_pairs(path)?),
        K::Hellaswag => AnyDataset::Hellaswag(mc::read_hellaswag(path)?),
    })
}

/// Detect a file's kind and load it.
pub fn load_any(path: &Path) -> Result<(DatasetKind, AnyDataset)> {
    let kind = DatasetKind::detect(path)?;
    Ok((kind, load(path, kind)?))
}

impl AnyDataset {
    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            Self::HarmfulQa(l) => l.len(),
            Self::Pairs(l) => l.len(),
            Self::Instructions(l) => l.len(),
            Self::Prompts(l) => l.len(),
            Self::HarmBenchTargets(m) => m.len(),
            Self::DecodingTrust(l) => l.len(),
            Self::DataToText(l) => l.len(),
            Self::ConvWeather(l) => l.len(),
            Self::TruthfulQa(l) => l.len(),
            Self::Arc(l) => l.len(),
            Self::Winogrande(l) => l.len(),
            Self::Mmlu(l) => l.len(),
            Self::Ethics(l) => l.len(),
            Self::CrowsPairs(l) => l.len(),
            Self::Hellaswag(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records left out while reading.
    pub fn skipped(&self) -> &[Skipped] {
        match self {
            Self::HarmfulQa(l) => &l.skipped,
            Self::Pairs(l) => &l.skipped,
            Self::Instructions(l) => &l.skipped,
            Self::Prompts(l) => &l.skipped,
            Self::HarmBenchTargets(_) => &[],
            Self::DecodingTrust(l) => &l.skipped,
            Self::DataToText(l) => &l.skipped,
            Self::ConvWeather(l) => &l.skipped,
            Self::TruthfulQa(l) => &l.skipped,
            Self::Arc(l) => &l.skipped,
            Self::Winogrande(l) => &l.skipped,
            Self::Mmlu(l) => &l.skipped,
            Self::Ethics(l) => &l.skipped,
            Self::CrowsPairs(l) => &l.skipped,
            Self::Hellaswag(l) => &l.skipped,
        }
    }
}

/// Counts for one file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DataStats {
    pub path: String,
    pub kind: String,
    pub records: usize,
    /// Records left out while reading, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Distinct normalised questions / inputs, where records have one.
    pub unique_questions: Option<usize>,
    /// Records per split: the record's own split field where it has one (DecodingTrust `type`,
    /// TruthfulQA `Type`, HarmBench functional category, ETHICS task), else the split named by the
    /// file name (`train`, `dev`, `test`) or `all`.
    pub splits: BTreeMap<String, usize>,
    /// Records per category (multi-label sets count once per flagged category; `(none)` for an
    /// empty set).
    pub categories: BTreeMap<String, usize>,
    /// Records per label (safe/unsafe, gold index, answer letter, ...).
    pub labels: BTreeMap<String, usize>,
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({})", self.path, self.kind)?;
        writeln!(f, "  records: {}", self.records)?;
        let skipped: usize = self.skipped.values().sum();
        writeln!(f, "  skipped: {skipped}")?;
        for (reason, n) in &self.skipped {
            writeln!(f, "    {n:>7}  {reason}")?;
        }
        if let Some(q) = self.unique_questions {
            writeln!(f, "  distinct questions: {q}")?;
        }
        for (title, map) in [
            ("splits", &self.splits),
            ("categories", &self.categories),
            ("labels", &self.labels),
        ] {
            if map.is_empty() {
                continue;
            }
            writeln!(f, "  {title}:")?;
            for (k, n) in map {
                writeln!(f, "    {n:>7}  {k}")?;
            }
        }
        Ok(())
    }
}

fn count(keys: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_default() += 1;
    }
    m
}

fn unique<T: HasQuestion>(records: &[T]) -> usize {
    records
        .iter()
        .map(|r| normalize_question(r.question()))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// The split a file name suggests: `train`, `dev` (dev/valid/val), `test`, or `all`.
pub fn split_from_name(path: &Path) -> &'static str {
    let name = path
        .file_stem()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let words: Vec<&str> = name.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let any = |ws: &[&str]| words.iter().any(|w| ws.contains(w));
    if any(&["test", "testset"]) {
        "test"
    } else if any(&["dev", "devset", "valid", "val", "validation"]) {
        "dev"
    } else if any(&["train", "training", "trainset"]) {
        "train"
    } else {
        "all"
    }
}

/// Statistics for a file (its kind detected).
pub fn stats(path: &Path) -> Result<DataStats> {
    let (kind, data) = load_any(path)?;
    Ok(stats_of(path, kind, &data))
}

/// Statistics for already-loaded data.
pub fn stats_of(path: &Path, kind: DatasetKind, data: &AnyDataset) -> DataStats {
    let file_split = split_from_name(path).to_string();
    let mut s = DataStats {
        path: path.display().to_string(),
        kind: kind.name(),
        records: data.len(),
        skipped: count(data.skipped().iter().map(|k| k.reason.clone())),
        ..DataStats::default()
    };
    s.splits = BTreeMap::from([(file_split.clone(), data.len())]);
    match data {
        AnyDataset::HarmfulQa(l) => {
            let r = &l.records;
            s.unique_questions = Some(unique(r));
            s.labels = count(
                r.iter()
                    .map(|x| if x.is_safe { "safe" } else { "unsafe" }.to_string()),
            );
            s.categories = count(r.iter().flat_map(|x| category_keys(x.categories)));
        }
        AnyDataset::Pairs(l) => {
            s.unique_questions = Some(unique(&l.records));
            s.categories = count(l.records.iter().flat_map(|x| category_keys(x.categories)));
        }
        AnyDataset::Instructions(l) => s.unique_questions = Some(unique(&l.records)),
        AnyDataset::Prompts(l) => {
            let r = &l.records;
            s.unique_questions = Some(unique(r));
            s.categories = count(r.iter().filter_map(|x| x.category.clone()));
            if r.iter().any(|x| x.functional_category.is_some()) {
                s.splits = count(
                    r.iter()
                        .map(|x| x.functional_category.clone().unwrap_or_default()),
                );
            }
            s.labels = count(r.iter().map(|x| {
                if x.context.is_some() {
                    "with context"
                } else {
                    "no context"
                }
                .to_string()
            }));
        }
        AnyDataset::HarmBenchTargets(_) => {}
        AnyDataset::DecodingTrust(l) => {
            let r = &l.records;
            s.unique_questions = Some(unique(r));
            s.splits = count(r.iter().map(|x| x.kind.clone()));
            s.labels = count(r.iter().map(|x| {
                if x.refusal.is_some() {
                    "with refusal"
                } else {
                    "no refusal"
                }
                .to_string()
            }));
        }
        AnyDataset::DataToText(l) => {
            let r = &l.records;
            s.unique_questions = Some(unique(r));
            s.categories = count(r.iter().filter_map(|x| x.domain.clone()));
        }
        AnyDataset::ConvWeather(l) => s.unique_questions = Some(unique(&l.records)),
        AnyDataset::TruthfulQa(l) => {
            let r = &l.records;
            s.unique_questions = Some(unique(r));
            s.splits = count(
                r.iter()
                    .map(|x| x.kind.clone().unwrap_or_else(|| file_split.clone())),
            );
            s.categories = count(r.iter().filter_map(|x| x.category.clone()));
        }
        AnyDataset::Arc(l) => {
            s.unique_questions = Some(unique(&l.records));
            s.labels = count(l.records.iter().map(|x| format!("gold {}", x.gold)));
        }
        AnyDataset::Winogrande(l) => {
            s.labels = count(l.records.iter().map(|x| format!("gold {}", x.gold)));
        }
        AnyDataset::Mmlu(l) => {
            s.unique_questions = Some(unique(&l.records));
            s.categories = count(l.records.iter().map(|x| x.subject.clone()));
            s.labels = count(
                l.records
                    .iter()
                    .map(|x| ["A", "B", "C", "D"][x.answer].to_string()),
            );
        }
        AnyDataset::Ethics(l) => {
            s.splits = count(l.records.iter().map(|x| x.task().name().to_string()));
            s.labels = count(l.records.iter().map(|x| match x.label() {
                Some(true) => "1".to_string(),
                Some(false) => "0".to_string(),
                None => "pair".to_string(),
            }));
        }
        AnyDataset::CrowsPairs(l) => {
            s.categories = count(l.records.iter().map(|x| x.bias_type.clone()));
            s.labels = count(
                l.records
                    .iter()
                    .map(|x| if x.stereo { "stereo" } else { "antistereo" }.to_string()),
            );
        }
        AnyDataset::Hellaswag(l) => {
            s.categories = count(l.records.iter().map(|x| x.activity_label.clone()));
            s.labels = count(l.records.iter().map(|x| format!("gold {}", x.label)));
        }
    }
    s
}

fn category_keys(c: Option<super::HarmCategories>) -> Vec<String> {
    match c {
        None => vec![],
        Some(set) if set.is_empty() => vec!["(none)".into()],
        Some(set) => set.iter().map(|c| c.name().to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_from_file_names() {
        assert_eq!(split_from_name(Path::new("a/train.csv")), "train");
        assert_eq!(split_from_name(Path::new("devset.csv")), "dev");
        assert_eq!(split_from_name(Path::new("testset_w_refs.csv")), "test");
        assert_eq!(
            split_from_name(Path::new("dart-v1.1.1-full-dev.json")),
            "dev"
        );
        assert_eq!(split_from_name(Path::new("valid.csv")), "dev");
        assert_eq!(split_from_name(Path::new("mmlu.jsonl")), "all");
        assert_eq!(
            split_from_name(Path::new("safety_only_data_Instructions.json")),
            "all"
        );
    }

    #[test]
    fn kinds_round_trip_through_names() {
        for n in DatasetKind::NAMES {
            assert_eq!(n.parse::<DatasetKind>().unwrap().name(), *n);
        }
        assert!("beavertails2".parse::<DatasetKind>().is_err());
    }
}
