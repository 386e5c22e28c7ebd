//! Removes the conntrack and affinity entries of deleted backends from the
//! pinned maps, on a thread of its own so a large conntrack table never
//! stalls the sync loop. The programs already refuse an entry whose
//! backend is gone (the flow moves to a live backend at its next packet);
//! the sweep frees the entries and keeps a reused backend ID from ever
//! meeting an old flow. Connected UDP sockets that socket-level balancing
//! sent to a deleted backend are closed too ([`super::sockets`]).

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

/// The handle the datapath keeps; the thread ends when it is dropped.
#[derive(Debug)]
pub struct Sweeper {
    tx: Sender<Vec<GoneBackend>>,
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

    pub fn sweep(&self, gone: Vec<GoneBackend>) {
        let _ = self.tx.send(gone);
    }
}

fn open<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, String> {
    super::typed(dir, name).map_err(|e| e.to_string())
}

fn run(dir: &Path, rx: &Receiver<Vec<GoneBackend>>) {
    while let Ok(mut gone) = rx.recv() {
        // Coalesce whatever queued up meanwhile into one pass.
        while let Ok(more) = rx.try_recv() {
            gone.extend(more);
        }
        match sweep_once(dir, &gone) {
            Ok((ct, aff)) => tracing::debug!(
                backends = gone.len(),
                conntrack = ct,
                affinity = aff,
                "swept entries of deleted backends"
            ),
            Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
        }
        let udp: Vec<super::sockets::Peer> = gone
            .iter()
            .filter(|g| g.proto == 17)
            .map(|g| {
                (
                    std::net::Ipv4Addr::from_bits(g.addr.to_host()),
                    g.port.to_host(),
                )
            })
            .collect();
        let cookies = match balanced_sockets(dir, &udp) {
            Ok(c) => std::sync::Arc::new(c),
            Err(e) => {
                tracing::warn!(error = %e, "reading the socket reverse-NAT map");
                continue;
            }
        };
        let closed = super::sockets::destroy_udp_sockets(&udp, &cookies);
        if closed > 0 {
            tracing::info!(
                sockets = closed,
                "closed connected UDP sockets of deleted backends"
            );
        }
    }
}

/// The cookies of the sockets socket-level balancing sent to one of
/// `peers` (from the socket reverse-NAT map).
fn balanced_sockets(
    dir: &Path,
    peers: &[super::sockets::Peer],
) -> Result<std::collections::HashSet<u64>, String> {
    if peers.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let map: HashMap<MapData, SockRevNat4Key, SockRevNat4Value> = open(dir, SOCK_REVNAT4_MAP)?;
    Ok(map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let peer = (
                std::net::Ipv4Addr::from_bits(k.backend_addr.to_host()),
                k.backend_port.to_host(),
            );
            peers.contains(&peer)
        })
        .map(|k| k.cookie)
        .collect())
}

/// One pass over both maps; returns the entries removed from each.
pub fn sweep_once(dir: &Path, gone: &[GoneBackend]) -> Result<(usize, usize), String> {
    let is_gone = |id: u32, addr: Be32, port: Be16| {
        gone.iter()
            .any(|g| g.id == id && g.addr == addr && g.port == port)
    };
    let mut ct: HashMap<MapData, Ct4Key, Ct4Value> = open(dir, CT4_MAP)?;
    let stale: Vec<Ct4Key> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            let (addr, port) = if k.dir == CT_FORWARD {
                (v.addr, v.port)
            } else {
                (k.src, k.sport)
            };
            is_gone(v.backend_id, addr, port)
        })
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        let _ = ct.remove(k);
    }
    let mut aff: HashMap<MapData, Affinity4Key, AffinityValue> = open(dir, AFFINITY4_MAP)?;
    let stale_aff: Vec<Affinity4Key> = aff
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| is_gone(v.backend_id, v.backend_addr, v.backend_port))
        .map(|(k, _)| k)
        .collect();
    for k in &stale_aff {
        let _ = aff.remove(k);
    }
    Ok((stale.len(), stale_aff.len()))
}
