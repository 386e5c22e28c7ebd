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
mod splice;
mod status;
pub mod table;
mod tcp;
mod udp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

use crate::datapath::{DatapathError, LbMaps};
use crate::metrics::DataplaneStatus;
use crate::model::{Action, FastMap, L4Addr, Protocol};
use crate::plan::{AppliedState, MapOp};
use status::Status;
use table::{AffinityKey, Backend, Frontend, Refusal, Rng, Table};

/// A socket bound to `addr` with SO_REUSEADDR and IP_FREEBIND (the address
/// need not be local yet), non-blocking; with SO_REUSEPORT when several of
/// ours share the address (one TCP listener per shard).
fn bind_socket(
    addr: SocketAddr,
    ty: socket2::Type,
    proto: socket2::Protocol,
    reuse_port: bool,
) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

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
            idle_timeout: Duration::from_secs(3600),
            udp_idle_timeout: Duration::from_secs(30),
            // SAFETY: geteuid has no preconditions.
            manage_addresses: unsafe { libc::geteuid() } == 0,
            worker_threads: std::env::var("FERRY_USERSPACE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        }
    }
}

/// Why a connection or datagram was refused (metric label).
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    NoEndpoints,
    SourceRange,
    NoBackend,
    Limit,
    /// RLIMIT_NOFILE reached: no descriptor for the connection.
    Descriptors,
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Refused {
        match r {
            Refusal::NoEndpoints => Refused::NoEndpoints,
            Refusal::SourceRange => Refused::SourceRange,
            Refusal::Exhausted => Refused::NoBackend,
        }
    }
}

const REFUSED: [(&str, Refused); 5] = [
    ("no_endpoints", Refused::NoEndpoints),
    ("source_range", Refused::SourceRange),
    ("no_backend", Refused::NoBackend),
    ("limit", Refused::Limit),
    ("descriptors", Refused::Descriptors),
];

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    refused: [AtomicU64; 5],
    pub connect_failures: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub bytes: AtomicU64,
    pub udp_sessions_total: AtomicU64,
}

impl Stats {
    pub fn refused(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_count(&self, why: Refused) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

/// What the serving tasks share.
#[derive(Debug)]
pub struct Shared {
    table: RwLock<Arc<Table>>,
    affinity: Mutex<FastMap<AffinityKey, (L4Addr, u64)>>,
    epoch: Instant,
    pub cfg: UserspaceConfig,
    pub stats: Stats,
    /// Open connections + sessions.
    active: AtomicU64,
    /// A descriptor held back for RLIMIT_NOFILE: closed to accept (and
    /// reset) a connection that found no descriptor, then taken again.
    pub reserve: Mutex<Option<std::fs::File>>,
    /// When running out of descriptors was last logged (ms since epoch).
    pub nofile_logged_ms: AtomicU64,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The frontend serving `client` on `key` (see [`Table::serving`]).
    pub fn frontend(&self, key: &L4Addr, client: IpAddr) -> Option<Arc<Frontend>> {
        self.table().serving(key, client)
    }

    /// Takes a connection slot; false at the limit.
    pub fn admit(&self) -> bool {
        let n = self.active.fetch_add(1, Ordering::Relaxed);
        if n >= self.cfg.max_connections {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Picks a backend with session affinity applied and recorded.
    pub fn pick(
        &self,
        fe: &Frontend,
        client: SocketAddr,
        exclude: &[L4Addr],
        rng: &mut Rng,
    ) -> Result<Backend, Refusal> {
        let now = self.now_ms();
        let timeout = u64::from(fe.entry.affinity_timeout) * 1000;
        let key = (fe.key, client.ip());
        let sticky = if timeout > 0 {
            let aff = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
            aff.get(&key).filter(|(_, exp)| *exp > now).map(|(b, _)| *b)
        } else {
            None
        };
        let b = table::choose(fe, client, exclude, sticky, now, rng)?;
        if timeout > 0 {
            let mut aff = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
            aff.insert(key, (b.addr, now + timeout));
        }
        Ok(b)
    }
}

struct Listener {
    /// The accept loops (one per shard) or the UDP server.
    tasks: Vec<AbortHandle>,
    sessions: Option<Arc<udp::Sessions>>,
}

impl Listener {
    /// Listening TCP sockets it holds (a UDP server's socket is not one).
    fn tcp_fds(&self) -> usize {
        if self.sessions.is_none() {
            self.tasks.len()
        } else {
            0
        }
    }

    fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A thread with its own single-threaded runtime that serves TCP. Each TCP
/// frontend has one SO_REUSEPORT listener per shard, and a connection stays
/// on the shard that accepted it from accept to close: its wake-ups never
/// cross threads, as in HAProxy's and nginx's per-thread listeners. The
/// kernel spreads new connections over the shards' listeners.
struct Shard {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shard {
    fn start(index: usize) -> std::io::Result<Shard> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-tcp-{index}"))
            .spawn(move || {
                // Runs the shard's tasks until told to stop; dropping the
                // runtime then drops every task it still holds.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Shard {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
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
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
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
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the table from the maps and serves it.
    fn refresh(&mut self) {
        self.generation += 1;
        let mut local: BTreeSet<IpAddr> = crate::netif::local_addresses(&[]).into_iter().collect();
        local.retain(|ip| !self.addresses.holds(ip));
        let table = Arc::new(table::build(
            &self.mirror,
            local.iter().copied().collect(),
            &mut self.registry,
            self.generation,
        ));
        *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
        {
            let now = self.shared.now_ms();
            let mut aff = self
                .shared
                .affinity
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            aff.retain(|_, (_, exp)| *exp > now);
        }

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
        let is_local = |ip: &IpAddr| ip.is_loopback() || local.contains(ip);

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
            if !self.addresses.holds(&key.ip) && !is_local(&key.ip) {
                unserved.insert(
                    key,
                    if self.addresses.enabled {
                        "the address could not be added to ferry0 or lo".to_string()
                    } else {
                        "the address is not on this host (as root, Ferry adds it to ferry0)"
                            .to_string()
                    },
                );
                continue;
            }
            match self.listen(key) {
                Ok(l) => {
                    self.tcp_listener_fds += l.tcp_fds();
                    self.listeners.insert(key, l);
                }
                Err(e) => {
                    unserved.insert(key, e);
                }
            }
        }
        {
            let mut old = self.unserved.lock().unwrap_or_else(|p| p.into_inner());
            for (k, why) in &unserved {
                if old.get(k) != Some(why) {
                    tracing::warn!(frontend = %k, reason = %why, "frontend not served");
                }
            }
            *old = unserved;
        }
        self.checkers
            .update(&table, self.runtime.handle(), &self.check_stats);
    }

    fn listen(&mut self, key: L4Addr) -> Result<Listener, String> {
        let addr = SocketAddr::new(key.ip, key.port);
        let _guard = self.runtime.enter();
        let shared = self.shared.clone();
        match key.protocol {
            Protocol::Tcp => {
                let mut listener = Listener {
                    tasks: Vec::with_capacity(self.shards.len()),
                    sessions: None,
                };
                // One listener per shard while the descriptors allow;
                // beyond that (thousands of Services) one listener per
                // frontend, the frontends spread over the shards.
                let n = self.shards.len();
                let per_shard = self.tcp_listener_fds + n <= self.listener_budget;
                let shards: &[Shard] = if per_shard {
                    &self.shards
                } else {
                    // Logged once, at the first such frontend.
                    if self.next_shard == 0 {
                        tracing::info!(
                            listeners = self.tcp_listener_fds,
                            "listener budget (a quarter of RLIMIT_NOFILE) reached: \
                             further TCP frontends get one listener on one thread"
                        );
                    }
                    self.next_shard += 1;
                    let i = self.next_shard % n;
                    &self.shards[i..=i]
                };
                let shared_port = shards.len() > 1;
                for shard in shards {
                    // AsyncFd registers with the runtime it is created in.
                    let _in_shard = shard.handle.enter();
                    let bound = tcp::bind(addr, shared_port).and_then(splice::register);
                    match bound {
                        Ok(l) => listener.tasks.push(
                            shard
                                .handle
                                .spawn(tcp::accept_loop(l, key, shared.clone()))
                                .abort_handle(),
                        ),
                        Err(e) => {
                            listener.abort();
                            return Err(format!("binding TCP {addr}: {e}"));
                        }
                    }
                }
                Ok(listener)
            }
            Protocol::Udp => {
                let std = udp::bind(addr).map_err(|e| format!("binding UDP {addr}: {e}"))?;
                let s = tokio::net::UdpSocket::from_std(std)
                    .map_err(|e| format!("binding UDP {addr}: {e}"))?;
                let sessions = Arc::new(udp::Sessions::default());
                let task = self
                    .runtime
                    .spawn(udp::serve(Arc::new(s), key, shared, sessions.clone()))
                    .abort_handle();
                Ok(Listener {
                    tasks: vec![task],
                    sessions: Some(sessions),
                })
            }
            Protocol::Sctp => Err("SCTP is not served by the userspace dataplane".into()),
        }
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
