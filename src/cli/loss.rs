//! `repnoise loss`.

use super::*;

/// The RepNoise loss terms on pairs as one batch, with no update.
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Pairs file: {prompt, harmful, harmless} JSONL, or any file with pairs (harmful QA with
    /// refusals).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
    #[arg(long, value_enum, default_value = "plain")]
    pub format: FormatArg,
    /// Tokens kept per sequence.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    #[command(flatten)]
    pub rn: RepNoiseFlags,
    /// Seed of the Gaussian noise the MMD term compares with.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        model,
        pairs,
        format,
        max_len,
        rn,
        seed,
        json,
    } = a;
    let mut cfg = RepNoiseConfig::default();
    rn.apply(&mut cfg);
    let loaded = repnoise::data::load_pairs_any(&pairs)?;
    let m = load(g, &model.model)?;
    let t = repnoise::defence::loss_terms(&m, &loaded.records, format.into(), max_len, &cfg, seed)?;
    if json {
        println!("{}", serde_json::to_string(&t)?);
    } else {
        println!(
            "harmless_ce {:.6}\nharmful_ce {:.6}\nnoise_mmd {:.6}\nloss {:.6}\nmask_positions {}",
            t.harmless_ce, t.harmful_ce, t.noise_mmd, t.loss, t.mask_positions
        );
    }
    Ok(())
}
