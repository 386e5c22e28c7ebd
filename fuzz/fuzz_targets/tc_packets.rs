//! cargo-fuzz target (root): each input is an Ethernet frame for the TC
//! ingress program, checked by ferry_tests::fuzz_packets::PacketOracle.
#![no_main]

use std::sync::Mutex;

static ORACLE: Mutex<Option<ferry_tests::fuzz_packets::PacketOracle>> = Mutex::new(None);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut oracle = ORACLE.lock().unwrap_or_else(|p| p.into_inner());
    oracle
        .get_or_insert_with(|| {
            ferry_tests::fuzz_packets::PacketOracle::new().expect("loading the TC program (root, FERRY_EBPF_OBJECT)")
        })
        .check(data);
});
