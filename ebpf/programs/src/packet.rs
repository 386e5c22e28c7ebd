//! Packet rewriting for the TC path: addresses and ports with checksums
//! fixed by difference, and the answers of a frontend without backends (a
//! TCP RST, an ICMP port unreachable) built in place.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use ferry_common::counters::{ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP};
use ferry_common::lb::{Be16, Be32};

use crate::nat::{
    at, Flow, ETH_HLEN, IP_CSUM, IP_OFF, IP_SRC, L4_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// One's-complement add of 32-bit partial sums (the kernel's csum_add).
#[inline(always)]
pub(super) fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}

/// The checksum change of replacing `old` by `new` (raw, as in memory).
#[inline(always)]
pub(super) fn csum_diff(old: u32, new: u32) -> u32 {
    csum_add(!old, new)
}

/// Writes the new addresses and ports in place, then fixes the IPv4 and
/// L4 checksums with three helper calls (by difference; the L4 one in two
/// parts, since the addresses are in the pseudo-header and the ports are
/// not, which matters for offloaded checksums).
#[inline(always)]
pub(super) fn rewrite(
    ctx: &TcContext,
    f: &Flow,
    (src, sport): (Be32, Be16),
    (dst, dport): (Be32, Be16),
) -> Result<(), i64> {
    let addrs = at::<[u32; 2]>(ctx, IP_SRC).ok_or(0i64)?;
    let ports = at::<[u16; 2]>(ctx, L4_OFF).ok_or(0i64)?;
    // SAFETY: both pointers were bounds-checked by `at` just now.
    unsafe {
        core::ptr::write_unaligned(addrs, [src.0, dst.0]);
        core::ptr::write_unaligned(ports, [sport.0, dport.0]);
    }
    let addr_diff = csum_add(csum_diff(f.src.0, src.0), csum_diff(f.dst.0, dst.0));
    let port_diff = csum_add(
        csum_diff(u32::from(f.sport.0), u32::from(sport.0)),
        csum_diff(u32::from(f.dport.0), u32::from(dport.0)),
    );
    if f.src != src || f.dst != dst {
        ctx.l3_csum_replace(IP_CSUM, 0, u64::from(addr_diff), 0)?;
        ctx.l4_csum_replace(
            f.csum_off(),
            0,
            u64::from(addr_diff),
            u64::from(BPF_F_PSEUDO_HDR) | f.csum_flags(),
        )?;
    }
    if f.sport != sport || f.dport != dport {
        ctx.l4_csum_replace(f.csum_off(), 0, u64::from(port_diff), f.csum_flags())?;
    }
    Ok(())
}

/// Answers a flow to a frontend without backends where it came from: a
/// TCP SYN gets a RST, a UDP datagram an ICMP port unreachable (from the
/// Service address). Anything else of such a flow is dropped.
#[inline(always)]
pub(super) fn reject(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    if f.proto == IPPROTO_TCP {
        if f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
            return Ok(TC_ACT_SHOT);
        }
        let seq = u32::from_be(ctx.load::<u32>(L4_OFF + 4)?);
        let pkt = tcp_rst(&macs, f, seq.wrapping_add(1));
        resize(ctx, pkt.len())?;
        ctx.store(0, &pkt, 0)?;
    } else {
        let quoted: [u8; 28] = ctx.load(IP_OFF)?;
        let pkt = icmp_unreachable(&macs, f, &quoted);
        resize(ctx, pkt.len())?;
        ctx.store(0, &pkt, 0)?;
    }
    // SAFETY: the kernel hands every TC program a valid skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call: out of the interface it came in by.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
pub(super) fn resize(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: plain helper call on our skb.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    Ok(())
}

/// Ethernet back to the sender, and an IPv4 header from `src` to `dst`.
#[inline(always)]
pub(super) fn headers(
    pkt: &mut [u8],
    macs: &[u8; 12],
    src: Be32,
    dst: Be32,
    total: u16,
    proto: u8,
) {
    pkt[..6].copy_from_slice(&macs[6..]);
    pkt[6..12].copy_from_slice(&macs[..6]);
    pkt[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = &mut pkt[ETH_HLEN..ETH_HLEN + 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.0.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst.0.to_ne_bytes());
    let mut hdr = [0u8; 20];
    hdr.copy_from_slice(ip);
    let sum = fold(sum_words(&hdr));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// RST|ACK for a SYN: from the frontend back to the client.
#[inline(always)]
pub(super) fn tcp_rst(macs: &[u8; 12], f: &Flow, ack: u32) -> [u8; 54] {
    let mut pkt = [0u8; 54];
    headers(&mut pkt, macs, f.dst, f.src, 40, IPPROTO_TCP);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&f.dport.0.to_ne_bytes());
    tcp[2..4].copy_from_slice(&f.sport.0.to_ne_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST | TCP_ACK;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&f.dst.0.to_ne_bytes());
    pseudo[4..8].copy_from_slice(&f.src.0.to_ne_bytes());
    pseudo[9] = IPPROTO_TCP;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let sum = fold(sum_words(&pseudo) + sum_words(&tcp));
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    pkt[34..54].copy_from_slice(&tcp);
    pkt
}

/// ICMP destination unreachable / port unreachable quoting the datagram's
/// IPv4 header and first 8 bytes, from the frontend to the client.
#[inline(always)]
pub(super) fn icmp_unreachable(macs: &[u8; 12], f: &Flow, quoted: &[u8; 28]) -> [u8; 70] {
    let mut pkt = [0u8; 70];
    headers(&mut pkt, macs, f.dst, f.src, 56, IPPROTO_ICMP);
    let mut icmp = [0u8; 36];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    icmp[8..36].copy_from_slice(quoted);
    let sum = fold(sum_words(&icmp));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    pkt[34..70].copy_from_slice(&icmp);
    pkt
}

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
pub(super) fn sum_words<const N: usize>(b: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
pub(super) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
