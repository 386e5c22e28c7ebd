//! `cargo xtask demo`: a small "cluster" in network namespaces (a node with
//! a bridge, three backend pods running a tiny HTTP server), Service and
//! EndpointSlice YAML for a ClusterIP and a NodePort Service, `ferry run
//! --source file:...` with the eBPF dataplane, bounded traffic with a live
//! per-backend table, then one endpoint removed while traffic flows. Every
//! namespace, cgroup, pin and process is removed at the end, also on error
//! or Ctrl-C. Without root (or with `--userspace`) the same story runs on
//! loopback with the userspace dataplane: no namespace, no privilege.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::{bridge_port, cgroup2_root, ip};
use crate::{deps, ebpf};

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
    namespaces: Vec<String>,
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

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace fd changes only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

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
        let full = format!("{}-{name}", self.tag);
        ip(&["netns", "add", &full])?;
        self.namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        Ok(full)
    }

    /// The userspace variant's set-up: backends on loopback, the agent
    /// with `--dataplane userspace`.
    fn start_userspace(&mut self, ferry: &Path) -> Result<()> {
        let net = self.net;
        println!(
            "== the cluster on loopback: node {}, pods {:?} (HTTP on :{})",
            net.node_ip, net.pods, net.target_port
        );
        for (i, pod_ip) in net.pods.iter().enumerate() {
            let listener = TcpListener::bind((*pod_ip, net.target_port))
                .with_context(|| format!("binding {pod_ip}:{}", net.target_port))?;
            serve_http(
                listener,
                format!("pod-{}", i + 1),
                self.stop_servers.clone(),
            );
        }
        self.write_yaml(&net.pods)?;
        println!(
            "== starting ferry run --dataplane userspace --source file:{}",
            self.dir.display()
        );
        let log = File::create(self.dir.join("ferry.log"))?;
        // As root, the agent still runs unprivileged (as nobody): the
        // userspace dataplane needs no privilege on loopback.
        let mut cmd = if deps::is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(ferry);
            println!("== (root: the agent runs as nobody via setpriv)");
            c
        } else {
            Command::new(ferry)
        };
        let child = cmd
            .args([
                "run",
                "--dataplane",
                "userspace",
                "--hostname-override",
                "node-demo",
            ])
            .arg(format!("--source=file:{}", self.dir.display()))
            .args(["--min-sync-period", "100ms"])
            .args([
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                DEMO_METRICS,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        self.agent = Some(child);
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

    /// The eBPF variant's set-up; returns the node namespace the client
    /// runs in.
    fn start_namespaces(&mut self, ferry: &Path) -> Result<String> {
        const PODS: [&str; 3] = NAMESPACES.pods;
        const NODE_IP: &str = NAMESPACES.node_ip;
        println!("== building the cluster: node {NODE_IP} (bridge), pods {PODS:?}");
        let node = self.netns("node")?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        for (i, pod_ip) in PODS.iter().enumerate() {
            let pod = self.netns(&format!("pod{}", i + 1))?;
            bridge_port(
                &node,
                &format!("veth{}", i + 1),
                &pod,
                &format!("{pod_ip}/24"),
                None,
            )?;
            let name = format!("pod-{}", i + 1);
            let listener = in_netns(&pod, || Ok(TcpListener::bind("0.0.0.0:8080")?))?;
            serve_http(listener, name, self.stop_servers.clone());
        }

        let cgroup = self.cgroup_root.join(&self.tag);
        std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        self.cgroup = Some(cgroup.clone());
        self.write_yaml(&PODS)?;

        println!("== starting ferry run --source file:{}", self.dir.display());
        let log = File::create(self.dir.join("ferry.log"))?;
        let child = Command::new(ferry)
            .args([
                "run",
                "--dataplane",
                "ebpf",
                // The host's own interfaces stay untouched by the demo.
                "--interfaces",
                "none",
                "--hostname-override",
                "node-demo",
            ])
            .arg(format!("--source=file:{}", self.dir.display()))
            .arg(format!("--bpffs-path={}", self.pins.display()))
            .arg(format!("--cgroup-path={}", cgroup.display()))
            .args(["--min-sync-period", "100ms"])
            .args([
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        self.agent = Some(child);

        // This process becomes the client: it joins the cgroup the
        // socket-level programs are attached to and talks from the node.
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(node)
    }

    fn write_yaml(&self, pods: &[&str]) -> Result<()> {
        let Net {
            node_ip,
            cluster_ip,
            second_cluster_ip,
            port,
            target_port,
            node_port,
            ..
        } = *self.net;
        let services = format!(
            r#"apiVersion: v1
kind: Node
metadata:
  name: node-demo
status:
  addresses:
  - {{type: InternalIP, address: {node_ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: {port}, targetPort: {target_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-nodeport, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {second_cluster_ip}
  ports: [{{name: http, port: {port}, targetPort: {target_port}, nodePort: {node_port}}}]
"#
        );
        let mut slices = String::new();
        for svc in ["web", "web-nodeport"] {
            let endpoints: Vec<String> = pods
                .iter()
                .map(|ip| {
                    format!(
                        "- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node-demo}}"
                    )
                })
                .collect();
            slices.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: {target_port}}}]\nendpoints:\n{}\n",
                endpoints.join("\n")
            ));
        }
        std::fs::write(self.dir.join("services.yaml"), services)?;
        // Write then rename: the agent never reads half a file.
        let tmp = self.dir.join(".slices.yaml.tmp");
        std::fs::write(&tmp, slices)?;
        std::fs::rename(&tmp, self.dir.join("slices.yaml"))?;
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
                        .and_then(|r| r["backends"].as_array().map(|b| b.len()))
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
        for ns in self.namespaces.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
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

/// A tiny HTTP server answering with its pod name (bounded: stops with the
/// demo, at most 10 minutes).
fn serve_http(listener: TcpListener, name: String, stop: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let body = format!("{name}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
}

#[derive(Default)]
struct Tally {
    per_backend: BTreeMap<String, u32>,
    failed: u32,
    done: u32,
}

fn lock(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tally_done(t: &Mutex<Tally>) -> u32 {
    lock(t).done
}

fn pod3(t: &Mutex<Tally>) -> u32 {
    lock(t).per_backend.get("pod-3").copied().unwrap_or(0)
}

/// `count` HTTP requests from the node namespace on a thread, a new
/// connection each, alternating ClusterIP and NodePort, with a live table.
fn traffic(
    node_ns: Option<String>,
    targets: [SocketAddr; 2],
    count: u32,
    tally: Arc<Mutex<Tally>>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        if let Some(node_ns) = node_ns {
            let path = format!("/var/run/netns/{node_ns}");
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd changes only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
        }
        for i in 0..count {
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let result = get(targets[i as usize % 2]);
            let mut t = lock(&tally);
            match result {
                Ok(pod) => *t.per_backend.entry(pod).or_insert(0) += 1,
                Err(_) => t.failed += 1,
            }
            t.done += 1;
            if t.done.is_multiple_of(20) || t.done == count {
                let cells: Vec<String> = t
                    .per_backend
                    .iter()
                    .map(|(p, n)| format!("{p}: {n:>4}"))
                    .collect();
                print!(
                    "\r  [{:>3}/{count}] {}   failed: {}",
                    t.done,
                    cells.join("  "),
                    t.failed
                );
                let _ = std::io::stdout().flush();
            }
            drop(t);
            // Pace the requests so the change lands mid-stream.
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
}

fn get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    Ok(body.trim().to_string())
}
