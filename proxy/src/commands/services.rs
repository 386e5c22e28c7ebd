//! `ferry services`: every frontend and its backends, from the pinned maps
//! of an eBPF agent, else from a userspace agent's `/services`.

use std::path::Path;
use std::process::ExitCode;

use ferry_proxy::datapath::{BpfMaps, LbMaps, MapCapacities};
use ferry_proxy::plan::AppliedState;
use ferry_proxy::rows;

use super::Output;

pub fn main(output: Output, bpffs_path: &Path, metrics_address: &str) -> ExitCode {
    let maps = match BpfMaps::open(bpffs_path, MapCapacities::default()) {
        Ok(m) => m,
        Err(e) => return from_userspace(output, bpffs_path, metrics_address, &e),
    };
    let applied = match maps.dump() {
        Ok(ops) => AppliedState::restore(ops),
        Err(e) => return super::failed("services", e),
    };
    let rows = rows::service_rows(&applied);
    match output {
        Output::Table => print!("{}", rows::format_table(&rows)),
        Output::Json => match serde_json::to_string_pretty(&rows) {
            Ok(s) => println!("{s}"),
            Err(e) => return super::failed("services", e),
        },
    }
    ExitCode::SUCCESS
}

/// No pinned maps: a userspace agent answers /services.
fn from_userspace(
    output: Output,
    bpffs_path: &Path,
    metrics_address: &str,
    no_maps: &dyn std::fmt::Display,
) -> ExitCode {
    let body = match ferry_proxy::http::get(metrics_address, "/services") {
        Ok(body) => body,
        Err(http) => {
            return super::failed(
                "services",
                format!(
                    "{no_maps} (is an eBPF agent running with --bpffs-path {}?); \
                     and no userspace agent at {metrics_address}: {http}",
                    bpffs_path.display()
                ),
            )
        }
    };
    match output {
        Output::Json => println!("{body}"),
        Output::Table => match rows::format_userspace_table(&body) {
            Ok(t) => print!("{t}"),
            Err(e) => return super::failed("services", e),
        },
    }
    ExitCode::SUCCESS
}
