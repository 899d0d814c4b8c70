//! `repnoise generate`.

use super::*;

/// Generate text from one or more prompts (batched).
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Prompt text; repeat the flag for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Wrap each prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens generated per answer (the command's own default: longer than the
    /// evaluations' 50-token answers).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = SamplingConfig::default().temperature)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens (with a temperature above 0).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p
    /// (with a temperature above 0).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalty on tokens already in the text, as transformers applies it (1: none).
    #[arg(long, default_value_t = SamplingConfig::default().repetition_penalty)]
    pub repetition_penalty: f64,
    /// Seed of the sampling (same seed, same text).
    #[arg(long, default_value_t = SamplingConfig::default().seed)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        model,
        prompt,
        chat: use_chat,
        system,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
        json,
    } = a;
    let m = load(g, &model.model)?;
    let cfg = SamplingConfig {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
    };
    let mut prompts = vec![];
    for p in &prompt {
        let ids = if use_chat {
            let mut msgs = vec![];
            if let Some(s) = &system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::user(p));
            chat::render(&m.tok, &msgs, true)?.ids
        } else {
            m.tok.encode_text(p)?
        };
        prompts.push(ids);
    }
    let net = Llama::frozen(&m.config, &m.params)?;
    let t0 = std::time::Instant::now();
    let outs =
        repnoise::model::generate::generate(&net, &prompts, m.tok.pad_id, &m.tok.stop_ids, &cfg)?;
    let secs = t0.elapsed().as_secs_f64();
    let texts: Vec<String> = outs
        .iter()
        .map(|o| m.tok.decode(o, true))
        .collect::<repnoise::Result<_>>()?;
    if json {
        let n: usize = outs.iter().map(Vec::len).sum();
        println!(
            "{}",
            serde_json::json!({"completions": texts, "new_tokens": n, "seconds": secs})
        );
    } else {
        for (i, t) in texts.iter().enumerate() {
            if texts.len() > 1 {
                println!("--- [{i}]");
            }
            println!("{}", t.trim());
        }
    }
    Ok(())
}
