//! What every other module stands on: typed errors, seeded randomness, atomic file I/O (and the
//! stage cache built on it), SVG charts, and the fault-injection points of the crash-safety
//! tests.

pub mod error;
pub mod fault;
pub mod io;
pub mod plot;
pub mod rng;
