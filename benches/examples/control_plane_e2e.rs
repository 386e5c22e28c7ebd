//! Control plane end to end (`cargo xtask bench control-plane`): the fake
//! API server holds N Services x 10 endpoints; `ferry run --source kube`
//! (a separate process, eBPF maps pinned in a scratch bpffs directory)
//! lists and programs them. Measured: time from start to every frontend in
//! the maps, the latency from an EndpointSlice change at the API server to
//! the change being in the maps, the agent's resident memory, and a
//! restart: the agent killed, a new one reconciling from the pinned maps.
//! usage: control_plane_e2e FERRY_BINARY [SERVICES] [CHANGES]  (root)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_benches::{cluster, slice, Shape};
use ferry_tests::fake_api::FakeApi;

fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory line of /proc/PID/status (VmRSS, VmHWM: the peak RSS), MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The agent process and everything it pinned or attached; removed on
/// drop, also when the benchmark fails.
struct AgentGuard {
    child: Option<std::process::Child>,
    ferry: String,
    pins: String,
    cgroup: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(&self.ferry)
            .args(["cleanup", "--bpffs-path", &self.pins])
            .output();
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cgroup2_root() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
            })
        })
        .expect("a cgroup2 mount")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(ferry) = args.get(1) else {
        eprintln!("usage: control_plane_e2e FERRY_BINARY [SERVICES] [CHANGES]");
        std::process::exit(2);
    };
    let services: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let changes: usize = args
        .get(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200)
        .min(10_000);
    let shape = Shape {
        services,
        endpoints: 10,
        nodeport_every: 0,
    };
    let api = FakeApi::start().expect("fake API server");
    let (svcs, slices) = cluster(shape);
    for s in &svcs {
        let mut v = serde_json::to_value(s).expect("Service to JSON");
        v["kind"] = "Service".into();
        api.apply(v);
    }
    for s in &slices {
        let mut v = serde_json::to_value(s).expect("EndpointSlice to JSON");
        v["kind"] = "EndpointSlice".into();
        api.apply(v);
    }
    let dir = std::env::temp_dir().join(format!("ferry-cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let pins = format!("/sys/fs/bpf/ferry-cp-bench-{}", std::process::id());
    let metrics_addr = "127.0.0.1:19249";
    eprintln!(
        "control plane: {services} Services x 10 endpoints at the fake API server; starting ferry"
    );

    // The programs attach to a scratch cgroup nobody is in: the machine's
    // own connections are never translated by the benchmark.
    let cgroup = cgroup2_root().join(format!("ferry-cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("scratch cgroup");
    let spawn = |log: &str| {
        Command::new(ferry)
            .arg("run")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--bpffs-path={pins}"))
            .arg(format!("--cgroup-path={}", cgroup.display()))
            .arg(format!("--metrics-bind-address={metrics_addr}"))
            .args([
                "--healthz-bind-address",
                "",
                "--dataplane",
                "ebpf",
                "--interfaces",
                "none",
                "--hostname-override",
                "node-0",
            ])
            .args(["--min-sync-period", "0s"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).expect("log file"))
            .spawn()
            .expect("starting ferry")
    };
    let start = Instant::now();
    let child = spawn("agent.log");
    let agent_pid = child.id();
    let mut guard = AgentGuard {
        child: Some(child),
        ferry: ferry.clone(),
        pins: pins.clone(),
        cgroup: cgroup.clone(),
        dir: dir.clone(),
    };
    let deadline = start
        + Duration::from_secs(
            std::env::var("FERRY_CP_TIMEOUT")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(120),
        );
    let programmed = loop {
        if metric(metrics_addr, "ferry_frontends") == Some(services as f64) {
            break start.elapsed();
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            let requests = api.requests();
            let tail = &requests[requests.len().saturating_sub(30)..];
            panic!("not programmed after 120 s; agent log:\n{log}\nlast API requests: {tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Settled: one second after programming (freed list buffers are
    // returned by then).
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_start = rss_mib(agent_pid);

    // Changes: replace one endpoint of a Service, wait until the agent has
    // synced it (its endpoint-change counter moves).
    let mut latencies = Vec::with_capacity(changes);
    // Each change hits another Service (7919 is prime to the Service
    // counts used), moving it from generation 0 to 1: never a no-op.
    for i in 0..changes {
        let svc = (i * 7919) % services;
        let before = metric(
            metrics_addr,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        )
        .unwrap_or(0.0);
        let mut v = serde_json::to_value(slice(svc, shape, 1)).expect("slice JSON");
        v["kind"] = "EndpointSlice".into();
        let t = Instant::now();
        api.apply(v);
        loop {
            let now = metric(
                metrics_addr,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            )
            .unwrap_or(0.0);
            if now > before {
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "change {i} not applied"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    latencies.sort_by(f64::total_cmp);
    let rss = rss_mib(agent_pid);
    let peak = status_mib(agent_pid, "VmHWM:");
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    // A restart: the agent killed (as a crash), a new one on the same pins
    // reads the maps back and reconciles; measured until its first full
    // sync is in the maps (its log says so).
    drop(guard.child.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    let restarted = Instant::now();
    guard.child = Some(spawn("restart.log"));
    let restart_log = || std::fs::read_to_string(dir.join("restart.log")).unwrap_or_default();
    let reconciled = loop {
        if restart_log().contains("ready: the first full sync") {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_mins(2),
            "not reconciled 120 s after a restart:\n{}",
            restart_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let restore_ms = restart_log()
        .lines()
        .find(|l| l.contains("restored the applied state"))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    drop(guard.child.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    drop(guard);
    if !log.contains("synced") || std::env::var_os("FERRY_CP_SHOW_LOG").is_some() {
        eprintln!("agent log:\n{log}");
    }

    println!("| metric | value |");
    println!("|---|---|");
    println!("| Services x endpoints | {services} x 10 |");
    println!(
        "| start to fully programmed maps | {:.2} s |",
        programmed.as_secs_f64()
    );
    println!(
        "| EndpointSlice change to maps, p50 / p99 ({changes} changes) | {:.1} ms / {:.1} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("| agent resident memory 1 s after programming / after the changes | {rss_after_start:.0} MiB / {rss:.0} MiB |");
    println!("| agent peak resident memory (VmHWM, during the first list) | {peak:.0} MiB |");
    println!(
        "| restart (SIGKILL) to reconciled: first full sync of the new agent in the maps | {:.2} s |",
        reconciled.as_secs_f64()
    );
    println!(
        "| of which reading the maps back (dump and restore) | {} |",
        restore_ms.map_or("?".to_string(), |ms| format!("{ms} ms"))
    );
}
