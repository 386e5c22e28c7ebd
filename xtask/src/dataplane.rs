//! `cargo xtask bench dataplane [--quick]`: Ferry against direct
//! forwarding, kube-proxy-style iptables (legacy and nft backends),
//! kube-proxy-style nftables, IPVS and HAProxy, in one run, on one
//! namespace topology the harness builds and removes (also on Ctrl-C):
//!
//! ```text
//!  client 198.18.0.2 --- node 198.18.0.1 | br0 198.18.1.1 --- b1 198.18.1.11
//!                         (the dataplanes)                  --- b2 198.18.1.12
//!                                                           --- b3 198.18.1.13
//! ```
//!
//! Every backend runs nginx (port 80) and b1 an iperf3 server. Each row
//! serves its own Service IP (198.19.<row>.10:80, and :5201 for iperf3 with
//! b1 as the only endpoint). wrk measures requests/s with keep-alive and with
//! a new connection per request, and latency; iperf3 bulk throughput; the
//! node's CPU use comes from /proc/stat. At 1 Service all rows are set up
//! together and runs are interleaved across rows; with 10,000 extra
//! Services (the measured one last in iptables order) each row is set up
//! alone, measured, and removed, and its programming time is recorded.
//! Results: bench-results/dataplane.{csv,md,svg}.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::deps;
use crate::host::{bridge_port, ip, sh, terminate};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

const EXTRA_SERVICES: usize = 10_000;
const BACKENDS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.1.13"];
/// The node's address on the client link (NodePort frontends).
const NODE_ADDRESS: &str = "198.18.0.1";
const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_IPERF: u16 = 30201;

/// The rows, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    /// Client -> backend through the node, no translation: the limit.
    Direct,
    /// From the node itself to the backend: the limit for socket-level LB.
    DirectFromNode,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Ipvs,
    Haproxy,
    FerryUserspace,
    /// ClusterIP from a client on the node (socket-level LB at connect()).
    FerryEbpfClusterIp,
    /// NodePort from the client namespace (the TC path).
    FerryEbpfNodePort,
}

impl Row {
    const ALL: [Row; 10] = [
        Row::Direct,
        Row::DirectFromNode,
        Row::IptablesLegacy,
        Row::IptablesNft,
        Row::Nftables,
        Row::Ipvs,
        Row::Haproxy,
        Row::FerryUserspace,
        Row::FerryEbpfClusterIp,
        Row::FerryEbpfNodePort,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::DirectFromNode => "direct (from node)",
            Row::IptablesLegacy => "iptables-legacy",
            Row::IptablesNft => "iptables-nft",
            Row::Nftables => "nftables",
            Row::Ipvs => "ipvs",
            Row::Haproxy => "haproxy (tcp mode)",
            Row::FerryUserspace => "ferry userspace",
            Row::FerryEbpfClusterIp => "ferry ebpf ClusterIP (socket LB, from node, 1 endpoint)",
            Row::FerryEbpfNodePort => "ferry ebpf NodePort (TC)",
        }
    }

    /// The name `--rows` takes.
    fn key(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::DirectFromNode => "direct-node",
            Row::IptablesLegacy => "iptables-legacy",
            Row::IptablesNft => "iptables-nft",
            Row::Nftables => "nftables",
            Row::Ipvs => "ipvs",
            Row::Haproxy => "haproxy",
            Row::FerryUserspace => "ferry-userspace",
            Row::FerryEbpfClusterIp => "ferry-ebpf",
            Row::FerryEbpfNodePort => "ferry-nodeport",
        }
    }

    /// The row whose figures this one is compared with.
    fn baseline(self) -> Row {
        match self {
            Row::DirectFromNode | Row::FerryEbpfClusterIp => Row::DirectFromNode,
            _ => Row::Direct,
        }
    }

    /// The third octet of this row's Service IP.
    fn octet(self) -> u8 {
        self as u8 + 1
    }

    fn service_ip(self) -> String {
        format!("198.19.{}.10", self.octet())
    }

    fn iperf_ip(self) -> String {
        format!("198.19.{}.11", self.octet())
    }

    /// Where requests go.
    fn http_target(self) -> String {
        match self {
            Row::Direct | Row::DirectFromNode => format!("{}:80", BACKENDS[0]),
            Row::FerryEbpfNodePort => format!("{NODE_ADDRESS}:{NODE_PORT_HTTP}"),
            _ => format!("{}:80", self.service_ip()),
        }
    }

    fn iperf_port(self) -> u16 {
        if self == Row::FerryEbpfNodePort {
            NODE_PORT_IPERF
        } else {
            5201
        }
    }

    fn iperf_target(self) -> String {
        match self {
            Row::Direct | Row::DirectFromNode => BACKENDS[0].to_string(),
            Row::FerryEbpfNodePort => NODE_ADDRESS.to_string(),
            _ => self.iperf_ip(),
        }
    }

    /// Runs from the node namespace (else from the client namespace).
    fn runs_on_node(self) -> bool {
        matches!(self, Row::DirectFromNode | Row::FerryEbpfClusterIp)
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    RpsKeepAlive,
    RpsNewConnection,
    P50Ms,
    P99Ms,
    ThroughputGbps,
    NodeCpuPct,
    /// wrk's socket errors and non-2xx answers, both wrk runs.
    Errors,
    /// Mean run time of the connect4 program during the new-connection run
    /// (kernel.bpf_stats_enabled), socket-LB row only; reported apart.
    Connect4Ns,
}

impl Metric {
    const ALL: [Metric; 7] = [
        Metric::RpsKeepAlive,
        Metric::RpsNewConnection,
        Metric::P50Ms,
        Metric::P99Ms,
        Metric::ThroughputGbps,
        Metric::NodeCpuPct,
        Metric::Errors,
    ];

    fn name(self) -> &'static str {
        match self {
            Metric::RpsKeepAlive => "req/s keep-alive",
            Metric::RpsNewConnection => "req/s new connection",
            Metric::P50Ms => "p50 ms (new connection)",
            Metric::P99Ms => "p99 ms (new connection)",
            Metric::ThroughputGbps => "iperf3 Gbit/s",
            Metric::NodeCpuPct => "machine CPU % (new connection)",
            Metric::Errors => "errors",
            Metric::Connect4Ns => "connect4 program ns per connect()",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Metric::RpsKeepAlive => "rps_keepalive",
            Metric::RpsNewConnection => "rps_new_connection",
            Metric::P50Ms => "p50_ms",
            Metric::P99Ms => "p99_ms",
            Metric::ThroughputGbps => "iperf3_gbps",
            Metric::NodeCpuPct => "cpu_pct",
            Metric::Errors => "errors",
            Metric::Connect4Ns => "connect4_ns",
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    /// --only-iperf3: bulk throughput only (no wrk runs).
    only_iperf3: bool,
    seconds: u64,
    repeats: usize,
    connections: u32,
    /// --congestion-control NAME: every namespace's TCP congestion control
    /// (default: the host's, which new namespaces inherit).
    congestion: Option<String>,
}

/// Everything the harness created; removed on drop.
struct Topo {
    tag: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    /// cgroups the harness made: one per eBPF row (its socket programs act
    /// there) and one for the from-node baseline (same depth, no programs).
    cgroups: BTreeMap<Row, PathBuf>,
    pins: PathBuf,
    ferry: PathBuf,
    /// --congestion-control, set in every namespace.
    congestion: Option<String>,
}

fn ns_name(tag: &str, n: &str) -> String {
    format!("{tag}-{n}")
}

impl Topo {
    fn node(&self) -> String {
        ns_name(&self.tag, "node")
    }

    fn client(&self) -> String {
        ns_name(&self.tag, "client")
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    fn add_ns(&mut self, n: &str) -> Result<String> {
        let name = ns_name(&self.tag, n);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        // Before any socket exists: sockets take the namespace's default
        // when they are created.
        if let Some(cc) = &self.congestion {
            sh(self.exec(&name, "sh").args([
                "-c",
                &format!("echo {cc} > /proc/sys/net/ipv4/tcp_congestion_control"),
            ]))
            .with_context(|| {
                format!("--congestion-control {cc}: not allowed in a namespace (see net.ipv4.tcp_allowed_congestion_control)")
            })?;
        }
        Ok(name)
    }

    fn spawn(&mut self, what: &str, cmd: &mut Command) -> Result<()> {
        let log = File::create(self.dir.join(format!("{what}.log")))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.procs.push((what.to_string(), child));
        Ok(())
    }

    fn stop(&mut self, what: &str) {
        let mut keep = Vec::new();
        for (name, mut child) in self.procs.drain(..) {
            if name == what {
                terminate(&mut child, Duration::from_secs(10));
            } else {
                keep.push((name, child));
            }
        }
        self.procs = keep;
    }

    fn build(tag: &str, ferry: PathBuf, congestion: Option<String>) -> Result<Topo> {
        let dir = std::env::temp_dir().join(tag);
        std::fs::create_dir_all(&dir)?;
        let mut t = Topo {
            tag: tag.into(),
            pins: PathBuf::from("/sys/fs/bpf").join(tag),
            dir,
            namespaces: Vec::new(),
            procs: Vec::new(),
            cgroups: BTreeMap::new(),
            ferry,
            congestion,
        };
        let client = t.add_ns("client")?;
        let node = t.add_ns("node")?;
        ip(&[
            "-n", &client, "link", "add", "c0", "type", "veth", "peer", "name", "n0", "netns",
            &node,
        ])?;
        ip(&["-n", &client, "addr", "add", "198.18.0.2/24", "dev", "c0"])?;
        ip(&["-n", &client, "link", "set", "c0", "up"])?;
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            "198.18.0.1",
        ])?;
        ip(&["-n", &node, "addr", "add", "198.18.0.1/24", "dev", "n0"])?;
        ip(&["-n", &node, "link", "set", "n0", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node, "addr", "add", "198.18.1.1/24", "dev", "br0"])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        // Forwarding in the node namespace (sh, not sysctl: procps is not
        // an essential package).
        sh(t.exec(&node, "sh")
            .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        for (i, addr) in BACKENDS.iter().enumerate() {
            let b = t.add_ns(&format!("b{}", i + 1))?;
            bridge_port(
                &node,
                &format!("vb{}", i + 1),
                &b,
                &format!("{addr}/24"),
                Some("198.18.1.1"),
            )?;
            let conf = t.dir.join(format!("nginx-b{}.conf", i + 1));
            let run = t.dir.join(format!("nginx-b{}", i + 1));
            std::fs::create_dir_all(&run)?;
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 1;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {run};\n  proxy_temp_path {run};\n  fastcgi_temp_path {run};\n  uwsgi_temp_path {run};\n  scgi_temp_path {run};\n  keepalive_requests 1000000;\n  server {{ listen {addr}:80 reuseport backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
                    run = run.display()
                ),
            )?;
            let mut cmd = t.exec(&b, "nginx");
            cmd.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
            t.spawn(&format!("nginx-b{}", i + 1), &mut cmd)?;
            if i == 0 {
                let mut cmd = t.exec(&b, "iperf3");
                cmd.args(["-s", "-p", "5201"]);
                t.spawn("iperf3-server", &mut cmd)?;
            }
        }
        Ok(t)
    }
}

impl Topo {
    /// The row's own cgroup under the cgroup2 root, made on first use.
    fn cgroup(&mut self, row: Row) -> Result<PathBuf> {
        if let Some(c) = self.cgroups.get(&row) {
            return Ok(c.clone());
        }
        let c = crate::host::cgroup2_root()?.join(format!("{}-{}", self.tag, row.key()));
        std::fs::create_dir_all(&c).with_context(|| format!("creating cgroup {}", c.display()))?;
        self.cgroups.insert(row, c.clone());
        Ok(c)
    }

    /// Each eBPF row pins its own maps: at 1 Service both agents run at
    /// once, and one agent's resync would prune the other's frontends.
    fn pins_for(&self, row: Row) -> PathBuf {
        PathBuf::from(format!("{}-{}", self.pins.display(), row.key()))
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for (_, mut child) in self.procs.drain(..) {
            terminate(&mut child, Duration::from_millis(50));
        }
        for row in [Row::FerryEbpfClusterIp, Row::FerryEbpfNodePort] {
            let _ = Command::new(&self.ferry)
                .args(["cleanup", "--bpffs-path"])
                .arg(self.pins_for(row))
                .output();
        }
        for (_, cg) in std::mem::take(&mut self.cgroups) {
            let _ = std::fs::remove_dir(&cg);
        }
        for ns in self.namespaces.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// iptables-restore input in kube-proxy's shape: KUBE-SERVICES jumps to a
/// KUBE-SVC chain per Service, which picks a KUBE-SEP chain with `statistic
/// random`, which DNATs. `extra` Services come first, the measured ones
/// last (the worst case: every new connection walks the whole list).
fn iptables_rules(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 200 + 4096);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..extra {
        let _ = writeln!(s, ":KUBE-SVC-X{i} - [0:0]\n:KUBE-SEP-X{i} - [0:0]");
    }
    s.push_str(":KUBE-SVC-WEB - [0:0]\n:KUBE-SVC-IPERF - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n:KUBE-SEP-3 - [0:0]\n:KUBE-SEP-IPERF - [0:0]\n");
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    s.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..extra {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d 198.19.{}.{}/32 -p tcp -m comment --comment \"bench/x{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X{i}\n-A KUBE-SVC-X{i} -j KUBE-SEP-X{i}\n-A KUBE-SEP-X{i} -p tcp -m tcp -j DNAT --to-destination {}:80",
            100 + i / 250,
            1 + i % 250,
            BACKENDS[i % 3]
        );
    }
    let svc = row.service_ip();
    let iperf = row.iperf_ip();
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -d {svc}/32 -p tcp -m comment --comment \"bench/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-WEB\n\
         -A KUBE-SERVICES -d {iperf}/32 -p tcp -m tcp --dport 5201 -j KUBE-SVC-IPERF\n\
         -A KUBE-SVC-WEB -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-1\n\
         -A KUBE-SVC-WEB -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-2\n\
         -A KUBE-SVC-WEB -j KUBE-SEP-3\n\
         -A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SEP-3 -p tcp -m tcp -j DNAT --to-destination {}:80\n\
         -A KUBE-SVC-IPERF -j KUBE-SEP-IPERF\n\
         -A KUBE-SEP-IPERF -p tcp -m tcp -j DNAT --to-destination {}:5201",
        BACKENDS[0], BACKENDS[1], BACKENDS[2], BACKENDS[0]
    );
    s.push_str("COMMIT\n");
    s
}

/// One Service's endpoint moves (x0 from b1 to b2), applied the way
/// today's kube-proxy does: iptables-restore --noflush of the changed
/// chains only (MinimizeIPTablesRestore), or one nft transaction that
/// rewrites the Service's chain.
fn one_change(row: Row) -> Option<(&'static str, Vec<&'static str>, String)> {
    match row {
        Row::IptablesLegacy | Row::IptablesNft => Some((
            if row == Row::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            },
            vec!["--noflush"],
            format!(
                "*nat\n:KUBE-SEP-X0 - [0:0]\n-A KUBE-SEP-X0 -p tcp -m tcp -j DNAT --to-destination {}:80\nCOMMIT\n",
                BACKENDS[1]
            ),
        )),
        Row::Nftables => Some((
            "nft",
            vec!["-f"],
            format!(
                "flush chain ip ferry-bench-kp svc-x0\nadd rule ip ferry-bench-kp svc-x0 meta l4proto tcp dnat to {}:80\n",
                BACKENDS[1]
            ),
        )),
        _ => None,
    }
}

/// Times [`one_change`] for a row programmed with its extra Services.
fn time_one_change(t: &Topo, row: Row) -> Result<Option<Duration>> {
    let Some((tool, args, input)) = one_change(row) else {
        return Ok(None);
    };
    let file = t.dir.join(format!("{tool}.change"));
    std::fs::write(&file, input)?;
    let start = Instant::now();
    sh(t.exec(&t.node(), tool).args(&args).arg(&file))?;
    Ok(Some(start.elapsed()))
}

/// `nft -f` input in kube-proxy's nftables shape: a verdict map from
/// address . protocol . port to a per-Service chain, which picks an
/// endpoint chain with `numgen random`.
fn nft_rules(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 250 + 4096);
    s.push_str("table ip ferry-bench-kp {\n");
    let mut elements = Vec::with_capacity(extra + 2);
    for i in 0..extra {
        let _ = writeln!(
            s,
            "  chain svc-x{i} {{ meta l4proto tcp dnat to {}:80; }}",
            BACKENDS[i % 3]
        );
        elements.push(format!(
            "198.19.{}.{} . tcp . 80 : goto svc-x{i}",
            100 + i / 250,
            1 + i % 250
        ));
    }
    for (i, b) in BACKENDS.iter().enumerate() {
        let _ = writeln!(
            s,
            "  chain ep-{} {{ meta l4proto tcp dnat to {b}:80; }}",
            i + 1
        );
    }
    let _ = writeln!(
        s,
        "  chain svc-web {{ numgen random mod 3 vmap {{ 0 : goto ep-1, 1 : goto ep-2, 2 : goto ep-3 }}; }}\n  chain svc-iperf {{ meta l4proto tcp dnat to {}:5201; }}",
        BACKENDS[0]
    );
    elements.push(format!("{} . tcp . 80 : goto svc-web", row.service_ip()));
    elements.push(format!("{} . tcp . 5201 : goto svc-iperf", row.iperf_ip()));
    let _ = writeln!(
        s,
        "  map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }}; }}",
        elements.join(", ")
    );
    s.push_str("  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
    s.push_str("  chain nat-output { type nat hook output priority -100; policy accept; ip daddr . meta l4proto . th dport vmap @service-ips; }\n}\n");
    s
}

/// HAProxy as an operator would tune it for L4: TCP mode, two threads,
/// and splice(2) for bulk transfers ("option splice-auto"; "maxpipes"
/// keeps its descriptor need within the harness's RLIMIT_NOFILE, which
/// HAProxy otherwise refuses to start under with maxconn 9000).
fn haproxy_config(row: Row, dir: &Path) -> String {
    format!(
        "global\n  maxconn 9000\n  maxpipes 500\n  nbthread 2\n  pidfile {}/haproxy.pid\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend web\n  bind {}:80\n  default_backend web\nbackend web\n  balance roundrobin\n  server b1 {}:80\n  server b2 {}:80\n  server b3 {}:80\nfrontend iperf\n  bind {}:5201\n  default_backend iperf\nbackend iperf\n  server b1 {}:5201\n",
        dir.display(),
        row.service_ip(),
        BACKENDS[0],
        BACKENDS[1],
        BACKENDS[2],
        row.iperf_ip(),
        BACKENDS[0]
    )
}

/// Service + EndpointSlice YAML for Ferry's file source: the measured
/// Service (3 endpoints; 1 for the socket-LB row), the iperf3 one, and `extra` one-endpoint ones.
fn ferry_yaml(row: Row, extra: usize) -> String {
    let mut s = String::with_capacity(extra * 600 + 4096);
    // The NodePort row's Services are NodePorts (the extra ones stay
    // ClusterIPs: they fill the same maps the TC path looks up).
    let node_port = |port: u16| match (row, port) {
        (Row::FerryEbpfNodePort, 80) => format!(", nodePort: {NODE_PORT_HTTP}"),
        (Row::FerryEbpfNodePort, _) => format!(", nodePort: {NODE_PORT_IPERF}"),
        _ => String::new(),
    };
    let mut add = |name: &str, ip: &str, port: u16, eps: &[&str], np: String| {
        let kind = if np.is_empty() {
            "ClusterIP"
        } else {
            "NodePort"
        };
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{type: {kind}, clusterIP: {ip}, ports: [{{name: p, port: {port}{np}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {port}}}]\nendpoints:\n"
        );
        for e in eps {
            let _ = writeln!(s, "- addresses: [{e}]");
        }
    };
    for i in 0..extra {
        add(
            &format!("x{i}"),
            &format!("198.19.{}.{}", 100 + i / 250, 1 + i % 250),
            80,
            &[BACKENDS[i % 3]],
            String::new(),
        );
    }
    // The socket-LB row is compared with connections from the node straight
    // to the first backend, so its Service has that one endpoint: the
    // comparison then differs only in the translation at connect() (three
    // nginx servers instead of one change the figures on two vCPUs, with
    // keep-alive too, where the socket programs do nothing per request).
    let web: &[&str] = if row == Row::FerryEbpfClusterIp {
        &BACKENDS[..1]
    } else {
        &BACKENDS
    };
    add("web", &row.service_ip(), 80, web, node_port(80));
    add(
        "iperf",
        &row.iperf_ip(),
        5201,
        &[BACKENDS[0]],
        node_port(5201),
    );
    s
}

/// Sets a row up at a scale; returns the programming time, or why the row
/// cannot run here.
fn setup(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
    match row {
        Row::Direct => wait_http(t, row).map(|_| None),
        Row::DirectFromNode => {
            t.cgroup(row).map_err(e)?;
            wait_http(t, row).map(|_| None)
        }
        Row::IptablesLegacy | Row::IptablesNft => {
            let tool = if row == Row::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            };
            let file = t.dir.join(format!("{tool}.rules"));
            std::fs::write(&file, iptables_rules(row, extra)).map_err(|x| x.to_string())?;
            let start = Instant::now();
            sh(t.exec(&node, tool).arg(&file)).map_err(e)?;
            Ok(Some(start.elapsed()))
        }
        Row::Nftables => {
            let file = t.dir.join("nft.rules");
            std::fs::write(&file, nft_rules(row, extra)).map_err(|x| x.to_string())?;
            let start = Instant::now();
            sh(t.exec(&node, "nft").arg("-f").arg(&file)).map_err(e)?;
            Ok(Some(start.elapsed()))
        }
        Row::Ipvs => {
            let probe = t.exec(&node, "ipvsadm").arg("-Ln").output();
            match probe {
                Ok(o) if o.status.success() => {
                    Err("IPVS works here but this harness has no IPVS row yet".into())
                }
                Ok(o) => Err(format!(
                    "IPVS is not available in this kernel ({})",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                )),
                Err(x) => Err(format!("ipvsadm: {x}")),
            }
        }
        Row::Haproxy => {
            if extra > 0 {
                return Err("not a kube-proxy mode: measured at 1 Service only".into());
            }
            for a in [row.service_ip(), row.iperf_ip()] {
                ip(&["-n", &node, "addr", "add", &format!("{a}/32"), "dev", "lo"]).map_err(e)?;
            }
            let cfg = t.dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(row, &t.dir)).map_err(|x| x.to_string())?;
            let mut cmd = t.exec(&node, "haproxy");
            cmd.arg("-f").arg(&cfg).arg("-db");
            t.spawn("haproxy", &mut cmd).map_err(e)?;
            wait_http(t, row).map(|_| None)
        }
        Row::FerryUserspace | Row::FerryEbpfClusterIp | Row::FerryEbpfNodePort => {
            let dir = t.dir.join(format!("ferry-{}", row as u8));
            std::fs::create_dir_all(&dir).map_err(|x| x.to_string())?;
            std::fs::write(dir.join("cluster.yaml"), ferry_yaml(row, extra))
                .map_err(|x| x.to_string())?;
            // The eBPF agent runs in the root mount namespace: `ip netns
            // exec` remounts /sys, hiding bpffs and cgroup2; its socket
            // programs act on the cgroup the row's client joins, whatever
            // its namespace. For the TC path it enters only the node's
            // network namespace, to attach to the node's interfaces.
            let mut cmd = match row {
                Row::FerryUserspace => t.exec(&node, &t.ferry.display().to_string()),
                Row::FerryEbpfNodePort => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/var/run/netns/{node}")).arg(&t.ferry);
                    c
                }
                _ => Command::new(&t.ferry),
            };
            cmd.arg("run")
                .arg(format!(
                    "--source=file:{}",
                    dir.join("cluster.yaml").display()
                ))
                .args([
                    "--hostname-override",
                    "bench-node",
                    "--min-sync-period",
                    "100ms",
                ])
                .args(["--healthz-bind-address", "", "--metrics-bind-address", ""]);
            if row == Row::FerryUserspace {
                cmd.args(["--dataplane", "userspace"]);
            } else {
                let cg = t.cgroup(row).map_err(e)?;
                let interfaces = if row == Row::FerryEbpfNodePort {
                    "n0,br0"
                } else {
                    "none"
                };
                cmd.args(["--dataplane", "ebpf", "--interfaces", interfaces])
                    .arg(format!("--bpffs-path={}", t.pins_for(row).display()))
                    .arg(format!("--cgroup-path={}", cg.display()));
            }
            let start = Instant::now();
            t.spawn(&format!("ferry-{}", row as u8), &mut cmd)
                .map_err(e)?;
            wait_http(t, row)?;
            Ok(Some(start.elapsed()))
        }
    }
}

fn teardown(t: &mut Topo, row: Row) {
    let node = t.node();
    match row {
        Row::IptablesLegacy => {
            let _ = sh(t.exec(&node, "iptables-legacy").args(["-t", "nat", "-F"]));
            let _ = sh(t.exec(&node, "iptables-legacy").args(["-t", "nat", "-X"]));
        }
        Row::IptablesNft => {
            let _ = sh(t.exec(&node, "iptables-nft").args(["-t", "nat", "-F"]));
            let _ = sh(t.exec(&node, "iptables-nft").args(["-t", "nat", "-X"]));
        }
        Row::Nftables => {
            let _ = sh(t
                .exec(&node, "nft")
                .args(["delete", "table", "ip", "ferry-bench-kp"]));
        }
        Row::Haproxy => {
            t.stop("haproxy");
            for a in [row.service_ip(), row.iperf_ip()] {
                let _ = ip(&["-n", &node, "addr", "del", &format!("{a}/32"), "dev", "lo"]);
            }
        }
        Row::FerryUserspace => t.stop(&format!("ferry-{}", row as u8)),
        Row::FerryEbpfClusterIp | Row::FerryEbpfNodePort => {
            t.stop(&format!("ferry-{}", row as u8));
            let _ = Command::new(&t.ferry)
                .args(["cleanup", "--bpffs-path"])
                .arg(t.pins_for(row))
                .output();
        }
        _ => {}
    }
}

/// The command prefix that runs a client program for `row`: in the client
/// namespace, or in the node namespace (inside Ferry's cgroup for the
/// socket-LB row).
fn client_cmd(t: &Topo, row: Row, program: &str, args: &[String]) -> Command {
    let ns = if row.runs_on_node() {
        t.node()
    } else {
        t.client()
    };
    let mut line = String::new();
    if row.runs_on_node() {
        if let Some(cg) = t.cgroups.get(&row) {
            let _ = write!(line, "echo $$ > {}/cgroup.procs && ", cg.display());
        }
    }
    let _ = write!(line, "exec ip netns exec {ns} {program}");
    for a in args {
        let _ = write!(line, " '{a}'");
    }
    let mut c = Command::new("sh");
    c.args(["-c", &line]);
    c
}

/// Waits (60 s at most) until one request through the row succeeds.
fn wait_http(t: &Topo, row: Row) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://{}/", row.http_target());
    loop {
        let out = client_cmd(
            t,
            row,
            "wrk",
            &["-t1".into(), "-c1".into(), "-d1s".into(), url.clone()],
        )
        .output()
        .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && parse_wrk(&text).is_some_and(|w| w.rps > 0.0 && w.errors == 0) {
            return Ok(());
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::Relaxed) {
            let logs: Vec<String> = t
                .procs
                .iter()
                .map(|(name, _)| name.clone())
                .filter(|n| n.starts_with("haproxy") || n.starts_with("ferry"))
                .map(|n| {
                    let text =
                        std::fs::read_to_string(t.dir.join(format!("{n}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(5).collect();
                    format!(
                        "{n}.log: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    )
                })
                .collect();
            return Err(format!(
                "{} never answered: wrk: {} {}; {}",
                row.name(),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                logs.join("; ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut found = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().ok()?;
            found = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            w.p50_ms = parse_duration_ms(v)?;
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_ms = parse_duration_ms(v)?;
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    w.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    found.then_some(w)
}

/// Busy and total jiffies of the machine.
fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// One sample of every metric for a row.
fn measure(t: &Topo, row: Row, s: &Settings) -> Result<BTreeMap<Metric, f64>> {
    let mut out = BTreeMap::new();
    if !s.only_iperf3 {
        measure_wrk(t, row, s, &mut out)?;
    }
    let o = client_cmd(
        t,
        row,
        "iperf3",
        &[
            "-c".into(),
            row.iperf_target(),
            "-p".into(),
            row.iperf_port().to_string(),
            "-t".into(),
            s.seconds.to_string(),
            "-J".into(),
        ],
    )
    .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("{}: iperf3 output", row.name()))?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|x| x.as_f64())
        .with_context(|| format!("{}: iperf3 said {}", row.name(), v["error"]))?;
    out.insert(Metric::ThroughputGbps, bps / 1e9);
    Ok(out)
}

/// The two wrk runs of [`measure`]: keep-alive, then a new connection per
/// request (with the socket-LB row's connect4 cost read around it).
fn measure_wrk(t: &Topo, row: Row, s: &Settings, out: &mut BTreeMap<Metric, f64>) -> Result<()> {
    let url = format!("http://{}/", row.http_target());
    let d = format!("-d{}s", s.seconds);
    let c = format!("-c{}", s.connections);
    let wrk = |extra: &[&str]| -> Result<(Wrk, f64)> {
        let mut args: Vec<String> = vec!["-t1".into(), c.clone(), d.clone(), "--latency".into()];
        args.extend(extra.iter().map(|x| x.to_string()));
        args.push(url.clone());
        let before = cpu_jiffies();
        let o = client_cmd(t, row, "wrk", &args).output()?;
        let after = cpu_jiffies();
        let text = String::from_utf8_lossy(&o.stdout);
        let w = parse_wrk(&text).with_context(|| format!("{}: wrk said {text}", row.name()))?;
        let cpu = 100.0 * (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
        Ok((w, cpu))
    };
    let (ka, _) = wrk(&[])?;
    out.insert(Metric::RpsKeepAlive, ka.rps);
    // The socket-LB row's connect4 program, with the kernel's run-time
    // statistics on for this run only (restored when `_stats_on` drops).
    let connect4 = (row == Row::FerryEbpfClusterIp)
        .then(|| t.cgroups.get(&row))
        .flatten()
        .and_then(|cg| prog_in_cgroup(cg, "ferry_connect4"));
    let _stats_on = connect4.and_then(|_| BpfStats::enable().ok());
    let before = connect4.and_then(prog_run_stats);
    let (nc, cpu) = wrk(&["-H", "Connection: close"])?;
    let after = connect4.and_then(prog_run_stats);
    if let (Some((ns0, n0)), Some((ns1, n1))) = (before, after) {
        if n1 > n0 {
            out.insert(Metric::Connect4Ns, (ns1 - ns0) as f64 / (n1 - n0) as f64);
        }
    }
    out.insert(Metric::RpsNewConnection, nc.rps);
    out.insert(Metric::P50Ms, nc.p50_ms);
    out.insert(Metric::P99Ms, nc.p99_ms);
    out.insert(Metric::NodeCpuPct, cpu);
    out.insert(Metric::Errors, (ka.errors + nc.errors) as f64);
    Ok(())
}

/// kernel.bpf_stats_enabled while alive: the kernel then keeps each
/// program's run time and count (at a small cost per run, so it is on only
/// around the one measurement that reads it).
struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(BPF_STATS).context("reading bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("enabling bpf_stats_enabled")?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.old.trim());
    }
}

/// The ID of the program called `name` attached to cgroup `cg`.
fn prog_in_cgroup(cg: &Path, name: &str) -> Option<u64> {
    let o = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["id"].as_u64())
}

/// (run_time_ns, run_cnt) of a program.
fn prog_run_stats(id: u64) -> Option<(u64, u64)> {
    let o = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    Some((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// Idle connections held open for the memory measurement. Enough that
/// the RSS's granularity does not decide the figure: Ferry's allocator
/// (mimalloc) backs its arena with 2 MiB transparent huge pages, so with
/// 2,000 connections one page more or less moved the result by 1 KiB per
/// connection (2.2 or 3.2 KiB from one start to the next); at 8,000 it is
/// 0.26 KiB. Within HAProxy's maxconn (9,000) and the backends' nginx
/// worker_connections (4,096 each, the connections spread over three).
const IDLE_CONNECTIONS: usize = 8000;

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Memory per idle connection of a proxy process: its RSS with
/// [`IDLE_CONNECTIONS`] idle client connections open (from the client
/// namespace, each accepted and connected to a backend) minus before.
fn idle_memory(t: &Topo, proc_name: &str, target: &str) -> Result<f64> {
    let pid = t
        .procs
        .iter()
        .find(|(n, _)| n == proc_name)
        .map(|(_, c)| c.id())
        .context("no such process")?;
    let before = rss_kib(pid).context("reading RSS")?;
    let ns = format!("/var/run/netns/{}", t.client());
    let addr: std::net::SocketAddr = target.parse()?;
    let conns = std::thread::spawn(move || -> Result<Vec<std::net::TcpStream>> {
        let f = File::open(&ns)?;
        // SAFETY: setns on a valid namespace fd changes only this thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {ns}: {}", std::io::Error::last_os_error());
        }
        let mut v = Vec::with_capacity(IDLE_CONNECTIONS);
        for _ in 0..IDLE_CONNECTIONS {
            v.push(std::net::TcpStream::connect_timeout(
                &addr,
                Duration::from_secs(2),
            )?);
        }
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    std::thread::sleep(Duration::from_millis(1500));
    let after = rss_kib(pid).context("reading RSS")?;
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

/// Samples of one (scale, row, metric).
type Samples = BTreeMap<(usize, Row, Metric), Vec<f64>>;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        })
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    if !deps::is_root() {
        bail!("the dataplane benchmark needs root (network namespaces, eBPF, iptables)");
    }
    let quick = args.iter().any(|a| a == "--quick");
    // --rows a,b: only these (the baselines always run).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    if let Some(only) = &only {
        for k in only {
            if !Row::ALL.iter().any(|r| r.key() == k) {
                let keys: Vec<&str> = Row::ALL.iter().map(|r| r.key()).collect();
                bail!("--rows: unknown row {k:?} (rows: {})", keys.join(", "));
            }
        }
    }
    let rows: Vec<Row> = Row::ALL
        .into_iter()
        .filter(|r| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|k| k == r.key()) || *r == r.baseline())
        })
        .collect();
    let flag = |name: &str| -> Result<Option<u64>> {
        match args.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .map(Some)
                .with_context(|| format!("{name} takes a positive number")),
        }
    };
    let s = Settings {
        quick,
        only_iperf3: args.iter().any(|a| a == "--only-iperf3"),
        seconds: flag("--seconds")?.unwrap_or(if quick { 1 } else { 4 }),
        repeats: flag("--repeats")?.unwrap_or(if quick { 1 } else { 5 }) as usize,
        connections: 32,
        congestion: match args.iter().position(|a| a == "--congestion-control") {
            None => None,
            Some(i) => Some(
                args.get(i + 1)
                    .filter(|v| {
                        !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                    .cloned()
                    .context("--congestion-control takes an algorithm name (e.g. reno, bbr)")?,
            ),
        },
    };
    // --max-services 1: skip the 10,000-Service scale.
    let scales_wanted = flag("--max-services")?;
    let repeats_given = args.iter().any(|a| a == "--repeats");
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    deps::ensure()?;
    deps::ensure_bench_tools()?;
    let ferry = crate::ebpf::build_release_ferry(root)?;
    let tag = format!("ferry-bdp-{}", std::process::id());
    let started = Instant::now();
    let mut t = Topo::build(&tag, ferry, s.congestion.clone())?;
    let mut samples: Samples = BTreeMap::new();
    let mut loads: Vec<f64> = Vec::new();
    let mut unavailable: BTreeMap<Row, String> = BTreeMap::new();
    let mut programming: BTreeMap<(usize, Row), Duration> = BTreeMap::new();
    let mut memory: BTreeMap<Row, f64> = BTreeMap::new();
    let mut changes: BTreeMap<Row, Duration> = BTreeMap::new();
    let scales: Vec<usize> = if quick || scales_wanted == Some(1) {
        vec![0]
    } else {
        vec![0, EXTRA_SERVICES]
    };

    for &extra in &scales {
        // At 1 Service every row is up at once and runs interleave; with
        // 10,000 extra Services one row at a time (they would slow each
        // other's first packets).
        let together = extra == 0;
        let mut ready: Vec<Row> = Vec::new();
        if together {
            for &row in &rows {
                match setup(&mut t, row, extra) {
                    Ok(p) => {
                        if let Some(p) = p {
                            programming.insert((extra, row), p);
                        }
                        ready.push(row);
                    }
                    Err(why) => {
                        eprintln!("  {}: not measured: {why}", row.name());
                        unavailable.entry(row).or_insert(why);
                    }
                }
            }
            // Memory per idle connection first, while the proxies are fresh:
            // after the load runs their allocators hold freed memory that
            // idle connections would reuse without growing the RSS (a
            // second batch of 2,000 grows neither process by 0.2 KiB per
            // connection; Ferry measured 1.2 KiB after ten repeats).
            let userspace_proc = format!("ferry-{}", Row::FerryUserspace as u8);
            for (row, name) in [
                (Row::FerryUserspace, userspace_proc.as_str()),
                (Row::Haproxy, "haproxy"),
            ] {
                if ready.contains(&row) {
                    match idle_memory(&t, name, &row.http_target()) {
                        Ok(kib) => {
                            memory.insert(row, kib);
                        }
                        Err(e) => eprintln!("  {}: idle memory not measured: {e:#}", row.name()),
                    }
                }
            }
            // The socket-LB row runs next to its baseline, so the two see
            // the same machine state.
            ready.sort_by_key(|r| match r {
                Row::FerryEbpfClusterIp => (Row::DirectFromNode, 1),
                r => (*r, 0),
            });
            // One fixed order: a run inherits its predecessor's state (some
            // 27,000 TIME_WAIT sockets on b1 after a new-connection run), so
            // every row keeps the same predecessor in every repeat. (Running
            // every other repeat in reverse measured "direct" twice in a row
            // at each turn, against its own TIME_WAIT sockets, and its
            // new-connection rate fell to 2,500-6,000 req/s.)
            for rep in 0..s.repeats {
                for &row in &ready {
                    check_interrupted()?;
                    eprintln!(
                        "[{:>4.0}s] 1 Service, run {}/{}: {}",
                        started.elapsed().as_secs_f64(),
                        rep + 1,
                        s.repeats,
                        row.name()
                    );
                    loads.push(loadavg());
                    for (m, v) in measure(&t, row, &s)? {
                        samples.entry((extra, row, m)).or_default().push(v);
                    }
                }
            }
            for &row in &ready {
                teardown(&mut t, row);
            }
        } else {
            for &row in &rows {
                check_interrupted()?;
                if unavailable.contains_key(&row) {
                    continue;
                }
                eprintln!(
                    "[{:>4.0}s] programming {extra} extra Services: {}",
                    started.elapsed().as_secs_f64(),
                    row.name()
                );
                match setup(&mut t, row, extra) {
                    Ok(p) => {
                        if let Some(p) = p {
                            programming.insert((extra, row), p);
                        }
                    }
                    Err(why) => {
                        eprintln!("  {}: not measured at {extra}: {why}", row.name());
                        continue;
                    }
                }
                if let Some(d) = time_one_change(&t, row)? {
                    changes.insert(row, d);
                }
                // One row at a time: fewer repeats keep the run under 15 minutes.
                let repeats_at_scale = if repeats_given {
                    s.repeats
                } else {
                    s.repeats.min(3)
                };
                for rep in 0..repeats_at_scale {
                    check_interrupted()?;
                    eprintln!(
                        "[{:>4.0}s] {extra} extra Services, run {}/{}: {}",
                        started.elapsed().as_secs_f64(),
                        rep + 1,
                        repeats_at_scale,
                        row.name()
                    );
                    loads.push(loadavg());
                    for (m, v) in measure(&t, row, &s)? {
                        samples.entry((extra, row, m)).or_default().push(v);
                    }
                }
                teardown(&mut t, row);
            }
        }
    }
    drop(t);
    let report = Report {
        settings: s,
        samples,
        unavailable,
        programming,
        changes,
        memory,
        loads,
        took: started.elapsed(),
    };
    report.write(&root.join("bench-results"))?;
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; everything the harness created was removed");
    }
    Ok(())
}

struct Report {
    settings: Settings,
    samples: Samples,
    unavailable: BTreeMap<Row, String>,
    programming: BTreeMap<(usize, Row), Duration>,
    /// One Service change applied at 10,000 Services.
    changes: BTreeMap<Row, Duration>,
    /// Resident memory per idle connection, KiB.
    memory: BTreeMap<Row, f64>,
    loads: Vec<f64>,
    took: Duration,
}

/// The host's default TCP congestion control, which the harness's
/// namespaces inherit. It shapes the bulk figures: BBR paces every sender,
/// and without the fq qdisc it does so with a kernel timer per burst, so a
/// proxy (a second sender on the path) pays more than forwarding does
/// (docs/BENCHMARKS.md).
fn congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

impl Report {
    fn ratio(&self, extra: usize, row: Row, m: Metric) -> Option<f64> {
        let base = median(self.samples.get(&(extra, row.baseline(), m))?);
        let v = median(self.samples.get(&(extra, row, m))?);
        (base > 0.0).then(|| v / base)
    }

    /// Per-repeat ratios of a row to its baseline at 1 Service, where every
    /// repeat measures both (next to each other for the socket-LB row):
    /// slow drift of the machine cancels out of each pair.
    fn paired_ratios(&self, row: Row, m: Metric) -> Option<Vec<f64>> {
        let base = self.samples.get(&(0, row.baseline(), m))?;
        let v = self.samples.get(&(0, row, m))?;
        (base.len() == v.len() && row != row.baseline()).then(|| {
            v.iter()
                .zip(base)
                .filter(|(_, b)| **b > 0.0)
                .map(|(x, b)| x / b)
                .collect()
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mode = if self.settings.quick { "quick" } else { "full" };
        // CSV: one line per (scale, row, metric).
        let mut csv =
            String::from("services,row,metric,median,min,max,runs,ratio_to_baseline,baseline\n");
        for ((extra, row, m), v) in &self.samples {
            let (lo, hi) = min_max(v);
            let _ = writeln!(
                csv,
                "{},{},{},{:.4},{:.4},{:.4},{},{},{}",
                extra + 1,
                row.name(),
                m.key(),
                median(v),
                lo,
                hi,
                v.len(),
                self.ratio(*extra, *row, *m)
                    .map_or(String::new(), |r| format!("{r:.3}")),
                row.baseline().name()
            );
        }
        std::fs::write(dir.join(format!("dataplane-{mode}.csv")), &csv)?;

        let mut md = String::new();
        let (lmin, lmax) = min_max(&self.loads);
        let _ = writeln!(
            md,
            "`cargo xtask bench dataplane{}`: {} repeat(s) of {} s per metric, wrk -t1 -c{}, medians (min-max), ratio to the baseline row in brackets; load average {:.2}-{:.2} during the runs; TCP congestion control {}; whole run {:.0} s.\n",
            if self.settings.quick { " --quick" } else { "" },
            self.settings.repeats,
            self.settings.seconds,
            self.settings.connections,
            lmin,
            lmax,
            self.settings
                .congestion
                .clone()
                .unwrap_or_else(|| format!("{} (the host's)", congestion_control())),
            self.took.as_secs_f64()
        );
        let scales: Vec<usize> = {
            let mut v: Vec<usize> = self.samples.keys().map(|k| k.0).collect();
            v.dedup();
            v
        };
        for extra in scales {
            let runs = self
                .samples
                .iter()
                .find(|(k, _)| k.0 == extra)
                .map_or(0, |(_, v)| v.len());
            let _ = writeln!(
                md,
                "#### {} Service(s) programmed ({runs} runs per row)\n",
                extra + 1
            );
            let _ = write!(md, "| row |");
            for m in Metric::ALL {
                let _ = write!(md, " {} |", m.name());
            }
            let _ = writeln!(md, "\n|---|{}", "---|".repeat(Metric::ALL.len()));
            for row in Row::ALL {
                if !self.samples.keys().any(|k| k.0 == extra && k.1 == row) {
                    continue;
                }
                let _ = write!(md, "| {} |", row.name());
                for m in Metric::ALL {
                    let Some(v) = self.samples.get(&(extra, row, m)) else {
                        let _ = write!(md, " - |");
                        continue;
                    };
                    let ratio = match (m, self.ratio(extra, row, m)) {
                        (Metric::NodeCpuPct | Metric::Errors, _) | (_, None) => String::new(),
                        (_, Some(r)) => format!(" [{r:.2}x]"),
                    };
                    let _ = write!(md, " {}{ratio} |", summary(v));
                }
                let _ = writeln!(md);
            }
            let _ = writeln!(md);
        }
        let paired_metrics = [
            Metric::RpsKeepAlive,
            Metric::RpsNewConnection,
            Metric::ThroughputGbps,
        ];
        let paired: Vec<(Row, Vec<Option<Vec<f64>>>)> = Row::ALL
            .into_iter()
            .map(|r| (r, paired_metrics.map(|m| self.paired_ratios(r, m)).to_vec()))
            .filter(|(_, v)| v.iter().any(Option::is_some))
            .collect();
        if !paired.is_empty() {
            let _ = write!(md, "Paired ratios at 1 Service: each repeat's figure over its baseline's in the same repeat, median (min-max):\n\n| row |");
            for m in paired_metrics {
                let _ = write!(md, " {} |", m.name());
            }
            let _ = writeln!(md, "\n|---|{}", "---|".repeat(paired_metrics.len()));
            for (row, cols) in paired {
                let _ = write!(md, "| {} |", row.name());
                for c in cols {
                    match c {
                        Some(v) if !v.is_empty() => {
                            let (lo, hi) = min_max(&v);
                            let _ = write!(md, " {:.2}x ({:.2}-{:.2}) |", median(&v), lo, hi);
                        }
                        _ => {
                            let _ = write!(md, " - |");
                        }
                    }
                }
                let _ = writeln!(md);
            }
            let _ = writeln!(md);
        }
        let prog: Vec<(usize, &Vec<f64>)> = self
            .samples
            .iter()
            .filter(|(k, _)| k.2 == Metric::Connect4Ns)
            .map(|(k, v)| (k.0, v))
            .collect();
        if !prog.is_empty() {
            let _ = writeln!(md, "Cost of the socket-LB connect4 program per connect() (kernel.bpf_stats_enabled during the new-connection runs of the socket-LB row):\n\n| Services | ns per connect() |\n|---|---|");
            for (extra, v) in prog {
                let _ = writeln!(md, "| {} | {} |", extra + 1, summary(v));
            }
            let _ = writeln!(md);
        }
        if !self.unavailable.is_empty() {
            let _ = writeln!(md, "Not measured:\n");
            for (row, why) in &self.unavailable {
                let _ = writeln!(md, "- {}: {why}", row.name());
            }
            let _ = writeln!(md);
        }
        if !self.programming.is_empty() {
            let _ = writeln!(md, "Time to program the rules (until the measured Service answers, for Ferry):\n\n| row | Services | time |\n|---|---|---|");
            for ((extra, row), d) in &self.programming {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.3} s |",
                    row.name(),
                    extra + 2,
                    d.as_secs_f64()
                );
            }
        }
        if !self.changes.is_empty() {
            let _ = writeln!(md, "\nOne Service's endpoint changed with {} Services programmed, applied as kube-proxy does today (iptables-restore --noflush of the changed chains; one nft transaction). Ferry's figure is the end-to-end change latency of `cargo xtask bench control-plane`:\n\n| row | time |\n|---|---|", EXTRA_SERVICES + 2);
            for (row, d) in &self.changes {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} ms |",
                    row.name(),
                    d.as_secs_f64() * 1000.0
                );
            }
        }
        if !self.memory.is_empty() {
            let _ = writeln!(md, "\nResident memory per idle connection ({IDLE_CONNECTIONS} idle client connections, each with its backend connection; process RSS only, kernel socket buffers not included):\n\n| row | KiB per connection |\n|---|---|");
            for (row, kib) in &self.memory {
                let _ = writeln!(md, "| {} | {kib:.2} |", row.name());
            }
        }
        std::fs::write(dir.join(format!("dataplane-{mode}.md")), &md)?;
        std::fs::write(dir.join(format!("dataplane-{mode}.svg")), self.svg())?;
        println!("{md}");
        println!("wrote {}/dataplane-{mode}.{{csv,md,svg}}", dir.display());
        Ok(())
    }

    /// Bars per row: ratio to the baseline for the two request rates and
    /// the throughput, at each scale.
    fn svg(&self) -> String {
        let metrics = [
            Metric::RpsKeepAlive,
            Metric::RpsNewConnection,
            Metric::ThroughputGbps,
        ];
        let colors = ["#4477aa", "#ee6677", "#228833"];
        let mut rows: Vec<(usize, Row)> = self.samples.keys().map(|k| (k.0, k.1)).collect();
        rows.dedup();
        let bar_h = 10.0;
        let group_h = bar_h * metrics.len() as f64 + 12.0;
        let left = 330.0;
        let width = 900.0;
        let scale_w = 400.0; // 1.0x
        let height = 60.0 + group_h * rows.len() as f64;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"18\" font-size=\"14\">Ratio to the baseline row (direct; direct from node for socket LB), medians</text>\n"
        );
        for (i, (m, c)) in metrics.iter().zip(colors).enumerate() {
            let x = 10.0 + i as f64 * 200.0;
            let _ = writeln!(s, "<rect x=\"{x}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"37\">{}</text>", x + 14.0, m.name());
        }
        let x1 = left + scale_w;
        let _ = writeln!(s, "<line x1=\"{x1}\" y1=\"45\" x2=\"{x1}\" y2=\"{height}\" stroke=\"#999\" stroke-dasharray=\"3,3\"/><text x=\"{}\" y=\"55\">1.0x</text>", x1 + 3.0);
        for (gi, (extra, row)) in rows.iter().enumerate() {
            let y0 = 60.0 + gi as f64 * group_h;
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{}\">{} ({} Svc)</text>",
                y0 + group_h / 2.0,
                row.name(),
                extra + 1
            );
            for (mi, (m, c)) in metrics.iter().zip(colors).enumerate() {
                let r = self.ratio(*extra, *row, *m).unwrap_or(0.0).min(2.0);
                let y = y0 + mi as f64 * bar_h;
                let _ = writeln!(
                    s,
                    "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"9\">{r:.2}</text>",
                    r * scale_w,
                    bar_h - 1.0,
                    left + r * scale_w + 3.0,
                    y + bar_h - 2.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

/// "median (min-max)" of samples, as the tables show them.
fn summary(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{} ({}-{})", fmt(median(v)), fmt(lo), fmt(hi))
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 1s test @ http://x/\n  Latency Distribution\n     50%  120.00us\n     75%  1.20ms\n     90%  2.00ms\n     99%    1.50s\n  1000 requests in 1.00s, 1 MB read\n  Socket errors: connect 2, read 1, write 0, timeout 0\nRequests/sec:   1000.50\nTransfer/sec:      1MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.rps, 1000.5);
        assert!((w.p50_ms - 0.12).abs() < 1e-9);
        assert_eq!(w.p99_ms, 1500.0);
        assert_eq!(w.errors, 3);
        assert!(parse_wrk("nothing").is_none());
    }

    #[test]
    fn rules_put_the_measured_service_last() {
        let r = iptables_rules(Row::IptablesLegacy, 3);
        let last_svc = r.rfind("-A KUBE-SERVICES").unwrap();
        assert!(r[last_svc..].contains("--dport 5201"));
        assert!(
            r.find("198.19.100.1/32").unwrap() < r.find(&Row::IptablesLegacy.service_ip()).unwrap()
        );
        let n = nft_rules(Row::Nftables, 2);
        assert!(n.contains("numgen random mod 3"));
        assert!(n.contains("198.19.100.2 . tcp . 80 : goto svc-x1"));
        let (tool, args, change) = one_change(Row::IptablesNft).unwrap();
        assert_eq!((tool, args), ("iptables-nft-restore", vec!["--noflush"]));
        assert!(change.contains(":KUBE-SEP-X0") && change.ends_with("COMMIT\n"));
        assert!(one_change(Row::Nftables)
            .unwrap()
            .2
            .contains("flush chain ip ferry-bench-kp svc-x0"));
        assert!(one_change(Row::Haproxy).is_none());
        let y = ferry_yaml(Row::FerryUserspace, 2);
        assert_eq!(y.matches("kind: Service\n").count(), 4);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
