//! Pure encoding between the plan's values and the eBPF maps' layouts
//! (ferry-common, IPv4): frontend keys and master entries, backend and
//! reverse-NAT values, source-range keys, and back again for the restart
//! dump. No syscalls here; `bpf.rs` does the map I/O.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use crate::model::{Action, Algorithm, L4Addr, Protocol, Scope};
use crate::plan::{BackendEntry, FrontendEntry, FrontendId, MapOp};
use aya::maps::lpm_trie::Key as LpmKey;
use ferry_common::lb::{
    Backend4, Be16, Be32, RevNat4, Service4Key, Service4Value, SourceRange4, BACKEND_FLAG_LOCAL,
    BACKEND_FLAG_TERMINATING, SCOPE_CLUSTER_IP, SCOPE_EXTERNAL_IP, SCOPE_LOAD_BALANCER,
    SCOPE_NODE_PORT, SVC_FLAG_DROP, SVC_FLAG_INTERNAL_VIA, SVC_FLAG_LEAST_CONNECTIONS,
    SVC_FLAG_MAGLEV, SVC_FLAG_PRESERVE_SOURCE, SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES,
    SVC_SCOPE_MASK, SVC_SCOPE_SHIFT,
};
use ipnet::Ipv4Net;
use std::net::IpAddr;

/// The map a run of upserts is batched into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    Services,
    Backends,
    RevNat,
}

pub(super) fn run_of(op: &MapOp) -> Option<Run> {
    match op {
        MapOp::UpsertBackend { entry, .. } if entry.addr.ip.is_ipv4() => Some(Run::Backends),
        MapOp::UpsertSlot { frontend, .. } | MapOp::UpsertFrontend { frontend, .. }
            if frontend.ip.is_ipv4() =>
        {
            Some(Run::Services)
        }
        MapOp::UpsertRevNat { frontend, .. } if frontend.ip.is_ipv4() => Some(Run::RevNat),
        _ => None,
    }
}

pub(super) fn backend_value(entry: &BackendEntry) -> Option<Backend4> {
    let (addr, port, proto) = v4(&entry.addr)?;
    let mut flags = 0;
    if entry.local {
        flags |= BACKEND_FLAG_LOCAL;
    }
    if entry.terminating {
        flags |= BACKEND_FLAG_TERMINATING;
    }
    Some(Backend4 {
        addr,
        port,
        proto,
        flags,
    })
}

pub(super) fn revnat_value(frontend: &L4Addr) -> Option<RevNat4> {
    let (addr, port, _) = v4(frontend)?;
    Some(RevNat4 { addr, port, pad: 0 })
}

/// The backends-map entry of a backend upsert.
pub(super) fn backend_entry(op: &MapOp) -> Option<(u32, Backend4)> {
    match op {
        MapOp::UpsertBackend { id, entry } => Some((id.0, backend_value(entry)?)),
        _ => None,
    }
}

/// The reverse-NAT-map entry of a reverse NAT upsert.
pub(super) fn revnat_entry(op: &MapOp) -> Option<(u32, RevNat4)> {
    match op {
        MapOp::UpsertRevNat { id, frontend } => Some((id.0, revnat_value(frontend)?)),
        _ => None,
    }
}

/// The services-map entry of a slot or master upsert.
pub(super) fn services_entry(op: &MapOp) -> Option<(Service4Key, Service4Value)> {
    match op {
        MapOp::UpsertSlot {
            frontend,
            slot,
            backend,
        } => Some((
            svc_key(frontend, *slot)?,
            Service4Value {
                backend_id: backend.0,
                ..Service4Value::default()
            },
        )),
        MapOp::UpsertFrontend { frontend, entry } => {
            Some((svc_key(frontend, 0)?, encode_frontend(entry)))
        }
        _ => None,
    }
}

pub(super) fn v4(addr: &L4Addr) -> Option<(Be32, Be16, u8)> {
    match addr.ip {
        IpAddr::V4(ip) => Some((
            Be32::from_host(ip.to_bits()),
            Be16::from_host(addr.port),
            addr.protocol.number(),
        )),
        IpAddr::V6(_) => None,
    }
}

pub(super) fn svc_key(frontend: &L4Addr, slot: u16) -> Option<Service4Key> {
    let (addr, port, proto) = v4(frontend)?;
    Some(Service4Key {
        addr,
        port,
        slot,
        proto,
        pad: [0; 3],
    })
}

pub(super) fn scope_bits(scope: Scope) -> u16 {
    let s = match scope {
        Scope::ClusterIp => SCOPE_CLUSTER_IP,
        Scope::NodePort => SCOPE_NODE_PORT,
        Scope::LoadBalancer => SCOPE_LOAD_BALANCER,
        Scope::ExternalIp => SCOPE_EXTERNAL_IP,
    };
    s << SVC_SCOPE_SHIFT
}

/// The master entry's value.
pub fn encode_frontend(e: &FrontendEntry) -> Service4Value {
    let mut flags = scope_bits(e.scope);
    flags |= match e.action {
        Action::Forward => 0,
        Action::Reject => SVC_FLAG_REJECT,
        Action::Drop => SVC_FLAG_DROP,
    };
    flags |= match e.algorithm {
        Algorithm::Maglev => SVC_FLAG_MAGLEV,
        Algorithm::LeastConnections => SVC_FLAG_LEAST_CONNECTIONS,
        Algorithm::Random => 0,
    };
    if e.preserve_source {
        flags |= SVC_FLAG_PRESERVE_SOURCE;
    }
    if e.source_ranges {
        flags |= SVC_FLAG_SOURCE_RANGES;
    }
    if e.internal_via.is_some() {
        flags |= SVC_FLAG_INTERNAL_VIA;
    }
    Service4Value {
        backend_id: e.internal_via.map_or(0, |id| id.0),
        frontend_id: e.id.0,
        count: e.count,
        flags,
        affinity_timeout: e.affinity_timeout,
    }
}

/// The inverse of [`encode_frontend`].
pub fn decode_frontend(v: &Service4Value) -> FrontendEntry {
    let scope = match (v.flags & SVC_SCOPE_MASK) >> SVC_SCOPE_SHIFT {
        SCOPE_NODE_PORT => Scope::NodePort,
        SCOPE_LOAD_BALANCER => Scope::LoadBalancer,
        SCOPE_EXTERNAL_IP => Scope::ExternalIp,
        _ => Scope::ClusterIp,
    };
    let action = if v.flags & SVC_FLAG_REJECT != 0 {
        Action::Reject
    } else if v.flags & SVC_FLAG_DROP != 0 {
        Action::Drop
    } else {
        Action::Forward
    };
    FrontendEntry {
        id: FrontendId(v.frontend_id),
        count: v.count,
        scope,
        action,
        algorithm: if v.flags & SVC_FLAG_MAGLEV != 0 {
            Algorithm::Maglev
        } else if v.flags & SVC_FLAG_LEAST_CONNECTIONS != 0 {
            Algorithm::LeastConnections
        } else {
            Algorithm::Random
        },
        affinity_timeout: v.affinity_timeout,
        preserve_source: v.flags & SVC_FLAG_PRESERVE_SOURCE != 0,
        source_ranges: v.flags & SVC_FLAG_SOURCE_RANGES != 0,
        internal_via: (v.flags & SVC_FLAG_INTERNAL_VIA != 0).then_some(FrontendId(v.backend_id)),
    }
}

pub(super) fn l4(addr: Be32, port: Be16, proto: u8) -> Option<L4Addr> {
    Some(L4Addr {
        ip: IpAddr::from(std::net::Ipv4Addr::from_bits(addr.to_host())),
        port: port.to_host(),
        protocol: Protocol::from_number(proto)?,
    })
}

pub(super) fn range_key(id: FrontendId, range: Ipv4Net) -> LpmKey<SourceRange4> {
    LpmKey::new(
        32 + u32::from(range.prefix_len()),
        SourceRange4 {
            frontend_id: Be32::from_host(id.0),
            addr: Be32::from_host(range.network().to_bits()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every master entry the plan can produce reads back as itself: the
    /// restart dump rebuilds the applied state from these values.
    #[test]
    fn frontend_entries_round_trip() {
        let scopes = [
            Scope::ClusterIp,
            Scope::NodePort,
            Scope::LoadBalancer,
            Scope::ExternalIp,
        ];
        let actions = [Action::Forward, Action::Reject, Action::Drop];
        let algorithms = [
            Algorithm::Random,
            Algorithm::Maglev,
            Algorithm::LeastConnections,
        ];
        let mut n = 0u32;
        for scope in scopes {
            for action in actions {
                for algorithm in algorithms {
                    for flags in 0..8u8 {
                        n += 1;
                        let e = FrontendEntry {
                            id: FrontendId(n * 7919),
                            count: (n % 300) as u16,
                            scope,
                            action,
                            algorithm,
                            affinity_timeout: if flags & 1 != 0 { 10_800 } else { 0 },
                            preserve_source: flags & 2 != 0,
                            source_ranges: flags & 4 != 0,
                            internal_via: n.is_multiple_of(3).then_some(FrontendId(n)),
                        };
                        assert_eq!(decode_frontend(&encode_frontend(&e)), e, "{e:?}");
                    }
                }
            }
        }
    }
}
