//! Measuring one row: wrk and iperf3 runs, the node's CPU, the eBPF
//! programs' own run time, and memory per idle connection.

use super::rows::{Metric, Row};
use super::setup::client_cmd;
use super::topo::Topo;
use super::Settings;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Wrk {
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) errors: u64,
}

pub(super) fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

pub(super) fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut found = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().ok()?;
            found = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            w.p50_ms = parse_duration_ms(v)?;
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_ms = parse_duration_ms(v)?;
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    w.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    found.then_some(w)
}

/// Busy and total jiffies of the machine.
pub(super) fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

pub(super) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// One sample of every metric for a row.
pub(super) fn measure(t: &Topo, row: Row, s: &Settings) -> Result<BTreeMap<Metric, f64>> {
    let mut out = BTreeMap::new();
    if !s.only_iperf3 {
        measure_wrk(t, row, s, &mut out)?;
    }
    let o = client_cmd(
        t,
        row,
        "iperf3",
        &[
            "-c".into(),
            row.iperf_target(),
            "-p".into(),
            row.iperf_port().to_string(),
            "-t".into(),
            s.seconds.to_string(),
            "-J".into(),
        ],
    )
    .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("{}: iperf3 output", row.name()))?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("{}: iperf3 said {}", row.name(), v["error"]))?;
    out.insert(Metric::ThroughputGbps, bps / 1e9);
    Ok(out)
}

/// The two wrk runs of [`measure`]: keep-alive, then a new connection per
/// request (with the socket-LB row's connect4 cost read around it).
pub(super) fn measure_wrk(
    t: &Topo,
    row: Row,
    s: &Settings,
    out: &mut BTreeMap<Metric, f64>,
) -> Result<()> {
    let url = format!("http://{}/", row.http_target());
    let duration = format!("-d{}s", s.seconds);
    let connections = format!("-c{}", s.connections);
    let wrk = |extra: &[&str]| -> Result<(Wrk, f64)> {
        let mut args: Vec<String> = vec![
            "-t1".into(),
            connections.clone(),
            duration.clone(),
            "--latency".into(),
        ];
        args.extend(extra.iter().map(std::string::ToString::to_string));
        args.push(url.clone());
        let before = cpu_jiffies();
        let output = client_cmd(t, row, "wrk", &args).output()?;
        let after = cpu_jiffies();
        let text = String::from_utf8_lossy(&output.stdout);
        let w = parse_wrk(&text).with_context(|| format!("{}: wrk said {text}", row.name()))?;
        let cpu = 100.0 * (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
        Ok((w, cpu))
    };
    let (ka, _) = wrk(&[])?;
    out.insert(Metric::RpsKeepAlive, ka.rps);
    // The socket-LB row's connect4 program, with the kernel's run-time
    // statistics on for this run only (restored when `_stats_on` drops).
    let connect4 = (row == Row::FerryEbpfClusterIp)
        .then(|| t.cgroups.get(&row))
        .flatten()
        .and_then(|cg| prog_in_cgroup(cg, "ferry_connect4"));
    let _stats_on = connect4.and_then(|_| BpfStats::enable().ok());
    let before = connect4.and_then(prog_run_stats);
    let (nc, cpu) = wrk(&["-H", "Connection: close"])?;
    let after = connect4.and_then(prog_run_stats);
    if let (Some((ns0, n0)), Some((ns1, n1))) = (before, after) {
        if n1 > n0 {
            out.insert(Metric::Connect4Ns, (ns1 - ns0) as f64 / (n1 - n0) as f64);
        }
    }
    out.insert(Metric::RpsNewConnection, nc.rps);
    out.insert(Metric::P50Ms, nc.p50_ms);
    out.insert(Metric::P99Ms, nc.p99_ms);
    out.insert(Metric::NodeCpuPct, cpu);
    out.insert(Metric::Errors, (ka.errors + nc.errors) as f64);
    Ok(())
}

/// kernel.bpf_stats_enabled while alive: the kernel then keeps each
/// program's run time and count (at a small cost per run, so it is on only
/// around the one measurement that reads it).
pub(super) struct BpfStats {
    pub(super) old: String,
}

pub(super) const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(BPF_STATS).context("reading bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("enabling bpf_stats_enabled")?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.old.trim());
    }
}

/// The ID of the program called `name` attached to cgroup `cg`.
pub(super) fn prog_in_cgroup(cg: &Path, name: &str) -> Option<u64> {
    let o = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["id"].as_u64())
}

/// (run_time_ns, run_cnt) of a program.
pub(super) fn prog_run_stats(id: u64) -> Option<(u64, u64)> {
    let o = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    Some((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// Idle connections held open for the memory measurement. Enough that
/// the RSS's granularity does not decide the figure: Ferry's allocator
/// (mimalloc) backs its arena with 2 MiB transparent huge pages, so with
/// 2,000 connections one page more or less moved the result by 1 KiB per
/// connection (2.2 or 3.2 KiB from one start to the next); at 8,000 it is
/// 0.26 KiB. Within HAProxy's maxconn (9,000) and the backends' nginx
/// worker_connections (4,096 each, the connections spread over three).
pub(super) const IDLE_CONNECTIONS: usize = 8000;

/// Resident memory of a process, KiB.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Memory per idle connection of a proxy process: its RSS with
/// [`IDLE_CONNECTIONS`] idle client connections open (from the client
/// namespace, each accepted and connected to a backend) minus before.
pub(super) fn idle_memory(t: &Topo, proc_name: &str, target: &str) -> Result<f64> {
    let pid = t
        .procs
        .iter()
        .find(|(n, _)| n == proc_name)
        .map(|(_, c)| c.id())
        .context("no such process")?;
    let before = rss_kib(pid).context("reading RSS")?;
    let ns = format!("/var/run/netns/{}", t.client());
    let addr: std::net::SocketAddr = target.parse()?;
    let conns = std::thread::spawn(move || -> Result<Vec<std::net::TcpStream>> {
        ferry_netns::enter(&ns)?;
        let mut v = Vec::with_capacity(IDLE_CONNECTIONS);
        for _ in 0..IDLE_CONNECTIONS {
            v.push(std::net::TcpStream::connect_timeout(
                &addr,
                Duration::from_secs(2),
            )?);
        }
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    std::thread::sleep(Duration::from_millis(1500));
    let after = rss_kib(pid).context("reading RSS")?;
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 1s test @ http://x/\n  Latency Distribution\n     50%  120.00us\n     75%  1.20ms\n     90%  2.00ms\n     99%    1.50s\n  1000 requests in 1.00s, 1 MB read\n  Socket errors: connect 2, read 1, write 0, timeout 0\nRequests/sec:   1000.50\nTransfer/sec:      1MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.rps, 1000.5);
        assert!((w.p50_ms - 0.12).abs() < 1e-9);
        assert_eq!(w.p99_ms, 1500.0);
        assert_eq!(w.errors, 3);
        assert!(parse_wrk("nothing").is_none());
    }
}
