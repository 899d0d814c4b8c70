//! `repnoise convert`.

use super::*;

/// Write a model as a Hugging Face directory (f32 safetensors, tokenizer, chat template).
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// The Hugging Face directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args { model, out } = a;
    let m = load(g, &model.model)?;
    load::save_hf_dir(&out, &m.config, &m.params, &m.tok)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
