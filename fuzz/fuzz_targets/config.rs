#![no_main]
//! `cargo fuzz run config`: see repnoise::dev::fuzzing::config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::dev::fuzzing::config(data));
