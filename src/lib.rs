//! `repnoise`: Representation Noising (Rosati et al., NeurIPS 2024) and the tooling around it:
//! load real chat models, train them, defend them, attack them and measure the result.
//!
//! This crate is the library; `src/main.rs` is a thin command-line front end over it.

pub mod analysis;
pub mod attack;
pub mod data;
pub mod defence;
pub mod dev;
pub mod eval;
pub mod experiment;
pub mod model;
pub mod report;
pub mod train;
pub mod util;

pub use util::error::{Error, Result};

#[doc(hidden)]
pub use tikv_jemallocator as __jemallocator;

/// Installs the binary's allocator, jemalloc, with the binary's settings, in the executable that
/// invokes it (`src/main.rs`, and the benchmark examples so that they measure what the binary
/// pays). Both are per executable: the `#[global_allocator]` static and the exported
/// `_rjem_malloc_conf` symbol jemalloc reads at start-up.
///
/// Why jemalloc: it reuses freed memory within a step; training allocates and frees hundreds
/// of MB per step, and with glibc's allocator the kernel zeroed those pages anew each time
/// (measured: about a fifth of a training step in page faults; see docs/BENCHMARKS.md).
///
/// The settings (measured with `repnoise bench`, docs/BENCHMARKS.md): freed pages handed back
/// to the kernel after about a second, so that a step's peak memory is close to its live
/// memory. Never returning them (an earlier setting) kept up to 3 GB of freed activations
/// resident: peak 5.7-6.9 against 3.9 GiB for the RepNoise step, 3.4 against 2.7 GiB for a
/// fine-tuning step, for some page faults as each step touches its activations again. One
/// arena: the same memory as eight, and the quicker of the two in the runs made (fine-tuning
/// step 5.4-5.8 s against 6.0-6.2 s). `_RJEM_MALLOC_CONF` still overrides them.
#[macro_export]
macro_rules! jemalloc_as_the_binary {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::__jemallocator::Jemalloc = $crate::__jemallocator::Jemalloc;

        /// jemalloc's settings ([`repnoise::jemalloc_as_the_binary`]); a thin pointer, as
        /// jemalloc reads a `const char *`.
        #[allow(non_upper_case_globals)]
        #[export_name = "_rjem_malloc_conf"]
        pub static malloc_conf: &[u8; 68] =
            b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0\0";
    };
}
