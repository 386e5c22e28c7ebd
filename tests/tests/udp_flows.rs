//! Privileged: UDP flows that never pause. A client sends a datagram every
//! 100 ms to a Service; then its backend is replaced, the Service is scaled
//! to zero endpoints, or it is deleted. Within 1 s no datagram reaches the
//! old backend any more (no reply comes from it), through socket-level
//! balancing (an unconnected and a connected socket) and through the TC
//! path's conntrack alike; a replacement backend gets the flow. Each case
//! also runs with the old backend still serving another Service, so that
//! its backend entry stays in the maps (kubernetes#139629, #141371 were
//! this class of bug in kube-proxy).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::io::BufRead;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ferry_proxy::agent::Agent;
use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::netns::{client_and_backends, TcTopology};
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::servers::Servers;
use ferry_tests::Netns;

/// What happens to the Service while the flow runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Its only backend is replaced by another.
    Replaced,
    /// Its endpoints go (the slice stays, empty).
    ScaledToZero,
    /// The Service and its slice are deleted.
    Deleted,
}

const CHANGES: [Change; 3] = [Change::Replaced, Change::ScaledToZero, Change::Deleted];

/// One reply (or failure) line, with the time it arrived.
type Line = (Instant, String);

/// Checks a flow's lines: replies from `old` before `at`, none arriving
/// more than 1 s after it; with a replacement, replies from `new` after.
fn check(what: &str, lines: &[Line], at: Instant, old: &str, new: Option<&str>) {
    let from = |l: &Line, who: &str| l.1.starts_with("ok ") && l.1.ends_with(who);
    assert!(
        lines.iter().any(|l| l.0 < at && from(l, old)),
        "{what}: no reply from {old} before the change: {lines:?}"
    );
    let late: Vec<&Line> = lines
        .iter()
        .filter(|l| from(l, old) && l.0 > at + Duration::from_secs(1))
        .collect();
    assert!(
        late.is_empty(),
        "{what}: {old} still reached >1 s after the change: {late:?}"
    );
    let last_old = lines
        .iter()
        .rev()
        .find(|l| from(l, old))
        .map(|l| l.0.saturating_duration_since(at));
    let mut first_new = None;
    if let Some(new) = new {
        let moved = lines.iter().find(|l| l.0 > at && from(l, new));
        let moved = moved.unwrap_or_else(|| panic!("{what}: {new} never answered: {lines:?}"));
        assert!(
            moved.0 < at + Duration::from_secs(1),
            "{what}: {new} took {:?}",
            moved.0 - at
        );
        first_new = Some(moved.0 - at);
    }
    // The figures of docs/reliability.md.
    eprintln!("{what}: last reply from the old backend {last_old:?} after the change, first from the new {first_new:?}");
}

/// Collects a flow's lines (stamped as they arrived) until it ends.
fn collect(rx: &Receiver<Line>) -> Vec<Line> {
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(l);
    }
    lines
}

/// The Service `name` (UDP `port` -> 5353 at `backends`), and, with
/// `shared`, a second Service `name`-x on the same backends, so their
/// entries outlive the first Service's use of them.
fn objects(
    name: &str,
    port: u16,
    backends: &[&str],
    shared: bool,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let eps: Vec<(&str, &str, bool, bool)> = backends
        .iter()
        .map(|ip| (*ip, "node-b", true, false))
        .collect();
    let mut services = vec![service(name, "UDP", port, 5353, "")];
    let mut slices = vec![slice(name, "UDP", 5353, &eps)];
    if shared {
        let other = format!("{name}-x");
        let both = [
            ("198.18.21.2", "node-b", true, false),
            ("198.18.21.3", "node-b", true, false),
        ];
        services.push(service(&other, "UDP", port + 100, 5353, ""));
        slices.push(slice(&other, "UDP", 5353, &both));
    }
    (services, slices)
}

/// Applies `change` to the Service `name` at once and returns when.
fn apply(
    agent: &mut Agent,
    change: Change,
    name: &str,
    port: u16,
    shared: bool,
    new: &str,
) -> Instant {
    let (mut services, mut slices) = objects(name, port, &[new], shared);
    match change {
        Change::Replaced => {}
        Change::ScaledToZero => slices[0] = slice(name, "UDP", 5353, &[]),
        Change::Deleted => {
            services.remove(0);
            slices.remove(0);
        }
    }
    sync(agent, &services, &slices);
    Instant::now()
}

/// UDP servers on the two backends, 198.18.21.2 and .3, port 5353, in
/// `srv`.
fn udp_backends(srv: &Netns) -> Servers {
    let udp = srv
        .run(|| {
            Ok(vec![
                UdpSocket::bind("198.18.21.2:5353")?,
                UdpSocket::bind("198.18.21.3:5353")?,
            ])
        })
        .unwrap();
    Servers::start(vec![], udp)
}

#[test]
fn udp_flows_leave_the_old_backend_through_tc_conntrack() {
    ferry_tests::needs_ebpf!("udp_flows_leave_the_old_backend_through_tc_conntrack");
    let t = TcTopology::new("uf").unwrap();
    let _servers = udp_backends(&t.srv);
    let pins = PinDir::new("uf").unwrap();
    let _ebpf = t.attach(pins.path()).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let mut port = 30300;
    for shared in [false, true] {
        for change in CHANGES {
            port += 1;
            let name = format!("u{port}");
            let (old, new) = ("198.18.21.2", "198.18.21.3");
            let (services, slices) = objects(&name, port, &[old], shared);
            sync(&mut agent, &services, &slices);
            let (tx, rx) = channel();
            let to = format!("198.18.20.1:{port}");
            let sender = t.cli.run(move || {
                let s = UdpSocket::bind("198.18.20.2:0")?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                std::thread::spawn(move || {
                    for _ in 0..22 {
                        let mut buf = [0u8; 128];
                        let line = match s.send_to(b"hi", &to).and_then(|_| s.recv_from(&mut buf)) {
                            Ok((n, _)) => format!("ok {}", String::from_utf8_lossy(&buf[..n])),
                            Err(e) => format!("err {:?}", e.kind()),
                        };
                        if tx.send((Instant::now(), line)).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
                Ok(())
            });
            sender.unwrap();
            std::thread::sleep(Duration::from_millis(800));
            let at = apply(&mut agent, change, &name, port, shared, new);
            let lines = collect(&rx);
            let what = format!("tc {change:?} shared={shared}");
            check(
                &what,
                &lines,
                at,
                &format!("{old}:5353"),
                (change == Change::Replaced).then_some(&*format!("{new}:5353")),
            );
        }
    }
}

/// Runs the test client in the cgroup and namespace, streaming its lines.
fn spawn_client(cg: &TestCgroup, ns: &Netns, mode: &str, to: &str) -> Receiver<Line> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([cg.path().to_str().unwrap(), ns.name(), mode, to, "22"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
        let _ = child.wait();
    });
    rx
}

#[test]
fn udp_flows_leave_the_old_backend_through_socket_balancing() {
    ferry_tests::needs_ebpf!("udp_flows_leave_the_old_backend_through_socket_balancing");
    // Backends 198.18.21.2 and .3, as in the TC topology.
    let (srv, cli) = client_and_backends("us", 21).unwrap();
    let _servers = udp_backends(&srv);
    let pins = PinDir::new("us").unwrap();
    let cg = TestCgroup::new("us").unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(
        pins.path(),
        &ferry_proxy::datapath::MapCapacities::default(),
    )
    .unwrap();
    ferry_proxy::ebpf::lb::attach_sock_lb(&mut ebpf, pins.path(), cg.path()).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let mut port = 30400;
    for mode in ["udpsock", "udpconn"] {
        for shared in [false, true] {
            for change in CHANGES {
                port += 1;
                let name = format!("s{port}");
                let (old, new) = ("198.18.21.2", "198.18.21.3");
                let (services, slices) = objects(&name, port, &[old], shared);
                sync(&mut agent, &services, &slices);
                // ferry_tests::objects::service's ClusterIP for this port.
                let ip = format!("198.19.0.{}", port % 250 + 1);
                let rx = spawn_client(&cg, &cli, mode, &format!("{ip}:80"));
                std::thread::sleep(Duration::from_millis(800));
                let at = apply(&mut agent, change, &name, port, shared, new);
                let lines = collect(&rx);
                let what = format!("{mode} {change:?} shared={shared}");
                let new = format!("{new}:5353");
                check(
                    &what,
                    &lines,
                    at,
                    &format!("{old}:5353"),
                    (change == Change::Replaced).then_some(new.as_str()),
                );
            }
        }
    }
    drop(ebpf);
}
