//! The language model: where it comes from (`load`, `assets`, `gguf`, `tokenizer`, `chat`), what it
//! is (`config`, `params`, `llama`, the fused `ops` with their backward passes, `vmath` the
//! vectorised element-wise kernels under them), its loss (`loss`) and how it answers
//! (`generate`).

pub mod assets;
pub mod chat;
pub mod config;
pub mod gemm;
pub mod generate;
pub mod gguf;
pub mod init;
pub mod llama;
pub mod load;
pub mod loss;
pub mod low_rank;
pub mod memory;
pub mod ops;
pub mod params;
pub mod tensor_file;
pub mod tokenizer;
pub mod vmath;
