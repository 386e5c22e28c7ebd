//! Privileged: one client port used towards two frontends whose flows land
//! on the same backend, kept without SNAT (the backend runs on this node).
//! Both flows would share the reply tuple (backend, client port); each
//! reply must still leave from its own frontend. A CI run of the cluster
//! story lost a connection this way: the client reopened a NodePort flow
//! from a port it had used for the LoadBalancer address in between, the
//! NodePort flow's old forward entry was reused, and the SYN-ACK went back
//! from the LoadBalancer address (the client answered with a RST).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use ferry_proxy::datapath::MapCapacities;
use ferry_tests::bpf::PinDir;
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::packets::{parse, tcp, Parsed, TcRunner, TCP_ACK, TCP_SYN};
use ferry_tests::Netns;

const CLIENT: [u8; 4] = [198, 18, 20, 2];
const NODE: [u8; 4] = [198, 18, 20, 1];
const LB: [u8; 4] = [198, 19, 1, 12];
const BACKEND: [u8; 4] = [198, 18, 21, 2];
const TCP_FIN: u8 = 0x01;
/// How long a closed flow keeps its tuples (the program's 1 s, and some).
const CLOSED_FOR: Duration = Duration::from_millis(1100);

/// A NodePort and a LoadBalancer Service, both on one backend of this node.
fn setup(name: &str) -> (PinDir, aya::Ebpf, Netns) {
    let pins = PinDir::new(name).unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap();
    TcRunner::load(&mut ebpf).unwrap();
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let local = [("198.18.21.2", "node-a", true, false)];
    sync(
        &mut agent,
        &[
            service("np", "TCP", 30080, 8080, ""),
            service("lb", "TCP", 30082, 8080, "    # lb 198.19.1.12"),
        ],
        &[
            slice("np", "TCP", 8080, &local),
            slice("lb", "TCP", 8080, &local),
        ],
    );
    let ns = Netns::new(name).unwrap();
    (pins, ebpf, ns)
}

fn send(run: &mut TcRunner<'_>, src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Parsed {
    parse(&run.run(&tcp(src, dst, flags, 1, b""), 1).unwrap().out).unwrap()
}

/// The backend's SYN-ACK to `port` on the client: where it leaves from.
fn reply_from(run: &mut TcRunner<'_>, port: u16) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let p = send(run, (BACKEND, 8080), (CLIENT, port), TCP_SYN | TCP_ACK);
    ((p.src, p.sport), (p.dst, p.dport))
}

/// Opens a flow from the client's `port` to `frontend`, checks its reply
/// and closes it (both FINs seen).
fn open_and_close(run: &mut TcRunner<'_>, port: u16, frontend: ([u8; 4], u16)) {
    let p = send(run, (CLIENT, port), frontend, TCP_SYN);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (CLIENT, port, BACKEND, 8080)
    );
    assert_eq!(reply_from(run, port), (frontend, (CLIENT, port)));
    send(run, (CLIENT, port), frontend, TCP_FIN | TCP_ACK);
    send(run, (BACKEND, 8080), (CLIENT, port), TCP_FIN | TCP_ACK);
}

#[test]
fn a_reopened_flow_replies_from_its_own_frontend() {
    ferry_tests::needs_ebpf!("a_reopened_flow_replies_from_its_own_frontend");
    let (_pins, mut ebpf, ns) = setup("tuplereopen");
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &ns,
    };
    // NodePort, then LoadBalancer, then NodePort again, from one port.
    open_and_close(&mut run, 50000, (NODE, 30080));
    std::thread::sleep(CLOSED_FOR);
    open_and_close(&mut run, 50000, (LB, 80));
    std::thread::sleep(CLOSED_FOR);
    open_and_close(&mut run, 50000, (NODE, 30080));
}

#[test]
fn a_client_port_in_two_live_flows_to_one_backend_is_remapped() {
    ferry_tests::needs_ebpf!("a_client_port_in_two_live_flows_to_one_backend_is_remapped");
    let (pins, mut ebpf, ns) = setup("tupleclash");
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &ns,
    };
    let a = send(&mut run, (CLIENT, 50001), (NODE, 30080), TCP_SYN);
    assert_eq!((a.src, a.sport), (CLIENT, 50001));
    // The same port to the LoadBalancer while the NodePort flow lives:
    // the client address stays, its port is one of the SNAT range.
    let b = send(&mut run, (CLIENT, 50001), (LB, 80), TCP_SYN);
    assert_eq!((b.src, b.dst, b.dport), (CLIENT, BACKEND, 8080));
    assert!((61_000..=65_535).contains(&b.sport), "{}", b.sport);
    // Each flow's replies leave from its own frontend, to port 50001.
    assert_eq!(
        reply_from(&mut run, 50001),
        ((NODE, 30080), (CLIENT, 50001))
    );
    assert_eq!(reply_from(&mut run, b.sport), ((LB, 80), (CLIENT, 50001)));
    // Later packets of each flow keep their translation.
    let a2 = send(&mut run, (CLIENT, 50001), (NODE, 30080), TCP_ACK);
    let b2 = send(&mut run, (CLIENT, 50001), (LB, 80), TCP_ACK);
    assert_eq!((a2.sport, b2.sport), (50001, b.sport));
    let counters = ferry_proxy::ebpf::lb::read_lb_counters(pins.path()).unwrap();
    let remapped = counters.iter().find(|(n, _)| *n == "tc_port_remapped");
    assert_eq!(remapped, Some(&("tc_port_remapped", 1)));
}
