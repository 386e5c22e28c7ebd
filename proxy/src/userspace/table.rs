//! The userspace dataplane's view of the maps: per frontend, its policy,
//! slots and Maglev table as the sync loop applied them (so the choice of
//! backend is the eBPF path's: same slots, same Maglev table, same flow
//! hash), plus the Service name and active health check (the frontend's
//! meta op). Backend health is shared state that outlives table rebuilds.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{Action, Algorithm, FastMap, FastSet, L4Addr, ProbeSpec, ServiceName};
use crate::plan::{AppliedState, BackendId, FrontendEntry};

/// Consecutive connect failures that eject a backend (passive outlier
/// detection), and for how long.
pub const EJECT_AFTER_FAILURES: u32 = 5;
pub const EJECT_FOR_MS: u64 = 10_000;

/// Health and load of one backend address, shared by every frontend that
/// uses it and kept across table rebuilds.
#[derive(Debug)]
pub struct BackendState {
    /// The active health check passes (true without a check).
    pub healthy: AtomicBool,
    /// Consecutive failed connects to it.
    pub connect_failures: AtomicU32,
    /// Ejected by passive outlier detection until this time (ms since the
    /// dataplane's epoch); 0 when not ejected.
    pub ejected_until_ms: AtomicU64,
    /// Connections open to it now.
    pub active: AtomicU32,
    pub connections_total: AtomicU64,
    pub ejections_total: AtomicU64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            healthy: AtomicBool::new(true),
            connect_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            active: AtomicU32::new(0),
            connections_total: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }
}

impl BackendState {
    /// May take new connections at `now_ms`.
    pub fn available(&self, now_ms: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// A connect succeeded.
    pub fn connected(&self) {
        self.connect_failures.store(0, Ordering::Relaxed);
    }

    /// A connect failed; returns true when this failure ejected it.
    pub fn connect_failed(&self, now_ms: u64) -> bool {
        let n = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER_FAILURES {
            self.connect_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms
                .store(now_ms + EJECT_FOR_MS, Ordering::Relaxed);
            self.ejections_total.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// "healthy", "unhealthy" (active check) or "ejected" (passive).
    pub fn describe(&self, now_ms: u64) -> &'static str {
        if !self.healthy.load(Ordering::Relaxed) {
            "unhealthy"
        } else if self.ejected_until_ms.load(Ordering::Relaxed) > now_ms {
            "ejected"
        } else {
            "healthy"
        }
    }
}

/// One backend of a frontend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: u32,
    pub addr: L4Addr,
    pub local: bool,
    pub terminating: bool,
    pub state: Arc<BackendState>,
}

/// One frontend as the userspace dataplane serves it.
#[derive(Debug)]
pub struct Frontend {
    pub key: L4Addr,
    pub service: Option<ServiceName>,
    pub port_name: Arc<str>,
    pub entry: FrontendEntry,
    /// The backends new flows may go to (the slots, in slot order).
    pub slots: Vec<Backend>,
    /// Maglev table as indexes into `slots` (u16::MAX: not a slot).
    pub maglev: Vec<u16>,
    pub source_ranges: Vec<IpNet>,
    pub probe: Option<Arc<ProbeSpec>>,
    /// Serves this frontend's clients on this node instead (kube-proxy's
    /// short-circuit of externalTrafficPolicy Local).
    pub internal_via: Option<L4Addr>,
}

/// Every frontend, indexed by address; rebuilt after each sync.
#[derive(Debug, Default)]
pub struct Table {
    pub frontends: FastMap<L4Addr, Arc<Frontend>>,
    /// This node's addresses: a client from one of them (or loopback) is
    /// on the node.
    pub node_addresses: FastSet<IpAddr>,
    /// Bumped on each rebuild: sessions re-check their backend when it moves.
    pub generation: u64,
}

/// Builds the table from the applied maps (the plan's ops); backend
/// states come from (and new ones go into) `registry`, which forgets
/// addresses no frontend names any more.
pub fn build(
    applied: &AppliedState,
    node_addresses: FastSet<IpAddr>,
    registry: &mut FastMap<L4Addr, Arc<BackendState>>,
    generation: u64,
) -> Table {
    let mut frontends = FastMap::default();
    let mut used: FastSet<L4Addr> = FastSet::default();
    for (key, f) in applied.frontends() {
        let Some(entry) = f.entry else { continue };
        let (slots, index_of) = slots(applied, &f.slots, registry, &mut used);
        let maglev = if entry.algorithm == Algorithm::Maglev {
            applied.maglev().get(&entry.id).map_or_else(Vec::new, |t| {
                t.iter()
                    .map(|id| index_of.get(&id.0).copied().unwrap_or(u16::MAX))
                    .collect()
            })
        } else {
            Vec::new()
        };
        let source_ranges = if entry.source_ranges {
            applied
                .source_ranges()
                .get(&entry.id)
                .map(|r| r.iter().copied().collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let meta = f.meta.as_ref();
        let frontend = Frontend {
            key: *key,
            service: meta.map(|m| m.service.clone()),
            port_name: meta.map_or_else(|| "".into(), |m| m.port_name.clone()),
            entry,
            slots,
            maglev,
            source_ranges,
            probe: meta.and_then(|m| m.probe.clone()),
            internal_via: entry
                .internal_via
                .and_then(|id| applied.rev_nat().get(&id).copied()),
        };
        frontends.insert(*key, Arc::new(frontend));
    }
    registry.retain(|addr, _| used.contains(addr));
    Table {
        frontends,
        node_addresses,
        generation,
    }
}

/// A frontend's backends in slot order (each with its shared state from
/// `registry`, marked in `used`), and each backend ID's index among them.
fn slots(
    applied: &AppliedState,
    ids: &[BackendId],
    registry: &mut FastMap<L4Addr, Arc<BackendState>>,
    used: &mut FastSet<L4Addr>,
) -> (Vec<Backend>, FastMap<u32, u16>) {
    let mut index_of: FastMap<u32, u16> = FastMap::default();
    let mut slots = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(b) = applied.backends().get(id) else {
            continue;
        };
        let state = registry.entry(b.addr).or_default().clone();
        used.insert(b.addr);
        index_of.insert(id.0, slots.len() as u16);
        slots.push(Backend {
            id: id.0,
            addr: b.addr,
            local: b.local,
            terminating: b.terminating,
            state,
        });
    }
    (slots, index_of)
}

impl Table {
    /// The frontend that serves `client` on `key`: the internal one for a
    /// client on this node when the frontend names one, else its own.
    pub fn serving(&self, key: &L4Addr, client: IpAddr) -> Option<Arc<Frontend>> {
        let fe = self.frontends.get(key)?;
        let on_node = client.is_loopback() || self.node_addresses.contains(&client);
        let via = fe.internal_via.filter(|_| on_node);
        // The internal frontend missing (not programmed): the own one.
        let via = via.and_then(|v| self.frontends.get(&v));
        Some(via.unwrap_or(fe).clone())
    }
}

/// Why a new flow gets no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The Service has no usable endpoint (or Local policy without a local
    /// one): refused at once.
    NoEndpoints,
    /// loadBalancerSourceRanges do not include the client.
    SourceRange,
    /// Every backend was tried.
    Exhausted,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::SourceRange => "source_range",
            Refusal::Exhausted => "no_backend",
        }
    }
}

/// A small, fast, non-cryptographic generator (xorshift64*), per task.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize * n) >> 32
    }
}

/// Session affinity (ClientIP): the backend a client was last sent to.
pub type AffinityKey = (L4Addr, IpAddr);

/// Picks the backend for a new flow from `client`, skipping `exclude`
/// (backends already tried for this flow). Order: source ranges, affinity,
/// then the frontend's algorithm over the available slots; if every slot is
/// unavailable (health checks or ejection), all slots are tried rather than
/// refusing (fail open, as a load balancer's panic mode).
pub fn choose(
    fe: &Frontend,
    client: SocketAddr,
    exclude: &[L4Addr],
    affinity: Option<L4Addr>,
    now_ms: u64,
    rng: &mut Rng,
) -> Result<Backend, Refusal> {
    if fe.entry.action != Action::Forward || fe.slots.is_empty() {
        return Err(Refusal::NoEndpoints);
    }
    if fe.entry.source_ranges && !fe.source_ranges.iter().any(|n| n.contains(&client.ip())) {
        return Err(Refusal::SourceRange);
    }
    let usable = |b: &Backend| !exclude.contains(&b.addr);
    if let Some(addr) = affinity {
        if let Some(b) = fe
            .slots
            .iter()
            .find(|b| b.addr == addr && usable(b) && b.state.available(now_ms))
        {
            return Ok(b.clone());
        }
    }
    let mut candidates: Vec<&Backend> = fe
        .slots
        .iter()
        .filter(|b| usable(b) && b.state.available(now_ms))
        .collect();
    if candidates.is_empty() {
        candidates = fe.slots.iter().filter(|b| usable(b)).collect();
    }
    if candidates.is_empty() {
        return Err(Refusal::Exhausted);
    }
    Ok(pick(fe, client, &candidates, rng).clone())
}

/// The frontend's algorithm over the available `candidates` (not empty):
/// Maglev's slot for the flow when it is a candidate, the less loaded of
/// two random ones, or one at random.
fn pick<'a>(
    fe: &'a Frontend,
    client: SocketAddr,
    candidates: &[&'a Backend],
    rng: &mut Rng,
) -> &'a Backend {
    match fe.entry.algorithm {
        Algorithm::Maglev => {
            let preferred = match crate::explain::flow_hash(client, &fe.key) {
                Some(h) if !fe.maglev.is_empty() => fe
                    .maglev
                    .get(h as usize % fe.maglev.len())
                    .and_then(|&i| fe.slots.get(usize::from(i))),
                _ => None,
            };
            match preferred {
                Some(b) if candidates.iter().any(|c| c.addr == b.addr) => b,
                _ => candidates[rng.below(candidates.len())],
            }
        }
        Algorithm::LeastConnections => {
            let a = candidates[rng.below(candidates.len())];
            let b = candidates[rng.below(candidates.len())];
            if b.state.active.load(Ordering::Relaxed) < a.state.active.load(Ordering::Relaxed) {
                b
            } else {
                a
            }
        }
        Algorithm::Random => candidates[rng.below(candidates.len())],
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
