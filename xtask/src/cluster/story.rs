//! `cargo xtask demo --cluster` and its CI test: three agnhost pods behind
//! a ClusterIP (asked by DNS name from a pod), a NodePort (every node's
//! address) and a LoadBalancer Service (asked from the client namespace),
//! with a live per-pod table, while a pod is deleted, the Deployment is
//! scaled 3 -> 5 -> 2, Ferry's DaemonSet is rolled (keep-alive connections
//! must survive) and the API server is restarted. Any failed request fails
//! the story.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::observe::{
    check_no_new_answers, pod_ips, pods, prober_log, scale, wait_dns_current, wait_lb_address,
    wait_new_pods, wait_pods_gone_from_endpoints, wait_serving, wait_unprogrammed, NS,
};
use super::traffic::{table, KeepAlive, Tally, Traffic};
use super::{control, latency, Layout, CLIENT_NS, NODES};

const NODE_PORT: u16 = 30080;

/// What the story measured, for the closing line and docs.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub healed_in: Duration,
    pub scaled_up_in: Duration,
    pub programming: Option<latency::Quantiles>,
}

pub fn run(root: &Path, layout: &Layout) -> Result<Report> {
    let lb = deploy(root, layout)?;
    let traffic = Traffic::default();
    let started = Instant::now();
    traffic.log_loop("pod->dns", &prober_log(layout)?)?;
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
    if tally.failures() > 0 {
        // What each node's programs did, to tell a drop from a wrong reply.
        println!("{}", datapath_events());
    }
    let report = judge(&tally, started, result)?;
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

/// Applies the story's objects and waits for them; the LoadBalancer address.
fn deploy(root: &Path, layout: &Layout) -> Result<String> {
    crate::run(
        layout
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(root.join("tools/cluster/manifests/story.yaml")),
    )?;
    let rollout = ["rollout", "status", "deployment/echo", "--timeout=180s"];
    crate::host::sh(layout.kubectl_ns(NS).args(rollout))?;
    let ready = [
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ];
    crate::host::sh(layout.kubectl_ns(NS).args(ready))?;
    let lb = wait_lb_address(layout)?;
    println!("== LoadBalancer address {lb} (from the FerryLoadBalancerIPPool, announced by L2)");
    let ip = wait_dns_current(layout)?;
    println!("== echo.{NS} resolves to the Service's ClusterIP {ip}");
    Ok(lb)
}

/// Every node's `ferry_datapath_events_total` counters (since its Ferry
/// started), one line per node.
fn datapath_events() -> String {
    let mut out = String::from("== datapath events per node");
    for spec in &NODES {
        let text = latency::metrics(spec).unwrap_or_default();
        let events: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ferry_datapath_events_total{event=\""))
            .filter_map(|l| l.split_once("\"} "))
            .filter(|(_, n)| *n != "0")
            .map(|(event, n)| format!("{event}={n}"))
            .collect();
        out.push_str(&format!("\n  {}: {}", spec.ns, events.join(" ")));
    }
    out
}

/// The story's verdict: any failed request fails it, with the first
/// failures of each path and when they happened.
fn judge(tally: &Tally, started: Instant, result: Result<Report>) -> Result<Report> {
    let failures = tally.failures();
    let answered: u64 = tally
        .paths
        .values()
        .flat_map(|p| p.pods.values())
        .map(|t| t.count)
        .sum();
    let requests = answered + failures;
    let mut why = String::new();
    for (path, t) in &tally.paths {
        for (at, f) in &t.failed {
            let at = (*at - started).as_secs_f64();
            why.push_str(&format!("\n  {path} at {at:.1} s: {f}"));
        }
    }
    let failed = || format!("{failures} of {requests} requests failed:{why}");
    let mut report = match result {
        Ok(r) => r,
        Err(e) if failures > 0 => return Err(e.context(failed())),
        Err(e) => return Err(e),
    };
    if failures > 0 {
        bail!(failed());
    }
    report.requests = requests;
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
        );
    };
    let mut report = Report::default();
    let all = wait_serving(traffic, &pods(layout)?, Duration::from_mins(1))?;
    println!(
        "== every path reaches every pod after {:.1} s; counting from here",
        all.as_secs_f64()
    );
    traffic.reset();
    live(traffic, Duration::from_secs(5));

    chapter("delete a pod");
    report.healed_in = delete_a_pod(root, layout, traffic)?;

    let metrics_before = latency::scrape()?;
    chapter("scale 3 -> 5");
    report.scaled_up_in = scale_up(layout, traffic)?;

    chapter("scale 5 -> 2");
    scale_down(root, layout, traffic)?;
    report.programming = latency::quantiles(&metrics_before, &latency::scrape()?);

    chapter("roll the Ferry DaemonSet, keep-alive connections open");
    roll_ferry(layout, lb)?;
    live(traffic, Duration::from_secs(2));

    chapter("restart the API server");
    restart_apiserver(layout, traffic)?;
    Ok(report)
}

/// Deletes a pod: its endpoint leaves every node's maps, no new connection
/// reaches it after that, and its replacement serves. Returns the time
/// from the delete to the replacement serving.
fn delete_a_pod(root: &Path, layout: &Layout, traffic: &Traffic) -> Result<Duration> {
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
    let healed_in = deleted_at.elapsed();
    check_no_new_answers(traffic, &[victim], programmed)?;
    live(traffic, Duration::from_secs(2));
    Ok(healed_in)
}

/// Scales 3 -> 5: the time until both new pods serve on every path.
fn scale_up(layout: &Layout, traffic: &Traffic) -> Result<Duration> {
    let before = pods(layout)?;
    let scaled_at = Instant::now();
    scale(layout, 5)?;
    let added = wait_new_pods(layout, &before, 2)?;
    wait_serving(traffic, &added, Duration::from_secs(90))?;
    let took = scaled_at.elapsed();
    live(traffic, Duration::from_secs(2));
    Ok(took)
}

/// Scales 5 -> 2: once the removed pods are out of the maps, no new
/// connection reaches them.
fn scale_down(root: &Path, layout: &Layout, traffic: &Traffic) -> Result<()> {
    let before = pods(layout)?;
    scale(layout, 2)?;
    let removed = wait_pods_gone_from_endpoints(layout, &before, 3)?;
    let programmed = wait_unprogrammed(root, layout, &pod_ips(layout, &removed)?)?;
    check_no_new_answers(traffic, &removed, programmed)?;
    live(traffic, Duration::from_secs(2));
    Ok(())
}

/// Stops the API server for 10 s under traffic, starts it again, and
/// checks Ferry serves a pod added after it came back.
fn restart_apiserver(layout: &Layout, traffic: &Traffic) -> Result<()> {
    control::stop_apiserver(layout)?;
    live(traffic, Duration::from_secs(10));
    control::start_apiserver(layout)?;
    let before = pods(layout)?;
    scale(layout, 3)?;
    let added = wait_new_pods(layout, &before, 1)?;
    wait_serving(traffic, &added, Duration::from_secs(90))?;
    println!("== Ferry reconnected: the pod added after the restart serves on every path");
    Ok(())
}

/// Prints the live table every two seconds for `d`.
fn live(traffic: &Traffic, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(2).min(end - Instant::now()));
        println!("{}", table(&traffic.snapshot()));
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
    let cluster_ip = layout
        .kubectl_ns(NS)
        .args(["exec", "client", "--", "sh", "-c"])
        .arg("curl -s --rate 5/s -w ' %{num_connects}\\n' $(for i in $(seq 1500); do echo http://echo/hostname; done)")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the ClusterIP keep-alive client")?;
    let mut roll = rollout(layout)?;
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
    let answers = cluster_ip_answers(cluster_ip)?;
    println!(
        "== Ferry rolled in {:.1} s; keep-alive connections kept: NodePort {} and LoadBalancer {} answers, ClusterIP {answers} answers on one connection",
        started.elapsed().as_secs_f64(),
        conns[0].1.answers,
        conns[1].1.answers,
    );
    Ok(())
}

/// Restarts the Ferry DaemonSet; the returned `kubectl rollout status`
/// ends when every node runs a new agent.
fn rollout(layout: &Layout) -> Result<std::process::Child> {
    crate::host::sh(layout.kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "restart",
        "daemonset/ferry",
    ]))?;
    Ok(layout
        .kubectl()
        .args([
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/ferry",
            "--timeout=300s",
        ])
        .spawn()?)
}

/// Stops the in-pod ClusterIP client and checks every answer after the
/// first came on its one connection; returns how many answers it got.
fn cluster_ip_answers(mut client: std::process::Child) -> Result<usize> {
    let _ = client.kill();
    let out = client.wait_with_output()?;
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
    Ok(connects.len())
}
