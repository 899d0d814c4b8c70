#![no_main]
//! `cargo fuzz run config`: see repnoise::fuzzing::config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::fuzzing::config(data));
