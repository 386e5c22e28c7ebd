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
use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event as WatchEvent;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use super::allocate::{allocate, Allocations};
use super::lease::LeaseLock;
use super::pool::{parse_pool, FerryLoadBalancerIPPool};
use super::service::{name_of, record, SvcRecord};
use super::write::{write_pool, write_service};
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
        *self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (pools, failures);
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
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
                tracing::warn!(error = %e, lease = LEASE_NAME, "cannot read or write the lease");
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
    let pump = async {
        tokio::join!(
            watch_pools(client, pool_writer, &changed),
            watch_services(client, &services, &changed)
        );
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
                () = changed.notified() => {
                    // Coalesce a burst of events into one pass.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                _ = renew.tick() => {}
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if !renewed(lock).await {
                return;
            }
        }
    };
    tokio::select! {
        () = pump => {}
        () = work => {}
    }
}

/// Renews the allocator lease: whether this agent still holds it (an
/// error keeps it until the lease would expire).
async fn renewed(lock: &mut LeaseLock) -> bool {
    match lock.try_acquire_or_renew().await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "cannot renew the allocator lease");
            lock.held()
        }
    }
}

/// Keeps the pools' store up to date, waking the allocator on each change.
async fn watch_pools(
    client: &Client,
    writer: reflector::store::Writer<FerryLoadBalancerIPPool>,
    changed: &tokio::sync::Notify,
) {
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<FerryLoadBalancerIPPool>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(_) => changed.notify_one(),
            Err(e) => tracing::warn!(error = %e, "pool watch failed; retrying"),
        }
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
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        if let Some(report) = alloc.pools.get(name.as_str()) {
            write_pool(client, p, report).await;
        }
    }
}
