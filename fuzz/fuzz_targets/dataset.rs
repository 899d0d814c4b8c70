#![no_main]
//! `cargo fuzz run dataset`: see repnoise::fuzzing::dataset.

libfuzzer_sys::fuzz_target!(|data: &[u8]| repnoise::fuzzing::dataset(data));
