//! cargo-fuzz target: ferry_tests::fuzz::objects_json on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::fuzz::objects_json(data));
