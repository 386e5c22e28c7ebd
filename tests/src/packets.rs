//! Packet fixtures for BPF_PROG_TEST_RUN: Ethernet/IPv4/TCP|UDP frames
//! built byte by byte, a parser for what a program returns, checksum
//! verification, and [`TcRunner`], which runs the TC ingress program on a
//! frame inside a test network namespace.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::programs::SchedClassifier;

use crate::Netns;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(34 + l4.len());
    p.extend_from_slice(&NODE_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = fold(sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(l4);
    p
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(src);
    ph.extend_from_slice(dst);
    ph.push(0);
    ph.push(proto);
    ph.extend_from_slice(&(len as u16).to_be_bytes());
    sum(&ph)
}

/// A TCP segment in an Ethernet frame, checksums filled in.
pub fn tcp(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: u8,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = fold(pseudo_sum(&src.0, &dst.0, 6, t.len()) + sum(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    frame(src.0, dst.0, 6, &t)
}

/// A UDP datagram in an Ethernet frame, checksum filled in.
pub fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src.1.to_be_bytes());
    u[2..4].copy_from_slice(&dst.1.to_be_bytes());
    u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(payload);
    let c = fold(pseudo_sum(&src.0, &dst.0, 17, len) + sum(&u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    frame(src.0, dst.0, 17, &u)
}

/// The fields of a returned frame the fixtures compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub proto: u8,
    /// TCP/UDP ports, or ICMP (type, code).
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

/// Parses an Ethernet/IPv4 frame and checks its IPv4 and L4 checksums.
pub fn parse(p: &[u8]) -> Result<Parsed> {
    if p.len() < 34 || p[12..14] != [0x08, 0x00] {
        bail!("not an IPv4 frame: {p:02x?}");
    }
    let ip = &p[14..34];
    if ip[0] != 0x45 {
        bail!("unexpected IPv4 header {:02x}", ip[0]);
    }
    if fold(sum(ip)) != 0 {
        bail!("bad IPv4 header checksum: {ip:02x?}");
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total + 14 > p.len() {
        bail!("IPv4 total length {total} beyond the frame ({})", p.len());
    }
    let l4 = &p[34..14 + total];
    let (src, dst) = (&ip[12..16], &ip[16..20]);
    let field16 = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let field32 = |o: usize| u32::from_be_bytes([l4[o], l4[o + 1], l4[o + 2], l4[o + 3]]);
    let (sport, dport, flags, seq, ack, payload) = match ip[9] {
        6 => {
            if fold(pseudo_sum(src, dst, 6, l4.len()) + sum(l4)) != 0 {
                bail!("bad TCP checksum");
            }
            let off = usize::from(l4[12] >> 4) * 4;
            (
                field16(0),
                field16(2),
                l4[13],
                field32(4),
                field32(8),
                l4[off..].to_vec(),
            )
        }
        17 => {
            if field16(6) != 0 && fold(pseudo_sum(src, dst, 17, l4.len()) + sum(l4)) != 0 {
                bail!("bad UDP checksum");
            }
            (field16(0), field16(2), 0, 0, 0, l4[8..].to_vec())
        }
        1 => {
            if fold(sum(l4)) != 0 {
                bail!("bad ICMP checksum");
            }
            (
                u16::from(l4[0]),
                u16::from(l4[1]),
                0,
                0,
                0,
                l4[8..].to_vec(),
            )
        }
        other => bail!("unexpected protocol {other}"),
    };
    let mac = |o: usize| -> [u8; 6] { p[o..o + 6].try_into().unwrap_or_default() };
    Ok(Parsed {
        dst_mac: mac(0),
        src_mac: mac(6),
        src: src.try_into()?,
        dst: dst.try_into()?,
        ttl: ip[8],
        proto: ip[9],
        sport,
        dport,
        tcp_flags: flags,
        seq,
        ack,
        payload,
    })
}

/// The TC ingress program, loaded from an [`aya::Ebpf`] whose maps are
/// pinned, run with BPF_PROG_TEST_RUN inside `ns` (so its FIB lookups see
/// the namespace's routes, never the host's).
#[derive(Debug)]
pub struct TcRunner<'a> {
    pub ebpf: &'a mut aya::Ebpf,
    pub ns: &'a Netns,
}

/// What one run returned.
#[derive(Debug)]
pub struct RunResult {
    pub verdict: u32,
    pub out: Vec<u8>,
    /// The kernel's average time per run.
    pub per_run: Duration,
}

impl TcRunner<'_> {
    pub fn load(ebpf: &mut aya::Ebpf) -> Result<()> {
        ferry_proxy::ebpf::load_program(ebpf, ferry_common::counters::TC_INGRESS_PROGRAM)?;
        Ok(())
    }

    /// Runs the program `repeat` times on `frame`.
    pub fn run(&mut self, frame: &[u8], repeat: u32) -> Result<RunResult> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(ferry_common::counters::TC_INGRESS_PROGRAM)
            .context("no TC ingress program")?
            .try_into()?;
        let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
        let frame = frame.to_vec();
        self.ns
            .run(move || test_run(fd.as_raw_fd(), &frame, repeat.max(1)))
    }
}

/// `union bpf_attr` as BPF_PROG_TEST_RUN reads it.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// BPF_PROG_TEST_RUN on `prog_fd` in the calling thread's namespace.
fn test_run(prog_fd: RawFd, frame: &[u8], repeat: u32) -> Result<RunResult> {
    let mut out = vec![0u8; frame.len().max(448) + 64];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: bpf(2) with a valid attr whose buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(RunResult {
        verdict: attr.retval,
        out,
        per_run: Duration::from_nanos(u64::from(attr.duration)),
    })
}
