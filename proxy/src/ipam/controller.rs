//! The allocator, I/O: exactly one agent at a time (the holder of the
//! `ferry-lb-ipam` Lease) watches Services (keeping only the few fields of
//! the ones it serves, [`SvcRecord`]) and FerryLoadBalancerIPPools,
//! runs [`allocate`] on every change and writes the differences back —
//! status.loadBalancer.ingress and a condition on each Service (server-side
//! apply, field manager `ferry-lb-ipam`), an Event when a Service's
//! condition changes, and each pool's status. Metrics go to [`IpamStatus`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event as WatchEvent;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use super::allocate::{allocate, Allocations, Outcome};
use super::lease::LeaseLock;
use super::pool::{parse_pool, FerryLoadBalancerIPPool, PoolCondition};
use super::service::{name_of, record, transition_time, SvcRecord, CONDITION};
use crate::model::ServiceName;

pub const FIELD_MANAGER: &str = "ferry-lb-ipam";
pub const LEASE_NAME: &str = "ferry-lb-ipam";

/// How the allocator contends for leadership.
#[derive(Clone, Debug)]
pub struct IpamConfig {
    /// Namespace of the Lease (the agent's own).
    pub lease_namespace: String,
    /// This agent's identity in the Lease (the node name).
    pub identity: String,
    /// A dead leader is replaced after this long.
    pub lease_duration: Duration,
    /// How often the leader renews and contenders retry.
    pub retry_period: Duration,
}

impl IpamConfig {
    /// Take-over within 15 s of the leader's death: 10 s lease, 2 s retry.
    pub fn new(lease_namespace: &str, identity: &str) -> IpamConfig {
        IpamConfig {
            lease_namespace: lease_namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// pool -> (used, free), and failure reason -> Services.
type Counts = (BTreeMap<String, (u64, u64)>, BTreeMap<&'static str, u64>);

/// The allocator's metrics, rendered into the agent's /metrics.
#[derive(Debug, Default)]
pub struct IpamStatus {
    leader: AtomicBool,
    counts: Mutex<Counts>,
}

impl IpamStatus {
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    fn record(&self, a: &Allocations) {
        let pools = a
            .pools
            .iter()
            .map(|(name, r)| (name.to_string(), (r.used, r.total.saturating_sub(r.used))))
            .collect();
        let mut failures = BTreeMap::new();
        for o in a.services.values() {
            if let Some((f, _)) = &o.failure {
                *failures.entry(f.reason()).or_insert(0) += 1;
            }
        }
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = (pools, failures);
    }
}

impl prometheus_client::collector::Collector for IpamStatus {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use crate::metrics::{family, label, single};
        use prometheus_client::metrics::MetricType::Gauge;
        single(
            &mut enc,
            "ferry_lb_ipam_leader",
            "1 while this agent is the LoadBalancer IP allocator",
            Gauge,
            u64::from(self.is_leader()),
        )?;
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let by_state = counts.0.iter().flat_map(|(pool, (used, free))| {
            let of = |state: &str| {
                let mut l = label("pool", pool.clone());
                l.push(("state", state.into()));
                l
            };
            [(of("used"), *used), (of("free"), *free)]
        });
        family(
            &mut enc,
            "ferry_lb_ipam_addresses",
            "Addresses of each pool by state (from the leader)",
            Gauge,
            by_state,
        )?;
        family(
            &mut enc,
            "ferry_lb_ipam_unsatisfied_services",
            "Services without (all) their addresses, by reason",
            Gauge,
            counts
                .1
                .iter()
                .map(|(reason, n)| (label("reason", *reason), *n)),
        )
    }
}

/// Contends for the Lease until `stop`; allocates while holding it.
pub async fn run(client: Client, cfg: IpamConfig, status: Arc<IpamStatus>, stop: Arc<AtomicBool>) {
    let leases = Api::namespaced(client.clone(), &cfg.lease_namespace);
    let mut lock = LeaseLock::new(leases, LEASE_NAME, &cfg.identity, cfg.lease_duration);
    while !stop.load(Ordering::Relaxed) {
        match lock.try_acquire_or_renew().await {
            Ok(true) => {
                tracing::info!(identity = %cfg.identity, "leading the LoadBalancer IP allocator");
                status.leader.store(true, Ordering::Relaxed);
                lead(&client, &cfg, &mut lock, &status, &stop).await;
                status.leader.store(false, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    if let Err(e) = lock.release().await {
                        tracing::warn!(error = %e, "cannot release the allocator lease");
                    }
                    return;
                }
                tracing::warn!(identity = %cfg.identity, "lost the LoadBalancer IP allocator lease");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, lease = LEASE_NAME, "cannot read or write the lease")
            }
        }
        tokio::time::sleep(cfg.retry_period).await;
    }
}

/// Allocates until the lease is lost or `stop`.
async fn lead(
    client: &Client,
    cfg: &IpamConfig,
    lock: &mut LeaseLock,
    status: &IpamStatus,
    stop: &AtomicBool,
) {
    let services = Mutex::new(Services::default());
    let (pools, pool_writer) = reflector::store::<FerryLoadBalancerIPPool>();
    let changed = tokio::sync::Notify::new();
    let pool_stream = reflector::reflector(
        pool_writer,
        watcher(
            Api::<FerryLoadBalancerIPPool>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let pump = async {
        let pools = async {
            let mut pool_stream = std::pin::pin!(pool_stream);
            while let Some(item) = pool_stream.next().await {
                match item {
                    Ok(_) => changed.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "pool watch failed; retrying"),
                }
            }
        };
        tokio::join!(pools, watch_services(client, &services, &changed));
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(cfg.identity.clone()),
        },
    );
    let work = async {
        let _ = pools.wait_until_ready().await;
        while !locked(&services).ready {
            changed.notified().await;
        }
        let mut renew = tokio::time::interval(cfg.retry_period);
        renew.tick().await;
        loop {
            // Also on every renewal: a write that failed is retried.
            reconcile(client, &recorder, &services, &pools, status).await;
            tokio::select! {
                _ = changed.notified() => {
                    // Coalesce a burst of events into one pass.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                _ = renew.tick() => {}
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match lock.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the allocator lease");
                    if !lock.held() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = pump => {}
        _ = work => {}
    }
}

/// The Services the allocator has to do with, from a watch.
#[derive(Debug, Default)]
struct Services {
    records: BTreeMap<ServiceName, SvcRecord>,
    /// The first list is in.
    ready: bool,
}

fn locked(s: &Mutex<Services>) -> MutexGuard<'_, Services> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `services` up to date; a (re)list replaces the records at once.
async fn watch_services(
    client: &Client,
    services: &Mutex<Services>,
    changed: &tokio::sync::Notify,
) {
    let stream = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut buffer = BTreeMap::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(WatchEvent::Init) => {
                buffer.clear();
                continue;
            }
            Ok(WatchEvent::InitApply(s)) => {
                if let Some(r) = record(&s) {
                    buffer.insert(name_of(&s), r);
                }
                continue;
            }
            Ok(WatchEvent::InitDone) => {
                let mut st = locked(services);
                st.records = std::mem::take(&mut buffer);
                st.ready = true;
            }
            Ok(WatchEvent::Apply(s)) => {
                let name = name_of(&s);
                let mut st = locked(services);
                match record(&s) {
                    Some(r) => st.records.insert(name, r),
                    None => st.records.remove(&name),
                };
            }
            Ok(WatchEvent::Delete(s)) => {
                locked(services).records.remove(&name_of(&s));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Service watch failed; retrying");
                continue;
            }
        }
        changed.notify_one();
    }
}

/// One pass: allocate and write back what differs.
async fn reconcile(
    client: &Client,
    recorder: &Recorder,
    services: &Mutex<Services>,
    pools: &Store<FerryLoadBalancerIPPool>,
    status: &IpamStatus,
) {
    let pool_objects = pools.state();
    let parsed: Vec<_> = pool_objects
        .iter()
        .map(|p| {
            let created = p
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second());
            parse_pool(&p.name_any(), created, &p.spec)
        })
        .collect();
    let records: Vec<(ServiceName, SvcRecord)> = locked(services)
        .records
        .iter()
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect();
    let lbs: Vec<_> = records.iter().filter_map(|(_, r)| r.lb.clone()).collect();
    let alloc = allocate(&parsed, &lbs);
    status.record(&alloc);
    for (name, rec) in &records {
        let want = alloc.services.get(name);
        if want.is_none() && rec.condition.is_none() {
            continue;
        }
        if let Err(e) = write_service(client, recorder, name, rec, want).await {
            tracing::warn!(service = %name, error = %e, "cannot write the LoadBalancer status");
        }
    }
    for p in &pool_objects {
        let name = p.name_any();
        let Some(report) = alloc.pools.get(name.as_str()) else {
            continue;
        };
        let mut conditions = Vec::new();
        let current = p.status.as_ref().map(|s| &s.conditions[..]).unwrap_or(&[]);
        conditions.push(condition(
            current,
            "ferry.dev/Conflict",
            report.conflict.is_some(),
            if report.conflict.is_some() {
                "Overlap"
            } else {
                "NoOverlap"
            },
            report.conflict.clone().unwrap_or_default(),
        ));
        conditions.push(condition(
            current,
            "ferry.dev/Invalid",
            report.invalid.is_some(),
            if report.invalid.is_some() {
                "InvalidSpec"
            } else {
                "Valid"
            },
            report.invalid.clone().unwrap_or_default(),
        ));
        let want = super::pool::PoolStatus {
            conditions,
            addresses_total: report.total,
            addresses_used: report.used,
            addresses_free: report.total.saturating_sub(report.used),
        };
        if p.status.as_ref() == Some(&want) {
            continue;
        }
        let body = json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "FerryLoadBalancerIPPool",
                          "metadata": {"name": name}, "status": want});
        let api = Api::<FerryLoadBalancerIPPool>::all(client.clone());
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            tracing::warn!(pool = %name, error = %e, "cannot write the pool status");
        }
    }
}

/// A condition, keeping its lastTransitionTime while its status holds.
fn condition(
    current: &[PoolCondition],
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
) -> PoolCondition {
    let status = if on { "True" } else { "False" };
    let state = current
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.last_transition_time.as_str()));
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let since = transition_time(state, status, &now);
    PoolCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
    }
}

/// Writes a Service's addresses and condition when they differ from
/// `want`; None releases whatever the allocator gave it.
async fn write_service(
    client: &Client,
    recorder: &Recorder,
    name: &ServiceName,
    rec: &SvcRecord,
    want: Option<&Outcome>,
) -> Result<(), kube::Error> {
    let ips: Vec<String> = want
        .map(|o| o.addresses.iter().map(|(ip, _)| ip.to_string()).collect())
        .unwrap_or_default();
    let cond = want.map(|o| match &o.failure {
        None => {
            let parts: Vec<String> = o
                .addresses
                .iter()
                .map(|(ip, pool)| format!("{ip} from pool {pool}"))
                .collect();
            (
                "True".to_string(),
                "Allocated".to_string(),
                parts.join(", "),
            )
        }
        Some((f, why)) => ("False".to_string(), f.reason().to_string(), why.clone()),
    });
    let current: Vec<String> = rec.ips.iter().map(|ip| ip.to_string()).collect();
    if current == ips && rec.condition == cond {
        return Ok(());
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let conditions: Vec<Value> = cond
        .iter()
        .map(|(status, reason, message)| {
            let since = transition_time(rec.condition_state(), status, &now);
            json!({"type": CONDITION, "status": status, "reason": reason,
                   "message": message, "lastTransitionTime": since,
                   "observedGeneration": rec.generation})
        })
        .collect();
    let ingress: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    let body = json!({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": &*name.name, "namespace": &*name.namespace},
                      "status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions}});
    Api::<Service>::namespaced(client.clone(), &name.namespace)
        .patch_status(
            &name.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    let (type_, reason, note) = match &cond {
        Some((s, reason, message)) if s == "True" => (
            EventType::Normal,
            reason.clone(),
            format!("allocated {message}"),
        ),
        Some((_, reason, message)) => (EventType::Warning, reason.clone(), message.clone()),
        None => (
            EventType::Normal,
            "Released".to_string(),
            format!("released {}", current.join(", ")),
        ),
    };
    tracing::info!(service = %name, addresses = ?ips, reason = %reason, "LoadBalancer status written");
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(name.namespace.to_string()),
        name: Some(name.name.to_string()),
        uid: rec.uid.clone(),
        ..Default::default()
    };
    let event = KubeEvent {
        type_,
        reason,
        note: Some(note),
        action: "Allocate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(service = %name, error = %e, "cannot publish an Event");
    }
    Ok(())
}
