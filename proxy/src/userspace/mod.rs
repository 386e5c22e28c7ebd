//! The userspace dataplane: the same Services without eBPF. It implements
//! the datapath's map interface by keeping the maps in memory, and after
//! each sync serves what they hold: a TCP listener (splice(2) both ways) or
//! UDP socket (sessions) per forwarding frontend, the eBPF path's backend
//! choice (slots, Maglev table, flow hash), ClientIP affinity, source
//! ranges, active health checks and passive ejection, a connection limit.
//! Frontend addresses go on the dummy interface `ferry0` when privileged;
//! unprivileged, it serves what it can bind and reports the rest.

mod addrs;
pub mod health;
mod listen;
mod shared;
mod splice;
mod status;
pub mod table;
mod tcp;
mod udp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::datapath::{DatapathError, LbMaps};
use crate::metrics::DataplaneStatus;
use crate::model::{Action, FastMap, L4Addr};
use crate::plan::{AppliedState, MapOp};
use listen::{Listener, Shard};
pub use shared::{Refused, Shared, Stats};
use status::Status;
use table::Table;

/// Settings of the userspace dataplane.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// Open TCP connections plus UDP sessions at most; beyond, new ones are
    /// reset at once.
    pub max_connections: u64,
    pub connect_timeout: Duration,
    /// A TCP connection with no byte either way for this long is reset.
    pub idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// Put non-local frontend addresses on `ferry0` (needs CAP_NET_ADMIN).
    pub manage_addresses: bool,
    pub worker_threads: usize,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            max_connections: 65_536,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_hours(1),
            udp_idle_timeout: Duration::from_secs(30),
            // SAFETY: geteuid has no preconditions.
            manage_addresses: unsafe { libc::geteuid() } == 0,
            worker_threads: std::env::var("FERRY_USERSPACE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
                }),
        }
    }
}

/// The userspace dataplane (see the module docs).
pub struct UserspaceDataplane {
    mirror: AppliedState,
    shared: Arc<Shared>,
    /// UDP, health checks.
    runtime: tokio::runtime::Runtime,
    /// TCP: one shard per worker thread.
    shards: Vec<Shard>,
    listeners: FastMap<L4Addr, Listener>,
    /// Frontends that could not be served, and why.
    unserved: Arc<Mutex<BTreeMap<L4Addr, String>>>,
    addresses: addrs::Addresses,
    checkers: health::Checkers,
    check_stats: Arc<health::CheckStats>,
    registry: FastMap<L4Addr, Arc<table::BackendState>>,
    generation: u64,
    /// Descriptors the TCP frontends' listeners may take (a quarter of
    /// RLIMIT_NOFILE); beyond it a new frontend gets one listener on one
    /// shard instead of one per shard.
    listener_budget: usize,
    /// Listening TCP sockets open now.
    tcp_listener_fds: usize,
    /// The shard of the next single-listener frontend (round robin).
    next_shard: usize,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as HAProxy and nginx
/// do: every proxied connection takes two descriptors and every TCP
/// frontend one per shard, so a default soft limit of 1,024 would cap the
/// dataplane at a few hundred connections. Returns the soft limit in force.
fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return 1024;
    }
    // An unlimited hard limit is still bounded by fs.nr_open (1 Mi by
    // default); asking for more fails.
    let want = r.rlim_max.min(1 << 20);
    if r.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            r.rlim_cur = want;
        }
    }
    r.rlim_cur
}

impl std::fmt::Debug for UserspaceDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceDataplane")
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

impl UserspaceDataplane {
    pub fn new(cfg: UserspaceConfig) -> Result<UserspaceDataplane, DatapathError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.max(1))
            .thread_name("ferry-userspace")
            .enable_all()
            .build()
            .map_err(|e| {
                DatapathError::Unsupported(format!("starting the userspace dataplane: {e}"))
            })?;
        let nofile = raise_nofile_limit();
        if nofile < 2 * cfg.max_connections + 1024 {
            tracing::warn!(
                nofile,
                max_connections = cfg.max_connections,
                "RLIMIT_NOFILE is below two descriptors per connection allowed: \
                 connections beyond about half of it will fail"
            );
        }
        let shards = (0..cfg.worker_threads.max(1))
            .map(Shard::start)
            .collect::<std::io::Result<Vec<Shard>>>()
            .map_err(|e| {
                DatapathError::Unsupported(format!("starting the userspace TCP threads: {e}"))
            })?;
        Ok(UserspaceDataplane {
            mirror: AppliedState::default(),
            addresses: addrs::Addresses::new(cfg.manage_addresses),
            shared: Arc::new(Shared {
                table: RwLock::new(Arc::new(Table::default())),
                affinity: Mutex::new(FastMap::default()),
                epoch: Instant::now(),
                cfg,
                stats: Stats::default(),
                active: AtomicU64::new(0),
                reserve: Mutex::new(std::fs::File::open("/dev/null").ok()),
                nofile_logged_ms: AtomicU64::new(0),
            }),
            runtime,
            shards,
            listeners: FastMap::default(),
            unserved: Arc::default(),
            checkers: health::Checkers::default(),
            check_stats: Arc::default(),
            registry: FastMap::default(),
            generation: 0,
            listener_budget: usize::try_from(nofile / 4).unwrap_or(usize::MAX),
            tcp_listener_fds: 0,
            next_shard: 0,
        })
    }

    /// Status for /metrics, /proxyMode and /services.
    pub fn status(&self) -> Arc<dyn DataplaneStatus> {
        Arc::new(Status {
            shared: self.shared.clone(),
            unserved: self.unserved.clone(),
            checks: self.check_stats.clone(),
        })
    }

    /// Frontends that could not be served, and why.
    pub fn unserved(&self) -> BTreeMap<L4Addr, String> {
        self.unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the table from the maps and serves it.
    fn refresh(&mut self) {
        self.generation += 1;
        let mut local: BTreeSet<IpAddr> = crate::netif::local_addresses(&[]).into_iter().collect();
        local.retain(|ip| !self.addresses.holds(ip));
        let table = self.rebuild_table(&local);
        // Addresses: every frontend IP (a rejecting frontend's too, so the
        // kernel refuses its connections at once).
        let wanted_ips: BTreeSet<IpAddr> = table
            .frontends
            .keys()
            .map(|k| k.ip)
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        if let Err(e) = self.addresses.sync(&wanted_ips, &local) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot manage frontend addresses"
            );
        }
        let unserved = self.sync_listeners(&table, &local);
        self.report_unserved(unserved);
        self.checkers
            .update(&table, self.runtime.handle(), &self.check_stats);
    }

    /// The table of what the ops built, put in service; expired affinity
    /// entries go.
    fn rebuild_table(&mut self, local: &BTreeSet<IpAddr>) -> Arc<Table> {
        let table = Arc::new(table::build(
            &self.mirror,
            local.iter().copied().collect(),
            &mut self.registry,
            self.generation,
        ));
        *self
            .shared
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table.clone();
        let now = self.shared.now_ms();
        let mut aff = self
            .shared
            .affinity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        aff.retain(|_, (_, exp)| *exp > now);
        table
    }

    /// Closes the listeners of frontends gone and opens those of new ones;
    /// returns the frontends that could not be served, and why.
    fn sync_listeners(
        &mut self,
        table: &Table,
        local: &BTreeSet<IpAddr>,
    ) -> BTreeMap<L4Addr, String> {
        let wanted: BTreeSet<L4Addr> = table
            .frontends
            .values()
            // A frontend with an internal one serves this node's clients.
            .filter(|f| f.entry.action == Action::Forward || f.internal_via.is_some())
            .map(|f| f.key)
            .collect();
        let shared = self.shared.clone();
        let mut closed_fds = 0;
        self.listeners.retain(|k, l| {
            if wanted.contains(k) {
                return true;
            }
            closed_fds += l.tcp_fds();
            l.abort();
            if let Some(s) = &l.sessions {
                s.clear(&shared);
            }
            false
        });
        self.tcp_listener_fds -= closed_fds;
        let mut unserved = BTreeMap::new();
        for key in wanted {
            if self.listeners.contains_key(&key) {
                continue;
            }
            let on_host = key.ip.is_loopback() || local.contains(&key.ip);
            if !self.addresses.holds(&key.ip) && !on_host {
                let why = if self.addresses.enabled {
                    "the address could not be added to ferry0 or lo"
                } else {
                    "the address is not on this host (as root, Ferry adds it to ferry0)"
                };
                unserved.insert(key, why.to_string());
                continue;
            }
            match self.listen(key) {
                Ok(l) => {
                    self.tcp_listener_fds += l.tcp_fds();
                    self.listeners.insert(key, l);
                }
                Err(e) => {
                    unserved.insert(key, e.to_string());
                }
            }
        }
        unserved
    }

    /// Logs each frontend newly unserved (or for another reason) and keeps
    /// the set for the status report.
    fn report_unserved(&self, unserved: BTreeMap<L4Addr, String>) {
        let mut old = self
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, why) in &unserved {
            if old.get(k) != Some(why) {
                tracing::warn!(frontend = %k, reason = %why, "frontend not served");
            }
        }
        *old = unserved;
    }
}

impl LbMaps for UserspaceDataplane {
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        self.mirror.apply(op);
        Ok(())
    }

    fn dump(&self) -> Result<Vec<MapOp>, DatapathError> {
        Ok(self.mirror.entries())
    }

    fn synced(&mut self) {
        self.refresh();
    }
}

impl Drop for UserspaceDataplane {
    fn drop(&mut self) {
        self.checkers.stop_all();
        for (_, l) in self.listeners.drain() {
            l.abort();
        }
        self.addresses.remove_all();
    }
}
