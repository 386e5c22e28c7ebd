//! `ferry crd`, `ferry version` and `ferry verify`.

use std::path::Path;
use std::process::ExitCode;

/// Prints the FerryLoadBalancerIPPool CRD.
pub fn crd() -> ExitCode {
    match ferry_proxy::ipam::pool::crd_yaml() {
        Ok(y) => {
            print!("{y}");
            ExitCode::SUCCESS
        }
        Err(e) => super::failed("crd", e),
    }
}

/// Prints the version and the embedded eBPF programs.
pub fn version() -> ExitCode {
    println!("ferry {}", env!("CARGO_PKG_VERSION"));
    match ferry_proxy::ebpf::embedded_programs() {
        Ok(names) => println!("eBPF programs: {}", names.join(", ")),
        Err(e) => println!("eBPF programs: none ({e})"),
    }
    ExitCode::SUCCESS
}

/// Loads every embedded program (the verifier runs on each).
pub fn verify(bpffs: &Path) -> ExitCode {
    match ferry_proxy::ebpf::verify_all(bpffs) {
        Ok(names) => {
            for n in names {
                println!("{n}: accepted by the verifier");
            }
            ExitCode::SUCCESS
        }
        Err(e) => super::failed("verify", e),
    }
}
