//! The flags of `ferry run`, typed by clap. Every one is optional: a flag
//! given wins over the config file, the file over the default
//! ([`super::resolve`]).

use std::path::PathBuf;

/// `ferry run`'s flags.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunFlags {
    /// The same settings as a YAML file (camelCase keys, e.g.
    /// `minSyncPeriod: 1s`); flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where Services and EndpointSlices come from: `kube` (default) or
    /// `file:PATH` (a YAML file or a directory of them).
    #[arg(long)]
    pub source: Option<String>,
    /// kubeconfig for `--source kube` (default: in-cluster, then
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: $NODE_NAME, then the hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// ebpf, userspace or auto (default).
    #[arg(long)]
    pub dataplane: Option<String>,
    /// NodePort frontends only on node addresses in these CIDRs
    /// (comma-separated; default: every node address).
    #[arg(long)]
    pub nodeport_addresses: Option<String>,
    /// bpffs directory for Ferry's pinned maps and links (default
    /// /sys/fs/bpf/ferry).
    #[arg(long)]
    pub bpffs_path: Option<PathBuf>,
    /// cgroup v2 the socket-level programs attach to (default: the
    /// cgroup2 mount, i.e. the root cgroup).
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// Shortest time between two syncs (bursts coalesce; default 1s).
    #[arg(long)]
    pub min_sync_period: Option<String>,
    /// Longest time between two full syncs (default 30s).
    #[arg(long)]
    pub sync_period: Option<String>,
    /// /healthz and /livez (default 0.0.0.0:10256; empty: off).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// /metrics, /proxyMode and /services (default 127.0.0.1:10249;
    /// empty: off).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Userspace dataplane: open connections and UDP sessions at most
    /// (default 65536); beyond, new ones are reset at once.
    #[arg(long)]
    pub max_connections: Option<u64>,
    /// Userspace dataplane: reset a TCP connection idle this long
    /// (default 1h).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Userspace dataplane: end a UDP session idle this long (default 30s).
    #[arg(long)]
    pub udp_idle_timeout: Option<String>,
    /// eBPF dataplane: interfaces the TC programs (NodePort,
    /// LoadBalancer and externalIP traffic from outside) attach to,
    /// comma-separated; `none` for none (default: every interface
    /// holding a global IPv4 address, except loopback and pod veths).
    #[arg(long)]
    pub interfaces: Option<String>,
    /// With `--source kube`: contend to be the cluster's LoadBalancer IP
    /// allocator (FerryLoadBalancerIPPool), true (default) or false.
    #[arg(long)]
    pub lb_ipam: Option<String>,
    /// With `--source kube`: interfaces to answer ARP on for the
    /// LoadBalancer addresses this node announces, comma-separated;
    /// `none` for no L2 announcement (default: the TC interfaces).
    #[arg(long)]
    pub l2_interfaces: Option<String>,
    /// With `--source kube`: how long an L2 announcement Lease lasts
    /// unrenewed, i.e. the failover time when a node dies (default 15s;
    /// it must outlast the agent's restart so a rolling update moves no
    /// address).
    #[arg(long)]
    pub l2_lease_duration: Option<String>,
    /// Namespace of the allocator's and the announcements' Leases
    /// (default: $POD_NAMESPACE, then kube-system).
    #[arg(long)]
    pub lease_namespace: Option<String>,
}
