//! What every other module stands on: typed errors, seeded randomness, atomic file I/O (and the
//! stage cache built on it), SVG charts, the fault-injection points of the crash-safety tests,
//! and the allocator's setting for inference.

pub mod alloc;
pub mod error;
pub mod fault;
pub mod io;
pub mod plot;
pub mod rng;
