#![no_main]
//! `cargo fuzz run gguf`: see repnoise::dev::fuzzing::gguf.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::dev::fuzzing::gguf(data));
