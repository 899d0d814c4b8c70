#![no_main]
//! `cargo fuzz run dataset`: see repnoise::dev::fuzzing::dataset.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::dev::fuzzing::dataset(data));
