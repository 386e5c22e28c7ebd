//! The benchmark's namespace topology (client, node, backends), and setting
//! up, changing and removing one row on it.

use super::measure::parse_wrk;
use super::rows::{ferry_yaml, haproxy_config, iptables_rules, nft_rules, one_change, Row};
use super::{BACKENDS, INTERRUPTED};
use crate::host::{bridge_port, ip, sh, terminate};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Everything the harness created; removed on drop.
pub(super) struct Topo {
    pub(super) tag: String,
    pub(super) dir: PathBuf,
    pub(super) namespaces: Vec<String>,
    pub(super) procs: Vec<(String, Child)>,
    /// cgroups the harness made: one per eBPF row (its socket programs act
    /// there) and one for the from-node baseline (same depth, no programs).
    pub(super) cgroups: BTreeMap<Row, PathBuf>,
    pub(super) pins: PathBuf,
    pub(super) ferry: PathBuf,
    /// --congestion-control, set in every namespace.
    pub(super) congestion: Option<String>,
}

pub(super) fn ns_name(tag: &str, n: &str) -> String {
    format!("{tag}-{n}")
}

impl Topo {
    pub(super) fn node(&self) -> String {
        ns_name(&self.tag, "node")
    }

    pub(super) fn client(&self) -> String {
        ns_name(&self.tag, "client")
    }

    pub(super) fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    pub(super) fn add_ns(&mut self, n: &str) -> Result<String> {
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

    pub(super) fn spawn(&mut self, what: &str, cmd: &mut Command) -> Result<()> {
        let log = File::create(self.dir.join(format!("{what}.log")))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.procs.push((what.to_string(), child));
        Ok(())
    }

    pub(super) fn stop(&mut self, what: &str) {
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

    pub(super) fn build(tag: &str, ferry: PathBuf, congestion: Option<String>) -> Result<Topo> {
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
    pub(super) fn cgroup(&mut self, row: Row) -> Result<PathBuf> {
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
    pub(super) fn pins_for(&self, row: Row) -> PathBuf {
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

/// Times [`one_change`] for a row programmed with its extra Services.
pub(super) fn time_one_change(t: &Topo, row: Row) -> Result<Option<Duration>> {
    let Some((tool, args, input)) = one_change(row) else {
        return Ok(None);
    };
    let file = t.dir.join(format!("{tool}.change"));
    std::fs::write(&file, input)?;
    let start = Instant::now();
    sh(t.exec(&t.node(), tool).args(&args).arg(&file))?;
    Ok(Some(start.elapsed()))
}

/// Sets a row up at a scale; returns the programming time, or why the row
/// cannot run here.
pub(super) fn setup(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    match row {
        Row::Direct => wait_http(t, row).map(|_| None),
        Row::DirectFromNode => {
            t.cgroup(row).map_err(|e| format!("{e:#}"))?;
            wait_http(t, row).map(|_| None)
        }
        Row::IptablesLegacy | Row::IptablesNft => setup_iptables(t, row, extra),
        Row::Nftables => setup_nftables(t, row, extra),
        Row::Ipvs => ipvs_unavailable(t),
        Row::Haproxy => setup_haproxy(t, row, extra),
        Row::FerryUserspace | Row::FerryEbpfClusterIp | Row::FerryEbpfNodePort => {
            setup_ferry(t, row, extra)
        }
    }
}

/// kube-proxy's iptables mode: the rules loaded in one restore, timed.
fn setup_iptables(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
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

/// kube-proxy's nftables mode: one transaction, timed.
fn setup_nftables(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
    let file = t.dir.join("nft.rules");
    std::fs::write(&file, nft_rules(row, extra)).map_err(|x| x.to_string())?;
    let start = Instant::now();
    sh(t.exec(&node, "nft").arg("-f").arg(&file)).map_err(e)?;
    Ok(Some(start.elapsed()))
}

/// Why the IPVS row is not measured here.
fn ipvs_unavailable(t: &mut Topo) -> Result<Option<Duration>, String> {
    let node = t.node();
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

/// HAProxy on the node (1 Service only: not a kube-proxy mode).
fn setup_haproxy(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
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

/// Ferry from a file source: userspace, or eBPF (socket-level in the
/// row's cgroup, or TC on the node's interfaces); timed until it serves.
fn setup_ferry(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
    let dir = t.dir.join(format!("ferry-{}", row as u8));
    std::fs::create_dir_all(&dir).map_err(|x| x.to_string())?;
    std::fs::write(dir.join("cluster.yaml"), ferry_yaml(row, extra)).map_err(|x| x.to_string())?;
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

pub(super) fn teardown(t: &mut Topo, row: Row) {
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
pub(super) fn client_cmd(t: &Topo, row: Row, program: &str, args: &[String]) -> Command {
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
pub(super) fn wait_http(t: &Topo, row: Row) -> Result<(), String> {
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
