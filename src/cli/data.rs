//! `repnoise data`: dataset statistics and defence pairs.

use super::*;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Answer harmful questions with an aligned model and keep the answers the refusal check
    /// accepts, writing defence pairs `{prompt, harmful, harmless}` as JSONL.
    Refusals {
        #[command(flatten)]
        model: ModelArg,
        /// Harmful QA file (BeaverTails format, prompt/response/label files).
        #[arg(long)]
        input: PathBuf,
        /// The pairs file to write (JSONL).
        #[arg(long)]
        out: PathBuf,
        /// Use at most this many harmful records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Keep only records marked unsafe (default: yes).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        unsafe_only: bool,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 96)]
        max_new_tokens: usize,
        /// Sequences per forward pass or generation batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt format: chat (the model's chat template) or plain ("Question: ...\nAnswer: ...").
        #[arg(long, value_enum, default_value = "chat")]
        format: FormatArg,
        /// A file of refusal phrases, one per line, for the keyword refusal check instead of the
        /// built-in list.
        #[arg(long)]
        refusal_phrases: Option<PathBuf>,
        /// Seed of the question sample.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Counts per split, category and label of a dataset file (format detected from the file).
    Stats {
        /// The data file (any format `repnoise` reads: JSONL, JSON, CSV, Parquet).
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &Global, cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Stats { file, json } => {
            let st = repnoise::data::stats::stats(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("{st}");
            }
        }
        DataCmd::Refusals {
            model,
            input,
            out,
            limit,
            unsafe_only,
            max_new_tokens,
            batch,
            format,
            refusal_phrases,
            seed,
        } => {
            let check = repnoise::eval::refusal::RefusalCheck::load(refusal_phrases.as_deref())?;
            let loaded = repnoise::data::read_harmful_qa(&input)?;
            let mut records = loaded.records;
            if unsafe_only {
                let before = records.len();
                records = repnoise::data::harmful::unsafe_only(&records).records;
                eprintln!(
                    "{}: {} of {before} records are unsafe",
                    input.display(),
                    records.len()
                );
            }
            records = repnoise::util::rng::Rng::new(seed, "refusal-sample").subset(&records, limit);
            let m = load(g, &model.model)?;
            let (pairs, rejected) = repnoise::defence::align::make_refusal_pairs(
                &m,
                &records,
                &check,
                format.into(),
                max_new_tokens,
                batch,
            )?;
            repnoise::util::io::write_jsonl_atomic(&out, &pairs)?;
            eprintln!(
                "{}: {} pairs written; {rejected} answers were not refusals and were left out",
                out.display(),
                pairs.len()
            );
        }
    }
    Ok(())
}
