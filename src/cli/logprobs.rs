//! `repnoise logprobs`.

use super::*;

/// Per-token log-probabilities of a text, tokenized exactly as given (after the
/// beginning-of-sequence token where the tokenizer asks for one, as for any model input).
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// The text to score.
    #[arg(long)]
    pub text: String,
    /// Print `{"ids": [...], "logprobs": [...]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args { model, text, json } = a;
    let m = load(g, &model.model)?;
    let ids = m.tok.encode_text(&text)?;
    let net = Llama::frozen(&m.config, &m.params)?;
    let lps = repnoise::model::generate::token_logprobs(&net, &ids)?;
    if json {
        println!("{}", serde_json::json!({"ids": ids, "logprobs": lps}));
    } else {
        for (i, id) in ids.iter().enumerate() {
            let tok = m.tok.id_to_token(*id).unwrap_or_default();
            match i.checked_sub(1).and_then(|j| lps.get(j)) {
                Some(lp) => println!("{id:>7} {tok:<20} {lp:.4}"),
                None => println!("{id:>7} {tok:<20}"),
            }
        }
    }
    Ok(())
}
