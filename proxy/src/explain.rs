//! `ferry explain`: which backend a flow would reach, and why, from the
//! maps' contents (pure: takes the applied state read back from the maps).

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use ferry_common::lb::{flow_hash4, Be16, Be32};

use crate::model::{Action, Algorithm, L4Addr};
use crate::plan::{AppliedState, BackendId, FrontendEntry};

/// The eBPF programs' flow hash of `src` -> `dst` (IPv4 only): what picks
/// a Maglev slot, in the kernel and in the userspace dataplane alike.
pub fn flow_hash(src: SocketAddr, dst: &L4Addr) -> Option<u32> {
    match (src.ip(), dst.ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(flow_hash4(
            Be32::from_host(s.to_bits()),
            Be32::from_host(d.to_bits()),
            Be16::from_host(src.port()),
            Be16::from_host(dst.port),
            dst.protocol.number(),
        )),
        _ => None,
    }
}

/// Explains the flow `src` -> `dst`.
pub fn explain(applied: &AppliedState, src: SocketAddr, dst: L4Addr) -> String {
    let mut out = format!("flow {src} -> {dst}\n");
    let Some(f) = applied.frontends().get(&dst) else {
        out.push_str("no Service frontend at this address: the flow is not translated\n");
        return out;
    };
    let Some(e) = f.entry else {
        out.push_str("the frontend is being programmed (no master entry yet)\n");
        return out;
    };
    let _ = writeln!(
        out,
        "frontend {dst}: id {}, {}, {}, {} backend(s)",
        e.id,
        e.scope.name(),
        e.algorithm.name(),
        e.count
    );
    if not_forwarded(&mut out, applied, &e, src) {
        return out;
    }
    let backend = |id: &BackendId| describe_backend(applied, *id);
    let slots: Vec<String> = f.slots.iter().map(backend).collect();
    let _ = writeln!(
        out,
        "from this node or its pods (socket-level, at connect()/sendmsg()): one of [{}] at random{}",
        slots.join(", "),
        if e.affinity_timeout != 0 {
            format!(", then the same one for {} s (sessionAffinity ClientIP)", e.affinity_timeout)
        } else {
            String::new()
        }
    );
    if e.algorithm == Algorithm::Maglev {
        match (applied.maglev().get(&e.id), flow_hash(src, &dst)) {
            (Some(table), Some(h)) if !table.is_empty() => {
                let slot = h as usize % table.len();
                let _ = writeln!(
                    out,
                    "from outside the node (TC path, a new flow; a tracked one keeps its backend): Maglev slot {slot} of {} -> {}",
                    table.len(),
                    backend(&table[slot])
                );
            }
            _ => out.push_str("no Maglev table for this frontend\n"),
        }
    }
    out
}

/// Writes why a flow from `src` goes to no backend, if it does not (the
/// frontend rejects or drops, or its source ranges leave `src` out), and
/// whether the source ranges allow it when it has some.
fn not_forwarded(
    out: &mut String,
    applied: &AppliedState,
    e: &FrontendEntry,
    src: SocketAddr,
) -> bool {
    match e.action {
        Action::Reject => {
            out.push_str(
                "rejected: the Service has no usable endpoint (connect() fails at once)\n",
            );
            return true;
        }
        Action::Drop => {
            out.push_str(
                "dropped: the traffic policy is Local and this node has no local endpoint\n",
            );
            return true;
        }
        Action::Forward => {}
    }
    if !e.source_ranges {
        return false;
    }
    let allowed = applied
        .source_ranges()
        .get(&e.id)
        .is_some_and(|r| r.iter().any(|net| net.contains(&src.ip())));
    let _ = writeln!(
        out,
        "loadBalancerSourceRanges: {} {}",
        src.ip(),
        if allowed {
            "is allowed"
        } else {
            "is NOT allowed: the flow is dropped"
        }
    );
    !allowed
}

/// One backend as `explain` names it.
fn describe_backend(applied: &AppliedState, id: BackendId) -> String {
    match applied.backends().get(&id) {
        Some(b) => format!(
            "backend {id} {}{}{}",
            b.addr,
            if b.local { " (local)" } else { "" },
            if b.terminating { " (terminating)" } else { "" }
        ),
        None => format!("backend {id} (missing)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Scope};
    use crate::plan::{BackendEntry, FrontendEntry, FrontendId, MapOp};

    fn l4(s: &str) -> L4Addr {
        let a: SocketAddr = s.parse().unwrap();
        L4Addr {
            ip: a.ip(),
            port: a.port(),
            protocol: Protocol::Tcp,
        }
    }

    fn state(action: Action, algorithm: Algorithm) -> AppliedState {
        let fe = l4("198.19.0.10:80");
        let mut ops = vec![
            MapOp::UpsertBackend {
                id: BackendId(1),
                entry: BackendEntry {
                    addr: l4("198.18.1.1:8080"),
                    local: true,
                    terminating: false,
                },
            },
            MapOp::UpsertRevNat {
                id: FrontendId(7),
                frontend: fe,
            },
            MapOp::UpsertSlot {
                frontend: fe,
                slot: 1,
                backend: BackendId(1),
            },
        ];
        if algorithm == Algorithm::Maglev {
            ops.push(MapOp::UpsertMaglev {
                id: FrontendId(7),
                table: vec![BackendId(1); 31].into(),
            });
        }
        ops.push(MapOp::UpsertFrontend {
            frontend: fe,
            entry: FrontendEntry {
                id: FrontendId(7),
                count: 1,
                scope: Scope::LoadBalancer,
                action,
                algorithm,
                affinity_timeout: 60,
                preserve_source: false,
                source_ranges: false,
                internal_via: None,
            },
        });
        AppliedState::restore(ops)
    }

    #[test]
    fn explains_forward_reject_and_unknown() {
        let src: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        let s = explain(
            &state(Action::Forward, Algorithm::Maglev),
            src,
            l4("198.19.0.10:80"),
        );
        assert!(
            s.contains("one of [backend 1 198.18.1.1:8080/TCP (local)] at random"),
            "{s}"
        );
        assert!(s.contains("sessionAffinity ClientIP"), "{s}");
        assert!(s.contains("Maglev slot"), "{s}");
        assert!(s.contains("-> backend 1 198.18.1.1:8080/TCP"), "{s}");
        let s = explain(
            &state(Action::Reject, Algorithm::Random),
            src,
            l4("198.19.0.10:80"),
        );
        assert!(s.contains("rejected"), "{s}");
        let s = explain(
            &state(Action::Forward, Algorithm::Random),
            src,
            l4("198.19.0.99:80"),
        );
        assert!(s.contains("not translated"), "{s}");
    }
}
