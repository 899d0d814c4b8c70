//! The integration tests, one binary: each file is a module, and a release build links once
//! instead of once per file (most of CI's time went to linking eight binaries with LTO).
//! Run one file's tests with `cargo test --release --test it training::`.

mod common;

mod align;
mod analysis;
mod attack;
mod bad_input;
mod candle_patches;
mod classifier;
mod data_encode;
mod data_readers;
mod data_shipped;
mod data_splits;
mod eval;
mod experiment;
mod fuzz;
mod layout;
mod model_core;
mod precision;
mod reliability;
mod smollm2;
mod training;
