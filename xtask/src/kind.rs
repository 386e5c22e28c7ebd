//! `cargo xtask kind up|load|deploy|e2e|down`: Ferry on a kind cluster
//! created without kube-proxy (deploy/kind/cluster.yaml). These need Docker
//! and kind on the machine; docs/kind.md is the walkthrough.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::deps;

const CLUSTER: &str = "ferry";
/// A non-latest tag, so the kubelet uses the image `kind load` put there
/// (imagePullPolicy IfNotPresent) instead of pulling.
pub const IMAGE: &str = "localhost/ferry:0.1.0";

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let steps: Vec<&str> = match args.first().map(String::as_str) {
        Some("up") => vec!["up"],
        Some("load") => vec!["load"],
        Some("deploy") => vec!["deploy"],
        Some("e2e") => vec!["e2e"],
        Some("down") => vec!["down"],
        Some("all") => vec!["up", "load", "deploy", "e2e"],
        other => bail!(
            "usage: cargo xtask kind up|load|deploy|e2e|down|all [--conformance] (got {other:?})"
        ),
    };
    let conformance = args.iter().any(|a| a == "--conformance");
    for tool in ["docker", "kind", "kubectl"] {
        if deps::find_on_path(tool).is_none() {
            bail!("`{tool}` is not installed; `cargo xtask kind` needs Docker, kind and kubectl (docs/kind.md)");
        }
    }
    for step in steps {
        match step {
            "up" => up(root)?,
            "load" => load(root)?,
            "deploy" => deploy(root)?,
            "e2e" => {
                smoke(root)?;
                if conformance {
                    sig_network_conformance()?;
                }
            }
            _ => down()?,
        }
    }
    Ok(())
}

fn kubectl() -> Command {
    let mut c = Command::new("kubectl");
    c.args(["--context", &format!("kind-{CLUSTER}")]);
    c
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn up(root: &Path) -> Result<()> {
    let existing = output(Command::new("kind").args(["get", "clusters"]))?;
    if existing.lines().any(|l| l == CLUSTER) {
        eprintln!("xtask: kind cluster {CLUSTER} exists");
        return Ok(());
    }
    crate::run(
        Command::new("kind")
            .args(["create", "cluster", "--config"])
            .arg(root.join("deploy/kind/cluster.yaml")),
    )
}

fn load(root: &Path) -> Result<()> {
    crate::run(Command::new("docker").current_dir(root).args([
        "build",
        "-f",
        "deploy/Dockerfile",
        "-t",
        IMAGE,
        ".",
    ]))?;
    crate::run(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]))
}

fn deploy(root: &Path) -> Result<()> {
    crate::run(kubectl().arg("apply").arg("-k").arg(root.join("deploy")))?;
    crate::run(kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/ferry",
        "--timeout=300s",
    ]))?;
    // CoreDNS only becomes ready once the `kubernetes` Service works, which
    // is Ferry's job on a cluster without kube-proxy.
    crate::run(kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/coredns",
        "--timeout=300s",
    ]))?;
    apply_pool(root)
}

/// Applies deploy/kind/lb-pool.yaml with its range moved to the top of the
/// kind network's IPv4 subnet.
fn apply_pool(root: &Path) -> Result<()> {
    let subnets = output(Command::new("docker").args([
        "network",
        "inspect",
        "kind",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ]))?;
    let subnet = subnets
        .split_whitespace()
        .find(|s| !s.contains(':'))
        .ok_or_else(|| anyhow::anyhow!("the kind network has no IPv4 subnet: {subnets:?}"))?;
    let (start, stop) = pool_range(subnet)?;
    let text = std::fs::read_to_string(root.join("deploy/kind/lb-pool.yaml"))?
        .replace("172.18.255.200", &start)
        .replace("172.18.255.250", &stop);
    eprintln!("xtask: LoadBalancer pool {start}-{stop} (kind network {subnet})");
    let path = root.join("target/deploy/lb-pool.yaml");
    std::fs::create_dir_all(root.join("target/deploy"))?;
    std::fs::write(&path, text)?;
    crate::run(kubectl().arg("apply").arg("-f").arg(&path))
}

/// The 51 addresses 5 below the top of an IPv4 subnet (at most /24).
fn pool_range(subnet: &str) -> Result<(String, String)> {
    let (addr, len) = subnet
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{subnet:?} is not a CIDR"))?;
    let addr: std::net::Ipv4Addr = addr.parse()?;
    let len: u32 = len.parse()?;
    if len > 24 {
        bail!("the kind network {subnet} is too small for a pool of 51 addresses");
    }
    let top = u32::from(addr) | (u32::MAX >> len);
    let ip = |n: u32| std::net::Ipv4Addr::from(n).to_string();
    Ok((ip(top - 55), ip(top - 5)))
}

/// Distinct pod names answering `count` requests, from a `sh -c` loop.
fn hostnames(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("echo-"))
        .map(str::to_string)
        .collect()
}

/// NodePort 30080 on every node's InternalIP answers from an echo pod.
fn nodeports_answer() -> Result<()> {
    let nodes = output(kubectl().args([
        "get", "nodes", "-o",
        "jsonpath={range .items[*]}{.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
    ]))?;
    for ip in nodes.lines().filter(|l| !l.is_empty()) {
        let body = output(Command::new("curl").args([
            "-s",
            "--max-time",
            "3",
            &format!("http://{ip}:30080/hostname"),
        ]))?;
        eprintln!("xtask: NodePort {ip}:30080 from the host -> {body}");
        if !body.starts_with("echo-") {
            bail!("NodePort {ip}:30080 answered {body:?}");
        }
    }
    Ok(())
}

/// The LoadBalancer address Ferry's allocator gives echo-lb (waits 60 s).
fn lb_address() -> Result<String> {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let ip = output(kubectl().args([
            "-n",
            "ferry-smoke",
            "get",
            "service",
            "echo-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]))?;
        if !ip.is_empty() {
            return Ok(ip);
        }
        if Instant::now() > deadline {
            bail!("Service ferry-smoke/echo-lb got no LoadBalancer address in 60 s (is a FerryLoadBalancerIPPool defined? docs/kind.md)");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn smoke(root: &Path) -> Result<()> {
    crate::run(
        kubectl()
            .arg("apply")
            .arg("-f")
            .arg(root.join("deploy/kind/smoke.yaml")),
    )?;
    crate::run(kubectl().args([
        "-n",
        "ferry-smoke",
        "rollout",
        "status",
        "deployment/echo",
        "--timeout=300s",
    ]))?;

    // ClusterIP by DNS name, from a pod (socket-level LB in the pod's cgroup).
    let from_pod = output(kubectl().args([
        "-n", "ferry-smoke", "run", "ferry-smoke-client", "--rm", "-i", "--restart=Never",
        "--image=registry.k8s.io/e2e-test-images/agnhost:2.53", "--command", "--", "sh", "-c",
        "for i in $(seq 30); do curl -s --max-time 2 http://echo.ferry-smoke.svc.cluster.local/hostname; echo; done",
    ]))?;
    let pods = hostnames(&from_pod);
    eprintln!(
        "xtask: ClusterIP from a pod reached {} pods: {pods:?}",
        pods.len()
    );
    if pods.len() < 2 {
        bail!("ClusterIP from a pod: expected answers from several pods, got {from_pod:?}");
    }

    // NodePort on every node's address, from the host (the TC path).
    nodeports_answer()?;

    // LoadBalancer: an address from Ferry's allocator, reached from the host.
    let lb = lb_address()?;
    let body = output(Command::new("curl").args([
        "-s",
        "--max-time",
        "3",
        &format!("http://{lb}/hostname"),
    ]))?;
    eprintln!("xtask: LoadBalancer {lb} from the host -> {body}");
    if !body.starts_with("echo-") {
        bail!("LoadBalancer {lb} answered {body:?}");
    }
    eprintln!("xtask: smoke test passed");
    Ok(())
}

/// The upstream sig-network conformance subset (docs/kind.md names it).
/// Needs `e2e.test` and `ginkgo` of the cluster's Kubernetes version on PATH.
fn sig_network_conformance() -> Result<()> {
    for tool in ["e2e.test", "ginkgo"] {
        if deps::find_on_path(tool).is_none() {
            bail!("`{tool}` is not on PATH (docs/kind.md: running the conformance subset)");
        }
    }
    let kubeconfig = std::env::temp_dir().join("ferry-kind-kubeconfig");
    std::fs::write(
        &kubeconfig,
        output(Command::new("kind").args(["get", "kubeconfig", "--name", CLUSTER]))?,
    )?;
    crate::run(Command::new("ginkgo").args([
        "--nodes=4",
        "--focus=\\[sig-network\\].*(Services|Conntrack|Networking).*\\[Conformance\\]|\\[sig-network\\] Services",
        "--skip=\\[Serial\\]|\\[Disruptive\\]|\\[Flaky\\]|\\[Slow\\]|\\[Feature:|IPv6|SCTP|ESIPP|session affinity.*timeout|GCE|AWS|Azure",
    ])
    .arg(deps::find_on_path("e2e.test").unwrap_or_default())
    .arg("--")
    .arg(format!("--kubeconfig={}", kubeconfig.display()))
    .arg("--provider=local"))
}

fn down() -> Result<()> {
    crate::run(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_range_is_the_top_of_the_subnet() {
        assert_eq!(
            super::pool_range("172.18.0.0/16").unwrap(),
            ("172.18.255.200".to_string(), "172.18.255.250".to_string())
        );
        assert_eq!(
            super::pool_range("10.89.0.0/24").unwrap(),
            ("10.89.0.200".to_string(), "10.89.0.250".to_string())
        );
        assert!(super::pool_range("10.89.0.0/25").is_err());
    }
}
