//! `repnoise refusal-rate`.

use super::*;

/// Refusal rate of a model on prompt sets (shipped sets by name, or files).
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// advbench, harmbench, malicious-instruct, decoding-trust, or a file of prompts;
    /// repeatable.
    #[arg(long, required = true)]
    pub set: Vec<String>,
    /// Prompts per set (0: all).
    #[arg(long, default_value_t = 0)]
    pub n: usize,
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Sequences per forward pass or generation batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
    #[arg(long, value_enum, default_value = "chat")]
    pub format: FormatArg,
    /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
    /// built-in list.
    #[arg(long)]
    pub refusal_phrases: Option<PathBuf>,
    /// Write every response here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the prompt sample.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        model,
        set,
        n,
        max_new_tokens,
        batch,
        format,
        refusal_phrases,
        out,
        seed,
    } = a;
    let m = load(g, &model.model)?;
    let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
    let sets = repnoise::data::prompts::named_prompt_sets(&set, n, seed)?;
    let net = Llama::frozen(&m.config, &m.params)?;
    let res = repnoise::defence::align::refusal_eval(
        &net,
        &m.tok,
        &sets,
        &check,
        format.into(),
        max_new_tokens,
        batch,
    )?;
    for s in &res {
        println!(
            "{}\t{}\trefusal_rate {:.3}\tn {}",
            s.name, s.kind, s.refusal_rate, s.n
        );
    }
    if let Some(p) = out {
        repnoise::util::io::write_json_atomic(&p, &res)?;
    }
    Ok(())
}
