//! Removes the conntrack and affinity entries of deleted backends from the
//! pinned maps, on a thread of its own so a large conntrack table never
//! stalls the sync loop. The programs already refuse an entry whose
//! backend is gone (the flow moves to a live backend at its next packet);
//! the sweep frees the entries and keeps a reused backend ID from ever
//! meeting an old flow. Connected UDP sockets that socket-level balancing
//! sent to a deleted backend are closed too ([`super::sockets`]). The same
//! is done for a released pair (a UDP frontend and a backend that left it
//! but stays for other frontends): the programs cannot tell such an entry
//! is stale, so only the sweep ends those flows.

use super::DatapathError;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};

use aya::maps::{HashMap, MapData};
use ferry_common::lb::{
    Affinity4Key, AffinityValue, Be16, Be32, Ct4Key, Ct4Value, SockRevNat4Key, SockRevNat4Value,
    AFFINITY4_MAP, CT4_MAP, CT_FORWARD, SOCK_REVNAT4_MAP,
};

/// A backend that was deleted: its ID and the address it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoneBackend {
    pub id: u32,
    pub addr: Be32,
    pub port: Be16,
    /// IP protocol number.
    pub proto: u8,
}

/// A UDP frontend and a backend that left it (see
/// [`crate::plan::MapOp::ReleaseFlows`]), with the backend's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GonePair {
    pub frontend_id: u32,
    pub backend: GoneBackend,
}

/// What one sweep removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gone {
    pub backends: Vec<GoneBackend>,
    pub pairs: Vec<GonePair>,
}

impl Gone {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.pairs.is_empty()
    }

    fn extend(&mut self, more: Gone) {
        self.backends.extend(more.backends);
        self.pairs.extend(more.pairs);
    }

    /// Whether a conntrack or affinity entry naming `frontend_id` and
    /// `backend_id`, whose backend is at `addr:port`, is stale.
    fn covers(&self, frontend_id: u32, backend_id: u32, addr: Be32, port: Be16) -> bool {
        let same = |g: &GoneBackend| g.id == backend_id && g.addr == addr && g.port == port;
        self.backends.iter().any(same)
            || self
                .pairs
                .iter()
                .any(|p| p.frontend_id == frontend_id && same(&p.backend))
    }
}

/// The handle the datapath keeps; the thread ends when it is dropped.
#[derive(Debug)]
pub struct Sweeper {
    tx: Sender<Gone>,
}

impl Sweeper {
    /// Starts the sweeping thread on the maps pinned under `dir`.
    pub fn start(dir: &Path) -> Sweeper {
        let (tx, rx) = channel();
        let dir = dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("ferry-sweep".into())
            .spawn(move || run(&dir, &rx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the conntrack sweeper; stale entries age out instead");
        }
        Sweeper { tx }
    }

    pub fn sweep(&self, gone: Gone) {
        let _ = self.tx.send(gone);
    }
}

fn run(dir: &Path, rx: &Receiver<Gone>) {
    while let Ok(mut gone) = rx.recv() {
        // Coalesce whatever queued up meanwhile into one pass.
        while let Ok(more) = rx.try_recv() {
            gone.extend(more);
        }
        match sweep_once(dir, &gone) {
            Ok((ct, aff)) => tracing::debug!(
                backends = gone.backends.len(),
                pairs = gone.pairs.len(),
                conntrack = ct,
                affinity = aff,
                "swept entries of deleted backends and released pairs"
            ),
            Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
        }
        close_sockets(dir, &gone);
    }
}

fn peer(g: &GoneBackend) -> super::sockets::Peer {
    (
        std::net::Ipv4Addr::from_bits(g.addr.to_host()),
        g.port.to_host(),
    )
}

/// Closes the connected UDP sockets socket-level balancing sent to a
/// deleted backend, or (for a released pair) to that backend through that
/// frontend.
fn close_sockets(dir: &Path, gone: &Gone) {
    let udp = |g: &&GoneBackend| g.proto == 17;
    let backends: Vec<super::sockets::Peer> = gone.backends.iter().filter(udp).map(peer).collect();
    let pairs: Vec<(u32, super::sockets::Peer)> = gone
        .pairs
        .iter()
        .filter(|p| p.backend.proto == 17)
        .map(|p| (p.frontend_id, peer(&p.backend)))
        .collect();
    if backends.is_empty() && pairs.is_empty() {
        return;
    }
    let cookies = match balanced_sockets(dir, &backends, &pairs) {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "reading the socket reverse-NAT map");
            return;
        }
    };
    let mut peers = backends;
    peers.extend(pairs.iter().map(|(_, p)| *p));
    let closed = super::sockets::destroy_udp_sockets(&peers, &cookies);
    if closed > 0 {
        tracing::info!(
            sockets = closed,
            "closed connected UDP sockets of deleted backends and released pairs"
        );
    }
}

/// The cookies of the sockets socket-level balancing sent to one of
/// `peers`, or to a peer of `pairs` through that frontend (from the socket
/// reverse-NAT map).
fn balanced_sockets(
    dir: &Path,
    peers: &[super::sockets::Peer],
    pairs: &[(u32, super::sockets::Peer)],
) -> Result<std::collections::HashSet<u64>, DatapathError> {
    let map: HashMap<MapData, SockRevNat4Key, SockRevNat4Value> =
        super::typed(dir, SOCK_REVNAT4_MAP)?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            let peer = (
                std::net::Ipv4Addr::from_bits(k.backend_addr.to_host()),
                k.backend_port.to_host(),
            );
            peers.contains(&peer) || pairs.contains(&(v.frontend_id, peer))
        })
        .map(|(k, _)| k.cookie)
        .collect())
}

/// One pass over both maps; returns the entries removed from each.
pub fn sweep_once(dir: &Path, gone: &Gone) -> Result<(usize, usize), DatapathError> {
    let mut ct: HashMap<MapData, Ct4Key, Ct4Value> = super::typed(dir, CT4_MAP)?;
    let stale: Vec<Ct4Key> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            let (addr, port) = if k.dir == CT_FORWARD {
                (v.addr, v.port)
            } else {
                (k.src, k.sport)
            };
            gone.covers(v.frontend_id, v.backend_id, addr, port)
        })
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        let _ = ct.remove(k);
    }
    let mut aff: HashMap<MapData, Affinity4Key, AffinityValue> = super::typed(dir, AFFINITY4_MAP)?;
    let stale_aff: Vec<Affinity4Key> = aff
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| gone.covers(k.frontend_id, v.backend_id, v.backend_addr, v.backend_port))
        .map(|(k, _)| k)
        .collect();
    for k in &stale_aff {
        let _ = aff.remove(k);
    }
    Ok((stale.len(), stale_aff.len()))
}
