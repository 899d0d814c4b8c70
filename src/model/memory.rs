//! A memory model of the training and generation steps: what a step holds at its peak, term by
//! term, from the model's shape, the batch, the compute dtype and the workload, following what
//! this implementation keeps (f32 master weights and AdamW moments, weights cast on use below
//! f32, the activations each op saves for its backward pass, the fused or composed LM-head
//! loss). `repnoise memory` prints it; docs/BENCHMARKS.md checks it against measured peaks on
//! the CPU and uses it to plan a 7B RepNoise step on one GPU.

use candle_core::DType;
use serde::Serialize;

use crate::model::config::ModelConfig;

/// What runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// A full fine-tuning step (every weight trained, AdamW).
    Finetune,
    /// A LoRA step: adapters of `rank` on all seven maps of every layer.
    Lora { rank: usize },
    /// A Representation Noising step: a harmless and a harmful batch, the logit lens over every
    /// layer, the MMD over every layer's MLP output.
    Repnoise,
    /// Batched generation of `new_tokens` after a prompt of the batch's sequence length.
    Generate { new_tokens: usize },
}

/// The memory of one step, term by term (bytes).
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    pub workload: Workload,
    pub batch: usize,
    pub seq: usize,
    pub dtype: String,
    /// On the CPU: the fused kernels run in f32, and the LM head's loss is fused whenever its
    /// weight is an f32 variable. Elsewhere every op is composed.
    pub cpu: bool,
    pub params: usize,
    pub terms: Vec<(String, f64)>,
    /// Everything held at the step's peak (the terms that coexist; see [`plan`]).
    pub peak: f64,
}

/// The plan for `cfg` at `batch` sequences of `seq` tokens in `dtype`, on the CPU or not
/// (`cpu`: which ops are fused; the activations the composed ops keep are larger).
///
/// The peak is: weights and optimizer state, plus the larger of (everything the forward pass
/// keeps for the backward) and (the finished gradients): the backward pass frees each node's
/// activations as it goes while the gradients build up (`backward_owned`).
pub fn plan(
    cfg: &ModelConfig,
    workload: Workload,
    batch: usize,
    seq: usize,
    dtype: DType,
    cpu: bool,
) -> MemoryPlan {
    // The fused layer kernels run on the CPU in f32; the fused LM-head loss whenever the head
    // is an f32 variable on the CPU (a trained head stays one in any compute dtype; a frozen
    // head is cast, so LoRA below f32 takes the composed loss).
    let fused = cpu && dtype == DType::F32;
    let head_fused = cpu && (dtype == DType::F32 || !matches!(workload, Workload::Lora { .. }));
    let p = cfg.num_params() as f64;
    let (l, d, v) = (
        cfg.num_layers as f64,
        cfg.hidden_size as f64,
        cfg.vocab_size as f64,
    );
    let q = (cfg.num_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as f64;
    let (i, h, t) = (
        cfg.intermediate_size as f64,
        cfg.num_heads as f64,
        seq as f64,
    );
    let n = (batch * seq) as f64; // tokens in a batch
    let sc = dtype.size_in_bytes() as f64;
    let mixed = dtype != DType::F32;
    let mut terms: Vec<(String, f64)> = vec![];
    let mut add = |name: &str, bytes: f64| terms.push((name.to_string(), bytes));

    add("weights (f32 master copy)", 4.0 * p);
    if mixed {
        add("weights cast to the compute dtype", sc * p);
    }
    // Saved for the backward pass, per token and layer (elements of the compute dtype): the
    // residual stream and both norms' outputs, q/k/v after rotary, the attention
    // probabilities (h x t), the attention output, gate, up and the SwiGLU product.
    let per_tok_layer = 4.0 * d + 2.0 * q + 2.0 * kv + h * t + 3.0 * i;
    // The composed ops keep more: each norm's f32 input and normalised value, the scaled and
    // masked f32 scores beside the probabilities.
    let composed_extra = if fused {
        0.0
    } else {
        2.0 * 8.0 * d + 4.0 * h * t
    };
    let forward = n * l * (per_tok_layer * sc + composed_extra);
    // The LM head's loss over `rows` rows: fused, the unit gradients `[rows, d]` and `[vocab,
    // d]` (f32); composed, the logits in the head's dtype (f32 for a trained head, the compute
    // dtype for a frozen one), their f32 copy when that is not f32, and the log-softmax.
    let hb = if matches!(workload, Workload::Lora { .. }) {
        sc
    } else {
        4.0
    };
    let head = |rows: f64| {
        if head_fused {
            4.0 * (rows * d + v * d)
        } else {
            rows * v * (hb + 4.0 + if hb < 4.0 { 4.0 } else { 0.0 })
        }
    };
    let (state, live, grads) = match workload {
        Workload::Finetune => {
            let st = 8.0 * p;
            let live = forward + head(n);
            (st, live, 4.0 * p)
        }
        Workload::Lora { rank } => {
            let r = rank as f64;
            let per_layer = r * ((d + q) + 2.0 * (d + kv) + (q + d) + 3.0 * (d + i));
            let ad = l * per_layer;
            add("adapters (f32)", 4.0 * ad);
            let st = 8.0 * ad;
            // Each adapter's rank-wide product per token.
            let live = forward + head(n) + n * l * 7.0 * r * sc;
            (st, live, 4.0 * ad)
        }
        Workload::Repnoise => {
            let st = 8.0 * p;
            // Two forwards (harmless, harmful); the harmless cross-entropy; the lens over the
            // L + 1 hidden states (fused: the stacked rows and their unit gradients); the MMD's
            // masked MLP outputs and noise per layer; below f32, the f32 copies of the hidden
            // states and MLP outputs the forward returns.
            let lens = if head_fused {
                4.0 * (2.0 * (l + 1.0) * n * d + v * d)
            } else {
                head((l + 1.0) * n)
            };
            let mmd = l * 4.0 * n * d * 4.0;
            let copies = if mixed {
                (2.0 * l + 1.0) * n * d * 4.0
            } else {
                0.0
            };
            let live = 2.0 * forward + head(n) + lens + mmd + copies;
            (st, live, 4.0 * p)
        }
        Workload::Generate { new_tokens } => {
            let total = t + new_tokens as f64;
            let cache = 2.0 * l * batch as f64 * total * kv * sc;
            add("KV cache", cache);
            // One layer's prefill temporaries (nothing is kept for a backward pass).
            let live = n
                * (h * t * (sc + if fused { 0.0 } else { 8.0 }) + (3.0 * i + 4.0 * d) * sc)
                + batch as f64 * v * 4.0;
            (0.0, live, 0.0)
        }
    };
    if state > 0.0 {
        add("AdamW moments (f32)", state);
    }
    // Held throughout the step: everything so far.
    let fixed: f64 = terms.iter().map(|(_, b)| b).sum();
    terms.push((
        "activations kept for the backward pass (peak of the forward)".to_string(),
        live,
    ));
    if grads > 0.0 {
        terms.push((
            "gradients (f32; the backward frees activations as they fill)".to_string(),
            grads,
        ));
    }
    let peak = fixed + live.max(grads);
    MemoryPlan {
        workload,
        batch,
        seq,
        dtype: dtype.as_str().to_string(),
        cpu,
        params: cfg.num_params(),
        terms,
        peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peak is what stays for the whole step (every term but the activations and the
    /// gradients) plus the larger of those two, for every workload, dtype and device; and with
    /// f32 master weights and moments no Llama-2-7B training step fits an 80 GB GPU, even at one
    /// short sequence (16 bytes a parameter: 100 GiB before any activation).
    #[test]
    fn peak_is_the_step_long_terms_plus_the_larger_of_activations_and_gradients() {
        let cfg = crate::model::init::resolve_shape("llama-2-7b").unwrap();
        let workloads = [
            Workload::Finetune,
            Workload::Lora { rank: 8 },
            Workload::Repnoise,
            Workload::Generate { new_tokens: 16 },
        ];
        for w in workloads {
            for dtype in [DType::F32, DType::BF16] {
                for cpu in [true, false] {
                    let p = plan(&cfg, w, 2, 64, dtype, cpu);
                    let of = |prefix: &str| -> f64 {
                        p.terms
                            .iter()
                            .filter(|(k, _)| k.starts_with(prefix))
                            .map(|(_, b)| b)
                            .sum()
                    };
                    let (live, grads) = (of("activations"), of("gradients"));
                    let all: f64 = p.terms.iter().map(|(_, b)| b).sum();
                    let expect = all - live - grads + live.max(grads);
                    assert!(
                        (p.peak - expect).abs() <= 1e-9 * expect,
                        "{w:?} {dtype:?} cpu {cpu}: peak {} against {expect}",
                        p.peak
                    );
                    assert!(live > 0.0, "{w:?}: no activations");
                }
            }
        }
        let gib = 1024f64.powi(3);
        for w in [Workload::Finetune, Workload::Repnoise] {
            let p = plan(&cfg, w, 1, 16, DType::BF16, false);
            assert!(p.peak > 80e9, "{w:?}: {:.1} GiB", p.peak / gib);
        }
        let lora = plan(&cfg, Workload::Lora { rank: 8 }, 1, 16, DType::BF16, false);
        assert!(lora.peak < 80e9, "LoRA: {:.1} GiB", lora.peak / gib);
    }
}
