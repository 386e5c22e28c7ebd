//! Privileged: the TC path end to end. A client namespace reaches a node
//! namespace whose two backend links carry the ingress and egress programs
//! (a third, a "pod" link, carries none); Services go through the real
//! pipeline into the pinned maps, and real TCP and UDP sockets check each
//! semantic: NodePort, LoadBalancer and externalIP DNAT, SNAT with
//! externalTrafficPolicy Cluster and a remote backend, the client address
//! kept with Local, hairpin, replies reversed on egress, source ranges,
//! RST / ICMP for a Service without endpoints, a UDP flow moving off a
//! removed backend, and a TCP connection draining from a terminating one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use ferry_tests::bpf::PinDir;
use ferry_tests::netns::TcTopology;
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::require_privileged;
use ferry_tests::servers::Servers;
use ferry_tests::userspace::{EchoBackend, LineClient};

/// One request over a new TCP connection from the client namespace.
fn tcp_ask(t: &TcTopology, to: &str) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().unwrap();
    t.cli
        .run(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"hi")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .map_err(|e| match e.downcast::<std::io::Error>() {
            Ok(io) => io,
            Err(e) => std::io::Error::other(e.to_string()),
        })
}

/// A UDP socket in the client namespace (bound to `port`, 0 for any).
fn udp_socket(t: &TcTopology, port: u16) -> UdpSocket {
    t.cli
        .run(move || {
            let s = UdpSocket::bind(("198.18.20.2", port))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
        .unwrap()
}

fn udp_ask(s: &UdpSocket, to: &str) -> Option<(SocketAddr, String)> {
    s.send_to(b"hi", to).ok()?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    Some((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

#[test]
fn nodeport_loadbalancer_and_externalip_through_tc() {
    ferry_tests::needs_ebpf!("nodeport_loadbalancer_and_externalip_through_tc");
    let t = TcTopology::new("tn").unwrap();
    let (tcp, udp) = t
        .srv
        .run(|| {
            Ok((
                vec![
                    TcpListener::bind("198.18.21.2:8080")?,
                    TcpListener::bind("198.18.21.3:8080")?,
                    TcpListener::bind("198.18.21.2:8081")?,
                    TcpListener::bind("198.18.21.2:8082")?,
                ],
                vec![
                    UdpSocket::bind("198.18.21.2:5353")?,
                    UdpSocket::bind("198.18.21.3:5353")?,
                ],
            ))
        })
        .unwrap();
    let _servers = Servers::start_with_peer(tcp, udp);
    let pod_tcp = t
        .pod
        .run(|| Ok(vec![TcpListener::bind("198.18.22.2:8083")?]))
        .unwrap();
    let _pod_servers = Servers::start_with_peer(pod_tcp, vec![]);

    let pins = PinDir::new("tcnp").unwrap();
    let ebpf = t.attach(pins.path()).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());

    let remote = |ip| (ip, "node-b", true, false);
    let services = vec![
        // Cluster policy, backends on another node: SNAT to the node.
        service("web", "TCP", 30080, 8080, "    externalIPs: [198.19.2.10]"),
        // Local policy, local backend: the client address is kept.
        service(
            "local",
            "TCP",
            30081,
            8081,
            "    externalTrafficPolicy: Local",
        ),
        // Hairpin: the only backend connects to its own Service.
        service(
            "hairpin",
            "TCP",
            30082,
            8082,
            "    externalTrafficPolicy: Local",
        ),
        // A local backend behind a link without the programs: its replies
        // are reversed on the client link's egress.
        service(
            "pod",
            "TCP",
            30083,
            8083,
            "    externalTrafficPolicy: Local",
        ),
        service("dns", "UDP", 30053, 5353, ""),
        service("empty", "TCP", 30099, 8080, ""),
        service("empty-udp", "UDP", 30098, 5353, ""),
        service(
            "lb-open",
            "TCP",
            30084,
            8080,
            "    loadBalancerSourceRanges: [198.18.20.0/24]\n    # lb 198.19.1.10",
        ),
        service(
            "lb-closed",
            "TCP",
            30085,
            8080,
            "    loadBalancerSourceRanges: [198.18.99.0/24]\n    # lb 198.19.1.11",
        ),
    ];
    let both = [remote("198.18.21.2"), remote("198.18.21.3")];
    let slices = vec![
        slice("web", "TCP", 8080, &both),
        slice(
            "local",
            "TCP",
            8081,
            &[("198.18.21.2", "node-a", true, false)],
        ),
        slice(
            "hairpin",
            "TCP",
            8082,
            &[("198.18.21.2", "node-a", true, false)],
        ),
        slice(
            "pod",
            "TCP",
            8083,
            &[("198.18.22.2", "node-a", true, false)],
        ),
        slice("dns", "UDP", 5353, &both),
        slice("empty", "TCP", 8080, &[]),
        slice("empty-udp", "UDP", 5353, &[]),
        slice("lb-open", "TCP", 8080, &both),
        slice("lb-closed", "TCP", 8080, &both),
    ];
    sync(&mut agent, &services, &slices);

    // NodePort, externalIP and LoadBalancer: both backends reached, and
    // they see the node (198.18.21.1, the address facing them), not the
    // client: SNAT with externalTrafficPolicy Cluster.
    for frontend in ["198.18.20.1:30080", "198.19.2.10:80", "198.19.1.10:80"] {
        let mut backends = std::collections::BTreeSet::new();
        for _ in 0..16 {
            let answer = tcp_ask(&t, frontend).unwrap_or_else(|e| {
                panic!(
                    "{frontend}: {e}; counters {:?}",
                    ferry_proxy::ebpf::lb::read_lb_counters(pins.path())
                )
            });
            let (me, peer) = answer.split_once(' ').unwrap();
            assert!(peer.starts_with("198.18.21.1:"), "{frontend}: {answer}");
            backends.insert(me.to_string());
        }
        assert_eq!(backends.len(), 2, "{frontend}: {backends:?}");
    }

    // Local policy: the backend sees the client itself.
    let answer = tcp_ask(&t, "198.18.20.1:30081").unwrap();
    assert!(
        answer.starts_with("198.18.21.2:8081 198.18.20.2:"),
        "{answer}"
    );

    // Replies from a backend behind a link without the programs are
    // reversed on egress: the connection works and keeps the client address.
    let answer = tcp_ask(&t, "198.18.20.1:30083").unwrap();
    assert!(
        answer.starts_with("198.18.22.2:8083 198.18.20.2:"),
        "{answer}"
    );

    // Hairpin: the backend reaches itself through the NodePort and sees
    // the node as its peer.
    let answer = t
        .srv
        .run(|| {
            let to: SocketAddr = "198.18.21.1:30082".parse()?;
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"hi")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap();
    assert!(
        answer.starts_with("198.18.21.2:8082 198.18.21.1:"),
        "{answer}"
    );

    // UDP: the reply comes from the NodePort; a flow stays on its backend.
    let sock = udp_socket(&t, 40053);
    let (from, first) = udp_ask(&sock, "198.18.20.1:30053").unwrap();
    assert_eq!(from.to_string(), "198.18.20.1:30053");
    let chosen = first.split(' ').next().unwrap().to_string();
    for _ in 0..5 {
        let (_, again) = udp_ask(&sock, "198.18.20.1:30053").unwrap();
        assert!(again.starts_with(&chosen), "{again} vs {chosen}");
    }

    // No endpoints: a SYN gets a RST at once, a datagram an ICMP port
    // unreachable (ECONNREFUSED on a connected socket).
    let started = Instant::now();
    let err = tcp_ask(&t, "198.18.20.1:30099").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let refused = t
        .cli
        .run(|| {
            let s = UdpSocket::bind("198.18.20.2:0")?;
            s.connect("198.18.20.1:30098")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send(b"hi")?;
            let mut buf = [0u8; 16];
            Ok(s.recv(&mut buf).map_err(|e| e.kind()))
        })
        .unwrap();
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));

    // loadBalancerSourceRanges: a client outside them gets nothing.
    let err = tcp_ask(&t, "198.19.1.11:80").unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "{err}"
    );

    // A backend is removed: the UDP flow moves to the other one at its
    // next datagram instead of being blackholed.
    let other = if chosen == "198.18.21.2:5353" {
        "198.18.21.3"
    } else {
        "198.18.21.2"
    };
    let mut slices2 = slices.clone();
    slices2[4] = slice("dns", "UDP", 5353, &[remote(other)]);
    sync(&mut agent, &services, &slices2);
    let moved = Instant::now();
    let (_, after) = udp_ask(&sock, "198.18.20.1:30053").unwrap();
    assert!(after.starts_with(other), "{after}");
    assert!(moved.elapsed() < Duration::from_secs(1));
    // ... and the sweeper removes every conntrack entry of the removed
    // backend within a second.
    let removed: std::net::Ipv4Addr = chosen.split(':').next().unwrap().parse().unwrap();
    let stale = || {
        let data = aya::maps::MapData::from_pin(pins.path().join("ferry_ct4")).unwrap();
        let ct: aya::maps::HashMap<_, ferry_common::lb::Ct4Key, ferry_common::lb::Ct4Value> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
        ct.iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let backend = if k.dir == ferry_common::lb::CT_FORWARD {
                    v.addr
                } else {
                    k.src
                };
                backend.to_host() == removed.to_bits() && k.proto == 17
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while stale() > 0 {
        assert!(
            Instant::now() < deadline,
            "conntrack entries of {removed} left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let counters = ferry_proxy::ebpf::lb::read_lb_counters(pins.path()).unwrap();
    for name in [
        "tc_new_flow",
        "tc_tracked",
        "tc_reply",
        "tc_rejected",
        "tc_source_denied",
        // Not tc_repicked: the sweeper usually removes the stale entry
        // before the next datagram could find it.
    ] {
        assert!(
            counters.iter().any(|(n, v)| *n == name && *v > 0),
            "{name} not counted: {counters:?}"
        );
    }
    drop(ebpf);
}

/// A TCP connection to a backend that starts terminating keeps flowing
/// (the backend drains) while new connections go to the ready one.
#[test]
fn tcp_drains_from_a_terminating_backend() {
    ferry_tests::needs_ebpf!("tcp_drains_from_a_terminating_backend");
    let t = TcTopology::new("td").unwrap();
    let backends = t
        .srv
        .run(|| {
            Ok((
                EchoBackend::start("198.18.21.2:9000")?,
                EchoBackend::start("198.18.21.3:9000")?,
            ))
        })
        .unwrap();
    let pins = PinDir::new("tcdr").unwrap();
    let ebpf = t.attach(pins.path()).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let services = vec![service("echo", "TCP", 30090, 9000, "")];
    sync(
        &mut agent,
        &services,
        &[slice(
            "echo",
            "TCP",
            9000,
            &[
                ("198.18.21.2", "node-b", true, false),
                ("198.18.21.3", "node-b", true, false),
            ],
        )],
    );
    let mut conn = t
        .cli
        .run(|| LineClient::connect("198.18.20.1:30090"))
        .unwrap();
    let me = conn.ask("one").unwrap();
    let (draining, ready) = if me.starts_with("198.18.21.2") {
        ("198.18.21.2", "198.18.21.3")
    } else {
        ("198.18.21.3", "198.18.21.2")
    };
    sync(
        &mut agent,
        &services,
        &[slice(
            "echo",
            "TCP",
            9000,
            &[
                (draining, "node-b", false, true),
                (ready, "node-b", true, false),
            ],
        )],
    );
    for i in 0..5 {
        let answer = conn.ask(&format!("more{i}")).unwrap();
        assert!(answer.starts_with(&me), "{answer}");
    }
    for _ in 0..6 {
        let mut fresh = t
            .cli
            .run(|| LineClient::connect("198.18.20.1:30090"))
            .unwrap();
        let answer = fresh.ask("new").unwrap();
        assert!(answer.starts_with(ready), "{answer}");
    }
    drop(backends);
    drop(ebpf);
}

/// `ferry run` in the node namespace attaches the TC programs to
/// `--interfaces`; an established NodePort stream keeps flowing while the
/// agent is killed with SIGKILL and started again, the restart swaps the
/// programs in the pinned links, and new connections work after.
#[test]
fn nodeport_stream_survives_agent_sigkill() {
    let bin = ferry_tests::ferry_binary();
    if !require_privileged(
        "nodeport_stream_survives_agent_sigkill",
        bin.as_ref().map(|_| ()).map_err(Clone::clone),
    ) {
        return;
    }
    let bin = bin.unwrap();
    let t = TcTopology::new("tr").unwrap();
    let _backend = t
        .srv
        .run(|| EchoBackend::start("198.18.21.2:9100"))
        .unwrap();
    let pins = PinDir::new("tcrs").unwrap();
    let cg = ferry_tests::bpf::TestCgroup::new("tcrs").unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-test-tcrs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: t}
spec:
  type: NodePort
  clusterIP: 198.19.0.30
  ports: [{port: 80, targetPort: 9100, nodePort: 30100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: t, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{port: 9100}]
endpoints:
- {addresses: [198.18.21.2], nodeName: node-b}
",
    )
    .unwrap();
    let log = dir.join("agent.log");
    let start = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        ferry_tests::KillOnDrop(
            ferry_tests::agent::EbpfAgent {
                netns: Some(t.node.name()),
                source: format!("--source=file:{}", dir.display()),
                pins: pins.path(),
                cgroup: cg.path(),
                interfaces: "tce0,tcb0",
                hostname: "node-a",
            }
            .command(&bin)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        )
    };
    let connect = || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match t.cli.run(|| LineClient::connect("198.18.20.1:30100")) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("NodePort never answered: {e:#}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let agent = start();
    let mut conn = connect();
    assert_eq!(conn.ask("before").unwrap(), "198.18.21.2:9100");

    // 40 round trips, 50 ms apart, across the kill and the restart.
    let mut agent = Some(agent);
    let mut restarted = None;
    for asked in 0..40 {
        let answer = conn.ask(&format!("line{asked}")).unwrap();
        assert_eq!(answer, "198.18.21.2:9100", "answer {asked}");
        if asked == 10 {
            let mut a = agent.take().unwrap();
            let _ = a.0.kill(); // SIGKILL
            let _ = a.0.wait();
        }
        if asked == 20 {
            restarted = Some(start());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _agent = restarted.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("replaced=true")
    {
        assert!(Instant::now() < deadline, "no program swap in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fresh = connect();
    assert_eq!(fresh.ask("after").unwrap(), "198.18.21.2:9100");
    let _ = std::fs::remove_dir_all(&dir);
}
