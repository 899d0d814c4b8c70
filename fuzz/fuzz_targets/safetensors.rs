#![no_main]
//! `cargo fuzz run safetensors`: see repnoise::fuzzing::safetensors.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::fuzzing::safetensors(data));
