//! categorize_endpoints: which endpoints of one Service port new flows may
//! use, following kube-proxy's rules: topology hints, terminating endpoints
//! as a last resort, Local policies, and "no endpoints at all".

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::{BackendInfo, NodeInfo, Protocol, Topology};
use crate::track::PortEndpoint;

/// The endpoint sets of one Service port (one IP family).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster policies (after topology and the terminating fallback).
    pub cluster: Vec<BackendInfo>,
    /// For Local policies: local ready endpoints, else local
    /// serving+terminating ones.
    pub local: Vec<BackendInfo>,
    /// Some endpoint anywhere can take traffic: with an empty selected set
    /// the frontend drops instead of rejecting.
    pub has_any: bool,
    /// Every endpoint of the port (any state), for draining.
    pub all: Vec<BackendInfo>,
}

/// What categorize needs from the Service.
#[derive(Debug, Clone, Copy)]
pub struct PortPolicy {
    pub uses_cluster: bool,
    pub uses_local: bool,
    pub topology: Topology,
}

pub fn categorize_endpoints(
    endpoints: &[PortEndpoint],
    protocol: Protocol,
    v4: bool,
    policy: PortPolicy,
    node: &NodeInfo,
) -> Categorized {
    let eps: Vec<&PortEndpoint> = endpoints
        .iter()
        .filter(|e| e.info.ip.is_ipv4() == v4)
        .collect();
    let is_local = |e: &PortEndpoint| e.info.node.as_deref() == Some(node.name.as_str());
    let backend = |e: &PortEndpoint| BackendInfo {
        addr: crate::model::L4Addr {
            ip: e.info.ip,
            port: e.port,
            protocol,
        },
        local: is_local(e),
        terminating: !e.info.state.ready,
    };
    let ready = |e: &PortEndpoint| e.info.state.ready;
    let serving_terminating =
        |e: &PortEndpoint| !e.info.state.ready && e.info.state.serving && e.info.state.terminating;
    let mut out = Categorized {
        all: eps.iter().map(|e| backend(e)).collect(),
        ..Categorized::default()
    };
    if policy.uses_cluster {
        let mode = topology_mode(&eps, policy.topology, node);
        out.cluster = eps
            .iter()
            .filter(|e| ready(e) && available_for_topology(e, mode, node))
            .map(|e| backend(e))
            .collect();
        if out.cluster.is_empty() {
            out.cluster = eps
                .iter()
                .filter(|e| serving_terminating(e))
                .map(|e| backend(e))
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if policy.uses_local {
        out.has_any |= eps.iter().any(|e| ready(e) || serving_terminating(e));
        out.local = eps
            .iter()
            .filter(|e| is_local(e) && ready(e))
            .map(|e| backend(e))
            .collect();
        if out.local.is_empty() {
            out.local = eps
                .iter()
                .filter(|e| is_local(e) && serving_terminating(e))
                .map(|e| backend(e))
                .collect();
        }
    }
    out
}

/// The hints to honour, if any: zone (or node) hints are used only when
/// every ready endpoint carries them and one is meant for this zone (node);
/// otherwise traffic goes everywhere, like kube-proxy.
fn topology_mode(eps: &[&PortEndpoint], wanted: Topology, node: &NodeInfo) -> Topology {
    if wanted == Topology::None {
        return Topology::None;
    }
    let ready: Vec<&&PortEndpoint> = eps.iter().filter(|e| e.info.state.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if wanted == Topology::SameNode
        && ready.iter().all(|e| !e.info.node_hints.is_empty())
        && ready
            .iter()
            .any(|e| e.info.node_hints.iter().any(|n| **n == *node.name))
    {
        return Topology::SameNode;
    }
    let Some(zone) = node.zone.as_deref() else {
        return Topology::None;
    };
    if ready.iter().all(|e| !e.info.zone_hints.is_empty())
        && ready
            .iter()
            .any(|e| e.info.zone_hints.iter().any(|z| &**z == zone))
    {
        return Topology::SameZone;
    }
    Topology::None
}

fn available_for_topology(e: &PortEndpoint, mode: Topology, node: &NodeInfo) -> bool {
    match mode {
        Topology::None => true,
        Topology::SameZone => node
            .zone
            .as_deref()
            .is_some_and(|zone| e.info.zone_hints.iter().any(|z| &**z == zone)),
        Topology::SameNode => e.info.node_hints.iter().any(|n| **n == *node.name),
    }
}

/// Distinct local ready endpoint addresses, as kube-proxy's health check
/// server counts them.
pub fn local_ready_addresses<'a>(
    eps: impl Iterator<Item = &'a PortEndpoint>,
    node: &NodeInfo,
    into: &mut BTreeSet<IpAddr>,
) {
    for e in eps {
        if e.info.state.ready && e.info.node.as_deref() == Some(node.name.as_str()) {
            into.insert(e.info.ip);
        }
    }
}
