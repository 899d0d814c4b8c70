//! `repnoise` command line: parses flags and calls the library. No ML logic lives here.

mod cli;

/// jemalloc reuses freed memory within a step: training allocates and frees hundreds of MB per
/// step, and with glibc's allocator the kernel zeroed those pages anew each time (measured:
/// about a fifth of a training step in page faults; see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (measured with `repnoise bench`, docs/BENCHMARKS.md): freed pages handed
/// back to the kernel after about a second, so that a step's peak memory is close to its live
/// memory. Never returning them (the earlier setting) kept up to 3 GB of freed activations
/// resident: peak 5.7-6.9 against 3.9 GiB for the RepNoise step, 3.4 against 2.7 GiB for a
/// fine-tuning step, for some page faults as each step touches its activations again. One
/// arena: the same memory as eight, and the quicker of the two in the runs made (fine-tuning
/// step 5.4-5.8 s against 6.0-6.2 s). `_RJEM_MALLOC_CONF` still overrides them.
/// (A thin pointer: jemalloc reads a `const char *`.)
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 68] =
    b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0\0";

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
