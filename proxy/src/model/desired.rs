//! What translate produces: the desired frontends with their policy and
//! backend sets, per Service.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::sync::Arc;

use ipnet::IpNet;

use super::{Algorithm, BackendAddr, FrontendKey, ProbeSpec, Scope, ServiceName};

/// What a frontend does with a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward to one of the backends.
    Forward,
    /// The Service has no usable endpoint at all: refuse at once (TCP RST,
    /// ICMP unreachable, connect() error).
    Reject,
    /// The traffic policy is Local and this node has no local endpoint while
    /// others exist: drop.
    Drop,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Forward => "forward",
            Action::Reject => "reject",
            Action::Drop => "drop",
        }
    }
}

/// A backend as a frontend uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendInfo {
    pub addr: BackendAddr,
    /// The endpoint runs on this node.
    pub local: bool,
    /// Serving but terminating (used only when nothing ready is left).
    pub terminating: bool,
}

/// The policy part of a frontend, shared by the datapaths.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrontendPolicy {
    pub scope: Scope,
    pub action: Action,
    pub algorithm: Algorithm,
    pub affinity_timeout: u32,
    /// NodePort/LoadBalancer/externalIP with externalTrafficPolicy Local:
    /// keep the client's source address.
    pub preserve_source: bool,
    pub source_ranges: Arc<[IpNet]>,
    /// Traffic that starts on this node (its own and its pods') goes as to
    /// this frontend instead: the Service's ClusterIP, for a NodePort,
    /// LoadBalancer or externalIP frontend with externalTrafficPolicy Local
    /// and internalTrafficPolicy Cluster (kube-proxy's short-circuit).
    pub internal_via: Option<FrontendKey>,
    /// Active health checks (userspace dataplane only; not in the maps).
    pub probe: Option<Arc<ProbeSpec>>,
}

/// One frontend of the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub key: FrontendKey,
    pub service: ServiceName,
    pub port_name: Arc<str>,
    pub policy: FrontendPolicy,
    /// The backends new flows may go to, in a stable order.
    pub backends: Arc<[BackendInfo]>,
    /// Endpoints that still exist but take no new flows (terminating while
    /// others are ready, or not serving): their backend entries stay so
    /// established flows drain.
    pub draining: Arc<[BackendInfo]>,
}

/// Everything translate produced for one Service.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceDesired {
    pub frontends: Vec<DesiredFrontend>,
    /// healthCheckNodePort and the local endpoint count it reports
    /// (externalTrafficPolicy Local only).
    pub health_check: Option<HealthCheck>,
    /// Backends left out of its frontends beyond the capacity per frontend
    /// (the most of any one frontend; 0: none).
    pub left_out: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    pub local_endpoints: usize,
}
