//! `repnoise demo`.

use super::*;

/// The main job: align the embedded model, defend it with RepNoise and two baselines, attack
/// every model, evaluate and write the report (configs/demo.toml, built in). A second run
/// reuses the finished stages.
#[derive(Args)]
pub struct Args {
    /// Run directory of the demo (created; an interrupted demo resumes there).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Use this experiment file instead of the built-in demo.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the demo's experiment as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Go on when the aligned model misses its over-refusal or knowledge targets by more
    /// than `align.targets.gate_margin` (the report still says so first).
    #[arg(long)]
    pub ignore_align_targets: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        out,
        config,
        print_config,
        ignore_align_targets,
    } = a;
    let exp = match &config {
        Some(p) => repnoise::experiment::Experiment::from_toml(p)?,
        None => repnoise::experiment::Experiment::from_toml_str(
            repnoise::experiment::DEMO_TOML,
            "configs/demo.toml (built in)",
        )?,
    };
    super::run::run_experiment(g, &exp, &out, print_config, ignore_align_targets)?;
    Ok(())
}
