//! What the cluster story observes: the Deployment's pods, when each path
//! of the traffic serves them, when no node's maps hold a removed pod any
//! more (`ferry services -o json` on each node), and the answers removed
//! pods got after that.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use super::poll::poll;
use super::traffic::{table, Traffic};
use super::{node, Layout, NODES};

/// The story's namespace (tools/cluster/manifests/story.yaml).
pub const NS: &str = "ferry-demo";

pub fn scale(layout: &Layout, replicas: u32) -> Result<()> {
    crate::host::sh(layout.kubectl_ns(NS).args([
        "scale",
        "deployment/echo",
        &format!("--replicas={replicas}"),
    ]))
    .map(|_| ())
}

/// The Deployment's pods that are not being deleted.
pub fn pods(layout: &Layout) -> Result<BTreeSet<String>> {
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

pub fn wait_new_pods(
    layout: &Layout,
    before: &BTreeSet<String>,
    count: usize,
) -> Result<BTreeSet<String>> {
    poll(
        &format!("{count} new pods"),
        Duration::from_mins(1),
        STEP,
        || {
            let new: BTreeSet<String> = pods(layout)?.difference(before).cloned().collect();
            Ok(if new.len() >= count {
                Ok(new)
            } else {
                Err(format!("new: {new:?}"))
            })
        },
    )
}

/// Waits until every path got an answer from each of `pods`.
pub fn wait_serving(
    traffic: &Traffic,
    pods: &BTreeSet<String>,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    poll(
        "traffic on every path",
        limit,
        Duration::from_millis(100),
        || {
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
            Ok(
                if missing.is_empty() && tally.paths.len() == NODES.len() + 2 {
                    Ok(started.elapsed())
                } else {
                    Err(format!("none for {missing:?}\n{}", table(&tally)))
                },
            )
        },
    )
}

/// Waits until `count` of `before` are no longer in the Deployment.
pub fn wait_pods_gone_from_endpoints(
    layout: &Layout,
    before: &BTreeSet<String>,
    count: usize,
) -> Result<Vec<String>> {
    poll(
        &format!("{count} pods gone"),
        Duration::from_mins(1),
        STEP,
        || {
            let gone: Vec<String> = before.difference(&pods(layout)?).cloned().collect();
            Ok(if gone.len() >= count {
                Ok(gone)
            } else {
                Err(format!("gone: {gone:?}"))
            })
        },
    )
}

/// How often the story asks the API server or the nodes.
const STEP: Duration = Duration::from_millis(200);

/// No path got an answer from `pods` later than a moment after `programmed`
/// (when no node's maps held them any more; a connection already begun
/// may still be answered).
pub fn check_no_new_answers(traffic: &Traffic, pods: &[String], programmed: Instant) -> Result<()> {
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
pub const IN_FLIGHT: Duration = Duration::from_secs(1);

pub fn pod_ips(layout: &Layout, pods: &[String]) -> Result<Vec<String>> {
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
pub fn wait_unprogrammed(root: &Path, layout: &Layout, ips: &[String]) -> Result<Instant> {
    let ferry = root.join("target/release/ferry").display().to_string();
    let what = "removed endpoints out of every node's maps";
    poll(
        what,
        Duration::from_mins(1),
        Duration::from_millis(100),
        || {
            let mut held = Vec::new();
            for node in &NODES {
                let dump = node::exec(layout, node, &[&ferry, "services", "-o", "json"])?;
                let frontends: serde_json::Value = serde_json::from_str(&dump)?;
                let backends = frontends
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|f| f["backends"].as_array().into_iter().flatten());
                for backend in backends {
                    let addr = backend["address"].as_str().unwrap_or("");
                    let removed = ips.iter().any(|ip| addr.starts_with(&format!("{ip}:")));
                    if backend["state"] == "active" && removed {
                        held.push(format!("{}: {addr}", node.name));
                    }
                }
            }
            Ok(if held.is_empty() {
                Ok(Instant::now())
            } else {
                Err(format!("held: {held:?}"))
            })
        },
    )
}

/// The prober container's log file on the node that runs the client pod.
pub fn prober_log(layout: &Layout) -> Result<std::path::PathBuf> {
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

pub fn wait_lb_address(layout: &Layout) -> Result<String> {
    let what = "a LoadBalancer address for Service ferry-demo/echo-lb";
    poll(what, Duration::from_mins(1), STEP, || {
        let ip = crate::host::sh(layout.kubectl_ns(NS).args([
            "get",
            "service",
            "echo-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]))?;
        let ip = ip.trim().to_string();
        Ok(if ip.is_empty() {
            Err("none yet".into())
        } else {
            Ok(ip)
        })
    })
}

/// Waits until the client pod resolves the echo Service's name to its
/// current ClusterIP a dozen times in a row (both CoreDNS replicas, which
/// cache answers 30 s: a story run again on the same cluster would
/// otherwise be sent to the last run's address for a while).
pub fn wait_dns_current(layout: &Layout) -> Result<String> {
    let ip = crate::host::sh(layout.kubectl_ns(NS).args([
        "get",
        "service",
        "echo",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]))?;
    let ip = ip.trim().to_string();
    let script = format!(
        "n=0; for i in $(seq 12); do getent hosts echo.{NS}.svc.cluster.local | grep -q '^{ip} ' && n=$((n+1)); done; echo $n"
    );
    poll(
        "the echo Service's name resolving to its ClusterIP",
        Duration::from_secs(90),
        STEP,
        || {
            let out = crate::host::sh(
                layout
                    .kubectl_ns(NS)
                    .args(["exec", "client", "-c", "client", "--", "sh", "-c", &script]),
            )?;
            Ok(match out.trim() {
                "12" => Ok(ip.clone()),
                n => Err(format!("{n} of 12 lookups answered {ip}")),
            })
        },
    )
}
