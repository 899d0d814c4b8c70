//! The data layer (issue 3): typed readers for every dataset the defence, the attacks and the
//! evaluations use, the paper's harm-category groups, seeded disjoint splits, prompt formats with
//! their loss and pair masks, and per-file statistics.
//!
//! - [`source`]: file formats, record locations and typed field access (errors name the file,
//!   line and field).
//! - [`categories`]: BeaverTails' 14 harm categories and the paper's category groups.
//! - [`harmful`]: harmful question/answer data (BeaverTails' published format, prompt/response/label
//!   files).
//! - [`pairs`]: the defence's input, one question with a harmful answer and a refusal.
//! - [`prompts`]: harmful-instruction sets (AdvBench, HarmBench, MaliciousInstruct, Safety-Tuned
//!   LLaMAs) and instruction/refusal training data.
//! - [`toxicity`]: DecodingTrust toxic-continuation data and its refusal version.
//! - [`nlg`]: the trainability tasks (ViGGO, E2E NLG, DART, ConvWeather, CACAPO).
//! - [`mc`]: the stability benchmarks (TruthfulQA, ARC, WinoGrande, MMLU, ETHICS, CrowS-Pairs,
//!   HellaSwag) and their log-likelihood multiple-choice form.
//! - [`xstest`]: XSTest prompts and human-labelled answers (over-refusal, judge calibration).
//! - [`split`]: question normalisation, seeded disjoint splits and overlap reports.
//! - [`encode`]: the plain and chat prompt formats, tokenisation, answer-only and pair masks,
//!   padding and truncation.
//! - [`stats`]: dataset detection and per-file counts (`repnoise data stats`).
//!
//! Nothing is dropped silently: readers return [`Loaded`], whose `skipped` list says which
//! records were left out and why; malformed records are errors.

use std::path::PathBuf;

use serde::Serialize;

pub mod categories;
pub mod encode;
pub mod everyday;
pub mod harmful;
pub mod mc;
pub mod nlg;
pub mod pairs;
pub mod prompts;
pub mod source;
pub mod split;
pub mod stats;
pub mod toxicity;
pub mod xstest;

pub use categories::{GroupMatch, HarmCategories, HarmCategory, HarmGroup};
pub use encode::{
    encode_pair, encode_prompt, encode_qa, pad_to, pair_mask, plain_prompt, plain_text,
    EncodeOptions, Encoded, EncodedPair, PadSide, Padding, PromptFormat,
};
pub use harmful::{read_harmful_qa, HarmfulQa};
pub use pairs::{read_pairs, Pair};
pub use split::{
    normalize_question, report_overlap, split_disjoint, OverlapReport, SplitSpec, Splits,
};
pub use stats::{load_any, stats, AnyDataset, DataStats, DatasetKind};

/// Records read from a file (or derived from other records), with the ones left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    /// Records that were valid input but left out, each with its location and the reason.
    pub skipped: Vec<Skipped>,
}

impl<T> Loaded<T> {
    pub fn new(records: Vec<T>) -> Self {
        Self {
            records,
            skipped: vec![],
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Apply `f` to every record, keeping the skip list.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Loaded<U> {
        Loaded {
            records: self.records.into_iter().map(f).collect(),
            skipped: self.skipped,
        }
    }
}

/// A record that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Where it was, e.g. `line 11777` or `record 3`.
    pub at: String,
    pub reason: String,
}

impl Skipped {
    pub fn new(at: impl ToString, reason: impl Into<String>) -> Self {
        Self {
            at: at.to_string(),
            reason: reason.into(),
        }
    }
}

/// Anything with a question (prompt, instruction, goal) that splits and overlap checks key on.
pub trait HasQuestion {
    fn question(&self) -> &str;
}

/// Anything that may carry BeaverTails harm categories.
pub trait HasCategories {
    /// `None` when the source has no category information.
    fn harm_categories(&self) -> Option<HarmCategories>;
}

/// Keep the records in `group` (matching as `how` says). Records without category information
/// are an error rather than silently dropped: a group filter needs categorised data.
pub fn filter_group<T: HasCategories + Clone>(
    records: &[T],
    group: HarmGroup,
    how: GroupMatch,
) -> crate::Result<Loaded<T>> {
    let mut out = Loaded::new(vec![]);
    for (i, r) in records.iter().enumerate() {
        let cats = r.harm_categories().ok_or_else(|| {
            crate::Error::setting(
                "harm group",
                group,
                format!(
                    "record {} has no harm categories; group filters need data with \
                     BeaverTails categories",
                    i + 1
                ),
            )
        })?;
        if group.matches(cats, how) {
            out.records.push(r.clone());
        } else {
            out.skipped.push(Skipped::new(
                format!("record {}", i + 1),
                format!("not in group {group}"),
            ));
        }
    }
    Ok(out)
}

/// Pairs from any file that carries them: a pairs file (`{prompt, harmful, harmless}`),
/// harmful QA with refusals (BeaverTails-with-refusals, the reference code's format), or
/// DecodingTrust records with refusals. Records that cannot form a pair are skipped with the
/// reason; a file with none is an error.
pub fn load_pairs_any(path: &std::path::Path) -> crate::Result<Loaded<Pair>> {
    use pairs::{pairs_from_harmful_qa, pairs_from_toxicity};
    use stats::{load_any, AnyDataset};
    let (kind, data) = load_any(path)?;
    let pairs = match data {
        AnyDataset::Pairs(l) => l,
        AnyDataset::HarmfulQa(l) => {
            let mut p = pairs_from_harmful_qa(&l.records);
            p.skipped.extend(l.skipped);
            p
        }
        AnyDataset::DecodingTrust(l) => {
            let mut p = pairs_from_toxicity(&l.records);
            p.skipped.extend(l.skipped);
            p
        }
        _ => {
            return Err(crate::Error::file(
                path,
                format!(
                    "read as {kind:?}, which has no pairs; expected {{prompt, harmful, harmless}} \
                     records, harmful QA with refusals, or DecodingTrust with refusals"
                ),
            ))
        }
    };
    if pairs.is_empty() {
        return Err(crate::Error::file(
            path,
            format!(
                "no record forms a pair ({} skipped, e.g. {})",
                pairs.skipped.len(),
                pairs
                    .skipped
                    .first()
                    .map_or("-".into(), |s| format!("{}: {}", s.at, s.reason))
            ),
        ));
    }
    Ok(pairs)
}

/// Where the shipped datasets are: `$REPNOISE_DATA`, else `./data` when it exists, else the
/// source tree's `data/`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REPNOISE_DATA") {
        return PathBuf::from(d);
    }
    let here = PathBuf::from("data");
    if here.join("README.md").exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}
