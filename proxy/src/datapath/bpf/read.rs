//! Reading the pinned maps back as the upserts that would recreate them
//! (a restart reconciles from these instead of flushing).

use std::net::IpAddr;

use ferry_common::lb::{
    BACKENDS4_MAP, BACKEND_FLAG_LOCAL, BACKEND_FLAG_TERMINATING, MAGLEV4_MAP, REVNAT4_MAP,
    SERVICES4_MAP, SOURCE_RANGES4_MAP,
};
use ipnet::{IpNet, Ipv4Net};

use super::BpfMaps;
use crate::datapath::encode::{decode_frontend, l4};
use crate::datapath::DatapathError;
use crate::model::{L4Addr, Protocol};
use crate::plan::{BackendEntry, BackendId, FrontendEntry, FrontendId, MapOp};

/// The error of iterating `map`.
fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        op: "iterate",
        source,
    }
}

impl BpfMaps {
    /// Every entry, in plan order (see [`crate::datapath::LbMaps::dump`]).
    pub(super) fn read(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = self.read_backends()?;
        ops.extend(self.read_revnat()?);
        let masters = self.read_services(&mut ops)?;
        set_revnat_protocols(&mut ops, &masters);
        ops.extend(self.read_maglev()?);
        ops.extend(self.read_ranges()?);
        for (frontend, entry) in masters {
            ops.push(MapOp::UpsertFrontend { frontend, entry });
        }
        Ok(ops)
    }

    fn read_backends(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        for item in &self.backends {
            let (id, b) = item.map_err(read_err(BACKENDS4_MAP))?;
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
        Ok(ops)
    }

    /// Reverse NAT keeps no protocol: TCP until [`set_revnat_protocols`].
    fn read_revnat(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        for item in &self.revnat {
            let (id, r) = item.map_err(read_err(REVNAT4_MAP))?;
            ops.push(MapOp::UpsertRevNat {
                id: FrontendId(id),
                frontend: L4Addr {
                    ip: IpAddr::from(std::net::Ipv4Addr::from_bits(r.addr.to_host())),
                    port: r.port.to_host(),
                    protocol: Protocol::Tcp,
                },
            });
        }
        Ok(ops)
    }

    /// The slots go into `ops`; the master entries are returned (they come
    /// last in plan order).
    fn read_services(
        &self,
        ops: &mut Vec<MapOp>,
    ) -> Result<Vec<(L4Addr, FrontendEntry)>, DatapathError> {
        let mut masters = Vec::new();
        for item in &self.services {
            let (k, v) = item.map_err(read_err(SERVICES4_MAP))?;
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
        Ok(masters)
    }

    fn read_maglev(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        for item in &self.maglev {
            let (id, t) = item.map_err(read_err(MAGLEV4_MAP))?;
            ops.push(MapOp::UpsertMaglev {
                id: FrontendId(id),
                table: t.backends.iter().map(|b| BackendId(*b)).collect(),
            });
        }
        Ok(ops)
    }

    fn read_ranges(&self) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        for item in &self.ranges {
            let (k, _) = item.map_err(read_err(SOURCE_RANGES4_MAP))?;
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
        Ok(ops)
    }
}

/// The reverse-NAT entries get their protocol from the master entry (found
/// by key: a scan per entry was quadratic in frontends).
fn set_revnat_protocols(ops: &mut [MapOp], masters: &[(L4Addr, FrontendEntry)]) {
    let protocols: std::collections::HashMap<(FrontendId, IpAddr, u16), Protocol> = masters
        .iter()
        .map(|(k, e)| ((e.id, k.ip, k.port), k.protocol))
        .collect();
    for op in ops {
        if let MapOp::UpsertRevNat { id, frontend } = op {
            if let Some(p) = protocols.get(&(*id, frontend.ip, frontend.port)) {
                frontend.protocol = *p;
            }
        }
    }
}
