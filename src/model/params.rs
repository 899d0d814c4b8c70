//! The parameter store: every weight of a model as a trainable f32 [`Var`], keyed by its
//! Hugging Face name (`model.layers.3.self_attn.q_proj.weight`), in a stable order.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::model::config::ModelConfig;
use crate::util::rng::Rng;
use crate::{Error, Result};

/// Named parameters in name order (so iteration, checkpoints and seeds are deterministic).
#[derive(Clone, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

/// The Hugging Face names and shapes a model with this config must have.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        if cfg.qkv_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    out
}

/// The tensors of [`Params::random`], one at a time: `f(name, shape, values)` in name order
/// (so a model too large to hold in f32 can be written tensor by tensor).
pub fn random_tensors(
    cfg: &ModelConfig,
    seed: u64,
    mut f: impl FnMut(String, Vec<usize>, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let mut rng = Rng::new(seed, "init");
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            vec![1f32; n]
        } else if name.ends_with(".bias") {
            vec![0f32; n]
        } else {
            rng.normal_vec(n, 0.02)
        };
        f(name, shape, data)?;
    }
    Ok(())
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Random initialisation as `transformers` does for Llama: N(0, 0.02) matrices and
    /// embeddings, zero biases, unit norms. Seeded: the same seed gives the same weights.
    pub fn random(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut p = Params::new();
        random_tensors(cfg, seed, |name, shape, data| {
            p.insert(name, Tensor::from_vec(data, shape, device)?)
        })?;
        Ok(p)
    }

    /// Insert a tensor (converted to a contiguous f32 variable).
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        self.vars.insert(name.into(), Var::from_tensor(&t)?);
        Ok(())
    }

    /// The variables, by name, the store given up.
    pub fn into_vars(self) -> impl Iterator<Item = (String, Var)> {
        self.vars.into_iter()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// The tensor of a parameter, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| Error::msg(format!("parameter `{name}` is missing")))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.vars.keys()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Check that the store holds exactly the tensors `cfg` needs, with the right shapes.
    /// `origin` names the file the weights came from.
    pub fn check_against(&self, cfg: &ModelConfig, origin: &std::path::Path) -> Result<()> {
        for (name, shape) in expected_shapes(cfg) {
            match self.vars.get(&name) {
                None => return Err(Error::tensor(origin, &name, "missing from the checkpoint")),
                Some(v) if v.dims() != shape.as_slice() => {
                    return Err(Error::tensor(
                        origin,
                        &name,
                        format!("has shape {:?}, the config needs {:?}", v.dims(), shape),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Plain tensors (sharing storage with the variables), for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// A deep copy (new storage), e.g. to keep a frozen reference model.
    pub fn deep_clone(&self) -> Result<Self> {
        let mut p = Params::new();
        for (k, v) in &self.vars {
            p.vars
                .insert(k.clone(), Var::from_tensor(&v.as_tensor().detach())?);
        }
        Ok(p)
    }
}
