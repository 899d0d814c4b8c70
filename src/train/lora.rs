//! LoRA (Hu et al. 2021) over a frozen model: the attack the paper's critics name first, since it
//! trains far fewer parameters than full fine-tuning and often still undoes safety training.
//!
//! Every adapted linear map `W [out, in]` gains `scale * B A` with `A [rank, in]` (initialised
//! uniform in `±1/sqrt(in)`, PEFT's default) and `B [out, rank]` (zeros, so training starts from
//! the unchanged model), `scale = alpha / rank`. The forward adds `(scale * x A^T) B^T` beside the
//! frozen `x W^T` (no full-size weight gradient is formed); [`Lora::merged`] folds the adapter
//! into the weights for saving. The adapter is saved in PEFT's layout
//! (`adapter_model.safetensors` with `base_model.model.` keys, `adapter_config.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::llama::{Adapter, Llama, PROJECTIONS};
use crate::model::load::{save_hf_dir, save_safetensors, LoadedModel};
use crate::model::params::Params;
use crate::model::tensor_file::TensorFile;
use crate::train::Trainee;
use crate::util::error::check_at_least_one;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Where a defended model directory keeps its security vector (a LoRA adapter in PEFT's
/// layout): other tools see an ordinary model and ignore it; `repnoise attack` and `repnoise
/// finetune` keep it active and frozen while they train, and drop it from what they save.
pub const SECURITY_VECTOR_DIR: &str = "security_vector";

/// LoRA settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Adapted maps by short name (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`), or `all`.
    pub targets: Vec<String>,
    /// Also write the merged model (`model/`) besides the adapter (`adapter/`).
    pub merge: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec!["all".into()],
            merge: true,
        }
    }
}

impl LoraConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Indices into [`PROJECTIONS`] of the adapted maps.
    pub fn projection_indices(&self) -> Result<Vec<usize>> {
        check_at_least_one("lora.rank", self.rank)?;
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            // A zero scale would make an adapter that changes nothing and learns nothing.
            return Err(Error::setting(
                "lora.alpha",
                self.alpha,
                "must be a positive number",
            ));
        }
        let mut out = vec![];
        for t in &self.targets {
            if t == "all" {
                return Ok((0..PROJECTIONS.len()).collect());
            }
            let i = PROJECTIONS
                .iter()
                .position(|p| p.rsplit('.').next() == Some(t.as_str()))
                .ok_or_else(|| {
                    Error::setting(
                        "lora.targets",
                        t,
                        "expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj \
                         or all",
                    )
                })?;
            if !out.contains(&i) {
                out.push(i);
            }
        }
        if out.is_empty() {
            return Err(Error::setting("lora.targets", "", "no target given"));
        }
        Ok(out)
    }
}

/// An adapter over a frozen base model.
pub struct Lora<'a> {
    pub base: &'a LoadedModel,
    pub cfg: LoraConfig,
    /// `<weight stem>.lora_A.weight` and `<weight stem>.lora_B.weight` per adapted map.
    pub store: Params,
    /// The frozen base network, built on first use: below f32 its weights are cast once, not
    /// at every step.
    frozen: std::sync::OnceLock<Llama>,
}

fn stem(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

impl<'a> Lora<'a> {
    /// A fresh adapter (B = 0: the model is unchanged until trained).
    pub fn new(base: &'a LoadedModel, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let idx = cfg.projection_indices()?;
        let dev = base
            .params
            .tensor("model.embed_tokens.weight")?
            .device()
            .clone();
        let mut rng = Rng::new(seed, "lora-init");
        let mut store = Params::new();
        for l in 0..base.config.num_layers {
            for &i in &idx {
                let w = format!("model.layers.{l}.{}.weight", PROJECTIONS[i]);
                let (out, inp) = base.params.tensor(&w)?.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                store.insert(
                    format!("{}.lora_A.weight", stem(&w)),
                    Tensor::from_vec(a, (cfg.rank, inp), &dev)?,
                )?;
                store.insert(
                    format!("{}.lora_B.weight", stem(&w)),
                    Tensor::zeros((out, cfg.rank), candle_core::DType::F32, &dev)?,
                )?;
            }
        }
        Ok(Self {
            base,
            cfg: cfg.clone(),
            store,
            frozen: Default::default(),
        })
    }

    pub fn scale(&self) -> f64 {
        self.cfg.alpha / self.cfg.rank as f64
    }

    /// Trainable parameter count.
    pub fn num_elements(&self) -> usize {
        self.store.num_elements()
    }

    /// The adapters keyed by the weight they adapt; `trainable` picks which carry gradients.
    pub fn adapters(&self, trainable: &dyn Fn(&str) -> bool) -> Result<BTreeMap<String, Adapter>> {
        let mut out = BTreeMap::new();
        for (name, var) in self.store.iter() {
            let Some(s) = name.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let bname = format!("{s}.lora_B.weight");
            let b = self.store.tensor(&bname)?;
            let pick = |n: &str, t: &Tensor| if trainable(n) { t.clone() } else { t.detach() };
            out.insert(
                format!("{s}.weight"),
                Adapter {
                    a: pick(name, var.as_tensor()),
                    b: pick(&bname, b),
                    scale: self.scale(),
                },
            );
        }
        Ok(out)
    }

    /// The base weights with every adapter folded in: `W + scale * B A`.
    pub fn merged(&self) -> Result<Params> {
        let out = self.base.params.deep_clone()?;
        for (w, ad) in self.adapters(&|_| false)? {
            let var = out
                .get(&w)
                .ok_or_else(|| Error::msg(format!("no weight `{w}` to merge into")))?;
            let delta = (ad.b.matmul(&ad.a)? * ad.scale)?;
            var.set(&(var.as_tensor() + delta)?)?;
        }
        Ok(out)
    }

    /// Write the adapter in PEFT's layout.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
        let tensors: Vec<(String, Tensor)> = self
            .store
            .iter()
            .map(|(k, v)| (format!("base_model.model.{k}"), v.as_tensor().clone()))
            .collect();
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let targets: Vec<&str> = self
            .cfg
            .projection_indices()?
            .into_iter()
            .map(|i| PROJECTIONS[i].rsplit('.').next().unwrap_or(PROJECTIONS[i]))
            .collect();
        crate::util::io::write_json_atomic(
            &dir.join("adapter_config.json"),
            &json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": self.cfg.rank,
                "lora_alpha": self.cfg.alpha,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": false,
                "target_modules": targets,
                "base_model_name_or_path": self.base.source,
                "inference_mode": true,
            }),
        )
    }

    /// Read an adapter written by [`Lora::save_adapter`] into this one's store.
    pub fn load_adapter(&self, dir: &Path) -> Result<()> {
        TensorFile::open(&dir.join("adapter_model.safetensors"))?.set_vars(
            self.store.iter(),
            |name| format!("base_model.model.{name}"),
            "the adapter",
        )
    }
}

/// The adapter directory beside a run's `model/`.
fn adapter_dir(model_dir: &Path) -> std::path::PathBuf {
    model_dir.with_file_name("adapter")
}

impl Trainee for Lora<'_> {
    type Net = Llama;
    fn store(&self) -> &Params {
        &self.store
    }
    fn num_layers(&self) -> usize {
        self.base.config.num_layers
    }
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Llama> {
        let base = match self.frozen.get() {
            Some(n) => n.clone(),
            None => {
                let n = Llama::frozen(&self.base.config, &self.base.params)?;
                self.frozen.get_or_init(|| n).clone()
            }
        };
        base.with_adapters(self.adapters(trainable)?)
    }
    fn compute_dtype(&self) -> candle_core::DType {
        self.base.config.compute_dtype
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        self.save_adapter(&adapter_dir(dir))?;
        if self.cfg.merge {
            save_hf_dir(dir, &self.base.config, &self.merged()?, &self.base.tok)?;
        }
        Ok(())
    }
    fn load_final(&self, dir: &Path) -> Result<()> {
        self.load_adapter(&adapter_dir(dir))
    }
}

/// The security vector of `model`, when it was loaded from a directory that has one.
pub fn security_vector_of(model: &LoadedModel) -> Option<PathBuf> {
    let d = Path::new(&model.source).join(SECURITY_VECTOR_DIR);
    d.join("adapter_model.safetensors").is_file().then_some(d)
}

/// Read a LoRA adapter in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`) as
/// frozen adapters for `base`, checked against its weights' shapes.
pub fn read_peft(dir: &Path, base: &LoadedModel) -> Result<BTreeMap<String, Adapter>> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::util::io::read_text(&cfg_path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(Error::file(
                &cfg_path,
                format!("field `peft_type`: {t} adapters are not supported (only LORA)"),
            ));
        }
    }
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .filter(|x| *x > 0.0)
            .ok_or_else(|| Error::file(&cfg_path, format!("field `{k}`: missing or not positive")))
    };
    // Settings this reader would silently get wrong.
    let unsupported = [
        (
            "use_dora",
            v.get("use_dora").and_then(|x| x.as_bool()) == Some(true),
        ),
        (
            "rank_pattern",
            v.get("rank_pattern")
                .and_then(|x| x.as_object())
                .is_some_and(|m| !m.is_empty()),
        ),
        (
            "alpha_pattern",
            v.get("alpha_pattern")
                .and_then(|x| x.as_object())
                .is_some_and(|m| !m.is_empty()),
        ),
        (
            "bias",
            v.get("bias")
                .and_then(|x| x.as_str())
                .is_some_and(|b| b != "none"),
        ),
        (
            "layers_to_transform",
            v.get("layers_to_transform").is_some_and(|x| !x.is_null()),
        ),
    ];
    if let Some((k, _)) = unsupported.iter().find(|(_, bad)| *bad) {
        return Err(Error::file(
            &cfg_path,
            format!("field `{k}`: not supported by this reader (plain LoRA only)"),
        ));
    }
    let r = num("r")?;
    let alpha = num("lora_alpha")?;
    let scale = if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let path = dir.join("adapter_model.safetensors");
    let dev = base
        .params
        .tensor("model.embed_tokens.weight")?
        .device()
        .clone();
    let t = TensorFile::open(&path)?;
    let mut out = BTreeMap::new();
    for key in t.names() {
        let Some(s) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let s = s.strip_prefix("base_model.model.").unwrap_or(s);
        let w = format!("{s}.weight");
        let bkey = key.replace(".lora_A.weight", ".lora_B.weight");
        let b = t
            .get(&bkey, &dev)?
            .ok_or_else(|| Error::tensor(&path, &bkey, "missing (lora_A without lora_B)"))?;
        let a = t
            .get(key, &dev)?
            .ok_or_else(|| Error::tensor(&path, key, "missing"))?;
        if crate::model::llama::projection_of(&w).is_none() {
            return Err(Error::tensor(
                &path,
                key,
                "adapts no attention or MLP projection (only those can carry an adapter)",
            ));
        }
        let wt = base
            .params
            .tensor(&w)
            .map_err(|_| Error::tensor(&path, key, "adapts no weight of this model"))?;
        let (o, i) = wt.dims2()?;
        let ok = a.dims().len() == 2
            && b.dims().len() == 2
            && a.dims()[1] == i
            && b.dims()[0] == o
            && a.dims()[0] == b.dims()[1];
        if !ok {
            return Err(Error::tensor(
                &path,
                key,
                format!(
                    "shapes A {:?}, B {:?} do not fit the weight {:?}",
                    a.dims(),
                    b.dims(),
                    wt.dims()
                ),
            ));
        }
        out.insert(
            w,
            Adapter {
                a: a.to_dtype(candle_core::DType::F32)?,
                b: b.to_dtype(candle_core::DType::F32)?,
                scale,
            },
        );
    }
    if out.is_empty() {
        return Err(Error::file(
            &path,
            "no LoRA weights (`*.lora_A.weight`) in it",
        ));
    }
    Ok(out)
}

/// A trainee with frozen adapters stacked on its network: fine-tuning under a security vector.
/// What it saves is the trainee's own result, without them.
pub struct WithFrozen<'a, T: Trainee<Net = Llama> + ?Sized> {
    pub inner: &'a T,
    pub frozen: BTreeMap<String, Adapter>,
}

impl<T: Trainee<Net = Llama> + ?Sized> Trainee for WithFrozen<'_, T> {
    type Net = Llama;
    fn store(&self) -> &Params {
        self.inner.store()
    }
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }
    fn peak_lr(&self, name: &str, lr: f64) -> f64 {
        self.inner.peak_lr(name, lr)
    }
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Llama> {
        self.inner
            .net(trainable)?
            .with_adapters(self.frozen.clone())
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        self.inner.save_final(dir)
    }
    fn load_final(&self, dir: &Path) -> Result<()> {
        self.inner.load_final(dir)
    }
    fn compute_dtype(&self) -> candle_core::DType {
        self.inner.compute_dtype()
    }
}

/// The security-vectors defence's trainee: a LoRA adapter trained on harmful answers, saved as
/// the unchanged base model with the adapter in its [`SECURITY_VECTOR_DIR`].
pub struct SecurityVector<'a>(pub Lora<'a>);

impl Trainee for SecurityVector<'_> {
    type Net = Llama;
    fn store(&self) -> &Params {
        &self.0.store
    }
    fn num_layers(&self) -> usize {
        self.0.num_layers()
    }
    fn net(&self, trainable: &dyn Fn(&str) -> bool) -> Result<Llama> {
        self.0.net(trainable)
    }
    fn compute_dtype(&self) -> candle_core::DType {
        self.0.compute_dtype()
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        let b = self.0.base;
        save_hf_dir(dir, &b.config, &b.params, &b.tok)?;
        self.0.save_adapter(&dir.join(SECURITY_VECTOR_DIR))
    }
    fn load_final(&self, dir: &Path) -> Result<()> {
        self.0.load_adapter(&dir.join(SECURITY_VECTOR_DIR))
    }
}

/// The security vector `model` carries, read as frozen adapters (None when it has none or
/// `ignore` is set).
pub fn load_security_vector(
    model: &LoadedModel,
    ignore: bool,
) -> Result<Option<(PathBuf, BTreeMap<String, Adapter>)>> {
    match security_vector_of(model) {
        Some(d) if !ignore => {
            let ad = read_peft(&d, model)?;
            Ok(Some((d, ad)))
        }
        _ => Ok(None),
    }
}

/// [`crate::train::train_any`], under frozen adapters when there are some.
pub fn train_under<T: Trainee<Net = Llama> + ?Sized>(
    run: &crate::train::RunDir,
    trainee: &T,
    frozen: Option<BTreeMap<String, Adapter>>,
    n: usize,
    cfg: &crate::train::TrainConfig,
    interrupt: crate::train::Interrupt,
    loss_fn: impl FnMut(&Llama, &mut crate::train::StepCtx) -> Result<crate::train::StepLoss>,
) -> Result<crate::train::TrainSummary> {
    match frozen {
        Some(frozen) => crate::train::train_any(
            run,
            &WithFrozen {
                inner: trainee,
                frozen,
            },
            n,
            cfg,
            interrupt,
            loss_fn,
        ),
        None => crate::train::train_any(run, trainee, n, cfg, interrupt, loss_fn),
    }
}
