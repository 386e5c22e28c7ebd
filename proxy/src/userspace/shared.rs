//! What the serving tasks share: the table in service, ClientIP affinity,
//! the connection budget and the counters.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use super::table::{self, AffinityKey, Backend, Frontend, Refusal, Rng, Table};
use super::UserspaceConfig;
use crate::model::{FastMap, L4Addr};

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

pub(super) const REFUSED: [(&str, Refused); 5] = [
    ("no_endpoints", Refused::NoEndpoints),
    ("source_range", Refused::SourceRange),
    ("no_backend", Refused::NoBackend),
    ("limit", Refused::Limit),
    ("descriptors", Refused::Descriptors),
];

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub(super) refused: [AtomicU64; 5],
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
    pub(super) table: RwLock<Arc<Table>>,
    pub(super) affinity: Mutex<FastMap<AffinityKey, (L4Addr, u64)>>,
    pub(super) epoch: Instant,
    pub cfg: UserspaceConfig,
    pub stats: Stats,
    /// Open connections + sessions.
    pub(super) active: AtomicU64,
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
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
            let aff = self
                .affinity
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            aff.get(&key).filter(|(_, exp)| *exp > now).map(|(b, _)| *b)
        } else {
            None
        };
        let b = table::choose(fe, client, exclude, sticky, now, rng)?;
        if timeout > 0 {
            let mut aff = self
                .affinity
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            aff.insert(key, (b.addr, now + timeout));
        }
        Ok(b)
    }
}
