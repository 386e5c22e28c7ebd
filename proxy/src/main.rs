//! `ferry`: the agent and its CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_proxy::agent::{Agent, AgentConfig};
use ferry_proxy::datapath::{BpfMaps, LbMaps, MapCapacities};
use ferry_proxy::http::Endpoints;
use ferry_proxy::plan::{AppliedState, PlanConfig};
use ferry_proxy::translate::TranslateConfig;
use ferry_proxy::{cli, rows, units};

/// mimalloc: the pipeline allocates many small objects; glibc malloc was a
/// quarter of a full sync's instructions (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Kubernetes service proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dataplane {
    Ebpf,
    Userspace,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: watch the source, program the dataplane, until
    /// SIGINT/SIGTERM (which leave the dataplane in place).
    Run {
        /// The same settings as a YAML file (camelCase keys, e.g.
        /// `minSyncPeriod: 1s`); flags given on the command line win.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where Services and EndpointSlices come from: `kube` (default) or
        /// `file:PATH` (a YAML file or a directory of them).
        #[arg(long)]
        source: Option<String>,
        /// kubeconfig for `--source kube` (default: in-cluster, then
        /// $KUBECONFIG or ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name (default: $NODE_NAME, then the hostname).
        #[arg(long)]
        hostname_override: Option<String>,
        /// ebpf, userspace or auto (default).
        #[arg(long)]
        dataplane: Option<String>,
        /// NodePort frontends only on node addresses in these CIDRs
        /// (comma-separated; default: every node address).
        #[arg(long)]
        nodeport_addresses: Option<String>,
        /// bpffs directory for Ferry's pinned maps and links (default
        /// /sys/fs/bpf/ferry).
        #[arg(long)]
        bpffs_path: Option<PathBuf>,
        /// cgroup v2 the socket-level programs attach to (default: the
        /// cgroup2 mount, i.e. the root cgroup).
        #[arg(long)]
        cgroup_path: Option<PathBuf>,
        /// Shortest time between two syncs (bursts coalesce; default 1s).
        #[arg(long)]
        min_sync_period: Option<String>,
        /// Longest time between two full syncs (default 30s).
        #[arg(long)]
        sync_period: Option<String>,
        /// /healthz and /livez (default 0.0.0.0:10256; empty: off).
        #[arg(long)]
        healthz_bind_address: Option<String>,
        /// /metrics, /proxyMode and /services (default 127.0.0.1:10249;
        /// empty: off).
        #[arg(long)]
        metrics_bind_address: Option<String>,
        /// Userspace dataplane: open connections and UDP sessions at most
        /// (default 65536); beyond, new ones are reset at once.
        #[arg(long)]
        max_connections: Option<u64>,
        /// Userspace dataplane: reset a TCP connection idle this long
        /// (default 1h).
        #[arg(long)]
        idle_timeout: Option<String>,
        /// Userspace dataplane: end a UDP session idle this long (default 30s).
        #[arg(long)]
        udp_idle_timeout: Option<String>,
        /// eBPF dataplane: interfaces the TC programs (NodePort,
        /// LoadBalancer and externalIP traffic from outside) attach to,
        /// comma-separated; `none` for none (default: every interface
        /// holding a global IPv4 address, except loopback and pod veths).
        #[arg(long)]
        interfaces: Option<String>,
        /// With `--source kube`: contend to be the cluster's LoadBalancer IP
        /// allocator (FerryLoadBalancerIPPool), true (default) or false.
        #[arg(long)]
        lb_ipam: Option<String>,
        /// With `--source kube`: interfaces to answer ARP on for the
        /// LoadBalancer addresses this node announces, comma-separated;
        /// `none` for no L2 announcement (default: the TC interfaces).
        #[arg(long)]
        l2_interfaces: Option<String>,
        /// With `--source kube`: how long an L2 announcement Lease lasts
        /// unrenewed, i.e. the failover time when a node dies (default 15s;
        /// it must outlast the agent's restart so a rolling update moves no
        /// address).
        #[arg(long)]
        l2_lease_duration: Option<String>,
        /// Namespace of the allocator's and the announcements' Leases
        /// (default: $POD_NAMESPACE, then kube-system).
        #[arg(long)]
        lease_namespace: Option<String>,
    },
    /// List every frontend with its backends: from the pinned maps (eBPF),
    /// else from a userspace agent's /services endpoint.
    Services {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
        /// The userspace agent's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_address: String,
    },
    /// Which backend a flow would reach, and why, from the pinned maps.
    Explain {
        /// SRC_IP:SRC_PORT
        source: std::net::SocketAddr,
        /// DST_IP:DST_PORT/PROTO (TCP, UDP or SCTP)
        destination: String,
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
    },
    /// Remove everything Ferry pinned (links, which detaches the programs,
    /// and maps).
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
    },
    /// Print the FerryLoadBalancerIPPool CustomResourceDefinition (YAML;
    /// deploy/crd.yaml is this output).
    Crd,
    /// Print the version and the eBPF programs embedded in this binary.
    Version,
    /// Load every embedded eBPF program into the kernel (runs the verifier
    /// on each; needs root) and report the result.
    Verify {
        /// bpffs mount where scratch maps are pinned (and removed again).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

/// A configuration error: one line naming the setting, exit code 2.
fn usage_error(setting: &str, why: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry: invalid {setting}: {why}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run {
            config,
            source,
            kubeconfig,
            hostname_override,
            dataplane,
            nodeport_addresses,
            bpffs_path,
            cgroup_path,
            min_sync_period,
            sync_period,
            healthz_bind_address,
            metrics_bind_address,
            max_connections,
            idle_timeout,
            udp_idle_timeout,
            interfaces,
            lb_ipam,
            l2_interfaces,
            l2_lease_duration,
            lease_namespace,
        } => {
            let file = match config {
                Some(path) => match cli::RunSettings::load(&path) {
                    Ok(f) => f,
                    Err(e) => return usage_error("--config", e),
                },
                None => cli::RunSettings::default(),
            };
            // A flag wins over the file, the file over the default.
            let source = source.or(file.source).unwrap_or_else(|| "kube".into());
            let kubeconfig = kubeconfig.or(file.kubeconfig);
            let hostname_override = hostname_override.or(file.hostname_override);
            let source = match (source.as_str(), source.strip_prefix("file:")) {
                ("kube", _) => Source::Kube(kubeconfig),
                (_, Some(path)) if !path.is_empty() => Source::File(PathBuf::from(path)),
                _ => {
                    return usage_error("--source", format!("{source:?} is not kube or file:PATH"))
                }
            };
            let dataplane = dataplane
                .or(file.dataplane)
                .unwrap_or_else(|| "auto".into());
            let dataplane = match Dataplane::from_str(&dataplane, true) {
                Ok(d) => d,
                Err(_) => {
                    return usage_error(
                        "--dataplane",
                        format!("{dataplane:?} is not ebpf, userspace or auto"),
                    )
                }
            };
            let nodeport_addresses = nodeport_addresses
                .or(file.nodeport_addresses)
                .unwrap_or_default();
            let bpffs_path = bpffs_path
                .or(file.bpffs_path)
                .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ferry"));
            let cgroup_path = cgroup_path.or(file.cgroup_path);
            let min_sync_period = min_sync_period
                .or(file.min_sync_period)
                .unwrap_or_else(|| "1s".into());
            let sync_period = sync_period
                .or(file.sync_period)
                .unwrap_or_else(|| "30s".into());
            let healthz_bind_address = healthz_bind_address
                .or(file.healthz_bind_address)
                .unwrap_or_else(|| "0.0.0.0:10256".into());
            let metrics_bind_address = metrics_bind_address
                .or(file.metrics_bind_address)
                .unwrap_or_else(|| "127.0.0.1:10249".into());
            let mut userspace = ferry_proxy::userspace::UserspaceConfig::default();
            if let Some(n) = max_connections.or(file.max_connections) {
                if n == 0 {
                    return usage_error("--max-connections", "must be at least 1");
                }
                userspace.max_connections = n;
            }
            for (flag, value, slot) in [
                (
                    "--idle-timeout",
                    idle_timeout.or(file.idle_timeout),
                    &mut userspace.idle_timeout,
                ),
                (
                    "--udp-idle-timeout",
                    udp_idle_timeout.or(file.udp_idle_timeout),
                    &mut userspace.udp_idle_timeout,
                ),
            ] {
                if let Some(v) = value {
                    match units::parse_duration(&v) {
                        Ok(d) if !d.is_zero() => *slot = d,
                        Ok(_) => return usage_error(flag, "must be more than 0"),
                        Err(e) => return usage_error(flag, e),
                    }
                }
            }
            let interfaces = match interfaces.or(file.interfaces) {
                Some(list) => match units::parse_interfaces(&list) {
                    Ok(l) => Some(l),
                    Err(e) => return usage_error("--interfaces", e),
                },
                None => None,
            };
            let lb_ipam = match lb_ipam {
                Some(v) => match units::parse_bool(&v) {
                    Ok(b) => b,
                    Err(e) => return usage_error("--lb-ipam", e),
                },
                None => file.lb_ipam.unwrap_or(true),
            };
            let l2_interfaces = match l2_interfaces.or(file.l2_interfaces) {
                Some(list) => match units::parse_interfaces(&list) {
                    Ok(l) => Some(l),
                    Err(e) => return usage_error("--l2-interfaces", e),
                },
                None => None,
            };
            let l2_lease_duration = match l2_lease_duration.or(file.l2_lease_duration) {
                Some(d) => match units::parse_duration(&d) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => return usage_error("--l2-lease-duration", "must be positive"),
                    Err(e) => return usage_error("--l2-lease-duration", e),
                },
                None => ferry_proxy::ipam::announce::DEFAULT_LEASE_DURATION,
            };
            let lease_namespace = lease_namespace
                .or(file.lease_namespace)
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "kube-system".into());
            let cidrs = match units::parse_cidrs(&nodeport_addresses) {
                Ok(c) => c,
                Err(e) => return usage_error("--nodeport-addresses", e),
            };
            let (min, max) = match (
                units::parse_duration(&min_sync_period),
                units::parse_duration(&sync_period),
            ) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) => return usage_error("--min-sync-period", e),
                (_, Err(e)) => return usage_error("--sync-period", e),
            };
            let mut listen = Vec::new();
            for (flag, value, what) in [
                (
                    "--healthz-bind-address",
                    &healthz_bind_address,
                    Endpoints::Health,
                ),
                (
                    "--metrics-bind-address",
                    &metrics_bind_address,
                    Endpoints::Metrics,
                ),
            ] {
                if value.is_empty() {
                    continue;
                }
                match value.parse::<std::net::SocketAddr>() {
                    Ok(a) => listen.push((a, what)),
                    Err(_) => return usage_error(flag, format!("{value:?} is not ADDRESS:PORT")),
                }
            }
            let cgroup = cgroup_path.or_else(cli::cgroup2_root);
            if dataplane == Dataplane::Ebpf && cgroup.is_none() {
                return usage_error("--cgroup-path", "no cgroup2 filesystem is mounted");
            }
            let cfg = AgentConfig {
                node_name: cli::node_name(hostname_override.as_deref()),
                nodeport_cidrs: cidrs,
                min_sync_period: min,
                sync_period: max,
                retry_period: Duration::from_secs(1),
                sources: match &source {
                    Source::File(_) => vec![ferry_proxy::source::file::NAME],
                    Source::Kube(_) => ferry_proxy::source::kube::SOURCES.to_vec(),
                },
                health_check_servers: true,
                translate: TranslateConfig::default(),
                plan: {
                    // ID ranges match the maps' capacities.
                    let caps = MapCapacities::default();
                    PlanConfig {
                        max_backends: caps.backends,
                        max_frontends: caps.frontends,
                        max_service_entries: caps.services,
                        ..PlanConfig::default()
                    }
                },
            };
            let ipam = match &source {
                Source::Kube(kubeconfig) => Some(ferry_proxy::ipam::IpamSettings {
                    kubeconfig: kubeconfig.clone(),
                    allocate: lb_ipam,
                    // By default, ARP is answered where the TC path listens.
                    l2_required: l2_interfaces.is_some(),
                    l2_interfaces: l2_interfaces
                        .or_else(|| interfaces.clone())
                        .unwrap_or_else(ferry_proxy::ebpf::tc::default_interfaces),
                    lease_namespace,
                    identity: cfg.node_name.clone(),
                    l2_lease_duration,
                }),
                Source::File(_) => None,
            };
            let dataplane = DataplaneChoice {
                mode: dataplane,
                bpffs: bpffs_path,
                cgroup,
                interfaces,
                userspace,
            };
            run(cfg, source, dataplane, &listen, ipam)
        }
        Command::Services {
            output,
            bpffs_path,
            metrics_address,
        } => {
            let maps = match BpfMaps::open(&bpffs_path, MapCapacities::default()) {
                Ok(m) => m,
                Err(e) => {
                    // No pinned maps: a userspace agent answers /services.
                    match ferry_proxy::http::get(&metrics_address, "/services") {
                        Ok(body) => {
                            match output {
                                Output::Json => println!("{body}"),
                                Output::Table => match rows::format_userspace_table(&body) {
                                    Ok(t) => print!("{t}"),
                                    Err(e) => {
                                        eprintln!("ferry services: {e}");
                                        return ExitCode::FAILURE;
                                    }
                                },
                            }
                            return ExitCode::SUCCESS;
                        }
                        Err(http) => {
                            eprintln!(
                                "ferry services: {e} (is an eBPF agent running with --bpffs-path {}?); \
                                 and no userspace agent at {metrics_address}: {http}",
                                bpffs_path.display()
                            );
                            return ExitCode::FAILURE;
                        }
                    }
                }
            };
            let applied = match maps.dump() {
                Ok(ops) => AppliedState::restore(ops),
                Err(e) => {
                    eprintln!("ferry services: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let rows = rows::service_rows(&applied);
            match output {
                Output::Table => print!("{}", rows::format_table(&rows)),
                Output::Json => match serde_json::to_string_pretty(&rows) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("ferry services: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Command::Explain {
            source,
            destination,
            bpffs_path,
        } => {
            let Some(dst) = parse_destination(&destination) else {
                return usage_error(
                    "DESTINATION",
                    format!("{destination:?} is not IP:PORT/PROTO"),
                );
            };
            let applied =
                match BpfMaps::open(&bpffs_path, MapCapacities::default()).and_then(|m| m.dump()) {
                    Ok(ops) => AppliedState::restore(ops),
                    Err(e) => {
                        eprintln!("ferry explain: {e}");
                        return ExitCode::FAILURE;
                    }
                };
            print!("{}", ferry_proxy::explain::explain(&applied, source, dst));
            ExitCode::SUCCESS
        }
        Command::Cleanup { bpffs_path } => {
            ferry_proxy::ebpf::lb::remove_pins(&bpffs_path);
            // A bpffs mount of its own stays, with the kernel's own entries
            // (maps.debug, progs.debug) but none of ours.
            let ours = |n: &str| n.starts_with("ferry") || n == "links";
            let left = std::fs::read_dir(&bpffs_path).map_or(0, |d| {
                d.flatten()
                    .filter(|e| ours(&e.file_name().to_string_lossy()))
                    .count()
            });
            if left > 0 {
                eprintln!(
                    "ferry cleanup: {} could not be removed entirely",
                    bpffs_path.display()
                );
                return ExitCode::FAILURE;
            }
            println!("removed {}", bpffs_path.display());
            ExitCode::SUCCESS
        }
        Command::Crd => match ferry_proxy::ipam::pool::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry crd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("ferry {}", env!("CARGO_PKG_VERSION"));
            match ferry_proxy::ebpf::embedded_programs() {
                Ok(names) => println!("eBPF programs: {}", names.join(", ")),
                Err(e) => println!("eBPF programs: none ({e})"),
            }
            ExitCode::SUCCESS
        }
        Command::Verify { bpffs } => match ferry_proxy::ebpf::verify_all(&bpffs) {
            Ok(names) => {
                for n in names {
                    println!("{n}: accepted by the verifier");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry verify: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// "198.19.0.10:80/TCP" (protocol optional, TCP by default).
fn parse_destination(s: &str) -> Option<ferry_proxy::model::L4Addr> {
    let (addr, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    Some(ferry_proxy::model::L4Addr {
        ip: addr.ip(),
        port: addr.port(),
        protocol: ferry_proxy::model::Protocol::parse(&proto.to_uppercase())?,
    })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Where the agent's objects come from.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Kube(Option<PathBuf>),
}

/// Which dataplane `ferry run` uses, and its settings.
#[derive(Debug)]
struct DataplaneChoice {
    mode: Dataplane,
    bpffs: PathBuf,
    cgroup: Option<PathBuf>,
    /// TC interfaces (None: the default ones).
    interfaces: Option<Vec<String>>,
    userspace: ferry_proxy::userspace::UserspaceConfig,
}

type EbpfSetup = (Box<dyn LbMaps + Send>, aya::Ebpf);

/// An error and its sources, one line ("a: b: c").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Loads and attaches the eBPF programs and opens the pinned maps.
fn setup_ebpf(dataplane: &DataplaneChoice) -> Result<EbpfSetup, String> {
    let bpffs = dataplane.bpffs.as_path();
    let cgroup = dataplane
        .cgroup
        .as_deref()
        .ok_or("no cgroup2 filesystem is mounted")?;
    let caps = MapCapacities::default();
    let mut ebpf = ferry_proxy::ebpf::open(bpffs, &caps)
        .map_err(|e| format!("cannot load the eBPF programs: {}", chain(&e)))?;
    match ferry_proxy::ebpf::lb::attach_sock_lb(&mut ebpf, bpffs, cgroup) {
        Ok(new) if new.is_empty() => {
            tracing::info!(cgroup = %cgroup.display(), "socket-level programs already attached (restart)")
        }
        Ok(new) => tracing::info!(cgroup = %cgroup.display(), programs = ?new, "attached"),
        Err(e) => {
            return Err(format!(
                "cannot attach the socket-level programs: {}",
                chain(&e)
            ))
        }
    }
    let interfaces = dataplane
        .interfaces
        .clone()
        .unwrap_or_else(ferry_proxy::ebpf::tc::default_interfaces);
    match ferry_proxy::ebpf::tc::attach_tc(&mut ebpf, bpffs, &interfaces) {
        Ok(done) => {
            for a in done {
                tracing::info!(interface = %a.interface, direction = a.direction, replaced = a.replaced, "TC program attached");
            }
        }
        Err(e) => return Err(format!("cannot attach the TC programs: {}", chain(&e))),
    }
    let maps =
        BpfMaps::open(bpffs, caps).map_err(|e| format!("cannot open the pinned maps: {e}"))?;
    Ok((Box::new(maps), ebpf))
}

fn run(
    cfg: AgentConfig,
    source: Source,
    dataplane: DataplaneChoice,
    listen: &[(std::net::SocketAddr, Endpoints)],
    ipam: Option<ferry_proxy::ipam::IpamSettings>,
) -> ExitCode {
    let health_timeout = 2 * cfg.sync_period;
    let cfg_node_name = cfg.node_name.clone();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let userspace = |settings: ferry_proxy::userspace::UserspaceConfig| {
        ferry_proxy::userspace::UserspaceDataplane::new(settings).map_err(|e| e.to_string())
    };
    let mut ebpf = None;
    let mut status = None;
    let maps: Box<dyn LbMaps + Send> = match dataplane.mode {
        Dataplane::Ebpf => match setup_ebpf(&dataplane) {
            Ok((maps, handle)) => {
                ebpf = Some(handle);
                maps
            }
            Err(e) => {
                tracing::error!(error = %e, "the eBPF dataplane cannot run");
                return ExitCode::FAILURE;
            }
        },
        Dataplane::Userspace | Dataplane::Auto => {
            let from_ebpf = if dataplane.mode == Dataplane::Auto {
                match setup_ebpf(&dataplane) {
                    Ok(x) => Some(x),
                    Err(e) => {
                        tracing::warn!(reason = %e, "eBPF unavailable: using the userspace dataplane");
                        None
                    }
                }
            } else {
                None
            };
            match from_ebpf {
                Some((maps, handle)) => {
                    tracing::info!("dataplane: ebpf");
                    ebpf = Some(handle);
                    maps
                }
                None => match userspace(dataplane.userspace.clone()) {
                    Ok(u) => {
                        tracing::info!(settings = ?dataplane.userspace, "dataplane: userspace");
                        status = Some(u.status());
                        Box::new(u)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the userspace dataplane cannot run");
                        return ExitCode::FAILURE;
                    }
                },
            }
        }
    };
    let mut agent = match Agent::new(cfg, maps) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pinned maps back");
            return ExitCode::FAILURE;
        }
    };
    if let Some(s) = status {
        agent.metrics().set_dataplane(s);
    } else if ebpf.is_some() {
        let status = Arc::new(ferry_proxy::ebpf::status::EbpfStatus::new(
            dataplane.bpffs.clone(),
            MapCapacities::default(),
        ));
        status.clone().watch(Duration::from_secs(60));
        agent.metrics().set_dataplane(status);
    }
    let stop_source = Arc::new(AtomicBool::new(false));
    let http = match ferry_proxy::http::HttpServer::start("ferry-http") {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the HTTP server");
            return ExitCode::FAILURE;
        }
    };
    let mut serving = Vec::new();
    for (addr, what) in listen {
        let handler = ferry_proxy::http::agent_handler(*what, agent.metrics(), health_timeout);
        match std::net::TcpListener::bind(addr).and_then(|l| http.serve(l, handler)) {
            Ok(s) => {
                tracing::info!(address = %s.local, endpoints = ?what, "serving");
                serving.push(s);
            }
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    tracing::info!(source = ?source, "running");
    let node_name = cfg_node_name.clone();
    let source_thread = match source {
        Source::File(path) => ferry_proxy::source::file::spawn(
            path,
            Duration::from_millis(500),
            tx,
            stop_source.clone(),
        ),
        Source::Kube(kubeconfig) => {
            let (events_tx, events_rx) = ferry_proxy::source::kube::event_channel();
            agent.report_invalid_to(Box::new(move |e| {
                let _ = events_tx.send(e.clone());
            }));
            match ferry_proxy::source::kube::spawn(
                kubeconfig,
                node_name,
                tx,
                Some(events_rx),
                stop_source.clone(),
            ) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the Kubernetes source");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let ipam_thread = match ipam {
        Some(mut settings) => {
            if ebpf.is_none() && !settings.l2_required && !settings.l2_interfaces.is_empty() {
                // Its Service addresses are local: the kernel answers ARP
                // for them on every node (docs/load-balancer.md).
                tracing::info!("no L2 announcement with the userspace dataplane unless --l2-interfaces asks for it");
                settings.l2_interfaces.clear();
            }
            let (tx, rx) = tokio::sync::watch::channel(Default::default());
            // Only an announcer needs the announceable addresses: without
            // one, syncs do not walk every frontend for them.
            if !settings.l2_interfaces.is_empty() {
                agent.announce_to(tx);
            }
            tracing::info!(allocate = settings.allocate, l2_interfaces = ?settings.l2_interfaces,
                lease_namespace = %settings.lease_namespace, "LoadBalancer IP management");
            match ferry_proxy::ipam::spawn(settings, rx, agent.metrics(), stop_source.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start LoadBalancer IP management");
                    stop_source.store(true, Ordering::Relaxed);
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    // The loaded programs go to the keeper, which puts back what is
    // removed under the agent (pins, links, TC on new interfaces).
    let keeper = ebpf.take().map(|handle| {
        ferry_proxy::ebpf::keeper::Keeper {
            ebpf: handle,
            dir: dataplane.bpffs.clone(),
            cgroup: dataplane.cgroup.clone().unwrap_or_default(),
            interfaces: dataplane.interfaces.clone(),
        }
        .spawn(Duration::from_secs(2), stop_source.clone())
    });
    agent.run(&rx, &STOP);
    stop_source.store(true, Ordering::Relaxed);
    let _ = source_thread.join();
    if let Some(t) = ipam_thread {
        let _ = t.join();
    }
    if let Some(k) = keeper {
        let _ = k.join();
        tracing::info!("stopped; the dataplane stays programmed (ferry cleanup removes it)");
    } else {
        tracing::info!("stopped; the userspace dataplane closed its listeners");
    }
    drop(serving);
    drop(http);
    drop(agent);
    ExitCode::SUCCESS
}
