//! `cargo xtask cluster build|up|down|status|kubeconfig`: a real Kubernetes
//! cluster (one control plane, two workers, no kube-proxy) whose nodes are
//! network namespaces on a test bridge, each with its own containerd,
//! kubelet, mounts and cgroup subtree, built from the Go modules pinned
//! under tools/cluster/, with Ferry installed from deploy/ as its only
//! service proxy. docs/cluster.md is the walkthrough.

mod build;
mod conformance;
mod control;
mod images;
pub mod init;
mod kubelet;
mod latency;
pub mod node;
mod observe;
mod pki;
mod poll;
pub mod story;
mod traffic;
mod up;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use build::run as build;

/// The Kubernetes release every program is built at (tools/cluster/kubernetes).
pub const KUBERNETES: &str = "v1.37.2";

/// The namespace holding the test bridge (the cluster's switch).
pub const SWITCH_NS: &str = "fc-net";
/// A namespace on the bridge for clients outside the cluster (kubectl, the
/// e2e tests, NodePort and LoadBalancer traffic).
pub const CLIENT_NS: &str = "fc-client";
/// The bridge's own address: every namespace's default route, leading
/// nowhere, so the test network has no way out.
pub const GATEWAY: &str = "198.18.0.1";
pub const CLIENT_IP: &str = "198.18.0.100";
pub const CONTROL_PLANE_IP: &str = "198.18.0.2";
pub const API_PORT: u16 = 6443;
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
pub const KUBERNETES_SERVICE_IP: &str = "198.19.0.1";
pub const DNS_SERVICE_IP: &str = "198.19.0.10";
/// Pod addresses; each node gets a /24 of it from the controller manager.
pub const CLUSTER_CIDR: &str = "198.18.16.0/20";

/// One machine of the cluster.
#[derive(Debug)]
pub struct NodeSpec {
    pub name: &'static str,
    /// Its network namespace.
    pub ns: &'static str,
    pub ip: &'static str,
}

/// The first node is the control plane; all three are schedulable (no
/// taint), so the e2e tests that want three schedulable nodes run.
pub const NODES: [NodeSpec; 3] = [
    NodeSpec {
        name: "ferry-control-plane",
        ns: "fc-cp",
        ip: CONTROL_PLANE_IP,
    },
    NodeSpec {
        name: "ferry-worker",
        ns: "fc-w1",
        ip: "198.18.0.3",
    },
    NodeSpec {
        name: "ferry-worker2",
        ns: "fc-w2",
        ip: "198.18.0.4",
    },
];

/// Where a cluster keeps its state: certificates, kubeconfigs, etcd, each
/// node's directories, logs and PIDs.
#[derive(Debug, Clone)]
pub struct Layout {
    pub state: PathBuf,
    /// The built programs (build::bin_dir).
    pub bin: PathBuf,
}

impl Layout {
    pub fn new() -> Self {
        let bin = build::bin_dir();
        let state = std::env::var_os("FERRY_CLUSTER_STATE")
            .map_or_else(|| PathBuf::from("/var/lib/ferry-cluster"), PathBuf::from);
        Self { state, bin }
    }
    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    pub fn node(&self, name: &str) -> PathBuf {
        self.state.join("nodes").join(name)
    }
    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    pub fn log(&self, node: &str, what: &str) -> PathBuf {
        self.logs().join(format!("{node}-{what}.log"))
    }
    pub fn pid_file(&self, node: &str, what: &str) -> PathBuf {
        self.node(node).join(format!("{what}.pid"))
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state.join("admin.kubeconfig")
    }
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
    /// kubectl in namespace `ns`.
    pub fn kubectl_ns(&self, ns: &str) -> Command {
        let mut cmd = self.kubectl();
        cmd.args(["-n", ns]);
        cmd
    }
    /// Creates `dir` on the host as a mount point for the nodes, recording
    /// it when it was not there so `down` removes it again.
    pub fn mount_point(&self, dir: &Path) -> Result<()> {
        if dir.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let list = self.state.join("mount-points");
        let mut text = std::fs::read_to_string(&list).unwrap_or_default();
        text.push_str(&format!("{}\n", dir.display()));
        std::fs::write(list, text)?;
        Ok(())
    }
    /// kubectl (the one built at the cluster's release) as the admin, run
    /// in the client namespace: the API server is only on the test network.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{CLIENT_NS}"))
            .arg(self.program("kubectl"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig());
        cmd
    }
}

const USAGE: &str =
    "usage: cargo xtask cluster build|up|down|status|kubeconfig|story|conformance [--ci|--focus REGEX]";

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("build") => build(root),
        Some("up") => {
            build(root)?;
            let layout = Layout::new();
            up::up(root, &layout)
        }
        Some("down") => {
            down(&Layout::new());
            Ok(())
        }
        Some("status") => status(&Layout::new()),
        Some("kubeconfig") => {
            let layout = Layout::new();
            let text = std::fs::read_to_string(layout.admin_kubeconfig())
                .context("no cluster is up (cargo xtask cluster up)")?;
            print!("{text}");
            Ok(())
        }
        Some("conformance") => {
            build(root)?;
            let layout = Layout::new();
            let focus = args.iter().position(|a| a == "--focus");
            let selection = match focus.map(|i| args.get(i + 1)) {
                Some(Some(re)) => conformance::Selection::Focus(re.clone()),
                Some(None) => bail!("--focus needs a regular expression\n{USAGE}"),
                None if args.iter().any(|a| a == "--ci") => conformance::Selection::Ci,
                None => conformance::Selection::Full,
            };
            conformance::run(root, &layout, &selection)
        }
        Some("story") => {
            build(root)?;
            let layout = Layout::new();
            story::run(root, &layout).map(|_| ())
        }
        Some("__init") => init::run(&args[1..]),
        other => bail!("{USAGE} (got {other:?})"),
    }
}

/// `cargo xtask demo --cluster`: the story on a cluster brought up for it
/// (or on the one already up, which is then left running).
pub fn demo(root: &Path) -> Result<()> {
    build(root)?;
    let layout = Layout::new();
    let ours = !layout.state.exists();
    if ours {
        up::up(root, &layout)?;
    }
    let result = story::run(root, &layout).map(|_| ());
    if ours {
        down(&layout);
    }
    result
}

/// The cluster part of `cargo xtask test`: build (or reuse) the programs,
/// bring a cluster up, run the story and the conformance subset, and take
/// it down again whatever happened.
pub fn ci(root: &Path) -> Result<()> {
    build(root)?;
    let layout = Layout::new();
    if layout.state.exists() {
        eprintln!("xtask: cluster: removing a cluster left behind");
        down(&layout);
    }
    up::up(root, &layout)?;
    let result = story::run(root, &layout)
        .and_then(|_| conformance::run(root, &layout, &conformance::Selection::Ci));
    down(&layout);
    result
}

/// Removes everything `up` made: node processes, namespaces, cgroups, mount
/// points and the state directory (its logs are kept under target/).
pub fn down(layout: &Layout) {
    node::destroy(layout);
    if let Ok(list) = std::fs::read_to_string(layout.state.join("mount-points")) {
        for dir in list.lines().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    let kept = crate::workspace_root().join("target/cluster-logs");
    if layout.logs().is_dir() {
        let _ = std::fs::remove_dir_all(&kept);
        let _ = std::fs::create_dir_all(kept.parent().unwrap_or(Path::new("/tmp")));
        let _ = std::fs::rename(layout.logs(), &kept);
    }
    if let Err(err) = std::fs::remove_dir_all(&layout.state) {
        if err.kind() != std::io::ErrorKind::NotFound {
            eprintln!("xtask: cluster: removing {}: {err}", layout.state.display());
        }
    }
    eprintln!("xtask: cluster: down (logs in {})", kept.display());
}

fn status(layout: &Layout) -> Result<()> {
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"][..],
    ] {
        crate::run(layout.kubectl().args(args))?;
    }
    Ok(())
}
