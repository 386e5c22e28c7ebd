//! Privileged: the pinned maps written in batches (BPF_MAP_UPDATE_BATCH)
//! hold exactly what single writes would, and a batch that fills a map
//! stops at the right op with the map-full error.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use ferry_proxy::datapath::{apply_ops, BpfMaps, FakeMaps, LbMaps, MapCapacities};
use ferry_proxy::model::{L4Addr, Protocol};
use ferry_proxy::plan::{AppliedState, BackendEntry, BackendId, MapOp};
use ferry_tests::bpf::PinDir;
use ferry_tests::objects::{service, slice};

fn sorted(mut ops: Vec<MapOp>) -> Vec<String> {
    let mut out: Vec<String> = ops
        .drain(..)
        .map(|op| ferry_proxy::dump::format_op(&op))
        .collect();
    out.sort();
    out
}

/// 300 Services (ClusterIP and NodePort, 3 endpoints each) through the
/// real pipeline onto the pinned maps and onto in-memory maps: the dumps
/// are equal, entry for entry.
#[test]
fn batched_writes_equal_single_writes() {
    ferry_tests::needs_ebpf!("batched_writes_equal_single_writes");
    let pins = PinDir::new("batch").unwrap();
    drop(ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).unwrap());
    let mut bpf = ferry_tests::objects::bpf_agent(pins.path());
    let mut fake = ferry_proxy::agent::Agent::new(
        ferry_tests::agent_config(vec!["test"]),
        Box::new(FakeMaps::default()),
    )
    .unwrap();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..300u16 {
        let mut svc = service(&format!("s{i}"), "TCP", 30000 + i, 8080, "");
        svc.spec.as_mut().unwrap().cluster_ip = Some(format!("198.19.{}.{}", i / 200, i % 200 + 1));
        services.push(svc);
        let ips: Vec<String> = (1..=3)
            .map(|e| format!("198.18.{}.{}", i % 200, e))
            .collect();
        let eps: Vec<(&str, &str, bool, bool)> = ips
            .iter()
            .map(|ip| (ip.as_str(), "node-a", true, false))
            .collect();
        slices.push(slice(&format!("s{i}"), "TCP", 8080, &eps));
    }
    ferry_tests::objects::sync(&mut bpf, &services, &slices);
    ferry_tests::objects::sync(&mut fake, &services, &slices);
    let on_bpf = sorted(bpf.maps_dump().unwrap());
    let in_memory = sorted(fake.maps_dump().unwrap());
    assert!(on_bpf.len() > 2_000, "{} entries", on_bpf.len());
    assert_eq!(on_bpf, in_memory);
}

/// A run of 100 backend upserts into a map of 64 entries: 64 go in (in
/// one batch), the 65th is reported as the map being full.
#[test]
fn a_batch_into_a_full_map_stops_at_the_right_op() {
    ferry_tests::needs_ebpf!("a_batch_into_a_full_map_stops_at_the_right_op");
    let pins = PinDir::new("batchfull").unwrap();
    let caps = MapCapacities {
        backends: 64,
        ..MapCapacities::default()
    };
    drop(ferry_proxy::ebpf::open(pins.path(), &caps).unwrap());
    let mut maps = BpfMaps::open(pins.path(), caps).unwrap();
    assert!(maps.batches(), "kernel 5.6+ has batch updates of hash maps");
    let ops: Vec<MapOp> = (1..=100u32)
        .map(|i| MapOp::UpsertBackend {
            id: BackendId(i),
            entry: BackendEntry {
                addr: L4Addr {
                    ip: std::net::Ipv4Addr::new(198, 18, 1, i as u8).into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                local: false,
                terminating: false,
            },
        })
        .collect();
    let mut applied = AppliedState::default();
    let done = apply_ops(&mut maps, &mut applied, &ops);
    assert_eq!(done.done, 64);
    let (op, e) = done.failed.expect("the map is full");
    assert_eq!(op, ops[64]);
    assert!(e.to_string().contains("is full (64 entries)"), "{e}");
    assert_eq!(maps.dump().unwrap().len(), 64);
    assert_eq!(sorted(maps.dump().unwrap()), sorted(ops[..64].to_vec()));
}
