//! Privileged: the TC path with its LRU maps full, through BPF_PROG_TEST_RUN.
//! With room for 4,096 conntrack entries (2,048 flows) and 4,096
//! affinities, 3,000 UDP flows and 5,000 ClientIP clients are all
//! translated (each new one
//! evicts the least recently used entry), an early flow comes back and is
//! translated again, and the census counts what the maps hold.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use ferry_common::lb::{AFFINITY4_MAP, CT4_MAP};
use ferry_proxy::agent::Agent;
use ferry_proxy::datapath::{BpfMaps, MapCapacities};
use ferry_proxy::ebpf::status::{fill_warnings, EbpfStatus};
use ferry_tests::bpf::PinDir;
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::packets::{parse, tcp, udp, TcRunner, TCP_SYN, TC_ACT_OK};
use ferry_tests::{agent_config, Netns};

const NODE: [u8; 4] = [198, 18, 20, 1];
const BACKEND: [u8; 4] = [198, 18, 21, 2];

#[test]
fn full_conntrack_and_affinity_maps_evict_the_oldest_and_serve_the_new() {
    ferry_tests::needs_ebpf!("full_conntrack_and_affinity_maps_evict_the_oldest_and_serve_the_new");
    let caps = MapCapacities {
        conntrack: 4096,
        affinity: 4096,
        ..MapCapacities::default()
    };
    let pins = PinDir::new("xm").unwrap();
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &caps).unwrap();
    TcRunner::load(&mut ebpf).unwrap();
    let maps = BpfMaps::open(pins.path(), caps).unwrap();
    let mut agent = Agent::new(agent_config(vec!["test"]), Box::new(maps)).unwrap();
    let backend = [("198.18.21.2", "node-b", true, false)];
    sync(
        &mut agent,
        &[
            service("dns", "UDP", 30053, 5353, ""),
            service(
                "sticky",
                "TCP",
                30054,
                9100,
                "    sessionAffinity: ClientIP",
            ),
        ],
        &[
            slice("dns", "UDP", 5353, &backend),
            slice("sticky", "TCP", 9100, &backend),
        ],
    );
    let ns = Netns::new("xm").unwrap();
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &ns,
    };
    let mut translated = |frame: &[u8], to_port: u16| {
        let r = run.run(frame, 1).unwrap();
        let p = parse(&r.out).unwrap();
        r.verdict == TC_ACT_OK && (p.dst, p.dport) == (BACKEND, to_port)
    };
    // 3,000 UDP flows (6,000 conntrack entries) in a table of 4,096.
    let client = |i: u32| [198, 18, 100 + (i / 250) as u8, (i % 250) as u8 + 1];
    let flow = |i: u32| udp((client(0), 20_000 + i as u16), (NODE, 30053), b"q");
    let served = (0..600).filter(|i| translated(&flow(*i), 5353)).count();
    assert_eq!(
        served, 600,
        "every new flow is translated with the table full"
    );
    assert!(
        translated(&flow(0), 5353),
        "the first flow, evicted, comes back"
    );
    // 600 ClientIP clients (one affinity each) in a map of 256.
    let syn = |i: u32| tcp((client(i), 40_000), (NODE, 30054), TCP_SYN, 1, b"");
    let served = (0..600).filter(|i| translated(&syn(*i), 9100)).count();
    assert_eq!(
        served, 600,
        "every new client is translated with the map full"
    );

    // The kernel's LRU evicts in batches from per-CPU lists, so a full map
    // holds less than its capacity; the census counts what is there.
    let census = EbpfStatus::new(pins.path().to_path_buf(), caps).census();
    let entries = |map| census.iter().find(|c| c.0 == map).map(|c| c.1).unwrap();
    assert!((1..=4096).contains(&entries(CT4_MAP)), "{census:?}");
    assert!((1..=4096).contains(&entries(AFFINITY4_MAP)), "{census:?}");
    eprintln!("after 3,000 flows and 5,000 clients: {census:?}");
    let full = [(CT4_MAP, 2400, 4096), (AFFINITY4_MAP, 3900, 4096)];
    let warnings = fill_warnings(&full);
    assert!(warnings[0].contains("least recently used"), "{warnings:?}");
    assert!(warnings[1].contains("may change backend"), "{warnings:?}");
}
