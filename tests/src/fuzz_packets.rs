//! The packet fuzz target's oracle (root): the TC ingress program, loaded
//! with maps programmed through the real pipeline, runs each frame with
//! BPF_PROG_TEST_RUN in a namespace without routes, conntrack cleared
//! before each frame. A frame that is no Service's must come back
//! unchanged; a Service's frame must be translated to one of that
//! Service's backends (length, payload and checksum validity kept),
//! rejected (TCP RST or ICMP unreachable, back to the client) or dropped,
//! as the Service's policy says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // an oracle panics

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use ferry_common::lb::{Ct4Key, Ct4Value, CT4_MAP};
use ferry_proxy::model::{Action, Protocol};
use ferry_proxy::plan::AppliedState;

use crate::bpf::PinDir;
use crate::objects::{service, slice, sync};
use crate::packets::{RunResult, TcRunner, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use crate::Netns;

/// What a frontend does with a new flow from the fuzzer's sources.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Forward(Vec<(Ipv4Addr, u16)>),
    Reject,
    Drop,
}

/// The loaded program and what each frontend should do.
pub struct PacketOracle {
    _pins: PinDir,
    ebpf: aya::Ebpf,
    ns: Netns,
    ct: HashMap<MapData, Ct4Key, Ct4Value>,
    frontends: BTreeMap<(Ipv4Addr, u16, u8), Expect>,
    /// The one source loadBalancerSourceRanges let in.
    allowed: Ipv4Network,
}

#[derive(Debug, Clone, Copy)]
struct Ipv4Network(Ipv4Addr, u8);

impl Ipv4Network {
    fn contains(self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.1)).unwrap_or(0);
        ip.to_bits() & mask == self.0.to_bits() & mask
    }
}

impl std::fmt::Debug for PacketOracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketOracle")
            .field("frontends", &self.frontends)
            .finish_non_exhaustive()
    }
}

impl PacketOracle {
    /// Loads the program, programs the Services and reads back what each
    /// frontend should do.
    pub fn new() -> Result<PacketOracle> {
        let pins = PinDir::new("fuzzpkt")?;
        let caps = ferry_proxy::datapath::MapCapacities::default();
        let mut ebpf = ferry_proxy::ebpf::open(pins.path(), &caps)?;
        TcRunner::load(&mut ebpf)?;
        let mut agent = crate::objects::bpf_agent(pins.path());
        let remote = |ip| (ip, "node-b", true, false);
        let services = vec![
            service("web", "TCP", 30080, 8080, ""),
            service("dns", "UDP", 30053, 5353, ""),
            service(
                "local",
                "TCP",
                30081,
                8081,
                "    externalTrafficPolicy: Local",
            ),
            service(
                "elsewhere",
                "TCP",
                30082,
                8082,
                "    externalTrafficPolicy: Local",
            ),
            service("empty", "TCP", 30099, 8080, ""),
            service("empty-udp", "UDP", 30098, 5353, ""),
            service(
                "closed",
                "TCP",
                30085,
                8080,
                "    loadBalancerSourceRanges: [198.18.20.0/24]\n    # lb 198.19.1.11",
            ),
        ];
        let slices = vec![
            slice(
                "web",
                "TCP",
                8080,
                &[remote("198.18.21.2"), remote("198.18.21.3")],
            ),
            slice(
                "dns",
                "UDP",
                5353,
                &[remote("198.18.21.2"), remote("198.18.21.3")],
            ),
            slice(
                "local",
                "TCP",
                8081,
                &[("198.18.21.2", "node-a", true, false)],
            ),
            slice("elsewhere", "TCP", 8082, &[remote("198.18.21.4")]),
            slice("empty", "TCP", 8080, &[]),
            slice("empty-udp", "UDP", 5353, &[]),
            slice("closed", "TCP", 8080, &[remote("198.18.21.2")]),
        ];
        sync(&mut agent, &services, &slices);
        let maps = ferry_proxy::datapath::BpfMaps::open(pins.path(), caps)?;
        let applied = AppliedState::restore(ferry_proxy::datapath::LbMaps::dump(&maps)?);
        let frontends = expectations(&applied);
        drop(agent);
        let data = MapData::from_pin(pins.path().join(CT4_MAP))?;
        let ct = HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
        let ns = Netns::new("fuzzpkt")?;
        Ok(PacketOracle {
            _pins: pins,
            ebpf,
            ns,
            ct,
            frontends,
            allowed: Ipv4Network(Ipv4Addr::new(198, 18, 20, 0), 24),
        })
    }

    /// None when the kernel refuses the test run itself (EINVAL: e.g. an
    /// IPv4 frame shorter than its header, which never reaches the program).
    fn run(&mut self, frame: &[u8]) -> Option<RunResult> {
        let keys: Vec<Ct4Key> = self.ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.ct.remove(&k);
        }
        let mut runner = TcRunner {
            ebpf: &mut self.ebpf,
            ns: &self.ns,
        };
        match runner.run(frame, 1) {
            Ok(r) => Some(r),
            Err(e) if e.to_string().contains("os error 22") => None,
            Err(e) => panic!("BPF_PROG_TEST_RUN: {e:#}"),
        }
    }

    /// Runs `frame` and checks the verdict and the frame that came back.
    pub fn check(&mut self, frame: &[u8]) {
        if frame.len() < 14 || frame.len() > 1500 {
            return; // the kernel refuses such test runs
        }
        let Some(r) = self.run(frame) else {
            return;
        };
        let v = r.verdict;
        assert!(
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&v),
            "verdict {v} for {frame:02x?}"
        );
        let Some(flow) = service_flow(frame) else {
            assert_eq!(
                (v, &r.out[..]),
                (TC_ACT_OK, frame),
                "no Service's frame was changed"
            );
            return;
        };
        let Some(expect) = self
            .frontends
            .get(&(flow.dst, flow.dport, flow.proto))
            .cloned()
        else {
            assert_eq!(
                (v, &r.out[..]),
                (TC_ACT_OK, frame),
                "no Service's frame was changed"
            );
            return;
        };
        let denied = flow.dst == Ipv4Addr::new(198, 19, 1, 11) && !self.allowed.contains(flow.src);
        match expect {
            _ if denied => assert_eq!(v, TC_ACT_SHOT, "outside the source ranges"),
            Expect::Drop => assert_eq!(v, TC_ACT_SHOT, "Local policy, no local endpoint"),
            Expect::Reject => check_reject(frame, &flow, &r),
            Expect::Forward(backends) => check_forward(frame, &flow, &r, &backends),
        }
    }
}

/// Each frontend's expectation, from the maps as programmed.
fn expectations(applied: &AppliedState) -> BTreeMap<(Ipv4Addr, u16, u8), Expect> {
    let mut out = BTreeMap::new();
    for (key, f) in applied.frontends() {
        let (IpAddr::V4(ip), Some(entry)) = (key.ip, f.entry) else {
            continue;
        };
        let backends: Vec<(Ipv4Addr, u16)> = f
            .slots
            .iter()
            .filter_map(|id| applied.backends().get(id))
            .filter_map(|b| match b.addr.ip {
                IpAddr::V4(a) => Some((a, b.addr.port)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let expect = match entry.action {
            Action::Drop => Expect::Drop,
            Action::Reject => Expect::Reject,
            Action::Forward if backends.is_empty() => Expect::Reject,
            Action::Forward => Expect::Forward(backends),
        };
        out.insert((ip, key.port, protocol_number(key.protocol)), expect);
    }
    out
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The flow of a frame the TC path handles (its documented contract):
/// Ethernet type IPv4, a 20-byte IPv4 header (no options), not a later
/// fragment, TCP (with its flags byte in the frame) or UDP (with its 8-byte
/// header).
#[derive(Debug, Clone, Copy)]
struct Flow {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
}

fn service_flow(f: &[u8]) -> Option<Flow> {
    let word = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    if f.len() < 42 || word(12) != 0x0800 || f[14] != 0x45 || word(20) & 0x1fff != 0 {
        return None;
    }
    let proto = f[23];
    let tcp_flags = match proto {
        6 if f.len() >= 48 => f[47],
        17 => 0,
        _ => return None,
    };
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    Some(Flow {
        src: ip(26),
        dst: ip(30),
        dport: word(36),
        proto,
        tcp_flags,
    })
}

/// The Internet checksum of `data` (with `start` already summed in).
fn checksum(start: u32, data: &[u8]) -> u16 {
    let mut s = start;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ip_header_ok(f: &[u8]) -> bool {
    checksum(0, &f[14..34]) == 0
}

/// Whether the L4 checksum over the rest of the frame holds (UDP's 0: none;
/// ICMP's has no pseudo-header).
fn l4_ok(f: &[u8]) -> bool {
    let seg = &f[34..];
    if f[23] == 17 && seg[6..8] == [0, 0] {
        return true;
    }
    if f[23] == 1 {
        return checksum(0, seg) == 0;
    }
    let mut pseudo = 0u32;
    for o in [26, 28, 30, 32] {
        pseudo += u32::from(u16::from_be_bytes([f[o], f[o + 1]]));
    }
    pseudo += u32::from(f[23]) + seg.len() as u32;
    checksum(pseudo, seg) == 0
}

fn check_forward(frame: &[u8], flow: &Flow, r: &RunResult, backends: &[(Ipv4Addr, u16)]) {
    if r.verdict == TC_ACT_SHOT {
        return; // a rewrite the kernel refused is dropped whole
    }
    let out = &r.out;
    assert_eq!(
        out.len(),
        frame.len(),
        "a translated frame keeps its length"
    );
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let dport = u16::from_be_bytes([out[36], out[37]]);
    assert!(
        backends.contains(&(dst, dport)),
        "{dst}:{dport} is no backend of {flow:?}"
    );
    let l4_len = if flow.proto == 6 { 20 } else { 8 };
    let keep = (34 + l4_len).min(frame.len());
    assert_eq!(out[keep..], frame[keep..], "payload changed");
    assert_eq!(
        out[..12],
        frame[..12],
        "MACs changed without a FIB redirect"
    );
    assert_eq!(
        ip_header_ok(out),
        ip_header_ok(frame),
        "IP checksum validity changed"
    );
    if flow.proto == 17 && frame[40..42] == [0, 0] {
        assert_eq!(
            out[40..42],
            [0, 0],
            "a UDP datagram without checksum got one"
        );
    } else if frame.len() >= 34 + l4_len {
        assert_eq!(l4_ok(out), l4_ok(frame), "L4 checksum validity changed");
    }
}

fn check_reject(frame: &[u8], flow: &Flow, r: &RunResult) {
    if flow.proto == 6 && flow.tcp_flags & 0x17 != 0x02 {
        assert_eq!(
            r.verdict, TC_ACT_SHOT,
            "a non-SYN to a rejecting frontend is dropped"
        );
        return;
    }
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "a reject goes back out");
    let out = &r.out;
    assert!(out.len() >= 42, "short reject: {out:02x?}");
    assert_eq!(out[..6], frame[6..12], "back to the sender's MAC");
    assert!(ip_header_ok(out), "reject's IP checksum");
    let (src, dst) = (&out[26..30], &out[30..34]);
    assert_eq!(
        (src, dst),
        (&frame[30..34], &frame[26..30]),
        "from the frontend to the client"
    );
    if flow.proto == 6 {
        assert_eq!((out[23], out[47] & 0x04), (6, 0x04), "a TCP RST");
    } else {
        assert_eq!(
            (out[23], out[34], out[35]),
            (1, 3, 3),
            "ICMP port unreachable"
        );
        assert_eq!(
            out[42..70],
            frame[14..42],
            "quotes the datagram's first 28 bytes"
        );
    }
    assert!(l4_ok(out), "reject's L4 checksum");
}
