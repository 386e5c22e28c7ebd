//! Writing one op into the pinned maps, one function per map; IPv6 keys
//! are counted in `skipped_ipv6` and left out.

use aya::maps::MapError;
use ferry_common::lb::{
    MaglevTable, BACKENDS4_MAP, MAGLEV4_MAP, MAGLEV_TABLE_SIZE, REVNAT4_MAP, SERVICES4_MAP,
    SOURCE_RANGES4_MAP,
};
use ipnet::IpNet;

use super::{BpfMaps, GoneBackend, GonePair};
use crate::datapath::encode::{backend_value, range_key, revnat_value, services_entry, svc_key};
use crate::datapath::DatapathError;
use crate::plan::{BackendId, FrontendId, MapOp};

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
        match op {
            MapOp::UpsertBackend { .. } | MapOp::DeleteBackend { .. } => self.write_backend(op),
            MapOp::UpsertRevNat { .. } | MapOp::DeleteRevNat { .. } => self.write_revnat(op),
            MapOp::UpsertSlot { .. }
            | MapOp::UpsertFrontend { .. }
            | MapOp::DeleteSlot { .. }
            | MapOp::DeleteFrontend { .. } => self.write_services(op),
            MapOp::UpsertMaglev { id, table } => self.write_maglev(*id, table),
            MapOp::DeleteMaglev { id } => ignore_missing(self.maglev.remove(&id.0))
                .map_err(map_err(MAGLEV4_MAP, "delete", self.caps.frontends)),
            MapOp::UpsertSourceRange { .. } | MapOp::DeleteSourceRange { .. } => {
                self.write_range(op)
            }
            MapOp::ReleaseFlows { frontend, backend } => {
                self.release(*frontend, *backend);
                Ok(())
            }
            // No eBPF map holds a frontend's name or probe.
            MapOp::UpsertMeta { .. } | MapOp::DeleteMeta { .. } => Ok(()),
        }
    }

    fn write_backend(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let cap = self.caps.backends;
        match op {
            MapOp::UpsertBackend { id, entry } => {
                let Some(value) = backend_value(entry) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                self.backends
                    .insert(id.0, value, 0)
                    .map_err(map_err(BACKENDS4_MAP, "insert", cap))
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
                    cap,
                ))
            }
            _ => Ok(()),
        }
    }

    fn write_revnat(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let cap = self.caps.frontends;
        match op {
            MapOp::UpsertRevNat { id, frontend } => {
                let Some(value) = revnat_value(frontend) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                self.revnat
                    .insert(id.0, value, 0)
                    .map_err(map_err(REVNAT4_MAP, "insert", cap))
            }
            MapOp::DeleteRevNat { id } => ignore_missing(self.revnat.remove(&id.0))
                .map_err(map_err(REVNAT4_MAP, "delete", cap)),
            _ => Ok(()),
        }
    }

    /// Master entries and slots.
    fn write_services(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let cap = self.caps.services;
        let key = match op {
            MapOp::DeleteSlot { frontend, slot } => svc_key(frontend, *slot),
            MapOp::DeleteFrontend { frontend } => svc_key(frontend, 0),
            _ => {
                let Some((key, value)) = services_entry(op) else {
                    self.skipped_ipv6 += 1;
                    return Ok(());
                };
                return self.services.insert(key, value, 0).map_err(map_err(
                    SERVICES4_MAP,
                    "insert",
                    cap,
                ));
            }
        };
        match key {
            Some(key) => ignore_missing(self.services.remove(&key)).map_err(map_err(
                SERVICES4_MAP,
                "delete",
                cap,
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

    fn write_range(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let cap = self.caps.source_ranges;
        match op {
            MapOp::UpsertSourceRange {
                id,
                range: IpNet::V4(net),
            } => self
                .ranges
                .insert(&range_key(*id, *net), 1, 0)
                .map_err(map_err(SOURCE_RANGES4_MAP, "insert", cap)),
            MapOp::DeleteSourceRange {
                id,
                range: IpNet::V4(net),
            } => ignore_missing(self.ranges.remove(&range_key(*id, *net))).map_err(map_err(
                SOURCE_RANGES4_MAP,
                "delete",
                cap,
            )),
            MapOp::UpsertSourceRange { .. } => {
                self.skipped_ipv6 += 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The backend stays (other frontends use it): its address tells the
    /// sweep which sockets and entries are the pair's.
    fn release(&mut self, frontend: FrontendId, backend: BackendId) {
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
    }
}
