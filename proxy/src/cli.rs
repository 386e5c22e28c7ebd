//! Helpers of the `ferry` command line: duration and CIDR list parsing, the
//! defaults that depend on the machine, and `ferry services` output.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::plan::AppliedState;

/// `ferry run --config FILE`: the run flags as YAML (camelCase keys). An
/// unknown key is an error naming it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunSettings {
    pub source: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub dataplane: Option<String>,
    pub nodeport_addresses: Option<String>,
    pub bpffs_path: Option<PathBuf>,
    pub cgroup_path: Option<PathBuf>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub max_connections: Option<u64>,
    pub idle_timeout: Option<String>,
    pub udp_idle_timeout: Option<String>,
    pub interfaces: Option<String>,
    pub lb_ipam: Option<bool>,
    pub l2_interfaces: Option<String>,
    pub l2_lease_duration: Option<String>,
    pub lease_namespace: Option<String>,
}

impl RunSettings {
    pub fn load(path: &std::path::Path) -> Result<RunSettings, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Parses "500ms", "1s", "2m", "1h" (as kube-proxy's flags take them).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses "10.0.0.0/8,192.168.1.0/24" (bare addresses are /32 or /128).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("{c:?} is not a CIDR"))
        })
        .collect()
}

/// Parses `--interfaces`: comma-separated interface names; "none" (or an
/// empty list) attaches the TC path nowhere.
pub fn parse_interfaces(s: &str) -> Result<Vec<String>, String> {
    if s.trim() == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if n.len() > 15 || n.contains(['/', ' ', ':']) || n == "." || n == ".." {
                Err(format!("{n:?} is not an interface name"))
            } else {
                Ok(n.to_string())
            }
        })
        .collect()
}

/// Parses a boolean flag value: true/false (also yes/no, 1/0).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

/// The node name: --hostname-override, else $NODE_NAME, else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return n.to_lowercase();
    }
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return n.to_lowercase();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

/// The cgroup v2 mount point (the root cgroup the programs attach to by
/// default).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

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
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("reading /services: {e}"))?;
    let mut out = String::new();
    use std::fmt::Write;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn run_settings_from_yaml() {
        let s: RunSettings = yaml_serde::from_str(
            "source: file:/etc/ferry\nminSyncPeriod: 250ms\nnodeportAddresses: 198.18.0.0/15\n",
        )
        .unwrap();
        assert_eq!(s.source.as_deref(), Some("file:/etc/ferry"));
        assert_eq!(s.min_sync_period.as_deref(), Some("250ms"));
        let err = yaml_serde::from_str::<RunSettings>("syncPeriodd: 1s\n").unwrap_err();
        assert!(err.to_string().contains("syncPeriodd"), "{err}");
    }

    #[test]
    fn cidr_lists() {
        let v = parse_cidrs("198.18.0.0/15, 10.0.0.1").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to_string(), "10.0.0.1/32");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
    }
}
