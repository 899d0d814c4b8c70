//! `repnoise`: Representation Noising (Rosati et al., NeurIPS 2024) and the tooling around it:
//! load real chat models, train them, defend them, attack them and measure the result.
//!
//! This crate is the library; `src/main.rs` is a thin command-line front end over it.

pub mod abliterate;
pub mod align;
pub mod analysis;
pub mod attack;
pub mod bench;
pub mod bert;
pub mod chat;
pub mod classifier;
pub mod config;
pub mod data;
pub mod deberta;
pub mod defend;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod fault;
pub mod fetch;
pub mod finetune;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod io;
pub mod lora;
pub mod loss;
pub mod model;
pub mod modelio;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod refusal;
pub mod report;
pub mod rng;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
