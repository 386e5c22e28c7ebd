//! The values every pipeline stage speaks: Services and endpoints as Ferry
//! understands them after parsing, and the desired frontends and backend
//! sets that translate produces. Plain data, no I/O.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

mod desired;
pub use desired::{
    Action, BackendInfo, DesiredFrontend, FrontendPolicy, HealthCheck, ServiceDesired,
};

/// Hash maps and sets of the pipeline: foldhash (fast on the small keys
/// used here, seeded per process so crafted input cannot degrade them).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// namespace/name of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectName {
    pub fn new(namespace: &str, name: &str) -> ObjectName {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service's namespace/name.
pub type ServiceName = ObjectName;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// How traffic reaches a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Scope {
    /// NodePort, LoadBalancer and externalIP traffic follows
    /// externalTrafficPolicy; ClusterIP traffic follows
    /// internalTrafficPolicy.
    pub fn is_external(self) -> bool {
        !matches!(self, Scope::ClusterIp)
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::ClusterIp => "ClusterIP",
            Scope::NodePort => "NodePort",
            Scope::LoadBalancer => "LoadBalancer",
            Scope::ExternalIp => "ExternalIP",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        [
            Scope::ClusterIp,
            Scope::NodePort,
            Scope::LoadBalancer,
            Scope::ExternalIp,
        ]
        .into_iter()
        .find(|scope| scope.name() == s)
    }
}

/// An address, port and protocol: the key of a frontend or a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct L4Addr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::hash::Hash for L4Addr {
    /// One or three words instead of the derived field-by-field hash: these
    /// keys are hashed on every map operation of a sync.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let tail = (u64::from(self.port) << 8) | u64::from(self.protocol.number());
        match self.ip {
            IpAddr::V4(ip) => state.write_u64((u64::from(ip.to_bits()) << 24) | tail),
            IpAddr::V6(ip) => {
                let bits = ip.to_bits();
                state.write_u64(bits as u64);
                state.write_u64((bits >> 64) as u64);
                state.write_u64(tail | 1 << 32);
            }
        }
    }
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Where a frontend listens.
pub type FrontendKey = L4Addr;
/// Where a backend receives.
pub type BackendAddr = L4Addr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// How a frontend picks a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Random,
    Maglev,
    /// The fewer active connections of two random backends (userspace
    /// dataplane; the eBPF socket path has no connection counts and picks at
    /// random).
    LeastConnections,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "random" => Some(Algorithm::Random),
            "maglev" => Some(Algorithm::Maglev),
            "least-connections" => Some(Algorithm::LeastConnections),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
            Algorithm::LeastConnections => "least-connections",
        }
    }
}

/// How the userspace dataplane actively checks a Service's backends
/// (`ferry.dev/health-check*` annotations).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    /// None: a TCP connect; Some(path): an HTTP GET that must answer 2xx/3xx.
    pub http_path: Option<Arc<str>>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive failures that take a backend out.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that bring it back.
    pub healthy_threshold: u32,
}

/// trafficDistribution / topology-aware routing, as resolved for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Topology {
    #[default]
    None,
    /// Use zone hints (topology-mode: Auto, PreferClose, PreferSameZone).
    SameZone,
    /// Use node hints, falling back to zone hints (PreferSameNode).
    SameNode,
}

/// One port of a Service, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The port's name ("" when the Service has a single unnamed port).
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
    /// 0 when the Service has no NodePort for this port.
    pub node_port: u16,
}

/// A Service after parsing and validation: everything translate needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: ServiceName,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress IPs whose ipMode is not Proxy (type
    /// LoadBalancer only).
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub health_check_node_port: u16,
    pub topology: Topology,
    /// Explicit `ferry.dev/lb-algorithm`; None picks the per-scope default.
    pub algorithm: Option<Algorithm>,
    /// `ferry.dev/health-check`: active checks of the userspace dataplane.
    pub probe: Option<Arc<ProbeSpec>>,
    /// From metadata.creationTimestamp (seconds); the older Service wins a
    /// clash. 0 when unknown.
    pub created: i64,
}

/// The state of an endpoint, from its EndpointSlice conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointState {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointState {
    pub const READY: EndpointState = EndpointState {
        ready: true,
        serving: true,
        terminating: false,
    };

    /// Rank for picking among duplicates of one address: ready beats
    /// serving+terminating beats the rest.
    pub fn rank(self) -> u8 {
        if self.ready {
            2
        } else {
            u8::from(self.serving && self.terminating)
        }
    }
}

/// One endpoint address of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub state: EndpointState,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Vec<Arc<str>>,
    pub node_hints: Vec<Arc<str>>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub name: ObjectName,
    pub service: ServiceName,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
    /// endpoints.kubernetes.io/last-change-trigger-time, unix ms: when the
    /// change that produced this slice happened (for the network
    /// programming latency metric).
    pub trigger_time_ms: Option<i64>,
}

/// This node, as translate needs it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// Addresses NodePort frontends are created on.
    pub nodeport_addresses: Vec<IpAddr>,
}
