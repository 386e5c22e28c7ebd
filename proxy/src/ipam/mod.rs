//! LoadBalancer IP address management: the allocator (one leader per
//! cluster) gives Services of type LoadBalancer addresses from
//! FerryLoadBalancerIPPools, and every node's announcer answers ARP for the
//! addresses of the Services whose L2 lease it holds.

pub mod allocate;
pub mod announce;
pub mod arp;
pub mod controller;
pub mod lease;
pub mod pool;
pub mod service;
mod write;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// What `ferry run` enables of LoadBalancer IP management.
#[derive(Clone, Debug)]
pub struct IpamSettings {
    pub kubeconfig: Option<PathBuf>,
    /// Contend for the allocator lease and allocate while holding it.
    pub allocate: bool,
    /// Interfaces to answer ARP on (empty: no L2 announcement).
    pub l2_interfaces: Vec<String>,
    /// The interfaces were asked for (`--l2-interfaces`): failing to open
    /// them stops the agent; the default ones are only warned about.
    pub l2_required: bool,
    pub lease_namespace: String,
    /// This node's name.
    pub identity: String,
    /// How long an L2 announcement Lease lasts unrenewed.
    pub l2_lease_duration: Duration,
}

impl IpamSettings {
    /// Where, as whom and for how long the announcer holds its Leases.
    fn lease(&self) -> LeaseSettings {
        LeaseSettings {
            namespace: self.lease_namespace.clone(),
            identity: self.identity.clone(),
            duration: self.l2_lease_duration,
        }
    }
}

/// Where and as whom the announcer holds its Leases, and for how long.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

/// The allocator waits this long at most for the dataplane's first sync
/// before it contends (the node's own Services come first at start-up).
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(30);

/// Why LoadBalancer IP management could not start.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("L2 announcement: {0}")]
    Arp(#[from] arp::ArpError),
    #[error("starting the LoadBalancer IP thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Starts the allocator and the announcer on a thread of their own; they
/// stop when `stop` is set (the allocator releasing its lease, the
/// announcer keeping its leases for the agent that replaces it).
pub fn spawn(
    settings: IpamSettings,
    announcements: tokio::sync::watch::Receiver<announce::Announcements>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, IpamError> {
    let responder = responder(&settings)?;
    let ipam_status = Arc::new(controller::IpamStatus::default());
    let l2_status = Arc::new(announce::L2Status {
        replies: responder
            .as_ref()
            .map(|r| r.replies.clone())
            .unwrap_or_default(),
        ..Default::default()
    });
    if settings.allocate {
        metrics.add_source(Box::new(ipam_status.clone()));
    }
    if responder.is_some() {
        metrics.add_source(Box::new(l2_status.clone()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(IpamError::Thread)?;
    std::thread::Builder::new()
        .name("lb-ipam".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(client) = crate::source::kube::client(settings.kubeconfig.clone())
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "no Kubernetes client for LoadBalancer IPs");
                    })
                else {
                    return;
                };
                let allocator = async {
                    if settings.allocate {
                        allocate(&client, &settings, &metrics, ipam_status, &stop).await;
                    }
                };
                let announcer = async {
                    if let Some(responder) = responder {
                        let lease = settings.lease();
                        let (client, stop) = (client.clone(), stop.clone());
                        announce::run(client, lease, responder, announcements, l2_status, stop)
                            .await;
                    }
                };
                tokio::join!(allocator, announcer);
                // Both return after `stop`; wait for it if neither ran.
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        })
        .map_err(IpamError::Thread)
}

/// The ARP responder on the L2 interfaces, if any; interfaces that cannot
/// be opened stop the start only when they were asked for.
fn responder(settings: &IpamSettings) -> Result<Option<arp::ArpResponder>, IpamError> {
    if settings.l2_interfaces.is_empty() {
        return Ok(None);
    }
    match arp::ArpResponder::start(&settings.l2_interfaces) {
        Ok(r) => Ok(Some(r)),
        Err(e) if settings.l2_required => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "no L2 announcement (set --l2-interfaces to choose the interfaces)");
            Ok(None)
        }
    }
}

/// Runs the allocator once the dataplane's first sync is in (or after
/// [`FIRST_SYNC_WAIT`]), until `stop`.
async fn allocate(
    client: &kube::Client,
    settings: &IpamSettings,
    metrics: &Metrics,
    status: Arc<controller::IpamStatus>,
    stop: &Arc<AtomicBool>,
) {
    let waited = std::time::Instant::now();
    while !metrics.synced_once()
        && waited.elapsed() < FIRST_SYNC_WAIT
        && !stop.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = controller::IpamConfig::new(&settings.lease_namespace, &settings.identity);
    controller::run(client.clone(), cfg, status, stop.clone()).await;
}
