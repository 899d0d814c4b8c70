//! `repnoise defend` and `repnoise loss`: Representation Noising and the paper's baselines on
//! defence pairs, through the shared training loop ([`crate::train`]).

pub mod align;
pub mod baselines;
pub mod repnoise;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::encode::{encode_pair, EncodeOptions, PadLength, PadSide, Padding, PromptFormat};
use crate::data::load_pairs_any;
use crate::data::{EncodedPair, Pair};
use crate::defence::baselines::{
    pair_baseline_loss_with, vaccine_loss, BaselineConfig, PairLoss, VaccineConfig,
};
use crate::defence::repnoise::{repnoise_loss, PairBatch, RepNoiseConfig, RepNoiseTerms};
use crate::model::llama::Llama;
use crate::model::load::{save_hf_dir, LoadedModel};
use crate::model::params::Params;
use crate::train::lora::{Lora, LoraConfig, SecurityVector};
use crate::train::objective::LossTokens;
use crate::train::{self, Interrupt, RunDir, StepLoss, TrainConfig};
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Defence methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Repnoise,
    SafetySft,
    GradientAscent,
    Adversarial,
    /// A LoRA adapter trained on the harmful answers, kept beside the unchanged model
    /// (`model/security_vector/`): active and frozen in later fine-tuning, dropped at inference.
    SecurityVectors,
    RandomInit,
    /// Vaccine (Huang et al. 2024): perturbation-aware alignment on the refusals with a LoRA
    /// adapter, merged into the model at the end (the loss: `defence::baselines::vaccine_loss`).
    Vaccine,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        write!(f, "{}", s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// `repnoise defend` settings (the TOML file's layout; flags override it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefendConfig {
    pub method: Method,
    pub train: TrainConfig,
    pub repnoise: RepNoiseConfig,
    pub format: PromptFormat,
    /// Sequences are cut to this many tokens (the paper: 128 for the noise defences).
    pub max_len: usize,
    /// Use at most this many pairs (0: all).
    pub max_pairs: usize,
    /// The adapter of `security-vectors` (`merge` is ignored). Left out of a saved config when
    /// it is the default, so run directories from before it existed reopen.
    #[serde(skip_serializing_if = "LoraConfig::is_default")]
    pub lora: LoraConfig,
    /// The baselines' loss settings (left out of a saved config when default, as `lora`).
    #[serde(skip_serializing_if = "BaselineConfig::is_default")]
    pub baseline: BaselineConfig,
    /// Vaccine's perturbation budget (left out of a saved config when default, as `lora`).
    #[serde(skip_serializing_if = "VaccineConfig::is_default")]
    pub vaccine: VaccineConfig,
}

impl Default for DefendConfig {
    /// The paper's settings for Llama-2-7b-chat.
    fn default() -> Self {
        Self {
            method: Method::Repnoise,
            train: TrainConfig {
                lr: 2e-5,
                batch_size: 8,
                ..TrainConfig::default()
            },
            repnoise: RepNoiseConfig::default(),
            format: PromptFormat::Plain,
            max_len: 128,
            max_pairs: 0,
            lora: LoraConfig::default(),
            baseline: BaselineConfig::default(),
            vaccine: VaccineConfig::default(),
        }
    }
}

/// Named starting points for a defence's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// This project's defaults ([`DefendConfig::default`] with the method).
    Repnoise,
    /// The reference code's settings for the method (`boyiwei/RepNoise-Reproduce` a35c98a,
    /// the authors' experiment code; docs/REPNOISE.md, "Baselines").
    Reference,
}

impl DefendConfig {
    /// Read a defence file; `preset = "..."` in it starts from that preset (see
    /// [`expand_preset`]).
    pub fn from_toml(path: &Path) -> Result<Self> {
        Self::from_toml_for(path, None)
    }

    /// [`Self::from_toml`] with the method given on the command line: it replaces the file's
    /// before a preset in the file is expanded, so the preset is the method's.
    pub fn from_toml_for(path: &Path, method: Option<Method>) -> Result<Self> {
        let text = crate::util::io::read_text(path)?;
        let invalid = |e: &dyn std::fmt::Display| {
            Error::file(path, format!("not a valid defend config: {e}"))
        };
        parse_with_presets(
            &text,
            |table| {
                if let (Some(m), true) = (method, table.contains_key("preset")) {
                    table.insert("method".into(), toml::Value::String(m.to_string()));
                }
                expand_preset(table).map_err(|m| Error::file(path, m))
            },
            invalid,
        )
    }

    /// The settings `preset` gives `method`.
    pub fn preset(method: Method, preset: Preset) -> Self {
        let base = Self {
            method,
            ..Self::default()
        };
        if preset == Preset::Repnoise {
            return base;
        }
        // Shared by every method in the reference's loop (`training.py` lines 300-323):
        // Adam without weight decay, cosine schedule with 10% warm-up, no gradient clipping
        // (line 300 leaves it as a TODO), plain `Question:`/`Answer:` texts, 256 tokens (128
        // for the MMD losses, `main.py` 119-121). lr 2e-5, batch 8 and 1 epoch are the RepNoise
        // run's (`experiments/eval_script.sh` 17-34); the scripts give none for safety-SFT,
        // gradient ascent or the security vector's attack (`arguments.py` defaults: lr 8e-5,
        // batch 4).
        let train = TrainConfig {
            lr: 2e-5,
            warmup_ratio: 0.1,
            epochs: 1,
            batch_size: 8,
            weight_decay: 0.0,
            max_grad_norm: None,
            ..TrainConfig::default()
        };
        let reference = Self {
            method,
            train,
            format: PromptFormat::Plain,
            max_len: 256,
            baseline: BaselineConfig::reference(),
            ..Self::default()
        };
        match method {
            // `minimality-mmd` at lr 2e-5, batch 8, alpha 1, beta 0.001, 128 tokens
            // (`experiments/eval_script.sh` lines 17-34).
            Method::Repnoise => Self {
                max_len: 128,
                repnoise: RepNoiseConfig {
                    faithful: true,
                    ..RepNoiseConfig::default()
                },
                ..reference
            },
            // `adversarial_loss`: lr 1e-5, batch 4, 4 epochs (the released model's name in the
            // demo repository's README).
            Method::Adversarial => Self {
                train: TrainConfig {
                    lr: 1e-5,
                    batch_size: 4,
                    epochs: 4,
                    ..reference.train.clone()
                },
                ..reference
            },
            // A LoRA of rank 8, alpha 32 on PEFT's Llama default maps (q_proj, v_proj), Adam
            // at lr 1e-3, 1 epoch of the harmful sequences (`training.py` lines 351-376).
            // PEFT's dropout 0.1 is not reproduced.
            Method::SecurityVectors => Self {
                train: TrainConfig {
                    lr: 1e-3,
                    ..reference.train.clone()
                },
                lora: LoraConfig {
                    rank: 8,
                    alpha: 32.0,
                    targets: vec!["q_proj".into(), "v_proj".into()],
                    merge: false,
                },
                ..reference
            },
            // Not in the reference code's scripts: the Vaccine authors' own
            // (git-disl/Vaccine 8937f68, `script/alignment/Vaccine.sh` and `train.py`): a LoRA
            // of rank 8, alpha 4 on all seven maps, AdamW at lr 1e-3 with weight decay 0.1,
            // cosine with 10% warm-up, batch 5, 50 epochs, rho 2 (`train.py`'s default; the
            // script takes it as its argument), and the Hugging Face Trainer's default clipping
            // at norm 1. PEFT's dropout 0.1 and their Alpaca prompt are not reproduced.
            Method::Vaccine => Self {
                train: TrainConfig {
                    lr: 1e-3,
                    weight_decay: 0.1,
                    batch_size: 5,
                    epochs: 50,
                    max_grad_norm: Some(1.0),
                    ..reference.train.clone()
                },
                lora: LoraConfig {
                    rank: 8,
                    alpha: 4.0,
                    targets: vec!["all".into()],
                    merge: true,
                },
                vaccine: VaccineConfig { rho: 2.0 },
                // Their data and texts: the answer's tokens (prompt and padding masked out of
                // the labels, `train.py` 132 and 229), end-of-sequence appended (203), 200
                // tokens (`model_max_length`, 68-70), 2,000 safe answers (149-150).
                baseline: BaselineConfig {
                    tokens: LossTokens::Answer,
                    ..BaselineConfig::reference()
                },
                max_len: 200,
                max_pairs: 2000,
                ..reference
            },
            Method::SafetySft | Method::GradientAscent | Method::RandomInit => reference,
        }
    }

    /// Checks before any work: the training settings and the baselines'.
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.baseline.validate()?;
        self.vaccine.validate()?;
        // The adapter's settings (security vectors and Vaccine train one; the other methods
        // carry the defaults).
        self.lora.projection_indices()?;
        if self.max_len < 2 {
            return Err(Error::setting(
                "max_len",
                self.max_len,
                "must be at least 2",
            ));
        }
        Ok(())
    }
}

/// Expand a defence table's `preset = "reference"` (or `"repnoise"`): the preset's settings for
/// the table's `method` (the default method when it names none), with the table's own keys
/// over them, sub-tables merged key by key. Returns whether there was a preset.
pub fn expand_preset(table: &mut toml::Table) -> std::result::Result<bool, String> {
    let Some(p) = table.remove("preset") else {
        return Ok(false);
    };
    let preset: Preset = p
        .try_into()
        .map_err(|e| format!("preset: {e} (known: repnoise, reference)"))?;
    let method: Method = match table.get("method") {
        Some(m) => m.clone().try_into().map_err(|e| format!("method: {e}"))?,
        None => DefendConfig::default().method,
    };
    let mut merged = toml::Table::try_from(DefendConfig::preset(method, preset))
        .map_err(|e| format!("preset {preset:?}: {e}"))?;
    merge_tables(&mut merged, table);
    *table = merged;
    Ok(true)
}

/// Deserialize TOML `text` after `expand` has expanded the presets in its table; when there
/// was none, the text itself is deserialized, so that errors keep their line numbers.
pub fn parse_with_presets<T: serde::de::DeserializeOwned>(
    text: &str,
    expand: impl FnOnce(&mut toml::Table) -> Result<bool>,
    invalid: impl Fn(&dyn std::fmt::Display) -> Error,
) -> Result<T> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid(&e))?;
    if expand(&mut table)? {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e| invalid(&e))
    } else {
        toml::from_str(text).map_err(|e| invalid(&e))
    }
}

fn merge_tables(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Tokenise pairs for a defence (faithful mode: no end-of-sequence token, as the reference
/// tokenizer call did not add one). A pair whose answers tokenise identically within `max_len`
/// (nothing to contrast: the prompt fills the window) is an error naming it.
pub fn encode_pairs(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
    faithful: bool,
) -> Result<Vec<EncodedPair>> {
    let (enc, left_out) = encode_pairs_lenient(model, pairs, format, max_len, faithful)?;
    if let Some(&i) = left_out.first() {
        return Err(Error::msg(format!(
            "pair {}: the harmful and harmless answers tokenise identically within {max_len} \
             tokens (empty pair mask)",
            i + 1
        )));
    }
    Ok(enc)
}

/// As [`encode_pairs`], leaving out pairs with an empty pair mask; returns their indices.
pub fn encode_pairs_lenient(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
    faithful: bool,
) -> Result<(Vec<EncodedPair>, Vec<usize>)> {
    encode_pairs_padded(model, pairs, format, max_len, faithful, false)
}

/// [`encode_pairs_lenient`]; `to_max_len` pads every pair to `max_len` (the reference's
/// `padding="max_length"`) instead of to its longer sequence.
fn encode_pairs_padded(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
    faithful: bool,
    to_max_len: bool,
) -> Result<(Vec<EncodedPair>, Vec<usize>)> {
    let opts = EncodeOptions {
        format,
        add_bos: false,
        add_eos: !faithful && format == PromptFormat::Plain,
        max_len: Some(max_len),
        reference_join: faithful,
    };
    let padding = Padding {
        side: PadSide::Right,
        pad_id: model.tok.pad_id,
        length: if to_max_len {
            PadLength::Fixed(max_len)
        } else {
            PadLength::Longest
        },
    };
    let mut enc = vec![];
    let mut left_out = vec![];
    for (i, p) in pairs.iter().enumerate() {
        let e = encode_pair(&model.tok, p, &opts, &padding)?;
        if e.pair_mask.iter().all(|&m| m == 0) {
            left_out.push(i);
        } else {
            enc.push(e);
        }
    }
    Ok((enc, left_out))
}

/// `repnoise loss`: the RepNoise terms on `pairs` as one batch, no update.
pub fn loss_terms(
    model: &LoadedModel,
    pairs: &[Pair],
    format: PromptFormat,
    max_len: usize,
    cfg: &RepNoiseConfig,
    seed: u64,
) -> Result<RepNoiseTerms> {
    let enc = encode_pairs(model, pairs, format, max_len, cfg.faithful)?;
    let refs: Vec<&EncodedPair> = enc.iter().collect();
    let net = Llama::frozen(&model.config, &model.params)?;
    let batch = PairBatch::new(&refs, model.tok.pad_id, net.device())?;
    let mut rng = Rng::new(seed, "noise");
    Ok(repnoise_loss(&net, &batch, cfg, &mut rng)?.1)
}

/// Run a defence in `out`; the defended model ends up in `out/model`.
pub fn defend(
    model: &mut LoadedModel,
    pairs_path: &Path,
    cfg: &DefendConfig,
    out: &Path,
    interrupt: Interrupt,
) -> Result<PathBuf> {
    cfg.validate()?;
    let run = RunDir::open(
        out,
        &json!({"command": "defend", "model": model.source, "pairs": pairs_path, "defend": cfg}),
    )?;
    if cfg.method == Method::RandomInit {
        // The attacker training from scratch: same architecture, random weights.
        let params = Params::random(&model.config, cfg.train.seed, model.device()?)?;
        let dir = run.model_dir();
        save_hf_dir(&dir, &model.config, &params, &model.tok)?;
        crate::util::io::write_json_atomic(&out.join("DONE"), &json!({"method": "random-init"}))?;
        model.params = params;
        return Ok(dir);
    }
    let loaded = load_pairs_any(pairs_path)?;
    if !loaded.skipped.is_empty() {
        run.log(&format!("{} pairs skipped", loaded.skipped.len()));
        eprintln!(
            "{}: {} pairs skipped",
            pairs_path.display(),
            loaded.skipped.len()
        );
    }
    let pairs = Rng::new(cfg.train.seed, "defence-pairs").subset(&loaded.records, cfg.max_pairs);
    let faithful = cfg.method == Method::Repnoise && cfg.repnoise.faithful;
    // Full-sequence losses train every position up to max_len, padding included, as the
    // reference's fixed-length batches did; its adversarial loss takes the pair mask of the
    // same fixed-length sequences (with its texts).
    let whole = cfg.baseline.tokens == LossTokens::Sequence
        && matches!(
            cfg.method,
            Method::SafetySft
                | Method::GradientAscent
                | Method::SecurityVectors
                | Method::Adversarial
                | Method::Vaccine
        );
    let (enc, left_out) = encode_pairs_padded(
        model,
        &pairs,
        cfg.format,
        cfg.max_len,
        faithful || whole,
        whole,
    )?;
    if !left_out.is_empty() {
        let msg = format!(
            "{} of {} pairs left out: their answers tokenise identically within max_len {} \
             (the prompt fills the window)",
            left_out.len(),
            pairs.len(),
            cfg.max_len
        );
        run.log(&msg);
        eprintln!("{msg}");
    }
    if enc.is_empty() {
        return Err(Error::setting(
            "max_len",
            cfg.max_len,
            "no pair has an answer token within it",
        ));
    }
    let pad = model.tok.pad_id;
    let method = cfg.method;
    let rn = cfg.repnoise.clone();
    let bl = cfg.baseline.clone();
    if method == Method::Vaccine {
        // Trained as a LoRA adapter and merged: the defended model is a plain model.
        let lora_cfg = LoraConfig {
            merge: true,
            ..cfg.lora.clone()
        };
        let lora = Lora::new(model, &lora_cfg, cfg.train.seed)?;
        let vc = cfg.vaccine.clone();
        let summary =
            train::train_any(&run, &lora, enc.len(), &cfg.train, interrupt, |net, ctx| {
                let refs: Vec<&EncodedPair> = ctx.indices.iter().map(|&i| &enc[i]).collect();
                let batch = PairBatch::new(&refs, pad, net.device())?;
                vaccine_loss(net, &batch, &vc, &bl)
            })?;
        return Ok(summary.model_dir);
    }
    if method == Method::SecurityVectors {
        let sv = SecurityVector(Lora::new(model, &cfg.lora, cfg.train.seed)?);
        run.log(&format!(
            "security vector: {} trainable parameters",
            sv.0.num_elements()
        ));
        let summary = train::train_any(&run, &sv, enc.len(), &cfg.train, interrupt, |net, ctx| {
            let refs: Vec<&EncodedPair> = ctx.indices.iter().map(|&i| &enc[i]).collect();
            let batch = PairBatch::new(&refs, pad, net.device())?;
            pair_baseline_loss_with(net, &batch, PairLoss::HarmfulSft, &bl)
        })?;
        return Ok(summary.model_dir);
    }
    let summary = train::train(&run, model, enc.len(), &cfg.train, interrupt, |net, ctx| {
        let refs: Vec<&EncodedPair> = ctx.indices.iter().map(|&i| &enc[i]).collect();
        let batch = PairBatch::new(&refs, pad, net.device())?;
        match method {
            Method::Repnoise => {
                let (loss, terms) = repnoise_loss(net, &batch, &rn, &mut ctx.rng)?;
                Ok(StepLoss {
                    loss,
                    terms: terms.as_map(),
                })
            }
            Method::SafetySft => pair_baseline_loss_with(net, &batch, PairLoss::SafetySft, &bl),
            Method::GradientAscent => {
                pair_baseline_loss_with(net, &batch, PairLoss::GradientAscent, &bl)
            }
            Method::Adversarial => pair_baseline_loss_with(net, &batch, PairLoss::Adversarial, &bl),
            Method::SecurityVectors | Method::RandomInit | Method::Vaccine => unreachable!(),
        }
    })?;
    Ok(summary.model_dir)
}
