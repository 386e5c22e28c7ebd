//! [`BpfMaps`]: the map-operation interface on the pinned eBPF maps of
//! ferry-common's layouts (IPv4). IPv6 frontends and backends are accepted
//! and not programmed until the IPv6 maps exist (counted in
//! `skipped_ipv6`).

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData, MapError};
use ferry_common::lb::{
    Backend4, MaglevTable, RevNat4, Service4Key, Service4Value, SourceRange4, BACKENDS4_MAP,
    MAGLEV4_MAP, REVNAT4_MAP, SERVICES4_MAP, SOURCE_RANGES4_MAP,
};

use super::batch::{supported, update_batch};
use super::encode::{backend_entry, revnat_entry, run_of, services_entry, Run};
mod read;
mod write;

use super::sweep::{Gone, GoneBackend, GonePair, Sweeper};
use super::{DatapathError, LbMaps};
use crate::plan::MapOp;

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

impl LbMaps for BpfMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        self.write(op)
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
        self.read()
    }
}
