#![no_main]
//! `cargo fuzz run safetensors`: see repnoise::dev::fuzzing::safetensors.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::dev::fuzzing::safetensors(data));
