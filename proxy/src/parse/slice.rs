//! EndpointSlice -> [`SliceInfo`]: ports, endpoint addresses, conditions,
//! node, zone and topology hints, validated.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{has_label, object_name, port_number, InvalidObject};
use crate::model::{EndpointInfo, EndpointState, Protocol, SliceInfo, SlicePort};

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Marks a slice (or Service) that no proxy serves; kube-proxy's
/// informers select `!service.kubernetes.io/headless`.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// When the change behind a slice happened (set by the controller).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedSlice {
    Serve(Arc<SliceInfo>),
    /// Not usable by a proxy (FQDN address type); the reason is for logs.
    Ignore(&'static str),
}

pub fn parse_slice(slice: &EndpointSlice) -> Result<ParsedSlice, InvalidObject> {
    let name = object_name(&slice.metadata);
    let err = |field: String, reason: String| InvalidObject {
        kind: "EndpointSlice",
        object: name.clone(),
        field,
        reason,
    };
    if has_label(&slice.metadata, HEADLESS_LABEL) {
        return Ok(ParsedSlice::Ignore(
            "labelled service.kubernetes.io/headless",
        ));
    }
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return Ok(ParsedSlice::Ignore("addressType FQDN")),
        other => return Err(err("addressType".into(), format!("unknown {other:?}"))),
    };
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            err(
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "missing: the slice belongs to no Service".into(),
            )
        })?;
    let ports = parse_ports(slice, &err)?;
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if let Some(e) = parse_endpoint(i, ep, want_v4, &slice.address_type, &err)? {
            endpoints.push(e);
        }
    }
    Ok(ParsedSlice::Serve(Arc::new(SliceInfo {
        service: crate::model::ObjectName::new(&name.namespace, service),
        name,
        ports,
        endpoints,
        // A malformed timestamp only loses the latency sample.
        trigger_time_ms: slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map(k8s_openapi::jiff::Timestamp::as_millisecond),
    })))
}

/// The slice's ports (a port without a number, "all ports", is skipped).
fn parse_ports(
    slice: &EndpointSlice,
    err: &impl Fn(String, String) -> InvalidObject,
) -> Result<Vec<SlicePort>, InvalidObject> {
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports": nothing a proxy can use.
        let Some(number) = p.port else { continue };
        let port = port_number(number).ok_or_else(|| {
            err(
                format!("ports[{i}].port"),
                format!("{number} is not a port (1-65535)"),
            )
        })?;
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let protocol = Protocol::parse(proto).ok_or_else(|| {
            err(
                format!("ports[{i}].protocol"),
                format!("unknown protocol {proto:?}"),
            )
        })?;
        let pname: Arc<str> = p.name.as_deref().unwrap_or("").into();
        if ports
            .iter()
            .any(|q: &SlicePort| q.name == pname && q.protocol == protocol)
        {
            return Err(err(
                format!("ports[{i}].name"),
                format!("duplicate port name {pname:?}"),
            ));
        }
        ports.push(SlicePort {
            name: pname,
            protocol,
            port,
        });
    }
    Ok(ports)
}

/// One endpoint (its first address, as kube-proxy), or None without one.
fn parse_endpoint(
    i: usize,
    ep: &Endpoint,
    want_v4: bool,
    address_type: &str,
    err: &impl Fn(String, String) -> InvalidObject,
) -> Result<Option<EndpointInfo>, InvalidObject> {
    // Like kube-proxy, only the first address of an endpoint is used.
    let Some(addr) = ep.addresses.first() else {
        return Ok(None);
    };
    let ip: IpAddr = addr.parse().map_err(|_| {
        err(
            format!("endpoints[{i}].addresses[0]"),
            format!("invalid IP address {addr:?}"),
        )
    })?;
    if ip.is_ipv4() != want_v4 {
        return Err(err(
            format!("endpoints[{i}].addresses[0]"),
            format!("{ip} does not match addressType {address_type}"),
        ));
    }
    let cond = ep.conditions.clone().unwrap_or_default();
    // Per the API: an unknown ready condition means ready, serving
    // defaults to ready, terminating to false.
    let ready = cond.ready.unwrap_or(true);
    let state = EndpointState {
        ready,
        serving: cond.serving.unwrap_or(ready),
        terminating: cond.terminating.unwrap_or(false),
    };
    let hints = ep.hints.as_ref();
    Ok(Some(EndpointInfo {
        ip,
        state,
        node: ep.node_name.as_deref().map(Arc::from),
        zone: ep.zone.as_deref().map(Arc::from),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| Arc::from(z.name.as_str())).collect())
            .unwrap_or_default(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| Arc::from(n.name.as_str())).collect())
            .unwrap_or_default(),
    }))
}
