//! Writing one op into the pinned maps; IPv6 keys are counted in
//! `skipped_ipv6` and left out.

use aya::maps::MapError;
use ferry_common::lb::{
    MaglevTable, Service4Key, BACKENDS4_MAP, MAGLEV4_MAP, MAGLEV_TABLE_SIZE, REVNAT4_MAP,
    SERVICES4_MAP, SOURCE_RANGES4_MAP,
};
use ipnet::IpNet;

use super::{BpfMaps, GoneBackend, GonePair};
use crate::datapath::encode::{backend_value, range_key, revnat_value, services_entry, svc_key};
use crate::datapath::DatapathError;
use crate::model::L4Addr;
use crate::plan::{BackendEntry, BackendId, FrontendId, MapOp};

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

impl BpfMaps {
    /// Applies one op (see [`crate::datapath::LbMaps::apply`]).
    pub(super) fn write(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let caps = self.caps;
        match op {
            MapOp::UpsertBackend { id, entry } => self.upsert_backend(*id, entry),
            MapOp::DeleteBackend { id } => {
                if let Some(gone) = self.gone_backend(*id) {
                    self.gone.backends.push(gone);
                }
                ignore_missing(self.backends.remove(&id.0)).map_err(map_err(
                    BACKENDS4_MAP,
                    "delete",
                    caps.backends,
                ))
            }
            MapOp::UpsertRevNat { id, frontend } => self.upsert_revnat(*id, frontend),
            MapOp::DeleteRevNat { id } => ignore_missing(self.revnat.remove(&id.0))
                .map_err(map_err(REVNAT4_MAP, "delete", caps.frontends)),
            MapOp::UpsertSlot { .. } | MapOp::UpsertFrontend { .. } => self.upsert_service(op),
            MapOp::DeleteSlot { frontend, slot } => self.delete_service(svc_key(frontend, *slot)),
            MapOp::DeleteFrontend { frontend } => self.delete_service(svc_key(frontend, 0)),
            MapOp::UpsertMaglev { id, table } => self.write_maglev(*id, table),
            MapOp::DeleteMaglev { id } => ignore_missing(self.maglev.remove(&id.0))
                .map_err(map_err(MAGLEV4_MAP, "delete", caps.frontends)),
            MapOp::UpsertSourceRange { id, range } => self.upsert_range(*id, range),
            MapOp::DeleteSourceRange { id, range } => match range {
                IpNet::V4(net) => ignore_missing(self.ranges.remove(&range_key(*id, *net)))
                    .map_err(map_err(SOURCE_RANGES4_MAP, "delete", caps.source_ranges)),
                IpNet::V6(_) => Ok(()),
            },
            MapOp::ReleaseFlows { frontend, backend } => {
                // The backend stays (other frontends use it): its address
                // tells the sweep which sockets and entries are the pair's.
                if let Some(backend) = self.gone_backend(*backend) {
                    self.gone.pairs.push(GonePair {
                        frontend_id: frontend.0,
                        backend,
                    });
                }
                Ok(())
            }
            // No eBPF map holds a frontend's name or probe.
            MapOp::UpsertMeta { .. } | MapOp::DeleteMeta { .. } => Ok(()),
        }
    }

    fn upsert_backend(&mut self, id: BackendId, entry: &BackendEntry) -> Result<(), DatapathError> {
        let Some(value) = backend_value(entry) else {
            self.skipped_ipv6 += 1;
            return Ok(());
        };
        self.backends.insert(id.0, value, 0).map_err(map_err(
            BACKENDS4_MAP,
            "insert",
            self.caps.backends,
        ))
    }

    fn upsert_revnat(&mut self, id: FrontendId, frontend: &L4Addr) -> Result<(), DatapathError> {
        let Some(value) = revnat_value(frontend) else {
            self.skipped_ipv6 += 1;
            return Ok(());
        };
        self.revnat.insert(id.0, value, 0).map_err(map_err(
            REVNAT4_MAP,
            "insert",
            self.caps.frontends,
        ))
    }

    /// A master entry or slot.
    fn upsert_service(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let Some((key, value)) = services_entry(op) else {
            self.skipped_ipv6 += 1;
            return Ok(());
        };
        self.services.insert(key, value, 0).map_err(map_err(
            SERVICES4_MAP,
            "insert",
            self.caps.services,
        ))
    }

    fn upsert_range(&mut self, id: FrontendId, range: &IpNet) -> Result<(), DatapathError> {
        let IpNet::V4(net) = range else {
            self.skipped_ipv6 += 1;
            return Ok(());
        };
        self.ranges
            .insert(&range_key(id, *net), 1, 0)
            .map_err(map_err(
                SOURCE_RANGES4_MAP,
                "insert",
                self.caps.source_ranges,
            ))
    }

    /// A backend as the sweep needs it (its address), read from the map.
    fn gone_backend(&self, id: BackendId) -> Option<GoneBackend> {
        let b = self.backends.get(&id.0, 0).ok()?;
        Some(GoneBackend {
            id: id.0,
            addr: b.addr,
            port: b.port,
            proto: b.proto,
        })
    }

    /// A master entry or slot removed (None: an IPv6 key, never written).
    fn delete_service(&mut self, key: Option<Service4Key>) -> Result<(), DatapathError> {
        match key {
            Some(key) => ignore_missing(self.services.remove(&key)).map_err(map_err(
                SERVICES4_MAP,
                "delete",
                self.caps.services,
            )),
            None => Ok(()),
        }
    }

    fn write_maglev(&mut self, id: FrontendId, table: &[BackendId]) -> Result<(), DatapathError> {
        if table.len() != MAGLEV_TABLE_SIZE as usize {
            return Err(DatapathError::Unsupported(format!(
                "maglev table of {} entries: the eBPF programs are built for {}",
                table.len(),
                MAGLEV_TABLE_SIZE
            )));
        }
        // 64 KiB built on the sync thread's stack once per table written.
        #[allow(clippy::large_stack_arrays)]
        let mut value = Box::new(MaglevTable {
            backends: [0; MAGLEV_TABLE_SIZE as usize],
        });
        for (slot, b) in value.backends.iter_mut().zip(table.iter()) {
            *slot = b.0;
        }
        self.maglev.insert(id.0, value.as_ref(), 0).map_err(map_err(
            MAGLEV4_MAP,
            "insert",
            self.caps.frontends,
        ))
    }
}
