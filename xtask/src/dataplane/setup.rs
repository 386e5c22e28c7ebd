//! Setting up, changing and removing one row (iptables, nftables, IPVS,
//! HAProxy, Ferry) on the benchmark's topology.

use super::measure::parse_wrk;
use super::rows::{ferry_yaml, haproxy_config, iptables_rules, nft_rules, one_change, Row};
use super::topo::{ns_exec, Topo};
use super::INTERRUPTED;
use crate::host::{ip, sh};
use anyhow::Result;
use std::fmt::Write as _;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Times [`one_change`] for a row programmed with its extra Services.
pub(super) fn time_one_change(t: &Topo, row: Row) -> Result<Option<Duration>> {
    let Some((tool, args, input)) = one_change(row) else {
        return Ok(None);
    };
    let file = t.dir.join(format!("{tool}.change"));
    std::fs::write(&file, input)?;
    let start = Instant::now();
    sh(ns_exec(&t.node(), tool).args(&args).arg(&file))?;
    Ok(Some(start.elapsed()))
}

/// Sets a row up at a scale; returns the programming time, or why the row
/// cannot run here.
pub(super) fn setup(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    match row {
        Row::Direct => wait_http(t, row).map(|()| None),
        Row::DirectFromNode => {
            t.cgroup(row).map_err(|e| format!("{e:#}"))?;
            wait_http(t, row).map(|()| None)
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
    sh(ns_exec(&node, tool).arg(&file)).map_err(e)?;
    Ok(Some(start.elapsed()))
}

/// kube-proxy's nftables mode: one transaction, timed.
fn setup_nftables(t: &mut Topo, row: Row, extra: usize) -> Result<Option<Duration>, String> {
    let node = t.node();
    let e = |e: anyhow::Error| format!("{e:#}");
    let file = t.dir.join("nft.rules");
    std::fs::write(&file, nft_rules(row, extra)).map_err(|x| x.to_string())?;
    let start = Instant::now();
    sh(ns_exec(&node, "nft").arg("-f").arg(&file)).map_err(e)?;
    Ok(Some(start.elapsed()))
}

/// Why the IPVS row is not measured here.
fn ipvs_unavailable(t: &mut Topo) -> Result<Option<Duration>, String> {
    let node = t.node();
    let probe = ns_exec(&node, "ipvsadm").arg("-Ln").output();
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
    let mut cmd = ns_exec(&node, "haproxy");
    cmd.arg("-f").arg(&cfg).arg("-db");
    t.spawn("haproxy", &mut cmd).map_err(e)?;
    wait_http(t, row).map(|()| None)
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
        Row::FerryUserspace => ns_exec(&node, &t.ferry.display().to_string()),
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
            let _ = sh(ns_exec(&node, "iptables-legacy").args(["-t", "nat", "-F"]));
            let _ = sh(ns_exec(&node, "iptables-legacy").args(["-t", "nat", "-X"]));
        }
        Row::IptablesNft => {
            let _ = sh(ns_exec(&node, "iptables-nft").args(["-t", "nat", "-F"]));
            let _ = sh(ns_exec(&node, "iptables-nft").args(["-t", "nat", "-X"]));
        }
        Row::Nftables => {
            let _ = sh(ns_exec(&node, "nft").args(["delete", "table", "ip", "ferry-bench-kp"]));
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
