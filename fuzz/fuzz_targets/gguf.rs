#![no_main]
//! `cargo fuzz run gguf`: see repnoise::fuzzing::gguf.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::fuzzing::gguf(data));
