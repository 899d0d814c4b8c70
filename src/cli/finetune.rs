//! `repnoise finetune`.

use super::*;

/// Benign fine-tuning on a data-to-text task, for the trainability check; keeps a test split
/// (`test.jsonl`) for the evaluation.
#[derive(Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// viggo, e2e, dart, conv_weather, or a data-to-text file.
    #[arg(long)]
    pub task: String,
    /// Run directory (created; resumes from its checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub ft: FinetuneFlags,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        model,
        task,
        out,
        ft,
    } = a;
    let cfg = ft.resolve()?;
    let mut m = load(g, &model.model)?;
    let r = repnoise::train::finetune::finetune(&mut m, &task, &cfg, &out, Interrupt::default())?;
    println!(
        "fine-tuned on {} examples ({} steps); {} test inputs in {}; model {}",
        r.train_examples,
        r.summary.steps,
        r.test_inputs,
        out.join("test.jsonl").display(),
        r.summary.model_dir.display()
    );
    Ok(())
}
