//! `ferry explain`: which backend a flow would reach, from the pinned maps.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use ferry_proxy::datapath::{BpfMaps, LbMaps, MapCapacities};
use ferry_proxy::model::{L4Addr, Protocol};
use ferry_proxy::plan::AppliedState;

pub fn main(source: SocketAddr, destination: &str, bpffs_path: &Path) -> ExitCode {
    let Some(dst) = parse_destination(destination) else {
        return super::usage_error(&ferry_proxy::cli::resolve::UsageError {
            setting: "DESTINATION",
            why: format!("{destination:?} is not IP:PORT/PROTO"),
        });
    };
    let applied = match BpfMaps::open(bpffs_path, MapCapacities::default()).and_then(|m| m.dump()) {
        Ok(ops) => AppliedState::restore(ops),
        Err(e) => return super::failed("explain", e),
    };
    print!("{}", ferry_proxy::explain::explain(&applied, source, dst));
    ExitCode::SUCCESS
}

/// "198.19.0.10:80/TCP" (protocol optional, TCP by default).
fn parse_destination(s: &str) -> Option<L4Addr> {
    let (addr, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let addr: SocketAddr = addr.parse().ok()?;
    Some(L4Addr {
        ip: addr.ip(),
        port: addr.port(),
        protocol: Protocol::parse(&proto.to_uppercase())?,
    })
}
