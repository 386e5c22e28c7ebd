//! Kubernetes objects for dataplane tests, written as YAML the way users
//! write them: a Service with one port (80 -> target, a NodePort), an
//! EndpointSlice with node names and conditions, the node "node-a" with
//! 198.18.20.1 and 198.18.21.1, and a sync of them through an agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use ferry_proxy::agent::runner::SyncKind;
use ferry_proxy::agent::Agent;
use ferry_proxy::datapath::{BpfMaps, MapCapacities};
use ferry_proxy::source::SourceEvent;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    yaml_serde::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A NodePort Service with one port (80 -> `target`, `node_port`) and
/// `extra` spec lines (indented four spaces); a `# lb IP` line among them
/// makes it a LoadBalancer with IP as its ingress address.
pub fn service(name: &str, proto: &str, node_port: u16, target: u16, extra: &str) -> Service {
    let mut lb_ip = String::new();
    for line in extra.lines() {
        if let Some(ip) = line.trim().strip_prefix("# lb ") {
            lb_ip = format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n");
        }
    }
    yaml(&format!(
        "metadata: {{name: {name}, namespace: default}}
spec:
    clusterIP: 198.19.0.{node_port_low}
    type: {kind}
    ports:
    - {{port: 80, targetPort: {target}, protocol: {proto}, nodePort: {node_port}}}
{extra}
{lb_ip}",
        node_port_low = node_port % 250 + 1,
        kind = if lb_ip.is_empty() {
            "NodePort"
        } else {
            "LoadBalancer"
        },
    ))
}

/// An EndpointSlice: (address, node, ready, terminating) per endpoint.
pub fn slice(
    service: &str,
    proto: &str,
    port: u16,
    eps: &[(&str, &str, bool, bool)],
) -> EndpointSlice {
    let mut text = format!(
        "metadata:
  name: {service}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{port: {port}, protocol: {proto}}}]
endpoints:
"
    );
    for (ip, node, ready, terminating) in eps {
        text.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}\n"
        ));
    }
    if eps.is_empty() {
        text.push_str("[]\n");
        text = text.replace("endpoints:\n[]", "endpoints: []");
    }
    yaml(&text)
}

pub fn node_object() -> Node {
    yaml(
        "metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 198.18.20.1}
  - {type: InternalIP, address: 198.18.21.1}",
    )
}

/// An agent (node "node-a", see [`crate::agent_config`]) on the maps
/// pinned under `pins`.
pub fn bpf_agent(pins: &std::path::Path) -> Agent {
    let maps = BpfMaps::open(pins, MapCapacities::default()).unwrap();
    Agent::new(crate::agent_config(vec!["test"]), Box::new(maps)).unwrap()
}

pub fn sync(agent: &mut Agent, services: &[Service], slices: &[EndpointSlice]) {
    agent.handle(SourceEvent::Snapshot {
        source: "test",
        services: services.to_vec(),
        slices: slices.to_vec(),
        nodes: vec![node_object()],
    });
    let report = agent.sync(SyncKind::Incremental).unwrap();
    assert_eq!(report.plan_errors, 0);
}
