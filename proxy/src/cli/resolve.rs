//! From `ferry run`'s flags and config file to the agent's settings. Pure:
//! what depends on the machine comes in an [`Environment`]. A flag given
//! wins over the file, the file over the default; a bad value is a
//! [`UsageError`] naming the setting (the command exits 2 with it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::flags::RunFlags;
use super::RunSettings;
use crate::agent::AgentConfig;
use crate::datapath::MapCapacities;
use crate::http::Endpoints;
use crate::ipam::IpamSettings;
use crate::plan::PlanConfig;
use crate::translate::TranslateConfig;
use crate::units;
use crate::userspace::UserspaceConfig;

/// A bad setting: `ferry: invalid SETTING: WHY`, exit code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting}: {why}")]
pub struct UsageError {
    pub setting: &'static str,
    pub why: String,
}

fn usage(setting: &'static str, why: impl std::fmt::Display) -> UsageError {
    UsageError {
        setting,
        why: why.to_string(),
    }
}

/// What the settings' defaults depend on, read by the command.
pub struct Environment {
    /// The node name without `--hostname-override`: $NODE_NAME, else the
    /// hostname (lowercase).
    pub node_name: String,
    /// $POD_NAMESPACE.
    pub pod_namespace: Option<String>,
    /// Where cgroup2 is mounted.
    pub cgroup2_root: Option<PathBuf>,
    /// The TC interfaces by default; asked only for the L2 default.
    pub default_interfaces: Box<dyn Fn() -> Vec<String>>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("node_name", &self.node_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("cgroup2_root", &self.cgroup2_root)
            .finish_non_exhaustive()
    }
}

/// Where the agent's objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Kube(Option<PathBuf>),
}

impl Source {
    /// The kubeconfig of a kube source (None: in-cluster or the default).
    pub fn kubeconfig(&self) -> Option<PathBuf> {
        match self {
            Source::Kube(k) => k.clone(),
            Source::File(_) => None,
        }
    }
}

/// `--dataplane`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Ebpf,
    Userspace,
    Auto,
}

/// Which dataplane `ferry run` uses, and its settings.
#[derive(Debug, Clone)]
pub struct DataplaneChoice {
    pub mode: Dataplane,
    pub bpffs: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// TC interfaces (None: the default ones).
    pub interfaces: Option<Vec<String>>,
    pub userspace: UserspaceConfig,
}

/// Everything `ferry run` runs with.
#[derive(Debug)]
pub struct RunConfig {
    pub agent: AgentConfig,
    pub source: Source,
    pub dataplane: DataplaneChoice,
    pub listen: Vec<(SocketAddr, Endpoints)>,
    pub ipam: Option<IpamSettings>,
}

/// Flags over file over defaults, checked in the order the flags are
/// documented (the first bad one is reported).
pub fn resolve(
    flags: RunFlags,
    file: RunSettings,
    env: &Environment,
) -> Result<RunConfig, UsageError> {
    let source = source(&flags, &file)?;
    let mode = dataplane(flags.dataplane.clone().or(file.dataplane.clone()))?;
    let userspace = userspace(&flags, &file)?;
    let interfaces = interfaces("--interfaces", flags.interfaces.or(file.interfaces.clone()))?;
    let ipam = ipam_settings(flags.lb_ipam.as_ref(), flags.l2_interfaces, &file, &source)?;
    let l2_lease = positive(
        "--l2-lease-duration",
        flags.l2_lease_duration.or(file.l2_lease_duration),
    )?
    .unwrap_or(crate::ipam::announce::DEFAULT_LEASE_DURATION);
    let nodeport = flags.nodeport_addresses.or(file.nodeport_addresses);
    let cidrs = units::parse_cidrs(&nodeport.unwrap_or_default())
        .map_err(|e| usage("--nodeport-addresses", e))?;
    let min_sync = flags.min_sync_period.or(file.min_sync_period);
    let min = duration("--min-sync-period", min_sync.as_deref(), "1s")?;
    let max_sync = flags.sync_period.or(file.sync_period);
    let max = duration("--sync-period", max_sync.as_deref(), "30s")?;
    let listen = listen(
        flags.healthz_bind_address.or(file.healthz_bind_address),
        flags.metrics_bind_address.or(file.metrics_bind_address),
    )?;
    let cgroup = cgroup(flags.cgroup_path.or(file.cgroup_path), env, mode)?;
    let node_name = node_name(flags.hostname_override.or(file.hostname_override), env);
    let lease_namespace = flags.lease_namespace.or(file.lease_namespace);
    let ipam = ipam.map(|(allocate, l2)| IpamSettings {
        kubeconfig: source.kubeconfig(),
        allocate,
        // By default, ARP is answered where the TC path listens.
        l2_required: l2.is_some(),
        l2_interfaces: l2
            .or_else(|| interfaces.clone())
            .unwrap_or_else(|| (env.default_interfaces)()),
        lease_namespace: lease_namespace
            .or_else(|| env.pod_namespace.clone())
            .unwrap_or_else(|| "kube-system".into()),
        identity: node_name.clone(),
        l2_lease_duration: l2_lease,
    });
    let bpffs = flags.bpffs_path.or(file.bpffs_path);
    Ok(RunConfig {
        agent: agent_config(node_name, cidrs, min, max, &source),
        dataplane: DataplaneChoice {
            mode,
            bpffs: bpffs.unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ferry")),
            cgroup,
            interfaces,
            userspace,
        },
        source,
        listen,
        ipam,
    })
}

fn source(flags: &RunFlags, file: &RunSettings) -> Result<Source, UsageError> {
    let source = flags
        .source
        .clone()
        .or(file.source.clone())
        .unwrap_or_else(|| "kube".into());
    let kubeconfig = flags.kubeconfig.clone().or(file.kubeconfig.clone());
    match (source.as_str(), source.strip_prefix("file:")) {
        ("kube", _) => Ok(Source::Kube(kubeconfig)),
        (_, Some(path)) if !path.is_empty() => Ok(Source::File(PathBuf::from(path))),
        _ => Err(usage(
            "--source",
            format!("{source:?} is not kube or file:PATH"),
        )),
    }
}

fn dataplane(value: Option<String>) -> Result<Dataplane, UsageError> {
    let value = value.unwrap_or_else(|| "auto".into());
    match value.to_ascii_lowercase().as_str() {
        "ebpf" => Ok(Dataplane::Ebpf),
        "userspace" => Ok(Dataplane::Userspace),
        "auto" => Ok(Dataplane::Auto),
        _ => Err(usage(
            "--dataplane",
            format!("{value:?} is not ebpf, userspace or auto"),
        )),
    }
}

fn userspace(flags: &RunFlags, file: &RunSettings) -> Result<UserspaceConfig, UsageError> {
    let mut config = UserspaceConfig::default();
    if let Some(n) = flags.max_connections.or(file.max_connections) {
        if n == 0 {
            return Err(usage("--max-connections", "must be at least 1"));
        }
        config.max_connections = n;
    }
    let idle = flags.idle_timeout.clone().or(file.idle_timeout.clone());
    if let Some(d) = positive("--idle-timeout", idle)? {
        config.idle_timeout = d;
    }
    let udp_idle = flags
        .udp_idle_timeout
        .clone()
        .or(file.udp_idle_timeout.clone());
    if let Some(d) = positive("--udp-idle-timeout", udp_idle)? {
        config.udp_idle_timeout = d;
    }
    Ok(config)
}

/// `--lb-ipam` and `--l2-interfaces`, with `--source kube` only: whether
/// to allocate, and the L2 interfaces asked for.
type IpamFlags = Option<(bool, Option<Vec<String>>)>;

fn ipam_settings(
    lb_ipam: Option<&String>,
    l2_interfaces: Option<String>,
    file: &RunSettings,
    source: &Source,
) -> Result<IpamFlags, UsageError> {
    let allocate = match lb_ipam {
        Some(v) => units::parse_bool(v).map_err(|e| usage("--lb-ipam", e))?,
        None => file.lb_ipam.unwrap_or(true),
    };
    let l2 = interfaces(
        "--l2-interfaces",
        l2_interfaces.or(file.l2_interfaces.clone()),
    )?;
    Ok(matches!(source, Source::Kube(_)).then_some((allocate, l2)))
}

fn interfaces(
    setting: &'static str,
    value: Option<String>,
) -> Result<Option<Vec<String>>, UsageError> {
    value
        .map(|list| units::parse_interfaces(&list).map_err(|e| usage(setting, e)))
        .transpose()
}

/// `--cgroup-path`, else the cgroup2 root; the eBPF dataplane needs one.
fn cgroup(
    path: Option<PathBuf>,
    env: &Environment,
    mode: Dataplane,
) -> Result<Option<PathBuf>, UsageError> {
    let cgroup = path.or_else(|| env.cgroup2_root.clone());
    if mode == Dataplane::Ebpf && cgroup.is_none() {
        return Err(usage("--cgroup-path", "no cgroup2 filesystem is mounted"));
    }
    Ok(cgroup)
}

/// `--hostname-override` (lower-cased, as kube-proxy's), else the node's
/// name from the environment.
fn node_name(hostname_override: Option<String>, env: &Environment) -> String {
    hostname_override
        .filter(|n| !n.is_empty())
        .map_or_else(|| env.node_name.clone(), |n| n.to_lowercase())
}

fn duration(
    setting: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, UsageError> {
    units::parse_duration(value.unwrap_or(default)).map_err(|e| usage(setting, e))
}

/// A duration that must be more than zero, when given.
fn positive(setting: &'static str, value: Option<String>) -> Result<Option<Duration>, UsageError> {
    match value.map(|v| units::parse_duration(&v)) {
        Some(Ok(d)) if d.is_zero() => Err(usage(setting, "must be more than 0")),
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => Err(usage(setting, e)),
        None => Ok(None),
    }
}

fn listen(
    healthz: Option<String>,
    metrics: Option<String>,
) -> Result<Vec<(SocketAddr, Endpoints)>, UsageError> {
    let healthz = healthz.unwrap_or_else(|| "0.0.0.0:10256".into());
    let metrics = metrics.unwrap_or_else(|| "127.0.0.1:10249".into());
    let mut out = Vec::new();
    for (setting, value, what) in [
        ("--healthz-bind-address", healthz, Endpoints::Health),
        ("--metrics-bind-address", metrics, Endpoints::Metrics),
    ] {
        if value.is_empty() {
            continue;
        }
        let addr = value
            .parse::<SocketAddr>()
            .map_err(|_| usage(setting, format!("{value:?} is not ADDRESS:PORT")))?;
        out.push((addr, what));
    }
    Ok(out)
}

fn agent_config(
    node_name: String,
    nodeport_cidrs: Vec<ipnet::IpNet>,
    min_sync_period: Duration,
    sync_period: Duration,
    source: &Source,
) -> AgentConfig {
    // ID ranges match the maps' capacities.
    let caps = MapCapacities::default();
    AgentConfig {
        node_name,
        nodeport_cidrs,
        min_sync_period,
        sync_period,
        retry_period: Duration::from_secs(1),
        sources: match source {
            Source::File(_) => vec![crate::source::file::NAME],
            Source::Kube(_) => crate::source::kube::SOURCES.to_vec(),
        },
        health_check_servers: true,
        translate: TranslateConfig::default(),
        plan: PlanConfig {
            max_backends: caps.backends,
            max_frontends: caps.frontends,
            max_service_entries: caps.services,
            ..PlanConfig::default()
        },
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
