//! Privileged: `ferry run --source file:DIR` end to end, and a hitless
//! restart. An established TCP stream through a ClusterIP keeps flowing
//! while the agent is killed with SIGKILL and started again; the restarted
//! agent reads the pinned maps back (same IDs, nothing flushed), new
//! connections work, and a change to the YAML is picked up.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::netns::client_and_backends;

fn yaml(endpoints: &[&str]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|ip| format!("- {{addresses: [{ip}]}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: t}}\nspec:\n  clusterIP: 198.19.0.20\n  ports: [{{port: 80, targetPort: 7000}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: echo-1, namespace: t, labels: {{kubernetes.io/service-name: echo}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}}}}\naddressType: IPv4\nports: [{{port: 7000}}]\nendpoints:\n{}\n",
        k8s_openapi::jiff::Timestamp::from_millisecond(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        )
        .unwrap(),
        eps.join("\n")
    )
}

fn write_yaml(dir: &Path, endpoints: &[&str]) {
    let tmp = dir.join(".svc.tmp");
    std::fs::write(&tmp, yaml(endpoints)).unwrap();
    std::fs::rename(&tmp, dir.join("svc.yaml")).unwrap();
}

struct AgentProc {
    child: Option<Child>,
}

impl AgentProc {
    fn start(bin: &Path, dir: &Path, pins: &Path, cgroup: &Path, log: &Path) -> AgentProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .arg("run")
            .arg(format!("--source=file:{}", dir.display()))
            .arg(format!("--bpffs-path={}", pins.display()))
            .arg(format!("--cgroup-path={}", cgroup.display()))
            .args([
                "--dataplane",
                "ebpf",
                // The root namespace's interfaces are not the test's.
                "--interfaces",
                "none",
                "--hostname-override",
                "node-a",
                "--min-sync-period",
                "50ms",
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProc { child: Some(child) }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The frontends in the pinned maps: (frontend, id, backend addresses).
fn services(bin: &Path, pins: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = Command::new(bin)
        .args(["services", "-o", "json", "--bpffs-path"])
        .arg(pins)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["frontend"].as_str().unwrap_or("").to_string(),
                r["id"].as_u64().unwrap_or(0),
                r["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| b["address"].as_str().unwrap_or("").to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The last address the agent logged for `endpoints` ("Health"/"Metrics").
fn served(log: &Path, endpoints: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .rev()
        .find(|l| l.contains("serving") && l.contains(&format!("endpoints={endpoints}")))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {endpoints} address in the log: {text}"))
        .to_string()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn echo_server(l: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_mins(2);
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((s, _)) = l.accept() {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                conns.push(std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 256];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for c in conns {
            let _ = c.join();
        }
    })
}

#[test]
fn established_stream_survives_sigkill_and_restart() {
    let Some(bin) =
        ferry_tests::privileged_ferry("established_stream_survives_sigkill_and_restart")
    else {
        return;
    };
    let (srv, cli) = client_and_backends("ar", 2).unwrap();
    let listeners = srv
        .run(|| {
            Ok(vec![
                TcpListener::bind("198.18.2.2:7000")?,
                TcpListener::bind("198.18.2.3:7000")?,
            ])
        })
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|l| echo_server(l, stop.clone()))
        .collect();

    let pins = PinDir::new("agent").unwrap();
    let cg = TestCgroup::new("agent").unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-test-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_yaml(&dir, &["198.18.2.2"]);
    let log = dir.join("agent.log");

    let mut agent = AgentProc::start(&bin, &dir, pins.path(), cg.path(), &log);
    wait_for("the ClusterIP to be programmed", || {
        services(&bin, pins.path())
            .iter()
            .any(|(f, _, b)| f == "198.19.0.20:80/TCP" && b.len() == 1)
    });
    let before = services(&bin, pins.path());

    // A stream of echoes through the ClusterIP for 3 s, across the restart.
    let stream = Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([
            cg.path().to_str().unwrap(),
            cli.name(),
            "stream",
            "198.19.0.20:80",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = AgentProc::start(&bin, &dir, pins.path(), cg.path(), &log);
    let out = stream.wait_with_output().unwrap();
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(result.starts_with("ok "), "stream broke: {result}");
    let lines: u64 = result[3..].parse().unwrap();
    assert!(lines > 50, "too few echoes: {lines}");

    // The restarted agent kept every entry and ID.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        services(&bin, pins.path()),
        before,
        "the restart changed the maps"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("already attached"),
        "second start re-attached: {text}"
    );

    // kube-proxy's endpoints answer on the addresses the agent logged.
    let health = http_get(&served(&log, "Health"), "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"lastUpdated\": \"20"), "{health}");
    let metrics = http_get(&served(&log, "Metrics"), "/metrics");
    assert!(metrics.contains("ferry_frontends 1"), "{metrics}");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"),
        "{metrics}"
    );
    assert!(http_get(&served(&log, "Metrics"), "/proxyMode").ends_with("ebpf"));
    // The programs' own counters: the stream's connect() was translated.
    let translated = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_datapath_events_total{event=\"sock_translated\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(translated.is_some_and(|n| n > 0), "{metrics}");
    // Map fill: the one ClusterIP's master entry and slot, its backend.
    assert!(
        metrics.contains("ferry_map_entries{map=\"ferry_svc4\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_map_entries{map=\"ferry_be4\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_map_capacity{map=\"ferry_ct4\"} 524288"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_conntrack_entries 0"), "{metrics}");
    let services_json = http_get(&served(&log, "Metrics"), "/services");
    assert!(
        services_json.contains("198.19.0.20:80/TCP"),
        "{services_json}"
    );

    // New connections work, and a change is picked up.
    write_yaml(&dir, &["198.18.2.3"]);
    wait_for("the endpoint change", || {
        services(&bin, pins.path()).iter().any(|(f, _, b)| {
            f == "198.19.0.20:80/TCP" && b == &vec!["198.18.2.3:7000/TCP".to_string()]
        })
    });
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([
            cg.path().to_str().unwrap(),
            cli.name(),
            "stream",
            "198.19.0.20:80",
            "1",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok "));

    agent.kill9();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
