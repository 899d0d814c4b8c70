//! Fault injection for the crash-safety tests. `REPNOISE_KILL_AT=<point>[:<n>]` makes the process
//! kill itself with SIGKILL the `n`-th time (default: the first) it reaches the named point, so a
//! test can land a `kill -9` exactly inside a checkpoint write, between a temporary file and its
//! rename, or half-way through a metrics line. Without the variable every point is one relaxed
//! atomic load.
//!
//! The points, in the order a training run meets them:
//!
//! | point | where |
//! |---|---|
//! | `metrics.partial` | half of a `metrics.jsonl` line written (no newline) |
//! | `checkpoint.dir` | checkpoint's temporary directory created, nothing in it |
//! | `checkpoint.weights` | checkpoint weights written, optimizer state not yet |
//! | `checkpoint.marker` | checkpoint complete (`COMPLETE` written), not yet renamed into place |
//! | `checkpoint.renamed` | checkpoint in place, older ones not yet pruned |
//! | `atomic.tmp` | any atomic write: temporary file synced, not yet renamed |
//! | `model.weights` | final model's weights written, its `config.json` not yet |
//! | `done.marker` | `DONE` written, checkpoints not yet removed |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Every fault point (see the module docs).
pub const POINTS: &[&str] = &[
    "metrics.partial",
    "checkpoint.dir",
    "checkpoint.weights",
    "checkpoint.marker",
    "checkpoint.renamed",
    "atomic.tmp",
    "model.weights",
    "done.marker",
];

static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
static HITS: AtomicUsize = AtomicUsize::new(0);

fn target() -> Option<&'static (String, usize)> {
    TARGET
        .get_or_init(|| {
            let v = std::env::var("REPNOISE_KILL_AT").ok()?;
            let (name, n) = match v.split_once(':') {
                Some((a, b)) => (a.to_string(), b.parse().unwrap_or(1)),
                None => (v, 1),
            };
            Some((name, n.max(1)))
        })
        .as_ref()
}

/// Whether this passage through `name` is the one to die at.
pub fn armed(name: &str) -> bool {
    match target() {
        Some((t, n)) if t == name => HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n,
        _ => false,
    }
}

/// Die here if `REPNOISE_KILL_AT` names this passage through `name`.
pub fn point(name: &str) {
    if armed(name) {
        kill_now();
    }
}

/// SIGKILL this process: no destructor, flush or handler runs.
pub fn kill_now() -> ! {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid with a signal that cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
