//! [`BpfMaps`]: the map-operation interface on the pinned eBPF maps of
//! ferry-common's layouts (IPv4). IPv6 frontends and backends are accepted
//! and not programmed until the IPv6 maps exist (counted in
//! `skipped_ipv6`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData, MapError};
use ferry_common::lb::{
    Backend4, MaglevTable, RevNat4, Service4Key, Service4Value, SourceRange4, BACKENDS4_MAP,
    BACKEND_FLAG_LOCAL, BACKEND_FLAG_TERMINATING, MAGLEV4_MAP, MAGLEV_TABLE_SIZE, REVNAT4_MAP,
    SERVICES4_MAP, SOURCE_RANGES4_MAP,
};
use ipnet::{IpNet, Ipv4Net};

use super::batch::{supported, update_batch};
use super::encode::{
    backend_entry, backend_value, decode_frontend, l4, range_key, revnat_entry, revnat_value,
    run_of, services_entry, svc_key, Run,
};
use super::sweep::{Gone, GoneBackend, GonePair, Sweeper};
use super::{DatapathError, LbMaps};
use crate::model::{L4Addr, Protocol};
use crate::plan::{BackendEntry, BackendId, FrontendId, MapOp};

/// Sizes of the maps, set when the programs are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapCapacities {
    /// Master entries plus backend slots.
    pub services: u32,
    pub backends: u32,
    pub frontends: u32,
    pub affinity: u32,
    pub sock_revnat: u32,
    pub source_ranges: u32,
    /// Conntrack entries of the TC path (two per flow).
    pub conntrack: u32,
}

impl Default for MapCapacities {
    fn default() -> Self {
        MapCapacities {
            services: 262_144,
            backends: 262_144,
            frontends: 65_536,
            affinity: 65_536,
            sock_revnat: 262_144,
            source_ranges: 16_384,
            conntrack: 524_288,
        }
    }
}

/// The pinned load-balancing maps.
#[derive(Debug)]
pub struct BpfMaps {
    services: HashMap<MapData, Service4Key, Service4Value>,
    backends: HashMap<MapData, u32, Backend4>,
    revnat: HashMap<MapData, u32, RevNat4>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    ranges: LpmTrie<MapData, SourceRange4, u8>,
    caps: MapCapacities,
    /// IPv6 ops accepted without programming (no IPv6 maps yet).
    pub skipped_ipv6: u64,
    /// Backends deleted and pairs released since the last sync, for the
    /// sweeper.
    gone: Gone,
    sweeper: Option<Sweeper>,
    dir: PathBuf,
    /// The maps written in batches, when the kernel has batch updates.
    batch: Option<BatchFds>,
}

/// Second handles on the maps full syncs write most, for batch updates.
#[derive(Debug)]
struct BatchFds {
    services: MapData,
    backends: MapData,
    revnat: MapData,
}

impl BatchFds {
    fn open(dir: &Path) -> Option<BatchFds> {
        let data = |name: &str| MapData::from_pin(dir.join(name)).ok();
        let fds = BatchFds {
            services: data(SERVICES4_MAP)?,
            backends: data(BACKENDS4_MAP)?,
            revnat: data(REVNAT4_MAP)?,
        };
        supported(raw(&fds.services)).then_some(fds)
    }
}

fn raw(map: &MapData) -> std::os::fd::RawFd {
    use std::os::fd::{AsFd, AsRawFd};
    map.fd().as_fd().as_raw_fd()
}

/// Upserts at most this many entries per batch (bounds the buffers).
const MAX_BATCH: usize = 4096;

fn open_map(dir: &Path, name: &str) -> Result<Map, DatapathError> {
    let path: PathBuf = dir.join(name);
    let open_err = |source: MapError| DatapathError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    Map::from_map_data(data).map_err(open_err)
}

/// The map pinned as `dir/name`, as the typed aya map `T` (its kind is
/// read from the kernel).
pub(crate) fn typed<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = open_map(dir, name)?;
    T::try_from(map).map_err(|source| DatapathError::Open {
        path: dir.join(name).display().to_string(),
        source,
    })
}

impl BpfMaps {
    /// Opens the maps pinned under `dir` (created by loading the programs).
    pub fn open(dir: &Path, caps: MapCapacities) -> Result<BpfMaps, DatapathError> {
        Ok(BpfMaps {
            services: typed(dir, SERVICES4_MAP)?,
            backends: typed(dir, BACKENDS4_MAP)?,
            revnat: typed(dir, REVNAT4_MAP)?,
            maglev: typed(dir, MAGLEV4_MAP)?,
            ranges: typed(dir, SOURCE_RANGES4_MAP)?,
            caps,
            skipped_ipv6: 0,
            gone: Gone::default(),
            sweeper: None,
            dir: dir.to_path_buf(),
            batch: BatchFds::open(dir),
        })
    }
}

impl BpfMaps {
    /// Whether runs of upserts go in as batches (the kernel has
    /// BPF_MAP_UPDATE_BATCH for these maps).
    pub fn batches(&self) -> bool {
        self.batch.is_some()
    }

    /// One batch of upserts that [`run_of`] put in run `r`; Err(how many
    /// went in) when the batch stopped early.
    fn write_run(&mut self, r: Run, ops: &[MapOp]) -> Result<(), usize> {
        let Some(fds) = &self.batch else {
            return Err(0);
        };
        match r {
            Run::Backends => write_batch(raw(&fds.backends), ops, backend_entry),
            Run::RevNat => write_batch(raw(&fds.revnat), ops, revnat_entry),
            Run::Services => write_batch(raw(&fds.services), ops, services_entry),
        }
    }
}

/// One batch of `ops`, each encoded by `entry`; Err(how many went in).
fn write_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::RawFd,
    ops: &[MapOp],
    entry: fn(&MapOp) -> Option<(K, V)>,
) -> Result<(), usize> {
    let (keys, values): (Vec<K>, Vec<V>) = ops.iter().filter_map(entry).unzip();
    if keys.len() != ops.len() {
        // Not all of the run encoded (cannot happen for what run_of
        // accepts): apply one by one.
        return Err(0);
    }
    update_batch(fd, &keys, &values).map_err(|e| {
        tracing::debug!(done = e.done, of = ops.len(), error = %e.error, "batch update stopped");
        e.done
    })
}

/// Maps an aya error on `map` to ours; E2BIG from an insert is a full map.
fn map_err(
    map: &'static str,
    op: &'static str,
    capacity: u32,
) -> impl Fn(MapError) -> DatapathError {
    move |e| match &e {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc_e2big()) => {
            DatapathError::MapFull { map, capacity }
        }
        _ => DatapathError::Map { map, op, source: e },
    }
}

const fn libc_e2big() -> i32 {
    7
}

/// Deleting a missing key is success.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

impl LbMaps for BpfMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let caps = self.caps;
        match op {
            MapOp::UpsertBackend { id, entry } => {
                let Some(value) = backend_value(entry) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                self.backends.insert(id.0, value, 0).map_err(map_err(
                    BACKENDS4_MAP,
                    "insert",
                    caps.backends,
                ))
            }
            MapOp::DeleteBackend { id } => {
                if let Ok(b) = self.backends.get(&id.0, 0) {
                    self.gone.backends.push(GoneBackend {
                        id: id.0,
                        addr: b.addr,
                        port: b.port,
                        proto: b.proto,
                    });
                }
                ignore_missing(self.backends.remove(&id.0)).map_err(map_err(
                    BACKENDS4_MAP,
                    "delete",
                    caps.backends,
                ))
            }
            MapOp::UpsertRevNat { id, frontend } => {
                let Some(value) = revnat_value(frontend) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                self.revnat.insert(id.0, value, 0).map_err(map_err(
                    REVNAT4_MAP,
                    "insert",
                    caps.frontends,
                ))
            }
            MapOp::ReleaseFlows { frontend, backend } => {
                // The backend stays (other frontends use it): its address
                // tells the sweep which sockets and entries are the pair's.
                if let Ok(b) = self.backends.get(&backend.0, 0) {
                    self.gone.pairs.push(GonePair {
                        frontend_id: frontend.0,
                        backend: GoneBackend {
                            id: backend.0,
                            addr: b.addr,
                            port: b.port,
                            proto: b.proto,
                        },
                    });
                }
                Ok(())
            }
            // No eBPF map holds a frontend's name or probe.
            MapOp::UpsertMeta { .. } | MapOp::DeleteMeta { .. } => Ok(()),
            MapOp::DeleteRevNat { id } => ignore_missing(self.revnat.remove(&id.0))
                .map_err(map_err(REVNAT4_MAP, "delete", caps.frontends)),
            MapOp::UpsertSlot { .. } | MapOp::UpsertFrontend { .. } => {
                let Some((key, value)) = services_entry(op) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                self.services.insert(key, value, 0).map_err(map_err(
                    SERVICES4_MAP,
                    "insert",
                    caps.services,
                ))
            }
            MapOp::DeleteSlot { frontend, slot } => match svc_key(frontend, *slot) {
                Some(key) => ignore_missing(self.services.remove(&key)).map_err(map_err(
                    SERVICES4_MAP,
                    "delete",
                    caps.services,
                )),
                None => Ok(()),
            },
            MapOp::DeleteFrontend { frontend } => match svc_key(frontend, 0) {
                Some(key) => ignore_missing(self.services.remove(&key)).map_err(map_err(
                    SERVICES4_MAP,
                    "delete",
                    caps.services,
                )),
                None => Ok(()),
            },
            MapOp::UpsertMaglev { id, table } => {
                if table.len() != MAGLEV_TABLE_SIZE as usize {
                    return Err(DatapathError::Unsupported(format!(
                        "maglev table of {} entries: the eBPF programs are built for {}",
                        table.len(),
                        MAGLEV_TABLE_SIZE
                    )));
                }
                let mut value = Box::new(MaglevTable {
                    backends: [0; MAGLEV_TABLE_SIZE as usize],
                });
                for (slot, b) in value.backends.iter_mut().zip(table.iter()) {
                    *slot = b.0;
                }
                self.maglev.insert(id.0, value.as_ref(), 0).map_err(map_err(
                    MAGLEV4_MAP,
                    "insert",
                    caps.frontends,
                ))
            }
            MapOp::DeleteMaglev { id } => ignore_missing(self.maglev.remove(&id.0))
                .map_err(map_err(MAGLEV4_MAP, "delete", caps.frontends)),
            MapOp::UpsertSourceRange { id, range } => match range {
                IpNet::V4(net) => self
                    .ranges
                    .insert(&range_key(*id, net), 1, 0)
                    .map_err(map_err(SOURCE_RANGES4_MAP, "insert", caps.source_ranges)),
                IpNet::V6(_) => {
                    self.skipped_ipv6 += 1;
                    Ok(())
                }
            },
            MapOp::DeleteSourceRange { id, range } => match range {
                IpNet::V4(net) => ignore_missing(self.ranges.remove(&range_key(*id, net)))
                    .map_err(map_err(SOURCE_RANGES4_MAP, "delete", caps.source_ranges)),
                IpNet::V6(_) => Ok(()),
            },
        }
    }

    /// Runs of upserts into one map go in as one BPF_MAP_UPDATE_BATCH;
    /// where a batch stops, the op it stopped at is applied alone for its
    /// precise error (a full map).
    fn apply_all(&mut self, ops: &[MapOp]) -> (usize, Option<DatapathError>) {
        let mut i = 0;
        while i < ops.len() {
            let run = run_of(&ops[i]).filter(|_| self.batch.is_some());
            let end = match run {
                Some(r) => {
                    let mut j = i + 1;
                    while j < ops.len() && j - i < MAX_BATCH && run_of(&ops[j]) == Some(r) {
                        j += 1;
                    }
                    j
                }
                None => i + 1,
            };
            if let (Some(r), true) = (run, end - i > 1) {
                match self.write_run(r, &ops[i..end]) {
                    Ok(()) => {
                        i = end;
                        continue;
                    }
                    Err(done) => i += done,
                }
            }
            if let Err(e) = self.apply(&ops[i]) {
                return (i, Some(e));
            }
            i += 1;
        }
        (ops.len(), None)
    }

    fn synced(&mut self) {
        if self.gone.is_empty() {
            return;
        }
        let gone = std::mem::take(&mut self.gone);
        let dir = self.dir.clone();
        self.sweeper
            .get_or_insert_with(|| Sweeper::start(&dir))
            .sweep(gone);
    }

    fn dump(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        let read = |map: &'static str| map_err(map, "iterate", 0);
        for item in self.backends.iter() {
            let (id, b) = item.map_err(read(BACKENDS4_MAP))?;
            if let Some(addr) = l4(b.addr, b.port, b.proto) {
                ops.push(MapOp::UpsertBackend {
                    id: BackendId(id),
                    entry: BackendEntry {
                        addr,
                        local: b.flags & BACKEND_FLAG_LOCAL != 0,
                        terminating: b.flags & BACKEND_FLAG_TERMINATING != 0,
                    },
                });
            }
        }
        for item in self.revnat.iter() {
            let (id, r) = item.map_err(read(REVNAT4_MAP))?;
            // Reverse NAT keeps no protocol: the services map has it.
            ops.push(MapOp::UpsertRevNat {
                id: FrontendId(id),
                frontend: L4Addr {
                    ip: IpAddr::from(std::net::Ipv4Addr::from_bits(r.addr.to_host())),
                    port: r.port.to_host(),
                    protocol: Protocol::Tcp,
                },
            });
        }
        let mut masters = Vec::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(read(SERVICES4_MAP))?;
            let Some(frontend) = l4(k.addr, k.port, k.proto) else {
                continue;
            };
            if k.slot == 0 {
                masters.push((frontend, decode_frontend(&v)));
            } else {
                ops.push(MapOp::UpsertSlot {
                    frontend,
                    slot: k.slot,
                    backend: BackendId(v.backend_id),
                });
            }
        }
        // The reverse-NAT entries get their protocol from the master entry
        // (found by key: a scan per entry was quadratic in frontends).
        let protocols: std::collections::HashMap<(FrontendId, IpAddr, u16), Protocol> = masters
            .iter()
            .map(|(k, e)| ((e.id, k.ip, k.port), k.protocol))
            .collect();
        for op in &mut ops {
            if let MapOp::UpsertRevNat { id, frontend } = op {
                if let Some(p) = protocols.get(&(*id, frontend.ip, frontend.port)) {
                    frontend.protocol = *p;
                }
            }
        }
        for item in self.maglev.iter() {
            let (id, t) = item.map_err(read(MAGLEV4_MAP))?;
            ops.push(MapOp::UpsertMaglev {
                id: FrontendId(id),
                table: t.backends.iter().map(|b| BackendId(*b)).collect(),
            });
        }
        for item in self.ranges.iter() {
            let (k, _) = item.map_err(read(SOURCE_RANGES4_MAP))?;
            let data = k.data();
            let prefix = k.prefix_len().saturating_sub(32) as u8;
            let addr = std::net::Ipv4Addr::from_bits(data.addr.to_host());
            if let Ok(net) = Ipv4Net::new(addr, prefix) {
                ops.push(MapOp::UpsertSourceRange {
                    id: FrontendId(data.frontend_id.to_host()),
                    range: IpNet::V4(net),
                });
            }
        }
        for (frontend, entry) in masters {
            ops.push(MapOp::UpsertFrontend { frontend, entry });
        }
        Ok(ops)
    }
}
