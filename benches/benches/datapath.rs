//! Root-only datapath benches: applying planned ops to the real pinned
//! eBPF maps (per op, at 1,000 and 10,000 Services), and the TC ingress
//! program's cost per packet measured by the kernel with BPF_PROG_TEST_RUN
//! (a tracked flow forwarded by FIB redirect, a new flow's first packet,
//! a packet that is no Service's). Without root or without the eBPF object
//! it says so and measures nothing.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ferry_benches::{loaded_core, plan_config, plan_from_empty, Shape};
use ferry_proxy::datapath::{apply_ops, BpfMaps, MapCapacities};
use ferry_proxy::plan::AppliedState;
use ferry_tests::bpf::PinDir;
use ferry_tests::netns::VethLink;
use ferry_tests::objects::{service, slice, sync};
use ferry_tests::packets::{tcp, TcRunner, TCP_ACK, TCP_SYN};
use ferry_tests::Netns;

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || ferry_proxy::ebpf::object().is_none() {
        eprintln!("datapath benches skipped: they need root and the eBPF object");
        return false;
    }
    true
}

/// Every op of a full plan applied to the pinned maps (upserts over the
/// same keys after the first round), reported per op.
fn datapath_apply(c: &mut Criterion) {
    if !can_run() {
        return;
    }
    let mut g = c.benchmark_group("datapath_apply");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let cfg = plan_config();
    for (label, services) in [
        ("1k_services_per_op", 1_000),
        ("10k_services_per_op", 10_000),
    ] {
        let pins = PinDir::new("bench-apply").expect("pin dir");
        let _ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).expect("maps");
        let mut maps = BpfMaps::open(pins.path(), MapCapacities::default()).expect("maps");
        let mut core = loaded_core(Shape {
            services,
            endpoints: 10,
            nodeport_every: 0,
        });
        core.translate_changes();
        let ops = plan_from_empty(&core, &cfg).ops;
        let n = ops.len() as u32;
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut applied = AppliedState::default();
                    let start = std::time::Instant::now();
                    let done = apply_ops(&mut maps, &mut applied, &ops);
                    total += start.elapsed() / n;
                    assert!(done.failed.is_none(), "{:?}", done.failed);
                    black_box(done.done);
                }
                total
            });
        });
    }
    g.finish();
}

/// The TC ingress program per packet, as BPF_PROG_TEST_RUN times it.
fn tc_ingress_per_packet(c: &mut Criterion) {
    if !can_run() {
        return;
    }
    let pins = PinDir::new("bench-tc").expect("pin dir");
    let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &MapCapacities::default()).expect("maps");
    TcRunner::load(&mut ebpf).expect("load");
    let mut agent = ferry_tests::objects::bpf_agent(pins.path());
    let eps: Vec<(String, &str, bool, bool)> = (2..5)
        .map(|i| (format!("198.18.21.{i}"), "node-b", true, false))
        .collect();
    let eps: Vec<(&str, &str, bool, bool)> = eps
        .iter()
        .map(|(a, n, r, t)| (a.as_str(), *n, *r, *t))
        .collect();
    sync(
        &mut agent,
        &[service("web", "TCP", 30080, 8080, "")],
        &[slice("web", "TCP", 8080, &eps)],
    );
    // A node namespace with a route and neighbours to the backends, so
    // tracked packets take the FIB redirect path.
    let node = Netns::new("benchtc").expect("netns");
    let peer = Netns::new("benchtcp").expect("netns");
    node.veth_to(
        &peer,
        VethLink {
            local: "bt0",
            local_cidr: "198.18.21.1/24",
            remote: "bt1",
            remote_cidr: "198.18.21.9/24",
        },
    )
    .expect("veth");
    for i in 2..5 {
        let ip = format!("198.18.21.{i}");
        let mac = format!("02:00:00:00:00:{i:02x}");
        node.ip(&["neigh", "add", &ip, "lladdr", &mac, "dev", "bt0"])
            .expect("neighbour");
    }
    node.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .expect("forwarding");
    let mut run = TcRunner {
        ebpf: &mut ebpf,
        ns: &node,
    };
    let client = [198, 18, 20, 2];
    let nodeport = ([198, 18, 20, 1], 30080);
    // The first packet creates the flow; the same frame again is tracked.
    let tracked = tcp((client, 40000), nodeport, TCP_ACK, 1, &[0u8; 64]);
    run.run(&tracked, 1).expect("first packet");
    let other = tcp((client, 40000), ([198, 18, 20, 1], 22), TCP_SYN, 1, b"");
    let mut g = c.benchmark_group("tc_ingress_per_packet");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let mut measure = |label: &str, frame: &dyn Fn(u64) -> Vec<u8>, batch: u32| {
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let r = run.run(&frame(i), batch).expect("test run");
                    total += r.per_run;
                }
                total
            });
        });
    };
    // The program rewrites the frame it runs on, so a translated packet is
    // timed one run at a time (each run gets a fresh copy); a frame it
    // leaves alone can repeat in the kernel, which shows what one-at-a-time
    // timing adds.
    measure("tracked_flow_fib_redirect", &|_| tracked.clone(), 1);
    measure("not_a_service", &|_| other.clone(), 1);
    measure("not_a_service_repeat_10000", &|_| other.clone(), 10_000);
    // A new flow per run: a fresh source port each time (the kernel's
    // figure for one run includes creating both conntrack entries).
    measure(
        "new_flow_syn",
        &|i| {
            let port = 1024 + (i % 60_000) as u16;
            tcp(
                ([198, 18, 30, (i / 60_000 % 250) as u8], port),
                nodeport,
                TCP_SYN,
                1,
                b"",
            )
        },
        1,
    );
    g.finish();
    drop(peer);
}

criterion_group!(benches, datapath_apply, tc_ingress_per_packet);
criterion_main!(benches);
