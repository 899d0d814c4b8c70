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
