//! L2 announcement: which LoadBalancer addresses this node may announce
//! (pure, from the desired state), and the loop that contends, per Service,
//! for a Lease `ferry-l2.<namespace>.<name>` among the eligible nodes and
//! answers ARP for the addresses of the Services it holds. Eligible: every
//! node for externalTrafficPolicy Cluster; with Local only nodes with a
//! local endpoint, so traffic never lands where it would be dropped.
//! Takeover: a holder that stops renewing loses the lease after its
//! duration ([`DEFAULT_LEASE_DURATION`], `--l2-lease-duration`); the new
//! holder sends gratuitous ARP at once. A restarted agent renews its node's
//! leases under the same identity, so a rolling update moves no address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::{Api, Client};

use super::arp::ArpResponder;
use super::lease::LeaseLock;
use crate::model::{Action, Scope, ServiceName};
use crate::translate::DesiredState;

/// A holder that stops renewing is replaced after this long (plus one
/// contender retry). It must outlast an agent's restart (a DaemonSet
/// rolling update: the old pod gone, the new one started), or every
/// address moves on each update; Cilium's L2 announcements default to 15 s
/// too. Shorter leases fail over faster when a node dies.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(1);
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Lease calls in flight at once.
const CONCURRENCY: usize = 32;

/// One Service's LoadBalancer addresses and whether this node may announce
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announce {
    pub ips: Vec<Ipv4Addr>,
    pub eligible: bool,
}

pub type Announcements = BTreeMap<ServiceName, Announce>;

/// The LoadBalancer IPv4 addresses of the desired state, per Service.
pub fn announceable(desired: &DesiredState) -> Announcements {
    let mut out: Announcements = BTreeMap::new();
    for f in desired.frontends().values() {
        if f.policy.scope != Scope::LoadBalancer {
            continue;
        }
        let IpAddr::V4(ip) = f.key.ip else {
            continue;
        };
        // Local with no local endpoint drops: not here.
        let eligible = !(f.policy.preserve_source && f.policy.action == Action::Drop);
        let entry = out.entry(f.service.clone()).or_insert(Announce {
            ips: Vec::new(),
            eligible: true,
        });
        if !entry.ips.contains(&ip) {
            entry.ips.push(ip);
            entry.ips.sort();
        }
        entry.eligible &= eligible;
    }
    out
}

/// The Lease of one Service's announcement.
pub fn lease_name(svc: &ServiceName) -> String {
    format!("ferry-l2.{}.{}", svc.namespace, svc.name)
}

/// Metrics of the announcer.
#[derive(Debug, Default)]
pub struct L2Status {
    pub announced: AtomicU64,
    pub replies: Arc<AtomicU64>,
}

impl prometheus_client::collector::Collector for L2Status {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use crate::metrics::single;
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        single(
            &mut enc,
            "ferry_l2_announced_addresses",
            "LoadBalancer addresses this node answers ARP for",
            Gauge,
            self.announced.load(Ordering::Relaxed),
        )?;
        single(
            &mut enc,
            "ferry_l2_arp_replies",
            "ARP replies sent for announced addresses",
            Counter,
            self.replies.load(Ordering::Relaxed),
        )
    }
}

struct Held {
    lock: LeaseLock,
    last_try: Option<Instant>,
}

/// Announces until `stop`: contends for the Services in `wanted` and keeps
/// the responder's set to the addresses of the Services held.
pub async fn run(
    client: Client,
    lease: super::LeaseSettings,
    responder: ArpResponder,
    mut wanted: tokio::sync::watch::Receiver<Announcements>,
    status: Arc<L2Status>,
    stop: Arc<AtomicBool>,
) {
    let api = Api::namespaced(client, &lease.namespace);
    let identity = lease.identity;
    let mut locks: BTreeMap<ServiceName, Held> = BTreeMap::new();
    let mut announced: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut tick = tokio::time::interval(RETRY_EVERY);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wanted.changed() => {}
        }
        let want = wanted.borrow_and_update().clone();
        release_unwanted(&mut locks, &want).await;
        for (s, a) in &want {
            if a.eligible && !locks.contains_key(s) {
                let lock = LeaseLock::new(api.clone(), &lease_name(s), &identity, lease.duration);
                locks.insert(
                    s.clone(),
                    Held {
                        lock,
                        last_try: None,
                    },
                );
            }
        }
        renew_due(&mut locks).await;
        // Through an API outage the holder keeps answering ARP: nobody can
        // take the lease meanwhile, and an unanswered address is an outage.
        let now: BTreeSet<Ipv4Addr> = locks
            .iter()
            .filter(|(_, h)| h.lock.held_or_unreachable())
            .filter_map(|(s, _)| want.get(s))
            .flat_map(|a| a.ips.iter().copied())
            .collect();
        if now != announced {
            publish(&responder, &status, &identity, &announced, &now);
            announced = now;
        }
    }
    // The leases are kept on a stop: the agent that replaces this one on
    // the node (a rolling update) renews them under the same identity, so
    // the addresses stay on this node and its connections survive; releasing
    // them would move every address to another node, whose SNAT breaks the
    // established flows. If no agent comes back, they expire after
    // their duration and another node takes over.
    if !locks.is_empty() {
        tracing::info!(
            leases = locks.len(),
            "stopping: keeping the L2 leases for the agent that replaces this one"
        );
    }
}

/// Gives up the leases of Services no longer wanted (or eligible) here.
async fn release_unwanted(locks: &mut BTreeMap<ServiceName, Held>, want: &Announcements) {
    let gone: Vec<ServiceName> = locks
        .keys()
        .filter(|s| !want.get(*s).is_some_and(|a| a.eligible))
        .cloned()
        .collect();
    for s in gone {
        if let Some(mut h) = locks.remove(&s) {
            if let Err(e) = h.lock.release().await {
                tracing::warn!(service = %s, error = %e, "cannot release the L2 lease");
            }
        }
    }
}

/// Renews the leases held and retries the others, each when it is due,
/// [`CONCURRENCY`] at a time.
async fn renew_due(locks: &mut BTreeMap<ServiceName, Held>) {
    futures::stream::iter(locks.values_mut().map(|h| async move {
        let due = if h.lock.held() {
            RENEW_EVERY
        } else {
            RETRY_EVERY
        };
        if h.last_try.is_some_and(|t| t.elapsed() < due) {
            return;
        }
        h.last_try = Some(Instant::now());
        if let Err(e) = h.lock.try_acquire_or_renew().await {
            tracing::warn!(lease = %h.lock.name(), error = %e, "cannot read or write the L2 lease");
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<()>()
    .await;
}

/// Hands the responder the addresses to answer for, with gratuitous ARP
/// for the new ones.
fn publish(
    responder: &ArpResponder,
    status: &L2Status,
    identity: &str,
    before: &BTreeSet<Ipv4Addr>,
    now: &BTreeSet<Ipv4Addr>,
) {
    if let Ok(mut set) = responder.announced.write() {
        *set = now.iter().copied().collect();
    }
    for ip in now.difference(before) {
        tracing::info!(address = %ip, node = %identity, "announcing");
        responder.gratuitous(*ip);
    }
    for ip in before.difference(now) {
        tracing::info!(address = %ip, node = %identity, "no longer announcing");
    }
    status.announced.store(now.len() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeInfo;
    use crate::pipeline::Core;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn announce_on(node: &str, policy: &str, endpoint_nodes: &[&str]) -> Announcements {
        let svc: Service = yaml_serde::from_str(&format!(
            "metadata: {{name: web, namespace: t}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.40
  externalTrafficPolicy: {policy}
  ports: [{{name: a, port: 80, targetPort: 9100, nodePort: 30040}}, {{name: b, port: 81, targetPort: 9100, nodePort: 30041}}]
status:
  loadBalancer: {{ingress: [{{ip: 198.18.40.240}}, {{ip: 198.18.40.241}}, {{ip: 'fd00::1'}}]}}
"
        ))
        .expect("a Service");
        let endpoints: Vec<String> = endpoint_nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("- {{addresses: [198.18.41.{}], nodeName: {n}}}", i + 2))
            .collect();
        let slice: EndpointSlice = yaml_serde::from_str(&format!(
            "metadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: a, port: 9100}}, {{name: b, port: 9100}}]
endpoints:
{}
",
            endpoints.join("\n")
        ))
        .expect("an EndpointSlice");
        let mut core = Core::new(
            crate::pipeline::DEFAULT_PROXY_NAME,
            NodeInfo {
                name: node.into(),
                ..Default::default()
            },
            crate::translate::TranslateConfig::default(),
        );
        core.upsert_service(&svc);
        core.upsert_slice(&slice);
        core.translate_changes();
        let invalid: Vec<String> = core
            .invalid()
            .map(std::string::ToString::to_string)
            .collect();
        assert!(invalid.is_empty(), "{invalid:?}");
        // Every LoadBalancer frontend forwards where an endpoint is usable.
        let usable =
            !endpoint_nodes.is_empty() && (policy == "Cluster" || endpoint_nodes.contains(&node));
        for f in core
            .desired()
            .frontends()
            .values()
            .filter(|f| f.key.ip.is_ipv4() && f.policy.scope == Scope::LoadBalancer)
        {
            assert_eq!(
                f.policy.action == Action::Forward,
                usable,
                "{node} {policy} {}",
                f.key
            );
        }
        announceable(core.desired())
    }

    #[test]
    fn local_policy_announces_only_where_an_endpoint_runs() {
        let name = ServiceName::new("t", "web");
        let ips: Vec<Ipv4Addr> = vec![[198, 18, 40, 240].into(), [198, 18, 40, 241].into()];
        for (node, policy, eligible) in [
            ("node-1", "Cluster", true),
            ("node-2", "Cluster", true),
            ("node-1", "Local", true),
            ("node-2", "Local", false),
        ] {
            let a = announce_on(node, policy, &["node-1"]);
            assert_eq!(
                a.get(&name),
                Some(&Announce {
                    ips: ips.clone(),
                    eligible
                }),
                "{node} {policy}"
            );
        }
        // Local without any endpoint rejects everywhere: any node may
        // announce (and answer with a reset).
        assert!(announce_on("node-2", "Local", &[])[&name].eligible);
        assert_eq!(lease_name(&name), "ferry-l2.t.web");
    }
}
