//! `repnoise run`.

use super::*;

/// Run (or resume) an experiment: defences x attacks x seeds with their evaluations and a
/// report (`OUT/report.md`, `OUT/report.html`).
#[derive(Args)]
pub struct Args {
    /// The experiment file (see configs/).
    pub experiment: PathBuf,
    /// Experiment directory (default: runs/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the resolved experiment as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Validate the experiment against the data it names (partitions, tasks, model) and
    /// exit; nothing is trained or written.
    #[arg(long)]
    pub check: bool,
    /// Go on when the aligned model misses its over-refusal or knowledge targets by more
    /// than `align.targets.gate_margin` (the report still says so first).
    #[arg(long)]
    pub ignore_align_targets: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let Args {
        experiment,
        out,
        print_config,
        check,
        ignore_align_targets,
    } = a;
    let exp = repnoise::experiment::Experiment::from_toml(&experiment)?;
    if check {
        let lines = repnoise::experiment::check(&exp)
            .with_context(|| format!("checking {}", experiment.display()))?;
        for l in lines {
            println!("{l}");
        }
        println!("{}: valid against its data", experiment.display());
        return Ok(());
    }
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&exp.name));
    run_experiment(g, &exp, &out, print_config, ignore_align_targets)?;
    Ok(())
}

pub fn run_experiment(
    g: &Global,
    exp: &repnoise::experiment::Experiment,
    out: &std::path::Path,
    print_config: bool,
    ignore_align_targets: bool,
) -> Result<()> {
    if print_config {
        print!("{}", toml::to_string(exp)?);
        return Ok(());
    }
    let opts = repnoise::experiment::RunOptions {
        cache: g
            .cache_dir
            .clone()
            .unwrap_or_else(repnoise::model::assets::default_cache_dir),
        device: device(&g.device)?,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ignore_align_targets,
        dtype: dtype(&g.dtype)?,
    };
    let r = repnoise::experiment::run(exp, out, &opts)?;
    repnoise::report::write_report(&r, out)?;
    for v in repnoise::report::verdicts(&r) {
        println!("{v}");
    }
    println!(
        "report: {} and {} ({:.1} min)",
        out.join("report.md").display(),
        out.join("report.html").display(),
        r.seconds / 60.0
    );
    Ok(())
}
