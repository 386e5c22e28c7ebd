//! A stable text dump of the maps (sorted, one entry per line): the golden
//! tests' output and what `ferry services` prints underneath.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::plan::{AppliedState, BackendId, FrontendEntry, MapOp};
use crate::translate::DesiredState;

/// Tables up to this size are printed in full, larger ones as counts.
const FULL_TABLE_MAX: usize = 64;

/// Dumps `applied`; with `desired`, each frontend is annotated with the
/// Service and port it serves.
pub fn dump(applied: &AppliedState, desired: Option<&DesiredState>) -> String {
    let mut out = String::new();
    let fronts: BTreeMap<_, _> = applied.frontends().iter().collect();
    for (key, f) in fronts {
        let _ = write!(out, "frontend {key}");
        if let Some(d) = desired.and_then(|d| d.frontend(key)) {
            let _ = write!(out, " svc={} port={:?}", d.service, &*d.port_name);
        }
        match f.entry {
            Some(e) => master_entry(&mut out, &e),
            None => out.push_str(" (no master entry)"),
        }
        out.push('\n');
        for (i, b) in f.slots.iter().enumerate() {
            let _ = writeln!(out, "  slot {} -> backend {b}", i + 1);
        }
        let Some(id) = applied.frontend_id(key) else {
            continue;
        };
        if let Some(table) = applied.maglev().get(&id) {
            let _ = writeln!(out, "  maglev {}", table_summary(table));
        }
        for r in applied.source_ranges().get(&id).into_iter().flatten() {
            let _ = writeln!(out, "  source-range {r}");
        }
    }
    let backends: BTreeMap<_, _> = applied.backends().iter().collect();
    for (id, b) in backends {
        let _ = write!(out, "backend {id} {}", b.addr);
        if b.local {
            out.push_str(" local");
        }
        if b.terminating {
            out.push_str(" terminating");
        }
        out.push('\n');
    }
    let rev: BTreeMap<_, _> = applied.rev_nat().iter().collect();
    for (id, key) in rev {
        let _ = writeln!(out, "revnat {id} {key}");
    }
    if let Some(desired) = desired {
        let checks: BTreeMap<_, _> = desired
            .services()
            .iter()
            .filter_map(|(n, s)| s.health_check.map(|h| (n, h)))
            .collect();
        for (name, h) in checks {
            let _ = writeln!(
                out,
                "healthcheck {name} nodePort={} localEndpoints={}",
                h.node_port, h.local_endpoints
            );
        }
    }
    out
}

/// A master entry's fields on its frontend's line.
fn master_entry(out: &mut String, e: &FrontendEntry) {
    let _ = write!(
        out,
        " id={} {} {} {} count={}",
        e.id,
        e.scope.name(),
        e.action.name(),
        e.algorithm.name(),
        e.count
    );
    if e.affinity_timeout != 0 {
        let _ = write!(out, " affinity={}s", e.affinity_timeout);
    }
    if e.preserve_source {
        out.push_str(" preserve-source");
    }
    if e.source_ranges {
        out.push_str(" source-ranges");
    }
    if let Some(via) = e.internal_via {
        let _ = write!(out, " node-traffic-via={via}");
    }
}

fn table_summary(table: &[BackendId]) -> String {
    let mut counts: BTreeMap<BackendId, usize> = BTreeMap::new();
    for b in table {
        *counts.entry(*b).or_insert(0) += 1;
    }
    let shares: Vec<String> = counts.iter().map(|(b, n)| format!("{b}:{n}")).collect();
    let mut s = format!("size={} shares={}", table.len(), shares.join(","));
    if table.len() <= FULL_TABLE_MAX {
        let ids: Vec<String> = table.iter().map(std::string::ToString::to_string).collect();
        let _ = write!(s, " table={}", ids.join(","));
    }
    s
}

/// One op per line, for golden files and debug logs.
pub fn format_op(op: &MapOp) -> String {
    match op {
        MapOp::UpsertBackend { id, entry } => format!(
            "upsert backend {id} {}{}{}",
            entry.addr,
            if entry.local { " local" } else { "" },
            if entry.terminating {
                " terminating"
            } else {
                ""
            }
        ),
        MapOp::UpsertRevNat { id, frontend } => format!("upsert revnat {id} {frontend}"),
        MapOp::UpsertSlot {
            frontend,
            slot,
            backend,
        } => {
            format!("upsert slot {frontend} #{slot} -> backend {backend}")
        }
        MapOp::UpsertMaglev { id, table } => {
            format!("upsert maglev {id} {}", table_summary(table))
        }
        MapOp::UpsertSourceRange { id, range } => format!("upsert source-range {id} {range}"),
        MapOp::UpsertFrontend { frontend, entry } => format!(
            "upsert frontend {frontend} id={} {} {} count={}{}",
            entry.id,
            entry.action.name(),
            entry.algorithm.name(),
            entry.count,
            entry
                .internal_via
                .map_or(String::new(), |via| format!(" node-traffic-via={via}"))
        ),
        MapOp::DeleteFrontend { frontend } => format!("delete frontend {frontend}"),
        MapOp::UpsertMeta { frontend, meta } => format!(
            "upsert meta {frontend} service={} port={}{}",
            meta.service,
            if meta.port_name.is_empty() {
                "-"
            } else {
                &meta.port_name
            },
            if meta.probe.is_some() { " probe" } else { "" }
        ),
        MapOp::DeleteMeta { frontend } => format!("delete meta {frontend}"),
        MapOp::DeleteSlot { frontend, slot } => format!("delete slot {frontend} #{slot}"),
        MapOp::DeleteMaglev { id } => format!("delete maglev {id}"),
        MapOp::DeleteSourceRange { id, range } => format!("delete source-range {id} {range}"),
        MapOp::DeleteRevNat { id } => format!("delete revnat {id}"),
        MapOp::ReleaseFlows { frontend, backend } => {
            format!("release flows of frontend {frontend} to backend {backend}")
        }
        MapOp::DeleteBackend { id } => format!("delete backend {id}"),
    }
}
