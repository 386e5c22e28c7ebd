//! Node -> [`NodeInfo`]: name, zone label and the addresses NodePort
//! frontends are created on.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::model::NodeInfo;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// This node's name, zone and NodePort addresses: its InternalIP and
/// ExternalIP addresses, limited to `nodeport_cidrs` when that is not
/// empty (kube-proxy's --nodeport-addresses). Unparseable addresses are
/// skipped: they cannot carry traffic.
pub fn parse_node(node: &Node, nodeport_cidrs: &[IpNet]) -> NodeInfo {
    let mut addrs: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .filter(|ip| nodeport_cidrs.is_empty() || nodeport_cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    addrs.sort();
    addrs.dedup();
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned(),
        nodeport_addresses: addrs,
    }
}
