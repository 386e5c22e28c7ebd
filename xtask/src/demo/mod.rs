//! `cargo xtask demo`: a small "cluster" in network namespaces (a node with
//! a bridge, three backend pods running a tiny HTTP server), Service and
//! EndpointSlice YAML for a ClusterIP and a NodePort Service, `ferry run
//! --source file:...` with the eBPF dataplane, bounded traffic with a live
//! per-backend table, then one endpoint removed while traffic flows. Every
//! namespace, cgroup, pin and process is removed at the end, also on error
//! or Ctrl-C. Without root (or with `--userspace`) the same story runs on
//! loopback with the userspace dataplane: no namespace, no privilege.

use anyhow::{bail, Result};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::cgroup2_root;
use crate::{deps, ebpf};

mod start;
mod traffic;
use traffic::{lock, pod3, tally_done, traffic, Tally};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

const TOTAL_REQUESTS: u32 = 800;

/// The demo's addresses: in namespaces (eBPF) or on loopback (userspace).
struct Net {
    pods: [&'static str; 3],
    node_ip: &'static str,
    cluster_ip: &'static str,
    second_cluster_ip: &'static str,
    port: u16,
    target_port: u16,
    node_port: u16,
}

const NAMESPACES: Net = Net {
    pods: ["198.18.0.11", "198.18.0.12", "198.18.0.13"],
    node_ip: "198.18.0.1",
    cluster_ip: "198.19.0.10",
    second_cluster_ip: "198.19.0.11",
    port: 80,
    target_port: 8080,
    node_port: 30080,
};

const LOOPBACK: Net = Net {
    pods: ["127.0.40.11", "127.0.40.12", "127.0.40.13"],
    node_ip: "127.0.40.1",
    cluster_ip: "127.0.40.10",
    second_cluster_ip: "127.0.40.20",
    port: 18000,
    target_port: 18080,
    node_port: 30080,
};

/// The userspace agent's metrics address (`ferry services` asks it).
const DEMO_METRICS: &str = "127.0.40.1:18249";

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--cluster") {
        return crate::cluster::demo(root);
    }
    let userspace = args.iter().any(|a| a == "--userspace") || !deps::is_root();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if !userspace {
        deps::ensure()?;
        ebpf::build(root)?;
    } else if !deps::is_root() {
        println!("== not root: the demo runs on loopback with the userspace dataplane");
    }
    let mut build = Command::new(deps::cargo());
    build
        .current_dir(root)
        .args(["build", "--locked", "-p", "ferry-proxy", "--bin", "ferry"]);
    // The eBPF object is embedded when it exists (always for the eBPF demo;
    // for the userspace one it keeps the build flags of `cargo xtask test`,
    // so nothing is rebuilt).
    if ebpf::object_path(root).is_file() {
        build.env("FERRY_EBPF_OBJECT", ebpf::object_path(root));
    }
    crate::run(&mut build)?;
    let ferry = root.join("target/debug/ferry");
    let tag = format!("ferry-demo-{}", std::process::id());
    let mut demo = Demo::new(&tag, userspace)?;
    let result = demo.play(&ferry);
    demo.cleanup(&ferry);
    result
}

/// Everything the demo created, removed by `cleanup` (or on drop).
struct Demo {
    tag: String,
    namespaces: Vec<Netns>,
    dir: PathBuf,
    pins: PathBuf,
    cgroup: Option<PathBuf>,
    cgroup_root: PathBuf,
    agent: Option<Child>,
    stop_servers: Arc<AtomicBool>,
    cleaned: bool,
    userspace: bool,
    net: &'static Net,
}

use ferry_netns::{run_in as in_netns, Netns};

impl Demo {
    fn new(tag: &str, userspace: bool) -> Result<Demo> {
        let dir = std::env::temp_dir().join(tag);
        std::fs::create_dir_all(&dir)?;
        Ok(Demo {
            tag: tag.into(),
            namespaces: Vec::new(),
            pins: if userspace {
                dir.join("no-bpffs")
            } else {
                PathBuf::from("/sys/fs/bpf").join(tag)
            },
            cgroup: None,
            cgroup_root: if userspace {
                PathBuf::new()
            } else {
                cgroup2_root()?
            },
            userspace,
            net: if userspace { &LOOPBACK } else { &NAMESPACES },
            dir,
            agent: None,
            stop_servers: Arc::new(AtomicBool::new(false)),
            cleaned: false,
        })
    }

    fn netns(&mut self, name: &str) -> Result<String> {
        let ns = Netns::named(&format!("{}-{name}", self.tag))?;
        let full = ns.name().to_string();
        self.namespaces.push(ns);
        Ok(full)
    }

    /// `ferry explain` for a client of the NodePort, from the pinned maps.
    fn explain(&self, ferry: &Path) -> Result<()> {
        let (node_ip, node_port) = (self.net.node_ip, self.net.node_port);
        let explain = Command::new(ferry)
            .args([
                "explain",
                "198.18.0.1:40000",
                &format!("{node_ip}:{node_port}/TCP"),
                "--bpffs-path",
            ])
            .arg(&self.pins)
            .output()?;
        println!(
            "$ ferry explain 198.18.0.1:40000 {node_ip}:{node_port}/TCP\n{}",
            String::from_utf8_lossy(&explain.stdout)
        );
        Ok(())
    }

    fn play(&mut self, ferry: &Path) -> Result<()> {
        let net = self.net;
        let (node_ip, cluster_ip, node_port, port) =
            (net.node_ip, net.cluster_ip, net.node_port, net.port);
        let node = if self.userspace {
            self.start_userspace(ferry)?;
            None
        } else {
            Some(self.start_namespaces(ferry)?)
        };
        self.wait_for_backends(ferry, 3)?;
        println!("{}", self.services(ferry)?);

        println!("== {TOTAL_REQUESTS} requests, a new connection each, alternating ClusterIP {cluster_ip}:{port} and NodePort {node_ip}:{node_port}");
        let tally = Arc::new(Mutex::new(Tally::default()));
        let targets: [SocketAddr; 2] = [
            format!("{cluster_ip}:{port}").parse()?,
            format!("{node_ip}:{node_port}").parse()?,
        ];
        let client = traffic(node.clone(), targets, TOTAL_REQUESTS, tally.clone());
        // Halfway through, while traffic flows, pod-3 leaves the Service.
        while tally_done(&tally) < TOTAL_REQUESTS / 2 && !client.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("\n== removing pod-3's endpoint from the EndpointSlice while traffic flows (pod-3 keeps running)");
        self.write_yaml(&net.pods[..2])?;
        self.wait_for_backends(ferry, 2)?;
        let pod3_at_switch = pod3(&tally);
        println!("== ferry programmed the change; pod-3 had served {pod3_at_switch} requests");
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        println!("\n\n{}", self.services(ferry)?);
        if !self.userspace {
            self.explain(ferry)?;
        }
        let t = lock(&tally);
        let pod3_total = t.per_backend.get("pod-3").copied().unwrap_or(0);
        println!(
            "== result: {} requests, {} failed; pod-3 got {} new connections after the change was programmed",
            t.done,
            t.failed,
            pod3_total - pod3_at_switch
        );
        if t.failed > 0 || pod3_total != pod3_at_switch || t.per_backend.len() != 3 {
            bail!(
                "the demo did not behave as expected; ferry's log: {}",
                self.dir.join("ferry.log").display()
            );
        }
        Ok(())
    }

    fn services(&self, ferry: &Path) -> Result<String> {
        let out = Command::new(ferry)
            .args([
                "services",
                "--metrics-address",
                DEMO_METRICS,
                "--bpffs-path",
            ])
            .arg(&self.pins)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (at most 15 s) until the ClusterIP has `n` backends in the maps.
    fn wait_for_backends(&mut self, ferry: &Path, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
            if let Some(agent) = self.agent.as_mut() {
                if let Some(status) = agent.try_wait()? {
                    bail!(
                        "ferry exited ({status}); its log: {}",
                        self.dir.join("ferry.log").display()
                    );
                }
            }
            let out = Command::new(ferry)
                .args([
                    "services",
                    "-o",
                    "json",
                    "--metrics-address",
                    DEMO_METRICS,
                    "--bpffs-path",
                ])
                .arg(&self.pins)
                .output()?;
            if let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let count = rows.as_array().and_then(|rows| {
                    rows.iter()
                        .find(|r| {
                            r["frontend"]
                                == format!("{}:{}/TCP", self.net.cluster_ip, self.net.port)
                        })
                        .and_then(|r| r["backends"].as_array().map(std::vec::Vec::len))
                });
                if count == Some(n) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "ferry did not program {n} backends in time; its log: {}",
            self.dir.join("ferry.log").display()
        )
    }

    fn cleanup(&mut self, ferry: &Path) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        self.stop_servers.store(true, Ordering::Relaxed);
        if let Some(mut agent) = self.agent.take() {
            crate::host::terminate(&mut agent, Duration::from_secs(5));
        }
        let _ = Command::new(ferry)
            .args(["cleanup", "--bpffs-path"])
            .arg(&self.pins)
            .output();
        if let Some(cg) = self.cgroup.take() {
            let _ = std::fs::write(
                self.cgroup_root.join("cgroup.procs"),
                std::process::id().to_string(),
            );
            let _ = std::fs::remove_dir(&cg);
        }
        // Deleted on drop.
        self.namespaces.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        println!("== cleaned up: namespaces, cgroup, pinned maps and links, ferry");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let ferry = PathBuf::from("ferry");
        self.cleanup(&ferry);
    }
}
