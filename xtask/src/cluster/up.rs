//! `cargo xtask cluster up`: certificates, images, the test network, the
//! nodes, the control plane, containerd and kubelets, the pod network,
//! CoreDNS, then Ferry from deploy/ and a LoadBalancer pool; everything is
//! removed again when a step fails.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

use super::poll::poll;
use super::{control, images, kubelet, node, pki, Layout, NODES};

/// The image deploy/kustomization.yaml names for Ferry.
pub const FERRY_IMAGE: &str = "localhost/ferry:0.1.0";

pub fn up(root: &Path, layout: &Layout) -> Result<()> {
    if !crate::deps::is_root() {
        bail!("cargo xtask cluster up needs root (namespaces, cgroups, mounts)");
    }
    if layout.state.exists() {
        bail!(
            "{} exists: a cluster is up or was left behind (cargo xtask cluster down)",
            layout.state.display()
        );
    }
    let started = Instant::now();
    let result = bring_up(root, layout);
    if let Err(err) = &result {
        if std::env::var_os("FERRY_CLUSTER_KEEP").is_some() {
            eprintln!("xtask: cluster up failed: {err:#}; left up (FERRY_CLUSTER_KEEP)");
            return result;
        }
        eprintln!("xtask: cluster up failed: {err:#}; taking it down");
        super::down(layout);
        return result;
    }
    eprintln!(
        "xtask: cluster up in {:.0} s; kubectl: nsenter --net=/run/netns/{} {} --kubeconfig {}",
        started.elapsed().as_secs_f64(),
        super::CLIENT_NS,
        layout.program("kubectl").display(),
        layout.admin_kubeconfig().display()
    );
    result
}

fn bring_up(root: &Path, layout: &Layout) -> Result<()> {
    std::fs::create_dir_all(layout.logs())?;
    let ferry = crate::ebpf::build_release_ferry(root)?;
    step("certificates", || certificates(layout))?;
    let archives = step("images", || {
        images::assemble(root, layout, &ferry, FERRY_IMAGE)
    })?;
    step("network and nodes", || {
        node::create_network()?;
        for spec in &NODES {
            node::start(layout, spec)?;
        }
        Ok(())
    })?;
    step("control plane", || {
        control::start_etcd(layout)?;
        control::start_apiserver(layout)?;
        control::start_controllers(layout)
    })?;
    step("containerd and kubelets", || {
        for spec in &NODES {
            kubelet::start_containerd(layout, spec, &archives)?;
            kubelet::start_kubelet(layout, spec)?;
        }
        kubelet::configure_pod_network(layout)?;
        kubectl(
            layout,
            &[
                "label",
                "node",
                NODES[0].name,
                "node-role.kubernetes.io/control-plane=",
            ],
        )
    })?;
    let manifests = root.join("tools/cluster/manifests");
    step("CoreDNS and Ferry", || {
        apply(layout, "-f", &manifests.join("coredns.yaml"))?;
        apply(layout, "-k", &manifests.join("ferry"))?;
        rollout(layout, "daemonset/ferry")?;
        rollout(layout, "deployment/coredns")?;
        wait_nodes_ready(layout)?;
        apply(layout, "-f", &manifests.join("lb-pool.yaml"))
    })
}

/// Runs one step of `up`, timing it.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    eprintln!("xtask: cluster: {what} ...");
    let out = f().with_context(|| format!("cluster up: {what}"))?;
    eprintln!(
        "xtask: cluster: {what} done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn certificates(layout: &Layout) -> Result<()> {
    pki::create(layout)?;
    let clients = [
        ("admin", "kubernetes-admin", Some("system:masters")),
        ("controller-manager", "system:kube-controller-manager", None),
        ("scheduler", "system:kube-scheduler", None),
        (
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
        ),
    ];
    for (stem, user, group) in clients {
        pki::kubeconfig(layout, &pki::Client { stem, user, group })?;
    }
    Ok(())
}

pub fn kubectl(layout: &Layout, args: &[&str]) -> Result<()> {
    crate::host::sh(layout.kubectl().args(args)).map(|_| ())
}

fn apply(layout: &Layout, how: &str, path: &Path) -> Result<()> {
    crate::run(layout.kubectl().args(["apply", how]).arg(path))
}

fn rollout(layout: &Layout, what: &str) -> Result<()> {
    crate::run(layout.kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        what,
        "--timeout=180s",
    ]))
}

fn wait_nodes_ready(layout: &Layout) -> Result<()> {
    poll(
        "every node Ready",
        Duration::from_mins(2),
        Duration::from_secs(1),
        || {
            let out = crate::host::sh(layout.kubectl().args([
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ]))
        .unwrap_or_default();
            let ready = out.lines().filter(|l| *l == "True").count();
            Ok(if ready == NODES.len() {
                Ok(())
            } else {
                Err(format!("Ready: {out:?}"))
            })
        },
    )
}
