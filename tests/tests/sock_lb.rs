//! Privileged: socket-level load balancing end to end. Services go through
//! the real pipeline (parse, translate, plan) into pinned eBPF maps; a client
//! process in a test cgroup and namespace connects to ClusterIPs and gets
//! backends in another namespace, sees the Service address as its peer,
//! is refused at once by a Service without endpoints, and follows an
//! endpoint change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use ferry_proxy::agent::runner::SyncKind;
use ferry_proxy::agent::Agent;
use ferry_proxy::datapath::MapCapacities;
use ferry_proxy::plan::{plan_sync, Allocators, AppliedState, MapOp, PlanConfig, PlanScope};
use ferry_proxy::source::SourceEvent;
use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::netns::client_and_backends;
use ferry_tests::servers::Servers;
use ferry_tests::Netns;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn service(name: &str, ip: &str, port: i32, proto: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            ports: Some(vec![ServicePort {
                port,
                protocol: Some(proto.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(service: &str, ips: &[&str], port: i32, proto: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-1")),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            port: Some(port),
            protocol: Some(proto.into()),
            ..Default::default()
        }]),
    }
}

/// Runs the test client; returns its output lines.
fn client(cg: &TestCgroup, ns: &Netns, proto: &str, addr: &str, count: u32) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([
            cg.path().to_str().unwrap(),
            ns.name(),
            proto,
            addr,
            &count.to_string(),
        ])
        .output()
        .expect("running ferry-test-client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Maps pinned for one test, a client cgroup with the four socket-level
/// programs attached, and an agent on the maps.
fn attached(tag: &str) -> (PinDir, TestCgroup, aya::Ebpf, Agent) {
    let pins = PinDir::new(tag).unwrap();
    let cg = TestCgroup::new(tag).unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap();
    let attached =
        ferry_proxy::ebpf::lb::attach_sock_lb(&mut ebpf, pins.path(), cg.path()).unwrap();
    assert_eq!(attached.len(), 4);
    let agent = ferry_tests::objects::bpf_agent(pins.path());
    (pins, cg, ebpf, agent)
}

/// Hands the agent every object (as a source's snapshot) and syncs.
fn sync(agent: &mut Agent, services: &[Service], slices: &[EndpointSlice]) {
    agent.handle(SourceEvent::Snapshot {
        source: "test",
        services: services.to_vec(),
        slices: slices.to_vec(),
        nodes: vec![],
    });
    let report = agent.sync(SyncKind::Incremental).unwrap();
    assert_eq!(report.plan_errors, 0);
}

#[test]
fn clusterip_tcp_udp_reject_and_endpoint_change() {
    ferry_tests::needs_ebpf!("clusterip_tcp_udp_reject_and_endpoint_change");
    let (srv, cli) = client_and_backends("sl", 1).unwrap();
    let (tcp, udp) = srv
        .run(|| {
            Ok((
                vec![
                    TcpListener::bind("198.18.1.2:8080")?,
                    TcpListener::bind("198.18.1.3:8080")?,
                ],
                vec![UdpSocket::bind("198.18.1.2:5353")?],
            ))
        })
        .unwrap();
    let _servers = Servers::start(tcp, udp);

    let (_pins, cg, ebpf, mut agent) = attached("sock");
    let services = [
        service("web", "198.19.0.10", 80, "TCP"),
        service("dns", "198.19.0.53", 53, "UDP"),
        service("empty", "198.19.0.99", 80, "TCP"),
    ];
    let mut slices = vec![
        slice("web", &["198.18.1.2", "198.18.1.3"], 8080, "TCP"),
        slice("dns", &["198.18.1.2"], 5353, "UDP"),
    ];
    sync(&mut agent, &services, &slices);

    // TCP through the ClusterIP reaches both backends; the peer is the VIP.
    let lines = client(&cg, &cli, "tcp", "198.19.0.10:80", 24);
    let mut seen = BTreeMap::new();
    for l in &lines {
        let parts: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(parts.first(), Some(&"ok"), "{lines:?}");
        assert_eq!(parts[1], "198.19.0.10:80", "getpeername shows the Service");
        *seen.entry(parts[2].to_string()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["198.18.1.2:8080", "198.18.1.3:8080"],
        "both backends used: {seen:?}"
    );

    // UDP: the reply appears to come from the Service address.
    let lines = client(&cg, &cli, "udp", "198.19.0.53:53", 5);
    assert!(
        lines
            .iter()
            .all(|l| l == "ok 198.19.0.53:53 198.18.1.2:5353"),
        "{lines:?}"
    );

    // No endpoints: refused at once (ECONNREFUSED, as kube-proxy's reject),
    // never a hang.
    let lines = client(&cg, &cli, "tcp", "198.19.0.99:80", 3);
    for l in &lines {
        let parts: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(parts[..2], ["err", "ConnectionRefused"], "{lines:?}");
        let ms: u64 = parts[2].parse().unwrap();
        assert!(ms < 1000, "refusal took {ms} ms");
    }

    // Addresses that are no Service are left alone.
    let lines = client(&cg, &cli, "tcp", "198.18.1.3:8080", 1);
    assert_eq!(lines, vec!["ok 198.18.1.3:8080 198.18.1.3:8080"]);

    // An endpoint goes away: new connections only reach the remaining one.
    slices[0] = slice("web", &["198.18.1.3"], 8080, "TCP");
    sync(&mut agent, &services, &slices);
    let lines = client(&cg, &cli, "tcp", "198.19.0.10:80", 12);
    assert!(
        lines
            .iter()
            .all(|l| l == "ok 198.19.0.10:80 198.18.1.3:8080"),
        "{lines:?}"
    );

    // What the maps hold reads back to what was applied.
    let cfg = PlanConfig::default();
    let restored = AppliedState::restore(agent.maps_dump().unwrap());
    let mut alloc = Allocators::restore(&cfg, &restored);
    let replan = plan_sync(
        &restored,
        agent.core().desired(),
        PlanScope::Full,
        &mut alloc,
        &cfg,
    );
    // A frontend's meta (Service name, probe) is in no eBPF map: a state
    // read back from the maps lacks it, and the plan hands it on again.
    let entries: Vec<_> = replan
        .ops
        .iter()
        .filter(|op| !matches!(op, MapOp::UpsertMeta { .. }))
        .collect();
    assert!(
        entries.is_empty(),
        "maps differ from the applied state: {entries:?}"
    );
    drop(ebpf);
}

/// sessionAffinity ClientIP keeps a client on its backend until that
/// backend leaves the Service; datagrams of one unconnected UDP socket stay
/// on one backend and move to a live one once theirs is removed.
#[test]
fn affinity_and_udp_move_off_a_removed_backend() {
    ferry_tests::needs_ebpf!("affinity_and_udp_move_off_a_removed_backend");
    let (srv, cli) = client_and_backends("af", 4).unwrap();
    let (tcp, udp) = srv
        .run(|| {
            Ok((
                vec![
                    TcpListener::bind("198.18.4.2:8080")?,
                    TcpListener::bind("198.18.4.3:8080")?,
                ],
                vec![
                    UdpSocket::bind("198.18.4.2:5353")?,
                    UdpSocket::bind("198.18.4.3:5353")?,
                ],
            ))
        })
        .unwrap();
    let _servers = Servers::start(tcp, udp);
    let (_pins, cg, ebpf, mut agent) = attached("aff");

    let mut sticky = service("sticky", "198.19.0.12", 80, "TCP");
    if let Some(spec) = sticky.spec.as_mut() {
        spec.session_affinity = Some("ClientIP".into());
    }
    let services = [sticky, service("dns", "198.19.0.54", 53, "UDP")];
    let both = ["198.18.4.2", "198.18.4.3"];
    let mut slices = vec![
        slice("sticky", &both, 8080, "TCP"),
        slice("dns", &both, 5353, "UDP"),
    ];
    sync(&mut agent, &services, &slices);

    // Affinity: ten separate clients of this namespace, one backend.
    let lines = client(&cg, &cli, "tcp", "198.19.0.12:80", 10);
    let first = lines[0].split_whitespace().nth(2).unwrap().to_string();
    assert!(lines.iter().all(|l| l.ends_with(&first)), "{lines:?}");
    // That backend leaves the Service: the next clients go to the other.
    let other = if first.starts_with("198.18.4.2") {
        "198.18.4.3"
    } else {
        "198.18.4.2"
    };
    slices[0] = slice("sticky", &[other], 8080, "TCP");
    sync(&mut agent, &services, &slices);
    let lines = client(&cg, &cli, "tcp", "198.19.0.12:80", 5);
    assert!(
        lines
            .iter()
            .all(|l| l == &format!("ok 198.19.0.12:80 {other}:8080")),
        "{lines:?}"
    );

    // UDP: one socket's datagrams stick to one backend...
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([
            cg.path().to_str().unwrap(),
            cli.name(),
            "udpsock",
            "198.19.0.54:53",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut read_line = || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).unwrap();
        l.trim().to_string()
    };
    let mut early = Vec::new();
    for _ in 0..5 {
        early.push(read_line());
    }
    let used = early[0].split_whitespace().nth(2).unwrap().to_string();
    assert!(
        early
            .iter()
            .all(|l| l == &format!("ok 198.19.0.54:53 {used}")),
        "{early:?}"
    );
    // ...and move to the other one once theirs is removed (its server
    // still answers, so only the choice of backend tells).
    let keep = if used.starts_with("198.18.4.2") {
        "198.18.4.3"
    } else {
        "198.18.4.2"
    };
    slices[1] = slice("dns", &[keep], 5353, "UDP");
    let removed_at = Instant::now();
    sync(&mut agent, &services, &slices);
    let mut rest = Vec::new();
    for _ in 0..25 {
        rest.push(read_line());
    }
    // Within 1 s (10 datagrams at most) every reply comes from the live one.
    let moved = rest
        .iter()
        .position(|l| l == &format!("ok 198.19.0.54:53 {keep}:5353"))
        .expect("never moved");
    assert!(moved <= 10, "moved after {moved} datagrams: {rest:?}");
    assert!(
        rest[moved..]
            .iter()
            .all(|l| l == &format!("ok 198.19.0.54:53 {keep}:5353")),
        "{rest:?}"
    );
    assert!(removed_at.elapsed() < Duration::from_secs(10));
    assert!(child.wait().unwrap().success());
    drop(ebpf);
}

/// A connected UDP socket was translated once, at connect(): when its
/// backend is deleted the agent closes it (sock_diag SOCK_DESTROY), the
/// client sees an error, opens a new socket and reaches the live backend,
/// within a second.
#[test]
fn connected_udp_socket_of_a_removed_backend_is_closed() {
    ferry_tests::needs_ebpf!("connected_udp_socket_of_a_removed_backend_is_closed");
    let (srv, cli) = client_and_backends("cu", 5).unwrap();
    let udp = srv
        .run(|| {
            Ok(vec![
                UdpSocket::bind("198.18.5.2:5353")?,
                UdpSocket::bind("198.18.5.3:5353")?,
            ])
        })
        .unwrap();
    let _servers = Servers::start(vec![], udp);
    let (_pins, cg, ebpf, mut agent) = attached("cudp");
    let services = [service("dns", "198.19.0.55", 53, "UDP")];
    let mut slices = vec![slice("dns", &["198.18.5.2", "198.18.5.3"], 5353, "UDP")];
    sync(&mut agent, &services, &slices);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
        .args([
            cg.path().to_str().unwrap(),
            cli.name(),
            "udpconn",
            "198.19.0.55:53",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut read_line = || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).unwrap();
        l.trim().to_string()
    };
    let early: Vec<String> = (0..5).map(|_| read_line()).collect();
    let used = early[0].split_whitespace().nth(2).unwrap().to_string();
    assert!(
        early
            .iter()
            .all(|l| l == &format!("ok 198.19.0.55:53 {used}")),
        "{early:?}"
    );
    let keep = if used.starts_with("198.18.5.2") {
        "198.18.5.3"
    } else {
        "198.18.5.2"
    };
    // A socket connected to that backend's address directly, not through
    // the Service, is none of Ferry's business: it stays open.
    let used_addr = used.clone();
    let direct = cli
        .run(move || {
            let s = UdpSocket::bind("198.18.5.1:0")?;
            s.connect(&used_addr)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(s)
        })
        .unwrap();
    slices[0] = slice("dns", &[keep], 5353, "UDP");
    sync(&mut agent, &services, &slices);
    let rest: Vec<String> = (0..25).map(|_| read_line()).collect();
    // The removed backend's server still answers: only a closed socket
    // and a new connect() can move the client.
    let moved = rest
        .iter()
        .position(|l| l == &format!("ok 198.19.0.55:53 {keep}:5353"))
        .unwrap_or_else(|| panic!("never moved: {rest:?}"));
    assert!(moved <= 10, "moved after {moved} datagrams: {rest:?}");
    assert!(
        rest[..moved].iter().any(|l| l.starts_with("err ")),
        "the old socket was not closed: {rest:?}"
    );
    direct.send(b"still there?").unwrap();
    let mut buf = [0u8; 64];
    let n = direct.recv(&mut buf).expect("the direct socket was closed");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with(&used));
    assert!(
        rest[moved..]
            .iter()
            .all(|l| l == &format!("ok 198.19.0.55:53 {keep}:5353")),
        "{rest:?}"
    );
    assert!(child.wait().unwrap().success());
    drop(ebpf);
}

/// From the node (a process in the cgroup): a NodePort on a node address,
/// an externalIP and a LoadBalancer IP are balanced at connect() like a
/// ClusterIP; internalTrafficPolicy Local without a local endpoint makes
/// connect() fail at once. externalTrafficPolicy Local with endpoints only
/// elsewhere still serves the node's own connections through every
/// endpoint (kube-proxy's short-circuit), unless internalTrafficPolicy is
/// Local too.
#[test]
fn external_frontends_and_internal_local_from_the_node() {
    use ferry_tests::objects;
    ferry_tests::needs_ebpf!("external_frontends_and_internal_local_from_the_node");
    let (srv, cli) = client_and_backends("ex", 6).unwrap();
    let tcp = srv
        .run(|| {
            Ok(vec![
                TcpListener::bind("198.18.6.2:8080")?,
                TcpListener::bind("198.18.6.3:8080")?,
            ])
        })
        .unwrap();
    let _servers = Servers::start(tcp, vec![]);
    let (_pins, cg, ebpf, mut agent) = attached("ext");
    let remote = [
        ("198.18.6.2", "node-b", true, false),
        ("198.18.6.3", "node-b", true, false),
    ];
    let services = [
        objects::service("np", "TCP", 30180, 8080, "    externalIPs: [198.19.3.10]"),
        objects::service("lb", "TCP", 30181, 8080, "    # lb 198.19.3.11"),
        objects::service(
            "itl",
            "TCP",
            30182,
            8080,
            "    internalTrafficPolicy: Local",
        ),
        objects::service(
            "etl",
            "TCP",
            30183,
            8080,
            "    externalTrafficPolicy: Local\n    # lb 198.19.3.12",
        ),
        objects::service(
            "both",
            "TCP",
            30184,
            8080,
            "    externalTrafficPolicy: Local\n    internalTrafficPolicy: Local",
        ),
    ];
    let slices = [
        objects::slice("np", "TCP", 8080, &remote),
        objects::slice("lb", "TCP", 8080, &remote),
        objects::slice("itl", "TCP", 8080, &remote),
        objects::slice("etl", "TCP", 8080, &remote),
        objects::slice("both", "TCP", 8080, &remote),
    ];
    objects::sync(&mut agent, &services, &slices);

    for frontend in [
        "198.18.20.1:30180",
        "198.19.3.10:80",
        "198.19.3.11:80",
        // externalTrafficPolicy Local, no local endpoint: via the ClusterIP.
        "198.18.20.1:30183",
        "198.19.3.12:80",
    ] {
        let lines = client(&cg, &cli, "tcp", frontend, 12);
        let mut seen = std::collections::BTreeSet::new();
        for l in &lines {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts[..2], ["ok", frontend], "{lines:?}");
            seen.insert(parts[2].to_string());
        }
        assert_eq!(seen.len(), 2, "{frontend}: {seen:?}");
    }
    // internalTrafficPolicy Local, endpoints only elsewhere: the ClusterIP
    // (198.19.0.183, see objects::service) refuses at once.
    // Both policies Local (ClusterIP 198.19.0.185): the NodePort drops too.
    for frontend in ["198.19.0.183:80", "198.19.0.185:80", "198.18.20.1:30184"] {
        let lines = client(&cg, &cli, "tcp", frontend, 2);
        for l in &lines {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts[..2], ["err", "PermissionDenied"], "{lines:?}");
            assert!(parts[2].parse::<u64>().unwrap() < 1000, "{lines:?}");
        }
    }
    drop(ebpf);
}

/// sessionAffinity ClientIP survives a backend joining the Service: the
/// client's backend keeps its slot, so its remembered choice still holds
/// (kube-proxy keeps a client on its endpoint while the endpoint stays).
/// Eight Services, each starting with the one backend that sorts last; a
/// slot layout that followed the address order would move it for each, and
/// half of them would lose their client (all eight keep it by chance with
/// odds of 1 in 256).
#[test]
fn affinity_survives_a_new_backend() {
    ferry_tests::needs_ebpf!("affinity_survives_a_new_backend");
    let (srv, cli) = client_and_backends("an", 5).unwrap();
    let tcp = srv
        .run(|| {
            Ok(vec![
                TcpListener::bind("198.18.5.2:8080")?,
                TcpListener::bind("198.18.5.3:8080")?,
            ])
        })
        .unwrap();
    let _servers = Servers::start(tcp, Vec::new());
    let (_pins, cg, ebpf, mut agent) = attached("affnew");
    let services: Vec<Service> = (0..8)
        .map(|i| {
            let mut s = service(
                &format!("sticky{i}"),
                &format!("198.19.0.{}", 20 + i),
                80,
                "TCP",
            );
            if let Some(spec) = s.spec.as_mut() {
                spec.session_affinity = Some("ClientIP".into());
            }
            s
        })
        .collect();
    let mut slices: Vec<EndpointSlice> = (0..8)
        .map(|i| slice(&format!("sticky{i}"), &["198.18.5.3"], 8080, "TCP"))
        .collect();
    sync(&mut agent, &services, &slices);
    for i in 0..8 {
        let lines = client(&cg, &cli, "tcp", &format!("198.19.0.{}:80", 20 + i), 1);
        assert!(lines[0].ends_with("198.18.5.3:8080"), "{lines:?}");
    }
    // 198.18.5.2 joins every Service; each client keeps 198.18.5.3.
    for (i, s) in slices.iter_mut().enumerate() {
        *s = slice(
            &format!("sticky{i}"),
            &["198.18.5.2", "198.18.5.3"],
            8080,
            "TCP",
        );
    }
    sync(&mut agent, &services, &slices);
    for i in 0..8 {
        let lines = client(&cg, &cli, "tcp", &format!("198.19.0.{}:80", 20 + i), 3);
        assert!(
            lines.iter().all(|l| l.ends_with("198.18.5.3:8080")),
            "sticky{i}: {lines:?}"
        );
    }
    drop(ebpf);
}
