//! `ferry cleanup`: removes everything Ferry pinned.

use std::path::Path;
use std::process::ExitCode;

pub fn main(bpffs_path: &Path) -> ExitCode {
    ferry_proxy::ebpf::lb::remove_pins(bpffs_path);
    // A bpffs mount of its own stays, with the kernel's own entries
    // (maps.debug, progs.debug) but none of ours.
    let ours = |n: &str| n.starts_with("ferry") || n == "links";
    let left = std::fs::read_dir(bpffs_path).map_or(0, |d| {
        d.flatten()
            .filter(|e| ours(&e.file_name().to_string_lossy()))
            .count()
    });
    if left > 0 {
        return super::failed(
            "cleanup",
            format!("{} could not be removed entirely", bpffs_path.display()),
        );
    }
    println!("removed {}", bpffs_path.display());
    ExitCode::SUCCESS
}
