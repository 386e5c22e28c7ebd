//! `cargo xtask bench dataplane [--quick]`: Ferry against direct
//! forwarding, kube-proxy-style iptables (legacy and nft backends),
//! kube-proxy-style nftables, IPVS and HAProxy, in one run, on one
//! namespace topology the harness builds and removes (also on Ctrl-C):
//!
//! ```text
//!  client 198.18.0.2 --- node 198.18.0.1 | br0 198.18.1.1 --- b1 198.18.1.11
//!                         (the dataplanes)                  --- b2 198.18.1.12
//!                                                           --- b3 198.18.1.13
//! ```
//!
//! Every backend runs nginx (port 80) and b1 an iperf3 server. Each row
//! serves its own Service IP (198.19.<row>.10:80, and :5201 for iperf3 with
//! b1 as the only endpoint). wrk measures requests/s with keep-alive and with
//! a new connection per request, and latency; iperf3 bulk throughput; the
//! node's CPU use comes from /proc/stat. At 1 Service all rows are set up
//! together and runs are interleaved across rows; with 10,000 extra
//! Services (the measured one last in iptables order) each row is set up
//! alone, measured, and removed, and its programming time is recorded.
//! Results: bench-results/dataplane.{csv,md,svg}.

mod measure;
mod report;
mod rows;
mod setup;
mod topo;

use crate::deps;
use anyhow::{bail, Context, Result};
use measure::{idle_memory, loadavg, measure};
use report::Report;
use rows::{Metric, Row};
use setup::{setup, teardown, time_one_change};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use topo::Topo;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

const EXTRA_SERVICES: usize = 10_000;

const BACKENDS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.1.13"];

/// The node's address on the client link (NodePort frontends).
const NODE_ADDRESS: &str = "198.18.0.1";

const NODE_PORT_HTTP: u16 = 30080;

const NODE_PORT_IPERF: u16 = 30201;

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    /// --only-iperf3: bulk throughput only (no wrk runs).
    only_iperf3: bool,
    seconds: u64,
    repeats: usize,
    connections: u32,
    /// --congestion-control NAME: every namespace's TCP congestion control
    /// (default: the host's, which new namespaces inherit).
    congestion: Option<String>,
}

/// Samples of one (scale, row, metric).
type Samples = BTreeMap<(usize, Row, Metric), Vec<f64>>;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        f64::midpoint(s[s.len() / 2 - 1], s[s.len() / 2])
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        })
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    if !deps::is_root() {
        bail!("the dataplane benchmark needs root (network namespaces, eBPF, iptables)");
    }
    let Args {
        settings,
        rows,
        scales_wanted,
        repeats_given,
    } = parse_args(args)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    deps::ensure()?;
    deps::ensure_bench_tools()?;
    let ferry = crate::ebpf::build_release_ferry(root)?;
    let tag = format!("ferry-bdp-{}", std::process::id());
    let started = Instant::now();
    let mut t = Topo::build(&tag, ferry, settings.congestion.clone())?;
    let quick = settings.quick;
    let mut report = Report {
        settings,
        samples: BTreeMap::new(),
        unavailable: BTreeMap::new(),
        programming: BTreeMap::new(),
        changes: BTreeMap::new(),
        memory: BTreeMap::new(),
        loads: Vec::new(),
        took: Duration::ZERO,
    };
    // At 1 Service every row is up at once and runs interleave; with
    // 10,000 extra Services one row at a time (they would slow each
    // other's first packets).
    all_together(&mut report, &mut t, &rows, started)?;
    if !(quick || scales_wanted == Some(1)) {
        // One row at a time: fewer repeats keep the run under 15 minutes.
        let repeats = if repeats_given {
            report.settings.repeats
        } else {
            report.settings.repeats.min(3)
        };
        one_at_a_time(&mut report, &mut t, &rows, repeats, started)?;
    }
    drop(t);
    report.took = started.elapsed();
    report.write(&root.join("bench-results"))?;
    Ok(())
}

/// The benchmark's command line.
struct Args {
    settings: Settings,
    /// The rows to run, baselines included.
    rows: Vec<Row>,
    /// --max-services 1: skip the 10,000-Service scale.
    scales_wanted: Option<u64>,
    repeats_given: bool,
}

/// `--rows a,b`: only these (the baselines always run); all without it.
fn rows_wanted(args: &[String]) -> Result<Vec<Row>> {
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    if let Some(only) = &only {
        for k in only {
            if !Row::ALL.iter().any(|r| r.key() == k) {
                let keys: Vec<&str> = Row::ALL.iter().map(|r| r.key()).collect();
                bail!("--rows: unknown row {k:?} (rows: {})", keys.join(", "));
            }
        }
    }
    Ok(Row::ALL
        .into_iter()
        .filter(|r| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|k| k == r.key()) || *r == r.baseline())
        })
        .collect())
}

fn parse_args(args: &[String]) -> Result<Args> {
    let quick = args.iter().any(|a| a == "--quick");
    let rows = rows_wanted(args)?;
    let flag = |name: &str| -> Result<Option<u64>> {
        match args.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .map(Some)
                .with_context(|| format!("{name} takes a positive number")),
        }
    };
    let s = Settings {
        quick,
        only_iperf3: args.iter().any(|a| a == "--only-iperf3"),
        seconds: flag("--seconds")?.unwrap_or(if quick { 1 } else { 4 }),
        repeats: flag("--repeats")?.unwrap_or(if quick { 1 } else { 5 }) as usize,
        connections: 32,
        congestion: match args.iter().position(|a| a == "--congestion-control") {
            None => None,
            Some(i) => Some(
                args.get(i + 1)
                    .filter(|v| {
                        !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                    .cloned()
                    .context("--congestion-control takes an algorithm name (e.g. reno, bbr)")?,
            ),
        },
    };
    let scales_wanted = flag("--max-services")?;
    let repeats_given = args.iter().any(|a| a == "--repeats");
    Ok(Args {
        settings: s,
        rows,
        scales_wanted,
        repeats_given,
    })
}

/// At 1 Service: every row set up at once, idle memory measured, then
/// `repeats` rounds over the rows in one fixed order.
fn all_together(report: &mut Report, t: &mut Topo, rows: &[Row], started: Instant) -> Result<()> {
    let extra = 0;
    let s = &report.settings;
    let (samples, loads, unavailable, programming, memory) = (
        &mut report.samples,
        &mut report.loads,
        &mut report.unavailable,
        &mut report.programming,
        &mut report.memory,
    );
    let mut ready: Vec<Row> = Vec::new();
    for &row in rows {
        match setup(t, row, extra) {
            Ok(p) => {
                if let Some(p) = p {
                    programming.insert((extra, row), p);
                }
                ready.push(row);
            }
            Err(why) => {
                eprintln!("  {}: not measured: {why}", row.name());
                unavailable.entry(row).or_insert(why);
            }
        }
    }
    idle_memories(t, &ready, memory);
    // The socket-LB row runs next to its baseline, so the two see
    // the same machine state.
    ready.sort_by_key(|r| match r {
        Row::FerryEbpfClusterIp => (Row::DirectFromNode, 1),
        r => (*r, 0),
    });
    // One fixed order: a run inherits its predecessor's state (some
    // 27,000 TIME_WAIT sockets on b1 after a new-connection run), so
    // every row keeps the same predecessor in every repeat. (Running
    // every other repeat in reverse measured "direct" twice in a row
    // at each turn, against its own TIME_WAIT sockets, and its
    // new-connection rate fell to 2,500-6,000 req/s.)
    for rep in 0..s.repeats {
        for &row in &ready {
            check_interrupted()?;
            eprintln!(
                "[{:>4.0}s] 1 Service, run {}/{}: {}",
                started.elapsed().as_secs_f64(),
                rep + 1,
                s.repeats,
                row.name()
            );
            loads.push(loadavg());
            for (m, v) in measure(t, row, s)? {
                samples.entry((extra, row, m)).or_default().push(v);
            }
        }
    }
    for &row in &ready {
        teardown(t, row);
    }
    Ok(())
}

/// Memory per idle connection of the proxies that hold connections open.
fn idle_memories(t: &Topo, ready: &[Row], memory: &mut BTreeMap<Row, f64>) {
    // Memory per idle connection first, while the proxies are fresh:
    // after the load runs their allocators hold freed memory that
    // idle connections would reuse without growing the RSS (a
    // second batch of 2,000 grows neither process by 0.2 KiB per
    // connection; Ferry measured 1.2 KiB after ten repeats).
    let userspace_proc = format!("ferry-{}", Row::FerryUserspace as u8);
    for (row, name) in [
        (Row::FerryUserspace, userspace_proc.as_str()),
        (Row::Haproxy, "haproxy"),
    ] {
        if ready.contains(&row) {
            match idle_memory(t, name, &row.http_target()) {
                Ok(kib) => {
                    memory.insert(row, kib);
                }
                Err(e) => eprintln!("  {}: idle memory not measured: {e:#}", row.name()),
            }
        }
    }
}

/// With 10,000 extra Services: each row set up alone (its programming
/// time and one change timed), measured `repeats` times, removed.
fn one_at_a_time(
    report: &mut Report,
    t: &mut Topo,
    rows: &[Row],
    repeats: usize,
    started: Instant,
) -> Result<()> {
    let extra = EXTRA_SERVICES;
    let s = &report.settings;
    let (samples, loads, unavailable, programming, changes) = (
        &mut report.samples,
        &mut report.loads,
        &report.unavailable,
        &mut report.programming,
        &mut report.changes,
    );
    for &row in rows {
        check_interrupted()?;
        if unavailable.contains_key(&row) {
            continue;
        }
        eprintln!(
            "[{:>4.0}s] programming {extra} extra Services: {}",
            started.elapsed().as_secs_f64(),
            row.name()
        );
        match setup(t, row, extra) {
            Ok(p) => {
                if let Some(p) = p {
                    programming.insert((extra, row), p);
                }
            }
            Err(why) => {
                eprintln!("  {}: not measured at {extra}: {why}", row.name());
                continue;
            }
        }
        if let Some(d) = time_one_change(t, row)? {
            changes.insert(row, d);
        }
        for rep in 0..repeats {
            check_interrupted()?;
            eprintln!(
                "[{:>4.0}s] {extra} extra Services, run {}/{}: {}",
                started.elapsed().as_secs_f64(),
                rep + 1,
                repeats,
                row.name()
            );
            loads.push(loadavg());
            for (m, v) in measure(t, row, s)? {
                samples.entry((extra, row, m)).or_default().push(v);
            }
        }
        teardown(t, row);
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; everything the harness created was removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
