//! The translate stage: (Service, its endpoints, this node) -> the desired
//! frontends with their backend sets, applying every Service semantic; and
//! the desired state of all Services, where frontend and NodePort clashes
//! between Services are settled (the first Service to claim keeps it).

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

mod desired;
mod endpoints;

pub use desired::{BackendUse, DesiredState, ServiceEntry, Touched};
pub use endpoints::{categorize_endpoints, Categorized, PortPolicy};

use std::collections::BTreeSet;

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use crate::model::{
    Action, Algorithm, BackendInfo, DesiredFrontend, FrontendKey, FrontendPolicy, HealthCheck,
    L4Addr, NodeInfo, Protocol, Scope, ServiceDesired, ServiceInfo, ServiceName, ServicePortInfo,
    TrafficPolicy,
};
use crate::parse::InvalidObject;
use crate::track::EndpointSliceCache;

/// Limits translate enforces.
#[derive(Debug, Clone)]
pub struct TranslateConfig {
    /// Most backends one frontend may have (the backend-slot capacity): a
    /// Service with more is served by a subset of this many, the same on
    /// every node ([`capped`]).
    pub max_backends_per_service: usize,
}

impl Default for TranslateConfig {
    fn default() -> Self {
        TranslateConfig {
            max_backends_per_service: 4096,
        }
    }
}

/// Translates one Service.
pub fn translate_service(
    svc: &ServiceInfo,
    cache: &EndpointSliceCache,
    node: &NodeInfo,
    cfg: &TranslateConfig,
) -> Result<ServiceDesired, InvalidObject> {
    let mut out = ServiceDesired::default();
    let mut local_ready = BTreeSet::new();
    let external_local = svc.external_policy == TrafficPolicy::Local;
    for port in &svc.ports {
        let eps = cache.endpoints(&svc.name, &port.name, port.protocol);
        if external_local && svc.health_check_node_port != 0 {
            endpoints::local_ready_addresses(eps.iter(), node, &mut local_ready);
        }
        for v4 in [true, false] {
            let keys = frontend_keys(svc, port, node, v4);
            if keys.is_empty() {
                continue;
            }
            let sets = SetsForFamily::new(svc, &eps, port.protocol, v4, node);
            let via = internal_via(svc, &keys);
            for (key, scope) in keys {
                let policy = if scope.is_external() {
                    svc.external_policy
                } else {
                    svc.internal_policy
                };
                let (backends, action) = sets.select(policy);
                let draining = sets.draining(&backends);
                let total = backends.len();
                let backends = capped(&svc.name, backends, cfg.max_backends_per_service);
                out.left_out = out.left_out.max(total - backends.len());
                out.frontends.push(DesiredFrontend {
                    key,
                    service: svc.name.clone(),
                    port_name: port.name.clone(),
                    policy: frontend_policy(svc, scope, action, via),
                    backends,
                    draining,
                });
            }
        }
    }
    if external_local && svc.health_check_node_port != 0 {
        out.health_check = Some(HealthCheck {
            node_port: svc.health_check_node_port,
            local_endpoints: local_ready.len(),
        });
    }
    Ok(out)
}

/// The policy of `svc`'s frontend of `scope`: Maglev for external scopes
/// unless the Service names an algorithm, the client's address kept for an
/// external one under externalTrafficPolicy Local, source ranges on the
/// LoadBalancer frontends only.
fn frontend_policy(
    svc: &ServiceInfo,
    scope: Scope,
    action: Action,
    via: Option<FrontendKey>,
) -> FrontendPolicy {
    let external = scope.is_external();
    FrontendPolicy {
        scope,
        action,
        algorithm: svc.algorithm.unwrap_or(if external {
            Algorithm::Maglev
        } else {
            Algorithm::Random
        }),
        affinity_timeout: svc.affinity_timeout,
        preserve_source: external && svc.external_policy == TrafficPolicy::Local,
        probe: svc.probe.clone(),
        source_ranges: if scope == Scope::LoadBalancer && !svc.source_ranges.is_empty() {
            svc.source_ranges.clone().into()
        } else {
            NO_RANGES.clone()
        },
        internal_via: via.filter(|_| external),
    }
}

/// `backends`, or when there are more than `max` the `max` of them whose
/// hash with the Service's name is lowest: a subset every node picks alike
/// (its connections land on the same pods wherever they enter), different
/// for each Service (so Services on the same pods do not all pick the same
/// few), and one that changes little when an endpoint comes or goes.
fn capped(svc: &ServiceName, backends: Arc<[BackendInfo]>, max: usize) -> Arc<[BackendInfo]> {
    if backends.len() <= max {
        return backends;
    }
    let seed = fnv1a(0xcbf2_9ce4_8422_2325, svc.to_string().as_bytes());
    let rank = |b: &BackendInfo| fnv1a(seed, b.addr.to_string().as_bytes());
    let mut ranked: Vec<(u64, BackendInfo)> = backends.iter().map(|b| (rank(b), *b)).collect();
    ranked.select_nth_unstable_by_key(max - 1, |r| r.0);
    ranked.truncate(max);
    // In address order, as every set is.
    ranked.sort_unstable_by_key(|r| r.1.addr);
    ranked.into_iter().map(|r| r.1).collect()
}

/// FNV-1a, 64 bits: a stable hash (the same on every node and version).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The categorized endpoints of one port and family, shared (Arc) by every
/// frontend that uses the same set.
struct SetsForFamily {
    cluster: Arc<[BackendInfo]>,
    local: Arc<[BackendInfo]>,
    has_any: bool,
    all: Vec<BackendInfo>,
}

impl SetsForFamily {
    fn new(
        svc: &ServiceInfo,
        eps: &[crate::track::PortEndpoint<'_>],
        protocol: Protocol,
        v4: bool,
        node: &NodeInfo,
    ) -> SetsForFamily {
        let external = has_external_frontends(svc);
        let policy = PortPolicy {
            uses_cluster: svc.internal_policy == TrafficPolicy::Cluster
                || (external && svc.external_policy == TrafficPolicy::Cluster),
            uses_local: svc.internal_policy == TrafficPolicy::Local
                || (external && svc.external_policy == TrafficPolicy::Local),
            topology: svc.topology,
        };
        let c = categorize_endpoints(eps, protocol, v4, policy, node);
        SetsForFamily {
            cluster: shared(c.cluster),
            local: shared(c.local),
            has_any: c.has_any,
            all: c.all,
        }
    }

    fn select(&self, policy: TrafficPolicy) -> (Arc<[BackendInfo]>, Action) {
        let set = match policy {
            TrafficPolicy::Cluster => &self.cluster,
            TrafficPolicy::Local => &self.local,
        };
        let action = if !set.is_empty() {
            Action::Forward
        } else if self.has_any {
            Action::Drop
        } else {
            Action::Reject
        };
        (set.clone(), action)
    }

    fn draining(&self, selected: &[BackendInfo]) -> Arc<[BackendInfo]> {
        if self.all.len() == selected.len() {
            // Every endpoint is selected (the common case): share one empty.
            return NO_BACKENDS.clone();
        }
        self.all
            .iter()
            .filter(|b| !selected.iter().any(|s| s.addr == b.addr))
            .copied()
            .collect()
    }
}

/// Shared empty sets: most frontends have no source ranges and nothing
/// draining, and an empty `Arc<[T]>` still costs an allocation.
static NO_BACKENDS: LazyLock<Arc<[BackendInfo]>> = LazyLock::new(|| Arc::from([]));
static NO_RANGES: LazyLock<Arc<[ipnet::IpNet]>> = LazyLock::new(|| Arc::from([]));

fn shared(v: Vec<BackendInfo>) -> Arc<[BackendInfo]> {
    if v.is_empty() {
        NO_BACKENDS.clone()
    } else {
        v.into()
    }
}

fn has_external_frontends(svc: &ServiceInfo) -> bool {
    !svc.external_ips.is_empty()
        || !svc.load_balancer_ips.is_empty()
        || svc.ports.iter().any(|p| p.node_port != 0)
}

/// The frontend that serves node-originated traffic to this port's
/// external addresses: its ClusterIP, when externalTrafficPolicy Local
/// would narrow them to local endpoints but internalTrafficPolicy is
/// Cluster (kube-proxy sends such traffic to the internal chain).
fn internal_via(svc: &ServiceInfo, keys: &[(FrontendKey, Scope)]) -> Option<FrontendKey> {
    if svc.external_policy != TrafficPolicy::Local || svc.internal_policy != TrafficPolicy::Cluster
    {
        return None;
    }
    keys.iter()
        .find(|(_, scope)| *scope == Scope::ClusterIp)
        .map(|(key, _)| *key)
}

/// Every frontend address of one port in one IP family.
fn frontend_keys(
    svc: &ServiceInfo,
    port: &ServicePortInfo,
    node: &NodeInfo,
    v4: bool,
) -> Vec<(FrontendKey, Scope)> {
    let of_family = |ip: &&IpAddr| ip.is_ipv4() == v4;
    let key = |ip: IpAddr, p: u16| L4Addr {
        ip,
        port: p,
        protocol: port.protocol,
    };
    let mut keys = Vec::new();
    for ip in svc.cluster_ips.iter().filter(of_family) {
        keys.push((key(*ip, port.port), Scope::ClusterIp));
    }
    for ip in svc.external_ips.iter().filter(of_family) {
        keys.push((key(*ip, port.port), Scope::ExternalIp));
    }
    for ip in svc.load_balancer_ips.iter().filter(of_family) {
        keys.push((key(*ip, port.port), Scope::LoadBalancer));
    }
    if port.node_port != 0 {
        for ip in node.nodeport_addresses.iter().filter(of_family) {
            keys.push((key(*ip, port.node_port), Scope::NodePort));
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u32) -> Vec<BackendInfo> {
        (0..n)
            .map(|i| BackendInfo {
                addr: L4Addr {
                    ip: IpAddr::V4(Ipv4Addr::from_bits(0xc612_0000 + i)),
                    port: 8080,
                    protocol: Protocol::Tcp,
                },
                local: false,
                terminating: false,
            })
            .collect()
    }

    /// 100,000 endpoints: a Service is served by the capacity's worth, the
    /// same subset whatever the order they came in, different for another
    /// Service, and one endpoint leaving changes it by one at most.
    #[test]
    fn a_service_with_100000_endpoints_is_served_by_a_stable_subset() {
        let all = backends(100_000);
        let web = ServiceName::new("t", "web");
        let pick = |v: &[BackendInfo], svc: &ServiceName| -> Vec<L4Addr> {
            capped(svc, v.to_vec().into(), 4096)
                .iter()
                .map(|b| b.addr)
                .collect()
        };
        let a = pick(&all, &web);
        assert_eq!(a.len(), 4096);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "address order");
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(pick(&reversed, &web), a, "independent of the order");
        let other = pick(&all, &ServiceName::new("t", "api"));
        let shared = other.iter().filter(|x| a.binary_search(x).is_ok()).count();
        assert!(shared < 400, "{shared} of 4096 shared with another Service");
        // An endpoint of the subset leaves: one other takes its place.
        let gone = a[100];
        let fewer: Vec<BackendInfo> = all.iter().copied().filter(|b| b.addr != gone).collect();
        let b = pick(&fewer, &web);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.iter().filter(|x| a.binary_search(x).is_err()).count(), 1);
        // An endpoint outside it leaves: nothing changes.
        let outside = all
            .iter()
            .find(|x| a.binary_search(&x.addr).is_err())
            .unwrap()
            .addr;
        let fewer: Vec<BackendInfo> = all.iter().copied().filter(|b| b.addr != outside).collect();
        assert_eq!(pick(&fewer, &web), a);
        // Within the capacity: all of them, untouched.
        assert_eq!(pick(&all[..10], &web).len(), 10);
    }
}
