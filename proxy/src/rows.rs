//! The rows of `ferry services`: each frontend and its backends, from
//! the applied state (the pinned maps read back) or from a userspace
//! agent's `/services`, and their table.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::collections::BTreeMap;

use crate::plan::AppliedState;

/// One row per frontend: what `ferry services` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub id: u32,
    pub scope: &'static str,
    pub action: &'static str,
    pub algorithm: &'static str,
    pub affinity_timeout: u32,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub state: &'static str,
    pub local: bool,
}

/// The rows of the maps' contents, sorted by frontend.
pub fn service_rows(applied: &AppliedState) -> Vec<ServiceRow> {
    let fronts: BTreeMap<_, _> = applied.frontends().iter().collect();
    fronts
        .into_iter()
        .filter_map(|(key, f)| {
            let e = f.entry?;
            Some(ServiceRow {
                frontend: key.to_string(),
                id: e.id.0,
                scope: e.scope.name(),
                action: e.action.name(),
                algorithm: e.algorithm.name(),
                affinity_timeout: e.affinity_timeout,
                backends: f
                    .slots
                    .iter()
                    .map(|b| match applied.backends().get(b) {
                        Some(be) => BackendRow {
                            id: b.0,
                            address: be.addr.to_string(),
                            state: if be.terminating {
                                "terminating"
                            } else {
                                "active"
                            },
                            local: be.local,
                        },
                        None => BackendRow {
                            id: b.0,
                            address: "?".into(),
                            state: "missing",
                            local: false,
                        },
                    })
                    .collect(),
            })
        })
        .collect()
}

/// The table form of [`service_rows`].
pub fn format_table(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<4} {:<26} {:<12} {:<8} {:<7} {}\n",
        "ID", "FRONTEND", "SCOPE", "ACTION", "ALGO", "BACKENDS"
    );
    for r in rows {
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}#{} ({}{})",
                    b.address,
                    b.id,
                    b.state,
                    if b.local { ", local" } else { "" }
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<4} {:<26} {:<12} {:<8} {:<7} {}\n",
            r.id,
            r.frontend,
            r.scope,
            r.action,
            r.algorithm,
            if backends.is_empty() {
                "-".to_string()
            } else {
                backends.join(", ")
            }
        ));
    }
    out
}

/// The userspace agent's /services JSON as a table.
pub fn format_userspace_table(json: &str) -> Result<String, String> {
    use std::fmt::Write;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("reading /services: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<30} {:<13} {:<8} {:<18} BACKENDS",
        "FRONTEND", "SERVICE", "SCOPE", "ACTION", "ALGORITHM"
    );
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let backends: Vec<String> = r["backends"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .map(|b| {
                        format!(
                            "{} ({}, {} active)",
                            b["address"].as_str().unwrap_or(""),
                            b["health"].as_str().unwrap_or(""),
                            b["active_connections"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut alg = s("algorithm");
        if r["affinity_timeout"].as_u64().unwrap_or(0) > 0 {
            alg.push_str("+affinity");
        }
        let _ = writeln!(
            out,
            "{:<28} {:<30} {:<13} {:<8} {:<18} {}",
            s("frontend"),
            s("service"),
            s("scope"),
            s("action"),
            alg,
            backends.join(", ")
        );
        let served = s("served");
        if served != "yes" && served != "refused" {
            let _ = writeln!(out, "{:<28} served: {served}", "");
        }
        let hc = s("health_check");
        if !hc.is_empty() {
            let _ = writeln!(out, "{:<28} health check: {hc}", "");
        }
    }
    Ok(out)
}
