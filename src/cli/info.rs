//! `repnoise info`.

use super::*;

/// Describe a model: architecture, sizes, tokenizer, template, dtype, parameter count.
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args { model, json } = a;
    let m = load(g, &model.model)?;
    let c = &m.config;
    let info = serde_json::json!({
        "source": m.source,
        "architecture": c.arch,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_positions": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tied_embeddings": c.tie_word_embeddings,
        "qkv_bias": c.qkv_bias,
        "parameters": m.params.num_elements(),
        "stored_dtype": m.stored_dtype,
        "compute_dtype": m.config.compute_dtype.as_str(),
        "tokenizer_vocab": m.tok.vocab_size(),
        "bos_token": m.tok.bos_token,
        "eos_token": m.tok.eos_token,
        "stop_ids": m.tok.stop_ids,
        "chat_template": m.tok.chat_template,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        for (k, v) in info.as_object().expect("object") {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:>18}: {s}");
        }
    }
    Ok(())
}
