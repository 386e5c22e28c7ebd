//! The benchmark's namespace topology (client, node, backends): made,
//! entered and removed (on drop).

use super::rows::Row;
use super::BACKENDS;
use crate::host::{bridge_port, ip, sh, terminate};
use anyhow::{Context, Result};
use ferry_netns::Netns;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Everything the harness created; removed on drop.
pub(super) struct Topo {
    pub(super) tag: String,
    pub(super) dir: PathBuf,
    pub(super) namespaces: Vec<Netns>,
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

pub(super) use ferry_netns::command_in as ns_exec;

impl Topo {
    pub(super) fn node(&self) -> String {
        ns_name(&self.tag, "node")
    }

    pub(super) fn client(&self) -> String {
        ns_name(&self.tag, "client")
    }

    pub(super) fn add_ns(&mut self, n: &str) -> Result<String> {
        let ns = Netns::named(&ns_name(&self.tag, n))?;
        let name = ns.name().to_string();
        self.namespaces.push(ns);
        // Before any socket exists: sockets take the namespace's default
        // when they are created.
        if let Some(cc) = &self.congestion {
            sh(ns_exec(&name, "sh").args([
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
        sh(ns_exec(&node, "sh").args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        for (i, addr) in BACKENDS.iter().enumerate() {
            t.backend(&node, i + 1, addr)?;
        }
        Ok(t)
    }

    /// Backend `n` (from 1): a namespace on the node's bridge running
    /// nginx at `addr`:80 (the first one iperf3 too).
    fn backend(&mut self, node: &str, n: usize, addr: &str) -> Result<()> {
        let b = self.add_ns(&format!("b{n}"))?;
        bridge_port(
            node,
            &format!("vb{n}"),
            &b,
            &format!("{addr}/24"),
            Some("198.18.1.1"),
        )?;
        let conf = self.dir.join(format!("nginx-b{n}.conf"));
        let run = self.dir.join(format!("nginx-b{n}"));
        std::fs::create_dir_all(&run)?;
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {run};\n  proxy_temp_path {run};\n  fastcgi_temp_path {run};\n  uwsgi_temp_path {run};\n  scgi_temp_path {run};\n  keepalive_requests 1000000;\n  server {{ listen {addr}:80 reuseport backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
                run = run.display()
            ),
        )?;
        let mut cmd = ns_exec(&b, "nginx");
        cmd.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
        self.spawn(&format!("nginx-b{n}"), &mut cmd)?;
        if n == 1 {
            let mut cmd = ns_exec(&b, "iperf3");
            cmd.args(["-s", "-p", "5201"]);
            self.spawn("iperf3-server", &mut cmd)?;
        }
        Ok(())
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
        // Deleted on drop.
        self.namespaces.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
