//! `cargo xtask demo --cluster` and its CI test: three agnhost pods behind
//! a ClusterIP (asked by DNS name from a pod), a NodePort (every node's
//! address) and a LoadBalancer Service (asked from the client namespace),
//! with a live per-pod table, while a pod is deleted, the Deployment is
//! scaled 3 -> 5 -> 2, Ferry's DaemonSet is rolled (keep-alive connections
//! must survive) and the API server is restarted. Any failed request fails
//! the story.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::traffic::{table, KeepAlive, Traffic};
use super::{control, latency, node, Layout, CLIENT_NS, NODES};

const NS: &str = "ferry-demo";
const NODE_PORT: u16 = 30080;

/// What the story measured, for the closing line and docs.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub failures: u64,
    pub healed_in: Duration,
    pub scaled_up_in: Duration,
    pub programming: Option<latency::Quantiles>,
}

pub fn run(root: &Path, layout: &Layout) -> Result<Report> {
    let kubectl = |args: &[&str]| crate::host::sh(layout.kubectl().args(args));
    crate::run(
        layout
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(root.join("tools/cluster/manifests/story.yaml")),
    )?;
    kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/echo",
        "--timeout=180s",
    ])?;
    kubectl(&[
        "-n",
        NS,
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ])?;
    let lb = wait_lb_address(layout)?;
    println!("== LoadBalancer address {lb} (from the FerryLoadBalancerIPPool, announced by L2)");

    let traffic = Traffic::default();
    let started = Instant::now();
    traffic.log_loop("pod->dns", prober_log(layout)?)?;
    for node in &NODES {
        let addr: SocketAddr = format!("{}:{NODE_PORT}", node.ip).parse()?;
        traffic.connect_loop(&format!("np:{}", node.ns), CLIENT_NS, addr);
    }
    traffic.connect_loop("lb", CLIENT_NS, format!("{lb}:80").parse()?);
    let result = chapters(root, layout, &traffic, &lb, started);
    traffic.stop();
    // The story's objects go with it, so it can run again on this cluster.
    let _ = crate::host::sh(
        layout
            .kubectl()
            .args(["delete", "namespace", NS, "--wait=false"]),
    );
    let tally = traffic.snapshot();
    println!("{}", table(&tally));
    let failures = tally.failures();
    let requests = tally
        .paths
        .values()
        .flat_map(|p| p.pods.values())
        .map(|t| t.count)
        .sum::<u64>()
        + failures;
    let mut why = String::new();
    for (path, t) in &tally.paths {
        for (at, f) in &t.failed {
            why.push_str(&format!(
                "\n  {path} at {:.1} s: {f}",
                (*at - started).as_secs_f64()
            ));
        }
    }
    let mut report = match result {
        Ok(r) => r,
        Err(e) if failures > 0 => {
            return Err(e.context(format!("{failures} of {requests} requests failed:{why}")))
        }
        Err(e) => return Err(e),
    };
    report.failures = failures;
    report.requests = requests;
    if failures > 0 {
        bail!("{failures} of {requests} requests failed:{why}");
    }
    println!(
        "== story passed: {} requests, 0 failed; pod deleted -> replacement serving in {:.1} s; \
         scaled 3 -> 5: new pods serving in {:.1} s",
        report.requests,
        report.healed_in.as_secs_f64(),
        report.scaled_up_in.as_secs_f64()
    );
    if let Some(q) = &report.programming {
        println!("== Ferry's network programming latency during the scale steps: {q}");
    }
    Ok(report)
}

fn chapters(
    root: &Path,
    layout: &Layout,
    traffic: &Traffic,
    lb: &str,
    started: Instant,
) -> Result<Report> {
    let chapter = |name: &str| {
        println!(
            "== chapter at {:.1} s: {name}",
            started.elapsed().as_secs_f64()
        )
    };
    let mut report = Report::default();
    let all = wait_serving(traffic, &pods(layout)?, Duration::from_secs(60))?;
    println!(
        "== every path reaches every pod after {:.1} s; counting from here",
        all.as_secs_f64()
    );
    traffic.reset();
    live(traffic, Duration::from_secs(5));

    chapter("delete a pod");
    let before = pods(layout)?;
    let victim = before.iter().next().context("no pod")?.clone();
    let victim_ips = pod_ips(layout, std::slice::from_ref(&victim))?;
    let deleted_at = Instant::now();
    crate::host::sh(
        layout
            .kubectl_ns(NS)
            .args(["delete", "pod", &victim, "--wait=false"]),
    )?;
    let programmed = wait_unprogrammed(root, layout, &victim_ips)?;
    println!(
        "== the deleted pod's endpoint left every node's maps {:.1} s after the delete",
        (programmed - deleted_at).as_secs_f64()
    );
    let replacement = wait_new_pods(layout, &before, 1)?;
    wait_serving(traffic, &replacement, Duration::from_secs(90))?;
    report.healed_in = deleted_at.elapsed();
    check_no_new_answers(traffic, &[victim], programmed)?;
    live(traffic, Duration::from_secs(2));

    let metrics_before = latency::scrape(layout)?;
    chapter("scale 3 -> 5");
    let before = pods(layout)?;
    let scaled_at = Instant::now();
    scale(layout, 5)?;
    let added = wait_new_pods(layout, &before, 2)?;
    wait_serving(traffic, &added, Duration::from_secs(90))?;
    report.scaled_up_in = scaled_at.elapsed();
    live(traffic, Duration::from_secs(2));

    chapter("scale 5 -> 2");
    let before = pods(layout)?;
    scale(layout, 2)?;
    let removed = wait_pods_gone_from_endpoints(layout, &before, 3)?;
    let programmed = wait_unprogrammed(root, layout, &pod_ips(layout, &removed)?)?;
    check_no_new_answers(traffic, &removed, programmed)?;
    live(traffic, Duration::from_secs(2));
    report.programming = latency::quantiles(&metrics_before, &latency::scrape(layout)?);

    chapter("roll the Ferry DaemonSet, keep-alive connections open");
    roll_ferry(layout, lb)?;
    live(traffic, Duration::from_secs(2));

    chapter("restart the API server");
    control::stop_apiserver(layout)?;
    live(traffic, Duration::from_secs(10));
    control::start_apiserver(layout)?;
    let before = pods(layout)?;
    scale(layout, 3)?;
    let added = wait_new_pods(layout, &before, 1)?;
    wait_serving(traffic, &added, Duration::from_secs(90))?;
    println!("== Ferry reconnected: the pod added after the restart serves on every path");
    Ok(report)
}

/// Prints the live table every two seconds for `d`.
fn live(traffic: &Traffic, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(2).min(end - Instant::now()));
        println!("{}", table(&traffic.snapshot()));
    }
}

fn scale(layout: &Layout, replicas: u32) -> Result<()> {
    crate::host::sh(layout.kubectl_ns(NS).args([
        "scale",
        "deployment/echo",
        &format!("--replicas={replicas}"),
    ]))
    .map(|_| ())
}

/// The Deployment's pods that are not being deleted.
fn pods(layout: &Layout) -> Result<BTreeSet<String>> {
    let out = crate::host::sh(layout.kubectl_ns(NS).args([
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, deleted)| deleted.trim().is_empty())
        .map(|(name, _)| name.to_string())
        .collect())
}

fn wait_new_pods(
    layout: &Layout,
    before: &BTreeSet<String>,
    count: usize,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let new: BTreeSet<String> = pods(layout)?.difference(before).cloned().collect();
        if new.len() >= count {
            return Ok(new);
        }
        if Instant::now() > deadline {
            bail!("expected {count} new pods, have {new:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every path got an answer from each of `pods`.
fn wait_serving(traffic: &Traffic, pods: &BTreeSet<String>, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let tally = traffic.snapshot();
        let missing: Vec<String> = tally
            .paths
            .iter()
            .flat_map(|(path, t)| {
                pods.iter()
                    .filter(|p| !t.pods.contains_key(*p))
                    .map(move |p| format!("{path}:{p}"))
            })
            .collect();
        if missing.is_empty() && tally.paths.len() == NODES.len() + 2 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!(
                "no traffic after {} s for {missing:?}\n{}",
                limit.as_secs(),
                table(&tally)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `count` of `before` are no longer in the Deployment.
fn wait_pods_gone_from_endpoints(
    layout: &Layout,
    before: &BTreeSet<String>,
    count: usize,
) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gone: Vec<String> = before.difference(&pods(layout)?).cloned().collect();
        if gone.len() >= count {
            return Ok(gone);
        }
        if Instant::now() > deadline {
            bail!("expected {count} pods to go, gone: {gone:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// No path got an answer from `pods` later than a moment after `programmed`
/// (when no node's maps held them any more; a connection already begun
/// may still be answered).
fn check_no_new_answers(traffic: &Traffic, pods: &[String], programmed: Instant) -> Result<()> {
    let since = programmed + IN_FLIGHT;
    std::thread::sleep(since.saturating_duration_since(Instant::now()) + Duration::from_secs(2));
    let tally = traffic.snapshot();
    for (path, t) in &tally.paths {
        for pod in pods {
            if let Some(p) = t.pods.get(pod).filter(|p| p.last > since) {
                bail!(
                    "{path}: removed pod {pod} still answered {:.1} s after no node's maps held it",
                    (p.last - programmed).as_secs_f64()
                );
            }
        }
    }
    println!(
        "== removed pods {pods:?} got no new connections once Ferry had programmed their removal"
    );
    Ok(())
}

/// How long after the maps changed an answer may still come from a removed
/// pod: a request already connected, and the pod loop's reporting delay.
const IN_FLIGHT: Duration = Duration::from_secs(1);

fn pod_ips(layout: &Layout, pods: &[String]) -> Result<Vec<String>> {
    pods.iter()
        .map(|p| {
            let ip = crate::host::sh(layout.kubectl_ns(NS).args([
                "get",
                "pod",
                p,
                "-o",
                "jsonpath={.status.podIP}",
            ]))?;
            Ok(ip.trim().to_string())
        })
        .collect()
}

/// Waits until no node's Ferry maps hold any of `ips` as an active backend
/// (`ferry services -o json` on each node's pinned maps); when that was.
fn wait_unprogrammed(root: &Path, layout: &Layout, ips: &[String]) -> Result<Instant> {
    let ferry = root.join("target/release/ferry").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = Vec::new();
        for node in &NODES {
            let dump = node::exec(layout, node, &[&ferry, "services", "-o", "json"])?;
            let frontends: serde_json::Value = serde_json::from_str(&dump)?;
            for backend in frontends
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|f| f["backends"].as_array().into_iter().flatten())
            {
                let addr = backend["address"].as_str().unwrap_or("");
                if backend["state"] == "active"
                    && ips.iter().any(|ip| addr.starts_with(&format!("{ip}:")))
                {
                    held.push(format!("{}: {addr}", node.name));
                }
            }
        }
        if held.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("removed endpoints still programmed after 60 s: {held:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The prober container's log file on the node that runs the client pod.
fn prober_log(layout: &Layout) -> Result<std::path::PathBuf> {
    let out = crate::host::sh(layout.kubectl_ns(NS).args([
        "get",
        "pod",
        "client",
        "-o",
        "jsonpath={.spec.nodeName} {.metadata.uid}",
    ]))?;
    let (node, uid) = out
        .trim()
        .split_once(' ')
        .context("the client pod has no node")?;
    Ok(layout
        .node(node)
        .join(format!("var-log/pods/{NS}_client_{uid}/prober/0.log")))
}

fn wait_lb_address(layout: &Layout) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ip = crate::host::sh(layout.kubectl_ns(NS).args([
            "get",
            "service",
            "echo-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]))?;
        if !ip.trim().is_empty() {
            return Ok(ip.trim().to_string());
        }
        if Instant::now() > deadline {
            bail!("Service ferry-demo/echo-lb got no LoadBalancer address in 60 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Rolls Ferry while a keep-alive connection through the NodePort, the
/// LoadBalancer and (from the client pod) the ClusterIP asks every 200 ms.
fn roll_ferry(layout: &Layout, lb: &str) -> Result<()> {
    let mut conns = vec![
        (
            "NodePort",
            KeepAlive::open(CLIENT_NS, format!("{}:{NODE_PORT}", NODES[1].ip).parse()?)?,
        ),
        (
            "LoadBalancer",
            KeepAlive::open(CLIENT_NS, format!("{lb}:80").parse()?)?,
        ),
    ];
    let mut cluster_ip = layout
        .kubectl_ns(NS)
        .args(["exec", "client", "--", "sh", "-c"])
        .arg("curl -s --rate 5/s -w ' %{num_connects}\\n' $(for i in $(seq 1500); do echo http://echo/hostname; done)")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the ClusterIP keep-alive client")?;
    crate::host::sh(layout.kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "restart",
        "daemonset/ferry",
    ]))?;
    let mut roll = layout
        .kubectl()
        .args([
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/ferry",
            "--timeout=300s",
        ])
        .spawn()?;
    let started = Instant::now();
    loop {
        for (what, conn) in &mut conns {
            conn.ask().with_context(|| {
                format!(
                    "{what} keep-alive connection after {:.1} s of the rollout",
                    started.elapsed().as_secs_f64()
                )
            })?;
        }
        if let Some(status) = roll.try_wait()? {
            if !status.success() {
                bail!("the Ferry rollout failed: {status}");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cluster_ip.kill();
    let out = cluster_ip.wait_with_output()?;
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    // "<pod> <connections opened>" per answer; the last line may be cut.
    let connects: Vec<&str> = lines
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, n)| n)
        .collect();
    if connects.len() < 5 || connects.iter().skip(1).any(|c| *c != "0") {
        bail!("the ClusterIP keep-alive connection did not survive the rollout: {lines:?}");
    }
    println!(
        "== Ferry rolled in {:.1} s; keep-alive connections kept: NodePort {} and LoadBalancer {} answers, ClusterIP {} answers on one connection",
        started.elapsed().as_secs_f64(),
        conns[0].1.answers,
        conns[1].1.answers,
        connects.len()
    );
    Ok(())
}
