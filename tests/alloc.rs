//! The allocator guard of `repnoise::util::alloc`, in a process of its own: it changes
//! process-wide allocator settings, which the other tests' generation would change too if they
//! ran beside it (`tests/it` runs its tests in parallel threads).

use repnoise::util::alloc::{dirty_decay_ms, KeepFreedPages};

/// Nested guards keep freed pages until the outer one is dropped; then the arena's own setting
/// is back.
#[test]
fn guards_hold_off_page_returning_and_restore_the_setting() {
    let before = dirty_decay_ms(0).expect("jemalloc's arena 0 answers");
    assert_ne!(before, -1, "jemalloc's default returns freed pages");
    let outer = KeepFreedPages::new();
    assert_eq!(dirty_decay_ms(0), Some(-1));
    let inner = KeepFreedPages::new();
    drop(inner);
    assert_eq!(dirty_decay_ms(0), Some(-1), "the outer guard still holds");
    drop(outer);
    assert_eq!(dirty_decay_ms(0), Some(before));
}
