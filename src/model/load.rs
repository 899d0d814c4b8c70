//! Where models come from and where they go: `--model` accepts a Hugging Face directory
//! (config.json, tokenizer.json, safetensors, possibly sharded), a GGUF file, or the name of an
//! embedded model. Pickle checkpoints are refused: loading a model never executes code.
//! Saving writes a Hugging Face directory that `repnoise` and `transformers` both load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::model::assets;
use crate::model::config::{self, ModelConfig};
use crate::model::gguf;
use crate::model::params::{expected_shapes, Params};
use crate::model::tensor_file::TensorFile;
pub use crate::model::tensor_file::{for_each_safetensor, save_safetensors, save_safetensors_as};
use crate::model::tokenizer::Tok;
use crate::{Error, Result};

/// A model ready to use: configuration, weights and tokenizer.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub params: Params,
    pub tok: Tok,
    /// Human-readable origin (path or embedded name).
    pub source: String,
    /// What the weights were stored as before conversion to f32.
    pub stored_dtype: String,
}

impl LoadedModel {
    /// The device its weights live on (the token embedding's).
    pub fn device(&self) -> Result<&candle_core::Device> {
        Ok(self.params.tensor("model.embed_tokens.weight")?.device())
    }

    /// A copy with its own weight storage (training it leaves `self` unchanged).
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            config: self.config.clone(),
            params: self.params.deep_clone()?,
            tok: self.tok.clone(),
            source: self.source.clone(),
            stored_dtype: self.stored_dtype.clone(),
        })
    }
}

/// Where a `--model` argument points.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Embedded(&'static str),
    HfDir(PathBuf),
    Gguf(PathBuf),
}

const PICKLE_EXTS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

fn pickle_refusal(path: &Path) -> Error {
    Error::file(
        path,
        "pickle checkpoints are refused: loading one can execute arbitrary code. Convert it to \
         safetensors first, e.g. with transformers: \
         `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`",
    )
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decide what a `--model` argument names.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    let path = Path::new(spec);
    if !path.exists() {
        if let Some(a) = assets::asset(spec) {
            if a.entry.ends_with(".gguf") {
                return Ok(ModelSource::Embedded(a.name));
            }
        }
        let names: Vec<&str> = assets::ASSETS
            .iter()
            .filter(|a| a.entry.ends_with(".gguf"))
            .map(|a| a.name)
            .collect();
        return Err(Error::file(
            path,
            format!(
                "no such file or directory, and not an embedded model (embedded: {})",
                names.join(", ")
            ),
        ));
    }
    if path.is_dir() {
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if is_pickle(path) {
        return Err(pickle_refusal(path));
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut magic))
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if n == 4 && &magic == b"GGUF" {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Err(Error::file(
            path,
            "a lone safetensors file has no config or tokenizer: pass the model directory",
        ));
    }
    Err(Error::file(
        path,
        "not a model: expected a Hugging Face directory, a GGUF file, or an embedded model name",
    ))
}

/// Load a model from a `--model` argument; embedded models are fetched into `cache`.
pub fn load(spec: &str, cache: &Path, device: &Device) -> Result<LoadedModel> {
    match resolve(spec)? {
        ModelSource::Embedded(name) => {
            let asset = assets::asset(name).expect("resolved embedded name");
            let path = assets::fetch(&asset, cache)?;
            let mut m = load_gguf(&path, device)?;
            m.source = format!("{name} ({})", path.display());
            Ok(m)
        }
        ModelSource::Gguf(p) => load_gguf(&p, device),
        ModelSource::HfDir(d) => load_hf_dir(&d, device),
    }
}

pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let g = gguf::load(path, device)?;
    let tok = Tok::from_gguf(&g.tokenizer, path)?;
    tok.check_vocab(g.config.vocab_size, path)?;
    Ok(LoadedModel {
        config: g.config,
        params: g.params,
        tok,
        source: path.display().to_string(),
        stored_dtype: "gguf (dequantized to f32)".into(),
    })
}

/// The safetensors files of a directory: the index's shards, or `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = crate::util::io::read_text(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::field(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<String> = vec![];
        for (k, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| Error::field(&index, format!("weight_map.{k}"), "not a string"))?;
            if Path::new(f).components().count() != 1 || f.starts_with('.') {
                return Err(Error::field(
                    &index,
                    format!("weight_map.{k}"),
                    format!("shard name {f:?} must be a plain file name in the directory"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    // No safetensors: say why, refusing pickles explicitly.
    let pickles: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_pickle(p))
        .collect();
    if let Some(p) = pickles.first() {
        return Err(pickle_refusal(p));
    }
    Err(Error::file(
        dir,
        "no model.safetensors or model.safetensors.index.json in the model directory",
    ))
}

pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = crate::util::io::read_text(&cfg_path)?;
    let config = config::parse_hf_config(&text, &cfg_path)?;
    let files = safetensors_files(dir)?;
    let wanted: HashMap<String, Vec<usize>> = expected_shapes(&config).into_iter().collect();
    let mut params = Params::new();
    let mut stored = String::new();
    for f in &files {
        TensorFile::open(f)?.for_each(
            device,
            |name| wanted.contains_key(name),
            |name, dtype, t| {
                if stored.is_empty() {
                    stored = format!("{dtype:?}").to_lowercase();
                }
                params.insert(name, t)
            },
        )?;
    }
    params.check_against(&config, &files[0])?;
    let tok = Tok::from_hf_dir(dir)?;
    tok.check_vocab(config.vocab_size, &dir.join("tokenizer.json"))?;
    Ok(LoadedModel {
        config,
        params,
        tok,
        source: dir.display().to_string(),
        stored_dtype: stored,
    })
}

/// Save a model as a Hugging Face directory: `config.json`, `generation_config.json`,
/// `model.safetensors` (f32), `tokenizer.json` and `tokenizer_config.json` (with the chat
/// template).
pub fn save_hf_dir(dir: &Path, config: &ModelConfig, params: &Params, tok: &Tok) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
    let tensors: Vec<(String, Tensor)> = expected_shapes(config)
        .into_iter()
        .map(|(name, _)| Ok((name.clone(), params.tensor(&name)?.clone())))
        .collect::<Result<_>>()?;
    save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    crate::util::fault::point("model.weights");
    tok.save(dir)?;
    let mut gen = serde_json::json!({"_from_model_config": true});
    if let Some(b) = config.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if !config.eos_token_ids.is_empty() {
        gen["eos_token_id"] = config.eos_token_ids.clone().into();
    }
    crate::util::io::write_json_atomic(&dir.join("generation_config.json"), &gen)?;
    // config.json last: its presence marks a complete directory.
    crate::util::io::write_json_atomic(&dir.join("config.json"), &config.to_hf_json())
}

/// Size and modification time of the weight files behind `model` (the files of a directory
/// whose name starts with `model` or ends in `.gguf`, or the file itself): caches of results keyed
/// by a model's path add this, so a model rebuilt at the same path is not mistaken for the old.
pub fn weights_fingerprint(model: &LoadedModel) -> serde_json::Value {
    let stamp = |p: &Path| -> Option<serde_json::Value> {
        let m = std::fs::metadata(p).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos()
            .to_string();
        Some(serde_json::json!([
            p.file_name()?.to_string_lossy(),
            m.len(),
            t
        ]))
    };
    let p = Path::new(&model.source);
    if p.is_file() {
        return stamp(p).into();
    }
    let Ok(rd) = std::fs::read_dir(p) else {
        return serde_json::Value::Null;
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            let n = f.file_name().map(|n| n.to_string_lossy().to_string());
            n.is_some_and(|n| n.starts_with("model") || n.ends_with(".gguf"))
        })
        .collect();
    files.sort();
    files.iter().filter_map(|f| stamp(f)).collect()
}
