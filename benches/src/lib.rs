//! Synthetic clusters for benchmarks: N Services with E endpoints each, as
//! the Kubernetes objects a source would deliver. Deterministic.

use std::collections::BTreeMap;

use ferry_proxy::model::NodeInfo;
use ferry_proxy::pipeline::Core;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, Plan, PlanConfig, PlanScope};
use ferry_proxy::translate::TranslateConfig;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Shape of a synthetic cluster.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub services: usize,
    pub endpoints: usize,
    /// Every n-th Service is a NodePort (Maglev tables); 0: none.
    pub nodeport_every: usize,
}

/// The ClusterIP of Service `i` (198.19.0.0/16, then 198.18.128.0/17 past
/// 65,000 Services).
pub fn cluster_ip(i: usize) -> String {
    if i < 65_000 {
        format!("198.19.{}.{}", i / 250, i % 250 + 1)
    } else {
        let j = i - 65_000;
        format!("198.18.{}.{}", 128 + j / 250, j % 250 + 1)
    }
}

/// Endpoint address `e` of Service `i`: 10.x.y.z pod addresses, unique per
/// Service (as pods usually are).
pub fn endpoint_ip(i: usize, e: usize) -> String {
    let n = i * 64 + e;
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

pub fn service(i: usize, shape: Shape) -> Service {
    let node_port = shape.nodeport_every != 0 && i.is_multiple_of(shape.nodeport_every);
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(if node_port { "NodePort" } else { "ClusterIP" }.into()),
            cluster_ip: Some(cluster_ip(i)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                node_port: node_port.then_some(30000 + (i % 2767) as i32),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The EndpointSlice of Service `i`; `generation` changes the last
/// endpoint (a pod replaced), so two generations differ by one endpoint.
pub fn slice(i: usize, shape: Shape, generation: usize) -> EndpointSlice {
    let endpoints = (0..shape.endpoints)
        .map(|e| {
            let e = if e + 1 == shape.endpoints {
                e + generation * shape.endpoints
            } else {
                e
            };
            Endpoint {
                addresses: vec![endpoint_ip(i, e % 64)],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(format!("node-{}", e % 3)),
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abcde")),
            namespace: Some("bench".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

/// Every object of the cluster.
pub fn cluster(shape: Shape) -> (Vec<Service>, Vec<EndpointSlice>) {
    (
        (0..shape.services).map(|i| service(i, shape)).collect(),
        (0..shape.services).map(|i| slice(i, shape, 0)).collect(),
    )
}

/// The node the benchmarks translate for.
pub fn bench_node() -> NodeInfo {
    NodeInfo {
        name: "node-0".into(),
        zone: None,
        nodeport_addresses: vec![std::net::IpAddr::from([198, 18, 0, 10])],
    }
}

/// Map capacities large enough for 50,000 Services.
pub fn plan_config() -> PlanConfig {
    PlanConfig {
        max_backends: 1 << 20,
        max_frontends: 1 << 18,
        ..PlanConfig::default()
    }
}

/// A core with every object of the cluster parsed and tracked (not yet
/// translated).
pub fn loaded_core(shape: Shape) -> Core {
    let (svcs, slices) = cluster(shape);
    let mut core = Core::new("ferry", bench_node(), TranslateConfig::default());
    for s in &svcs {
        core.upsert_service(s);
    }
    for s in &slices {
        core.upsert_slice(s);
    }
    core
}

/// The plan that programs `core`'s desired state into empty maps.
pub fn plan_from_empty(core: &Core, cfg: &PlanConfig) -> Plan {
    let mut alloc = Allocators::new(cfg);
    plan_sync(
        &AppliedState::default(),
        core.desired(),
        PlanScope::Full,
        &mut alloc,
        cfg,
    )
}
