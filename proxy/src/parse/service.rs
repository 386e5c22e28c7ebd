//! Service -> [`ServiceInfo`]: every field translate relies on, validated.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::annotations::{algorithm, parse_probe, topology};
use super::{object_name, port_number, InvalidObject};
use crate::model::{ObjectName, Protocol, ServiceInfo, ServicePortInfo, TrafficPolicy};

/// Services with this label are served only by the proxy it names.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// What Ferry does with a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedService {
    Serve(ServiceInfo),
    /// Not ours to serve (headless, ExternalName, another proxy's); the
    /// reason is for logs.
    Ignore(&'static str),
}

pub(super) struct Ctx<'a> {
    name: &'a ObjectName,
}

impl Ctx<'_> {
    pub(super) fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> InvalidObject {
        InvalidObject {
            kind: "Service",
            object: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn ip(&self, field: String, value: &str) -> Result<IpAddr, InvalidObject> {
        value
            .trim()
            .parse()
            .map_err(|_| self.err(field, format!("invalid IP address {value:?}")))
    }
}

/// Parses a Service. `proxy_name` is the service-proxy-name Ferry answers
/// to (Services labelled with any other name are ignored).
pub fn parse_service(svc: &Service, proxy_name: &str) -> Result<ParsedService, InvalidObject> {
    let name = object_name(&svc.metadata);
    let cx = Ctx { name: &name };
    if let Some(why) = ignored_by_label(svc, proxy_name) {
        return Ok(ParsedService::Ignore(why));
    }
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    match type_ {
        "ExternalName" => return Ok(ParsedService::Ignore("type ExternalName")),
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => return Err(cx.err("spec.type", format!("unknown type {other:?}"))),
    }
    let cluster_ips = cluster_ips(&cx, &spec)?;
    let Some(cluster_ips) = cluster_ips else {
        return Ok(ParsedService::Ignore("headless (clusterIP None)"));
    };
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let ports = ports(&cx, spec.ports.as_deref().unwrap_or_default(), type_)?;
    let external_ips = external_ips(&cx, &spec)?;
    let load_balancer_ips = if type_ == "LoadBalancer" {
        lb_ips(&cx, svc)?
    } else {
        Vec::new()
    };
    let source_ranges =
        source_ranges(&cx, spec.load_balancer_source_ranges.as_ref(), &annotations)?;
    let affinity_timeout = affinity(&cx, &spec)?;
    let external_policy = policy(
        &cx,
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let internal_policy = policy(
        &cx,
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let health_check_node_port = health_check_node_port(&cx, &spec, external_policy)?;
    let algorithm = algorithm(&cx, &annotations)?;
    Ok(ParsedService::Serve(ServiceInfo {
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout,
        external_policy,
        internal_policy,
        health_check_node_port,
        topology: topology(&annotations, spec.traffic_distribution.as_deref()),
        algorithm,
        probe: parse_probe(&cx, &annotations)?,
        created: created_at(svc),
        name,
    }))
}

/// Why a Service is not this proxy's to serve, by its labels: another
/// proxy's `service.kubernetes.io/service-proxy-name`, or headless.
fn ignored_by_label(svc: &Service, proxy_name: &str) -> Option<&'static str> {
    let labels = svc.metadata.labels.as_ref();
    if labels
        .and_then(|l| l.get(PROXY_NAME_LABEL))
        .is_some_and(|proxy| proxy != proxy_name)
    {
        return Some("service-proxy-name is another proxy's");
    }
    super::has_label(&svc.metadata, super::HEADLESS_LABEL)
        .then_some("labelled service.kubernetes.io/headless")
}

/// None for a headless Service.
fn cluster_ips(
    cx: &Ctx<'_>,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Option<Vec<IpAddr>>, InvalidObject> {
    let (field, list): (&str, Vec<&str>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => (
            "spec.clusterIPs",
            ips.iter().map(std::string::String::as_str).collect(),
        ),
        (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.as_str()]),
        _ => ("spec.clusterIP", Vec::new()),
    };
    if list.contains(&"None") {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, ip) in list.iter().enumerate() {
        let ip = cx.ip(format!("{field}[{i}]"), ip)?;
        if out.iter().any(|o: &IpAddr| o.is_ipv4() == ip.is_ipv4()) {
            return Err(cx.err(format!("{field}[{i}]"), "two cluster IPs of one family"));
        }
        out.push(ip);
    }
    Ok(Some(out))
}

fn ports(
    cx: &Ctx<'_>,
    ports: &[k8s_openapi::api::core::v1::ServicePort],
    type_: &str,
) -> Result<Vec<ServicePortInfo>, InvalidObject> {
    let mut names = HashSet::new();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return Err(cx.err(field("name"), "required when a Service has several ports"));
        }
        if !names.insert(name.clone()) {
            return Err(cx.err(field("name"), format!("duplicate port name {name:?}")));
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let protocol = Protocol::parse(proto)
            .ok_or_else(|| cx.err(field("protocol"), format!("unknown protocol {proto:?}")))?;
        let port = port_number(p.port)
            .ok_or_else(|| cx.err(field("port"), format!("{} is not a port (1-65535)", p.port)))?;
        if !seen.insert((port, protocol)) {
            return Err(cx.err(field("port"), format!("duplicate port {port}/{protocol}")));
        }
        let node_port = match p.node_port {
            Some(np) if type_ != "ClusterIP" => port_number(np).ok_or_else(|| {
                cx.err(field("nodePort"), format!("{np} is not a port (1-65535)"))
            })?,
            _ => 0,
        };
        out.push(ServicePortInfo {
            name: Arc::from(name),
            protocol,
            port,
            node_port,
        });
    }
    Ok(out)
}

fn lb_ips(cx: &Ctx<'_>, svc: &Service) -> Result<Vec<IpAddr>, InvalidObject> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut out = Vec::new();
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // ipMode Proxy: the load balancer proxies to the nodes itself, so
        // its address must not be short-circuited on the node.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) {
            out.push(cx.ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?);
        }
    }
    Ok(out)
}

/// metadata.creationTimestamp in seconds (0: unset).
fn created_at(svc: &Service) -> i64 {
    svc.metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

fn external_ips(cx: &Ctx<'_>, spec: &ServiceSpec) -> Result<Vec<IpAddr>, InvalidObject> {
    spec.external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| cx.ip(format!("spec.externalIPs[{i}]"), ip))
        .collect()
}

/// spec.healthCheckNodePort, which only externalTrafficPolicy Local uses
/// (0: none).
fn health_check_node_port(
    cx: &Ctx<'_>,
    spec: &ServiceSpec,
    external_policy: TrafficPolicy,
) -> Result<u16, InvalidObject> {
    match spec.health_check_node_port {
        Some(p) if external_policy == TrafficPolicy::Local => port_number(p).ok_or_else(|| {
            cx.err(
                "spec.healthCheckNodePort",
                format!("{p} is not a port (1-65535)"),
            )
        }),
        _ => Ok(0),
    }
}

fn source_ranges(
    cx: &Ctx<'_>,
    spec_ranges: Option<&Vec<String>>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<IpNet>, InvalidObject> {
    let (field, raw): (String, Vec<String>) = match spec_ranges {
        Some(r) if !r.is_empty() => ("spec.loadBalancerSourceRanges".into(), r.clone()),
        _ => match annotations.get(SOURCE_RANGES_ANNOTATION) {
            Some(a) => (
                format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
                a.split(',')
                    .map(str::to_string)
                    .filter(|s| !s.trim().is_empty())
                    .collect(),
            ),
            None => return Ok(Vec::new()),
        },
    };
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let r = r.trim();
        let net = r
            .parse::<IpNet>()
            .or_else(|_| r.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| cx.err(format!("{field}[{i}]"), format!("invalid CIDR {r:?}")))?;
        out.push(net.trunc());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn affinity(
    cx: &Ctx<'_>,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<u32, InvalidObject> {
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => Ok(0),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(DEFAULT_AFFINITY_TIMEOUT),
                Some(t @ 1..=MAX_AFFINITY_TIMEOUT) => Ok(t.unsigned_abs()),
                Some(t) => Err(cx.err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT}"),
                )),
            }
        }
        Some(other) => Err(cx.err("spec.sessionAffinity", format!("unknown value {other:?}"))),
    }
}

fn policy(cx: &Ctx<'_>, field: &str, value: Option<&str>) -> Result<TrafficPolicy, InvalidObject> {
    match value {
        None | Some("" | "Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(cx.err(field, format!("unknown policy {other:?}"))),
    }
}
