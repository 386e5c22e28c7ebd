//! cargo-fuzz target: ferry_tests::fuzz::config on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::fuzz::config(data));
