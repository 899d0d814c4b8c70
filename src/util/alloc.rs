//! The allocator's page returning, held off while generation runs.
//!
//! The binary's jemalloc returns freed pages to the system about a second after they are freed
//! (`dirty_decay_ms:1000`, [`crate::jemalloc_as_the_binary`]), which keeps a training step's
//! resident memory near its live memory (docs/BENCHMARKS.md). Decoding frees and allocates
//! buffers of the same sizes many times a second instead, and the returned pages were faulted
//! back in by the next step: `repnoise bench generate --batch 64` spent 18% of its samples in
//! the kernel (page faults, zeroing, unmapping). [`KeepFreedPages`] keeps them for its
//! lifetime: 1.69M -> 0.46M page faults for that run, at 0.013 GiB more peak memory (0.883
//! against 0.870 GiB; the 1.02-1.14 GiB peaks seen before, with and without the guard, were
//! the model's loading: docs/BENCHMARKS.md, ninth run). Pages freed meanwhile are reused by
//! the allocations that follow, and returned when the last guard is dropped. The held-out
//! cross-entropy holds one too (`eval::heldout::score`, ninth run); stability scoring was tried
//! and left as it was (docs/BENCHMARKS.md, eighth run).
//!
//! It acts on jemalloc's arenas (`arena.<i>.dirty_decay_ms`), whether or not jemalloc is the
//! process's global allocator; where it is not (tests, a library user's program), the guard
//! changes nothing that allocates.

use std::sync::Mutex;

/// The guards alive, and the decay times they replaced (per arena; `None` where unreadable).
static STATE: Mutex<(usize, Vec<Option<isize>>)> = Mutex::new((0, Vec::new()));

/// While one is alive, freed pages stay with the allocator for reuse (see the module docs).
/// Guards nest and may overlap across threads: the first one in sets the arenas, the last one
/// out restores them.
#[must_use = "the setting holds only while the guard lives"]
pub struct KeepFreedPages(());

impl KeepFreedPages {
    pub fn new() -> Self {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            // The pages already free are returned first, so that the guard keeps only the
            // pages freed while it lives.
            state.1 = (0..arenas()).map(|i| purge_then_set(i, -1)).collect();
        }
        state.0 += 1;
        Self(())
    }
}

impl Default for KeepFreedPages {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepFreedPages {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            // The pages kept are returned, so that what runs next (a training step, between
            // held-out probes) starts as it would have without the guard.
            for (i, v) in std::mem::take(&mut state.1).into_iter().enumerate() {
                if let Some(v) = v {
                    purge_then_set(i, v);
                }
            }
        }
    }
}

/// The number of arenas jemalloc has (0 when it cannot say).
fn arenas() -> usize {
    tikv_jemalloc_ctl::arenas::narenas::read().map_or(0, |n| n as usize)
}

/// The name of arena `i`'s dirty-page decay time (ms; -1: never return), NUL-terminated.
fn decay_name(i: usize) -> String {
    format!("arena.{i}.dirty_decay_ms\0")
}

/// Returns arena `i`'s free pages to the system at once (jemalloc purges when the decay time
/// is set to 0), then sets its decay time to `ms`; returns the decay time it had before.
fn purge_then_set(i: usize, ms: isize) -> Option<isize> {
    let old = set_decay(i, 0);
    set_decay(i, ms);
    old
}

/// Sets arena `i`'s dirty-page decay time and returns the one it replaced (`None` where the
/// arena does not answer, e.g. one not in use).
fn set_decay(i: usize, ms: isize) -> Option<isize> {
    // SAFETY: the name is NUL-terminated and names an `ssize_t` setting.
    unsafe { tikv_jemalloc_ctl::raw::update::<isize>(decay_name(i).as_bytes(), ms) }.ok()
}

/// Arena `i`'s dirty-page decay time in ms (-1 while a [`KeepFreedPages`] lives), if it
/// answers: what the guard acts on, for tests and diagnostics.
pub fn dirty_decay_ms(i: usize) -> Option<isize> {
    // SAFETY: as in `set_decay`.
    unsafe { tikv_jemalloc_ctl::raw::read::<isize>(decay_name(i).as_bytes()) }.ok()
}
