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
    endpoints: &[PortEndpoint<'_>],
    protocol: Protocol,
    v4: bool,
    policy: PortPolicy,
    node: &NodeInfo,
) -> Categorized {
    let family = || endpoints.iter().filter(move |e| e.info.ip.is_ipv4() == v4);
    // One BackendInfo per endpoint (locality compared once), in the same
    // order as `family()`, so the sets below are filters over both.
    let all: Vec<BackendInfo> = family()
        .map(|e| BackendInfo {
            addr: crate::model::L4Addr {
                ip: e.info.ip,
                port: e.port,
                protocol,
            },
            local: e.info.node.as_deref() == Some(node.name.as_str()),
            terminating: !e.info.state.ready,
        })
        .collect();
    let ready = |e: &PortEndpoint<'_>| e.info.state.ready;
    let serving_terminating = |e: &PortEndpoint<'_>| {
        !e.info.state.ready && e.info.state.serving && e.info.state.terminating
    };
    let select = |keep: &dyn Fn(&PortEndpoint<'_>, &BackendInfo) -> bool| -> Vec<BackendInfo> {
        family()
            .zip(&all)
            .filter(|(e, b)| keep(e, b))
            .map(|(_, b)| *b)
            .collect()
    };
    let mut out = Categorized::default();
    if policy.uses_cluster {
        let mode = topology_mode(family(), policy.topology, node);
        out.cluster = if mode == Topology::None && family().all(ready) {
            all.clone()
        } else {
            select(&|e, _| ready(e) && available_for_topology(e, mode, node))
        };
        if out.cluster.is_empty() {
            out.cluster = select(&|e, _| serving_terminating(e));
        }
        out.has_any = !out.cluster.is_empty();
    }
    if policy.uses_local {
        out.has_any |= family().any(|e| ready(e) || serving_terminating(e));
        out.local = select(&|e, b| b.local && ready(e));
        if out.local.is_empty() {
            out.local = select(&|e, b| b.local && serving_terminating(e));
        }
    }
    out.all = all;
    out
}

/// The hints to honour, if any: zone (or node) hints are used only when
/// every ready endpoint carries them and one is meant for this zone (node);
/// otherwise traffic goes everywhere, like kube-proxy.
fn topology_mode<'a>(
    eps: impl Iterator<Item = &'a PortEndpoint<'a>>,
    wanted: Topology,
    node: &NodeInfo,
) -> Topology {
    if wanted == Topology::None {
        return Topology::None;
    }
    let ready: Vec<&PortEndpoint<'_>> = eps.filter(|e| e.info.state.ready).collect();
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

fn available_for_topology(e: &PortEndpoint<'_>, mode: Topology, node: &NodeInfo) -> bool {
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
    eps: impl Iterator<Item = &'a PortEndpoint<'a>>,
    node: &NodeInfo,
    into: &mut BTreeSet<IpAddr>,
) {
    for e in eps {
        if e.info.state.ready && e.info.node.as_deref() == Some(node.name.as_str()) {
            into.insert(e.info.ip);
        }
    }
}
