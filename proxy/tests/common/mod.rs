//! Shared by the integration tests of the proxy crate.

use std::path::{Path, PathBuf};

/// The golden scenario directories (those with an input.yaml), sorted.
pub fn scenario_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("proxy/testdata is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("input.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}
