//! `repnoise defend` and `repnoise loss`: Representation Noising and the paper's baselines on
//! defence pairs, through the shared training loop ([`crate::train`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::encode::{encode_pair, EncodeOptions, PadLength, PadSide, Padding, PromptFormat};
use crate::data::pairs::load_pairs_any;
use crate::data::{EncodedPair, Pair};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig, SecurityVector};
use crate::model::Llama;
use crate::modelio::{save_hf_dir, LoadedModel};
use crate::objective::{
    pair_baseline_loss, repnoise_loss, PairBatch, PairLoss, RepNoiseConfig, RepNoiseTerms,
};
use crate::params::Params;
use crate::rng::Rng;
use crate::train::{self, Interrupt, RunDir, StepLoss, TrainConfig};

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
        }
    }
}

impl DefendConfig {
    pub fn from_toml(path: &Path) -> Result<Self> {
        crate::io::read_toml(path, "defend")
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
    let opts = EncodeOptions {
        format,
        add_bos: false,
        add_eos: !faithful && format == PromptFormat::Plain,
        max_len: Some(max_len),
    };
    let padding = Padding {
        side: PadSide::Right,
        pad_id: model.tok.pad_id,
        length: PadLength::Longest,
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
    let run = RunDir::open(
        out,
        &json!({"command": "defend", "model": model.source, "pairs": pairs_path, "defend": cfg}),
    )?;
    if cfg.method == Method::RandomInit {
        // The attacker training from scratch: same architecture, random weights.
        let params = Params::random(
            &model.config,
            cfg.train.seed,
            model.params.tensor("model.embed_tokens.weight")?.device(),
        )?;
        let dir = run.model_dir();
        save_hf_dir(&dir, &model.config, &params, &model.tok)?;
        crate::io::write_json_atomic(&out.join("DONE"), &json!({"method": "random-init"}))?;
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
    let mut pairs = loaded.records;
    if cfg.max_pairs > 0 && pairs.len() > cfg.max_pairs {
        let mut idx: Vec<usize> = (0..pairs.len()).collect();
        Rng::new(cfg.train.seed, "defence-pairs").shuffle(&mut idx);
        idx.truncate(cfg.max_pairs);
        idx.sort();
        pairs = idx.into_iter().map(|i| pairs[i].clone()).collect();
    }
    let faithful = cfg.method == Method::Repnoise && cfg.repnoise.faithful;
    let (enc, left_out) = encode_pairs_lenient(model, &pairs, cfg.format, cfg.max_len, faithful)?;
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
    if method == Method::SecurityVectors {
        let sv = SecurityVector(Lora::new(model, &cfg.lora, cfg.train.seed)?);
        run.log(&format!(
            "security vector: {} trainable parameters",
            sv.0.num_elements()
        ));
        let summary = train::train_any(&run, &sv, enc.len(), &cfg.train, interrupt, |net, ctx| {
            let refs: Vec<&EncodedPair> = ctx.indices.iter().map(|&i| &enc[i]).collect();
            let batch = PairBatch::new(&refs, pad, net.device())?;
            pair_baseline_loss(net, &batch, PairLoss::HarmfulSft)
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
            Method::SafetySft => pair_baseline_loss(net, &batch, PairLoss::SafetySft),
            Method::GradientAscent => pair_baseline_loss(net, &batch, PairLoss::GradientAscent),
            Method::Adversarial => pair_baseline_loss(net, &batch, PairLoss::Adversarial),
            Method::SecurityVectors | Method::RandomInit => unreachable!(),
        }
    })?;
    Ok(summary.model_dir)
}
