//! `ferry run`: the agent. Settings from flags and the config file
//! (resolved in `ferry_proxy::cli::resolve`), then the dataplane, the HTTP
//! endpoints, the source, LoadBalancer IP management and the keeper around
//! one sync loop, until SIGINT/SIGTERM (which leave the dataplane in place).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_proxy::agent::Agent;
use ferry_proxy::cli::flags::RunFlags;
use ferry_proxy::cli::resolve::{self, Dataplane, DataplaneChoice, Environment, RunConfig, Source};
use ferry_proxy::cli::{self, RunSettings};
use ferry_proxy::datapath::{BpfMaps, DatapathError, LbMaps, MapCapacities};
use ferry_proxy::ebpf::EbpfError;
use ferry_proxy::http::{HttpServer, Serving};
use ferry_proxy::metrics::DataplaneStatus;

pub fn main(flags: RunFlags) -> ExitCode {
    let file = match &flags.config {
        Some(path) => match RunSettings::load(path) {
            Ok(f) => f,
            Err(e) => {
                return super::usage_error(&resolve::UsageError {
                    setting: "--config",
                    why: e.to_string(),
                })
            }
        },
        None => RunSettings::default(),
    };
    let env = Environment {
        node_name: cli::node_name(None),
        pod_namespace: std::env::var("POD_NAMESPACE").ok(),
        cgroup2_root: cli::cgroup2_root(),
        default_interfaces: Box::new(ferry_proxy::ebpf::tc::default_interfaces),
    };
    match resolve::resolve(flags, file, &env) {
        Ok(config) => run(config),
        Err(e) => super::usage_error(&e),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The threads beside the sync loop, stopped with it.
struct Threads {
    stop: Arc<AtomicBool>,
    source: Option<JoinHandle<()>>,
    ipam: Option<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in [self.source.take(), self.ipam.take(), self.keeper.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

fn run(config: RunConfig) -> ExitCode {
    let health_timeout = 2 * config.agent.sync_period;
    let node_name = config.agent.node_name.clone();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let Some((maps, mut ebpf, status)) = dataplane(&config.dataplane) else {
        return ExitCode::FAILURE;
    };
    let mut agent = match Agent::new(config.agent, maps) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pinned maps back");
            return ExitCode::FAILURE;
        }
    };
    agent.metrics().set_dataplane(status);
    let Some((http, serving)) = serve(&config.listen, &agent, health_timeout) else {
        return ExitCode::FAILURE;
    };
    let mut threads = Threads {
        stop: Arc::new(AtomicBool::new(false)),
        source: None,
        ipam: None,
        keeper: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    tracing::info!(source = ?config.source, "running");
    let started = source(config.source, node_name, tx, &mut agent, &threads.stop)
        .map(|t| threads.source = Some(t))
        .and_then(|()| ipam(config.ipam, ebpf.is_some(), &mut agent, &threads.stop))
        .map(|t| threads.ipam = t);
    if started.is_err() {
        return ExitCode::FAILURE;
    }
    // The loaded programs go to the keeper, which puts back what is
    // removed under the agent (pins, links, TC on new interfaces).
    threads.keeper = ebpf.take().map(|handle| {
        ferry_proxy::ebpf::keeper::Keeper {
            ebpf: handle,
            dir: config.dataplane.bpffs.clone(),
            cgroup: config.dataplane.cgroup.clone().unwrap_or_default(),
            interfaces: config.dataplane.interfaces.clone(),
        }
        .spawn(Duration::from_secs(2), threads.stop.clone())
    });
    let kept = threads.keeper.is_some();
    agent.run(&rx, &STOP);
    drop(threads);
    if kept {
        tracing::info!("stopped; the dataplane stays programmed (ferry cleanup removes it)");
    } else {
        tracing::info!("stopped; the userspace dataplane closed its listeners");
    }
    drop(serving);
    drop(http);
    ExitCode::SUCCESS
}

/// The HTTP endpoints on their addresses; None (logged) when one cannot
/// listen.
fn serve(
    listen: &[(std::net::SocketAddr, ferry_proxy::http::Endpoints)],
    agent: &Agent,
    health_timeout: Duration,
) -> Option<(HttpServer, Vec<Serving>)> {
    let http = match HttpServer::start("ferry-http") {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the HTTP server");
            return None;
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
                return None;
            }
        }
    }
    Some((http, serving))
}

type Maps = Box<dyn LbMaps + Send>;

/// The dataplane asked for (auto: eBPF, else userspace), its maps, the
/// loaded programs (eBPF) and its status for /metrics; None (logged) when
/// it cannot run.
fn dataplane(
    choice: &DataplaneChoice,
) -> Option<(Maps, Option<aya::Ebpf>, Arc<dyn DataplaneStatus>)> {
    let ebpf = match choice.mode {
        Dataplane::Ebpf => match setup_ebpf(choice) {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::error!(error = %e, "the eBPF dataplane cannot run");
                return None;
            }
        },
        Dataplane::Auto => match setup_ebpf(choice) {
            Ok(x) => {
                tracing::info!("dataplane: ebpf");
                Some(x)
            }
            Err(e) => {
                tracing::warn!(reason = %e, "eBPF unavailable: using the userspace dataplane");
                None
            }
        },
        Dataplane::Userspace => None,
    };
    if let Some((maps, handle)) = ebpf {
        let status = Arc::new(ferry_proxy::ebpf::status::EbpfStatus::new(
            choice.bpffs.clone(),
            MapCapacities::default(),
        ));
        status.clone().watch(Duration::from_mins(1));
        return Some((maps, Some(handle), status));
    }
    match ferry_proxy::userspace::UserspaceDataplane::new(choice.userspace.clone()) {
        Ok(u) => {
            tracing::info!(settings = ?choice.userspace, "dataplane: userspace");
            let status = u.status();
            Some((Box::new(u), None, status))
        }
        Err(e) => {
            tracing::error!(error = %e, "the userspace dataplane cannot run");
            None
        }
    }
}

/// Loads and attaches the eBPF programs and opens the pinned maps.
/// Why the eBPF dataplane cannot run; each variant's message includes
/// the error under it.
#[derive(Debug, thiserror::Error)]
enum EbpfSetupError {
    #[error("no cgroup2 filesystem is mounted")]
    NoCgroup,
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[source] EbpfError),
    #[error("cannot attach the socket-level programs: {0}")]
    AttachSock(#[source] EbpfError),
    #[error("cannot attach the TC programs: {0}")]
    AttachTc(#[source] EbpfError),
    #[error("cannot open the pinned maps: {0}")]
    Maps(#[source] DatapathError),
}

fn setup_ebpf(choice: &DataplaneChoice) -> Result<(Maps, aya::Ebpf), EbpfSetupError> {
    let bpffs = choice.bpffs.as_path();
    let cgroup = choice.cgroup.as_deref().ok_or(EbpfSetupError::NoCgroup)?;
    let caps = MapCapacities::default();
    let mut ebpf = ferry_proxy::ebpf::open(bpffs, &caps).map_err(EbpfSetupError::Load)?;
    let new = ferry_proxy::ebpf::lb::attach_sock_lb(&mut ebpf, bpffs, cgroup)
        .map_err(EbpfSetupError::AttachSock)?;
    if new.is_empty() {
        tracing::info!(cgroup = %cgroup.display(), "socket-level programs already attached (restart)");
    } else {
        tracing::info!(cgroup = %cgroup.display(), programs = ?new, "attached");
    }
    let interfaces = choice
        .interfaces
        .clone()
        .unwrap_or_else(ferry_proxy::ebpf::tc::default_interfaces);
    let done = ferry_proxy::ebpf::tc::attach_tc(&mut ebpf, bpffs, &interfaces)
        .map_err(EbpfSetupError::AttachTc)?;
    for a in done {
        tracing::info!(interface = %a.interface, direction = a.direction, replaced = a.replaced, "TC program attached");
    }
    let maps = BpfMaps::open(bpffs, caps).map_err(EbpfSetupError::Maps)?;
    Ok((Box::new(maps), ebpf))
}

/// Starts the source thread; Err (logged) when it cannot start.
fn source(
    source: Source,
    node_name: String,
    tx: std::sync::mpsc::Sender<ferry_proxy::source::SourceEvent>,
    agent: &mut Agent,
    stop: &Arc<AtomicBool>,
) -> Result<JoinHandle<()>, ()> {
    match source {
        Source::File(path) => Ok(ferry_proxy::source::file::spawn(
            path,
            Duration::from_millis(500),
            tx,
            stop.clone(),
        )),
        Source::Kube(kubeconfig) => {
            let (events_tx, events_rx) = ferry_proxy::source::kube::event_channel();
            agent.report_invalid_to(Box::new(move |e| {
                let _ = events_tx.send(e.clone());
            }));
            let events = Some(events_rx);
            ferry_proxy::source::kube::spawn(kubeconfig, node_name, tx, events, stop.clone())
                .map_err(|e| tracing::error!(error = %e, "cannot start the Kubernetes source"))
        }
    }
}

/// Starts LoadBalancer IP management (with `--source kube`); Err (logged)
/// when it cannot start.
fn ipam(
    settings: Option<ferry_proxy::ipam::IpamSettings>,
    ebpf: bool,
    agent: &mut Agent,
    stop: &Arc<AtomicBool>,
) -> Result<Option<JoinHandle<()>>, ()> {
    let Some(mut settings) = settings else {
        return Ok(None);
    };
    if !ebpf && !settings.l2_required && !settings.l2_interfaces.is_empty() {
        // Its Service addresses are local: the kernel answers ARP for them
        // on every node (docs/load-balancer.md).
        tracing::info!(
            "no L2 announcement with the userspace dataplane unless --l2-interfaces asks for it"
        );
        settings.l2_interfaces.clear();
    }
    let (tx, rx) = tokio::sync::watch::channel(std::collections::BTreeMap::default());
    // Only an announcer needs the announceable addresses: without one,
    // syncs do not walk every frontend for them.
    if !settings.l2_interfaces.is_empty() {
        agent.announce_to(tx);
    }
    tracing::info!(allocate = settings.allocate, l2_interfaces = ?settings.l2_interfaces,
        lease_namespace = %settings.lease_namespace, "LoadBalancer IP management");
    ferry_proxy::ipam::spawn(settings, rx, agent.metrics(), stop.clone())
        .map(Some)
        .map_err(|e| tracing::error!(error = %e, "cannot start LoadBalancer IP management"))
}
