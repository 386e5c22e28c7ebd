//! The `ferry` command line's library side: the `ferry run` flags
//! ([`flags`]), the config file, the defaults that depend on the machine,
//! and the pure resolver from flags and file to the agent's settings
//! ([`resolve`]). Values are parsed in [`crate::units`]; the `ferry
//! services` rows are in [`crate::rows`].

use std::path::PathBuf;

pub mod flags;
pub mod resolve;

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
    pub fn load(path: &std::path::Path) -> Result<RunSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        yaml_serde::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Why `--config FILE` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: yaml_serde::Error,
    },
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
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_lowercase())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
