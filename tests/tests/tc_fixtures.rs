//! Privileged: BPF_PROG_TEST_RUN fixtures for the TC ingress program.
//! Each feeds one frame to the loaded program (maps programmed through
//! the real pipeline) and checks the verdict and every rewritten field of
//! the frame it returns, checksums included. FIB lookups run in a test
//! namespace: one without routes (the stack would route) and one with a
//! route and a neighbour to the backends (redirect with new MACs, TTL-1).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use ferry_proxy::datapath::MapCapacities;
use ferry_tests::bpf::PinDir;
use ferry_tests::netns::VethLink;
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::packets::{
    parse, tcp, udp, TcRunner, CLIENT_MAC, NODE_MAC, TCP_ACK, TCP_RST, TCP_SYN, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT,
};
use ferry_tests::Netns;

const CLIENT: [u8; 4] = [198, 18, 20, 2];
const NODE: [u8; 4] = [198, 18, 20, 1];
const NODE_INT: [u8; 4] = [198, 18, 21, 1];
const BACKEND: [u8; 4] = [198, 18, 21, 2];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

#[test]
fn tc_ingress_packet_fixtures() {
    ferry_tests::needs_ebpf!("tc_ingress_packet_fixtures");
    let pins = PinDir::new("fix").unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap();
    TcRunner::load(&mut ebpf).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let remote = [("198.18.21.2", "node-b", true, false)];
    let local = [("198.18.21.2", "node-a", true, false)];
    let services = vec![
        service("web", "TCP", 30080, 8080, ""),
        service(
            "local",
            "TCP",
            30081,
            8081,
            "    externalTrafficPolicy: Local",
        ),
        service("empty", "TCP", 30099, 8080, ""),
        service("empty-udp", "UDP", 30098, 5353, ""),
        service(
            "closed",
            "TCP",
            30085,
            8080,
            "    loadBalancerSourceRanges: [198.18.99.0/24]\n    # lb 198.19.1.11",
        ),
    ];
    let slices = vec![
        slice("web", "TCP", 8080, &remote),
        slice("local", "TCP", 8081, &local),
        slice("empty", "TCP", 8080, &[]),
        slice("empty-udp", "UDP", 5353, &[]),
        slice("closed", "TCP", 8080, &remote),
    ];
    sync(&mut agent, &services, &slices);

    // Without routes the FIB knows no way: the stack gets the frame.
    let bare = Netns::new("fixbare").unwrap();
    bare.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &bare,
    };

    // A SYN to the NodePort: DNAT to the backend and, the backend being on
    // another node with policy Cluster, SNAT to the node (the frontend's
    // address when the FIB has no source) and a port of the SNAT range.
    let syn = tcp((CLIENT, 40000), (NODE, 30080), TCP_SYN, 1000, b"");
    let r = run.run(&syn, 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = parse(&r.out).unwrap();
    let snat_port = p.sport;
    assert_eq!(p.src, NODE);
    assert!((61_000..=65_535).contains(&snat_port), "{snat_port}");
    assert_eq!((p.dst, p.dport), (BACKEND, 8080));
    assert_eq!((p.tcp_flags, p.seq, p.ttl), (TCP_SYN, 1000, 64));

    // The node's own connection from the client's port number to the same
    // backend is not mistaken for the SNATed flow.
    let own = tcp((BACKEND, 8080), (NODE, 40000), TCP_SYN | TCP_ACK, 1, b"");
    let r = run.run(&own, 1).unwrap();
    assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &own));

    // The backend's SYN-ACK: back to the client, from the NodePort.
    let synack = tcp(
        (BACKEND, 8080),
        (NODE, snat_port),
        TCP_SYN | TCP_ACK,
        5000,
        b"",
    );
    let r = run.run(&synack, 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = parse(&r.out).unwrap();
    assert_eq!((p.src, p.sport), (NODE, 30080));
    assert_eq!((p.dst, p.dport), (CLIENT, 40000));

    // Later packets of the flow follow the conntrack entry, payload intact.
    let data = tcp(
        (CLIENT, 40000),
        (NODE, 30080),
        TCP_ACK,
        1001,
        b"GET / HTTP/1.1\r\n",
    );
    let r = run.run(&data, 1).unwrap();
    let p = parse(&r.out).unwrap();
    assert_eq!(
        (p.dst, p.dport, p.src, p.sport),
        (BACKEND, 8080, NODE, snat_port)
    );
    assert_eq!(p.payload, b"GET / HTTP/1.1\r\n");

    // Local policy: DNAT only, the client address is kept.
    let r = run
        .run(&tcp((CLIENT, 40002), (NODE, 30081), TCP_SYN, 7, b""), 1)
        .unwrap();
    let p = parse(&r.out).unwrap();
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (CLIENT, 40002, BACKEND, 8081)
    );

    // No endpoints, TCP: the SYN comes back as RST|ACK from the frontend,
    // out of the interface it came in by.
    let r = run
        .run(&tcp((CLIENT, 40001), (NODE, 30099), TCP_SYN, 77, b""), 1)
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let p = parse(&r.out).unwrap();
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, NODE_MAC));
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (NODE, 30099, CLIENT, 40001)
    );
    assert_eq!((p.tcp_flags, p.ack), (TCP_RST | TCP_ACK, 78));
    assert_eq!(r.out.len(), 54);

    // No endpoints, UDP: ICMP port unreachable quoting the datagram.
    let dgram = udp((CLIENT, 40003), (NODE, 30098), b"query");
    let r = run.run(&dgram, 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let p = parse(&r.out).unwrap();
    assert_eq!((p.proto, p.sport, p.dport), (1, 3, 3), "type 3 code 3");
    assert_eq!((p.src, p.dst), (NODE, CLIENT));
    assert_eq!(p.payload, dgram[14..42].to_vec());

    // Outside loadBalancerSourceRanges: dropped.
    let r = run
        .run(
            &tcp((CLIENT, 40004), ([198, 19, 1, 11], 80), TCP_SYN, 1, b""),
            1,
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);

    // No Service: untouched.
    let other = tcp((CLIENT, 40005), (NODE, 22), TCP_SYN, 1, b"");
    let r = run.run(&other, 1).unwrap();
    assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &other));

    // With a route and a neighbour to the backends, a new flow leaves by
    // redirect: MACs from the FIB, TTL - 1, SNAT to the address facing
    // the backend.
    let routed = Netns::new("fixroute").unwrap();
    let peer = Netns::new("fixpeer").unwrap();
    routed
        .veth_to(
            &peer,
            VethLink {
                local: "fx0",
                local_cidr: "198.18.21.1/24",
                remote: "fx1",
                remote_cidr: "198.18.21.9/24",
            },
        )
        .unwrap();
    routed
        .ip(&[
            "neigh",
            "add",
            "198.18.21.2",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "fx0",
        ])
        .unwrap();
    routed
        .exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    let fx0_mac = routed
        .exec("cat", &["/sys/class/net/fx0/address"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap();
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &routed,
    };
    let r = run
        .run(&tcp((CLIENT, 41000), (NODE, 30080), TCP_SYN, 9, b""), 1)
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let p = parse(&r.out).unwrap();
    assert_eq!(p.dst_mac, BACKEND_MAC);
    let mac: Vec<String> = p.src_mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(mac.join(":"), fx0_mac);
    assert_eq!(p.ttl, 63);
    assert_eq!((p.src, p.dst, p.dport), (NODE_INT, BACKEND, 8080));
    assert!(p.sport >= 61_000, "{}", p.sport);
    drop(peer);
}

/// A SNAT port goes to a new flow once its flow closed; the old flow's
/// forward entry goes with it, so its client reusing the same source port
/// gets a port of its own instead of following the old entry onto the
/// port another client now holds (which broke both connections).
#[test]
fn reused_snat_port_takes_the_old_forward_entry_with_it() {
    ferry_tests::needs_ebpf!("reused_snat_port_takes_the_old_forward_entry_with_it");
    let pins = PinDir::new("fixsnat").unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap();
    TcRunner::load(&mut ebpf).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    sync(
        &mut agent,
        &[service("web", "TCP", 30080, 8080, "")],
        &[slice(
            "web",
            "TCP",
            8080,
            &[("198.18.21.2", "node-b", true, false)],
        )],
    );
    let bare = Netns::new("fixsnat").unwrap();
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &bare,
    };
    let sport_of = |r: &ferry_tests::packets::RunResult| parse(&r.out).unwrap().sport;
    // Flow A opens, and the backend closes it.
    let a = tcp((CLIENT, 50000), (NODE, 30080), TCP_SYN, 1, b"");
    let port_a = sport_of(&run.run(&a, 1).unwrap());
    let fin = tcp((BACKEND, 8080), (NODE, port_a), TCP_ACK | 0x01, 9, b"");
    run.run(&fin, 1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // New flows from other clients until one is given A's port.
    let mut taken = false;
    for i in 0..20_000u32 {
        let client = [198, 18, 40 + (i / 60_000) as u8, 2 + (i % 200) as u8];
        let syn = tcp(
            (client, 1024 + (i % 60_000) as u16),
            (NODE, 30080),
            TCP_SYN,
            1,
            b"",
        );
        if sport_of(&run.run(&syn, 1).unwrap()) == port_a {
            taken = true;
            break;
        }
    }
    assert!(taken, "port {port_a} was never reused");
    // A's client opens a new connection from the same port: not on A's
    // old SNAT port, which belongs to the other client now.
    let again = sport_of(&run.run(&a, 1).unwrap());
    assert_ne!(again, port_a);
}
