//! `repnoise` command line: parses flags and calls the library. No ML logic lives here.

mod cli;

// jemalloc with the settings measured for this binary (why: `repnoise::jemalloc_as_the_binary`).
repnoise::jemalloc_as_the_binary!();

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPNOISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // candle asks for its thread count on every matrix product, and without this variable it
    // reads the CPU mask from /proc each time (about a sixth of generation's time on 2 cores).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    let cli = cli::parse();
    // Everything runs inside candle's CPU thread pool (`Device::with_context`), so the thread
    // that issues the ops is one of the workers of each parallel section (matrix products, the
    // fused ops) instead of a bystander that wakes the pool and sleeps until it is done: about
    // a quarter as many context switches, and a faster forward pass (docs/BENCHMARKS.md).
    if let Err(e) = candle_core::Device::Cpu.with_context(|| cli::run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
