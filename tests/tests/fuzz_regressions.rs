//! Every input kept in fuzz/regressions/ (inputs that once failed a fuzz
//! target, kept after the fix) and every seed in fuzz/seeds/, through the
//! same oracles the fuzz targets run (ferry_tests::fuzz). The packet
//! target's inputs need root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["regressions", "seeds"] {
        if let Ok(d) = std::fs::read_dir(fuzz.join(dir).join(target)) {
            files.extend(d.flatten().map(|e| e.path()));
        }
    }
    files.sort();
    files
}

#[test]
fn parser_targets_replay_their_kept_inputs() {
    let mut ran = 0;
    for (name, oracle) in ferry_tests::fuzz::TARGETS {
        for f in inputs(name) {
            let data = std::fs::read(&f).unwrap();
            let outcome = std::panic::catch_unwind(|| oracle(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", f.display());
            ran += 1;
        }
    }
    assert!(ran >= 60, "only {ran} kept inputs found");
}

#[test]
fn packet_target_replays_its_kept_inputs() {
    ferry_tests::needs_ebpf!("packet_target_replays_its_kept_inputs");
    let mut oracle = ferry_tests::fuzz_packets::PacketOracle::new().unwrap();
    let files = inputs("tc_packets");
    assert!(files.len() >= 20, "{files:?}");
    for f in files {
        let frame = std::fs::read(&f).unwrap();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| oracle.check(&frame)));
        assert!(outcome.is_ok(), "tc_packets: {} fails", f.display());
    }
}
