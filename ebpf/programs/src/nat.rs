//! Service translation in TC for IPv4 TCP and UDP: a new flow to a
//! frontend gets a backend (affinity, Maglev or a random slot), a
//! conntrack entry for each direction, DNAT, and SNAT to the node when the
//! backend is elsewhere and the policy is Cluster (or the client is the
//! backend itself); later packets follow their entry, replies are reversed.
//! The packet then leaves by bpf_fib_lookup + redirect when the FIB knows
//! the way, else the stack routes it. A frontend without backends answers
//! a SYN with a RST and a datagram with an ICMP port unreachable.
//! The conntrack and SNAT ports are in `ct.rs`, packet rewriting and the
//! refusals in `packet.rs`.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SRC, BPF_F_MARK_MANGLED_0, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use ferry_common::counters::{ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP};
use ferry_common::lb::{
    flow_hash4, Be16, Be32, Ct4Key, Ct4Value, LbCounter, Service4Key, SourceRange4,
    AFFINITY_CLIENT_ADDR, BACKEND_FLAG_LOCAL, CT_FORWARD, CT_REPLY, SVC_FLAG_DROP, SVC_FLAG_MAGLEV,
    SVC_FLAG_PRESERVE_SOURCE, SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES,
};

use crate::ct::{backend_unchanged, claim_reply, now, reply_key, snat_port, touch, track};
use crate::maps::{count, CT4, SERVICES4, SOURCE_RANGES4};
use crate::packet::{csum_diff, reject, rewrite};
use crate::pick;

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const IP_OFF: usize = ETH_HLEN;
pub(crate) const IP_TTL: usize = IP_OFF + 8;
pub(crate) const IP_CSUM: usize = IP_OFF + 10;
pub(crate) const IP_SRC: usize = IP_OFF + 12;
pub(crate) const IP_DST: usize = IP_OFF + 16;
pub(crate) const AF_INET: u8 = 2;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// The IPv4 TCP/UDP header fields the translation needs.
pub struct Flow {
    pub src: Be32,
    pub dst: Be32,
    pub sport: Be16,
    pub dport: Be16,
    pub proto: u8,
    pub tcp_flags: u8,
}

impl Flow {
    #[inline(always)]
    pub(crate) fn key(&self, dir: u8) -> Ct4Key {
        Ct4Key {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            pad: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            L4_OFF + 16
        } else {
            L4_OFF + 6
        }
    }

    /// UDP may carry no checksum (0), which must stay 0.
    #[inline(always)]
    pub(crate) fn csum_flags(&self) -> u64 {
        if self.proto == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

/// A pointer to a `T` at `off` in the packet's linear data, if it is there.
#[inline(always)]
pub(crate) fn at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Offset of the L4 header: IPv4 options are not translated (such packets
/// go to the stack untouched), which keeps every offset a constant the
/// verifier follows.
pub(crate) const L4_OFF: usize = IP_OFF + 20;
/// Ethernet, IPv4 and the 8 bytes of a UDP header (or a TCP header's
/// first 8).
const PARSE_LEN: usize = L4_OFF + 8;

/// The flow of an IPv4 TCP or UDP packet; None for anything else (and for
/// fragments after the first, which carry no ports). Reads the headers in
/// place (direct packet access, no helper calls).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Flow>, i64> {
    if ctx.data() + PARSE_LEN > ctx.data_end() {
        // Headers outside the linear data (or a short frame): pull them.
        if ctx.len() < PARSE_LEN as u32 || ctx.pull_data(PARSE_LEN as u32).is_err() {
            return Ok(None);
        }
    }
    let hdr = at::<[u8; PARSE_LEN]>(ctx, 0).ok_or(0i64)?;
    // SAFETY: `at` checked the bounds against data_end; packet data has no
    // alignment guarantee, hence read_unaligned (into a stack copy).
    let h = unsafe { core::ptr::read_unaligned(hdr) };
    let word = |o: usize| u16::from_be_bytes([h[o], h[o + 1]]);
    let raw32 = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let raw16 = |o: usize| u16::from_ne_bytes([h[o], h[o + 1]]);
    let proto = h[IP_OFF + 9];
    if word(12) != ETH_P_IP
        || h[IP_OFF] != 0x45
        || word(IP_OFF + 6) & 0x1fff != 0
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
    {
        return Ok(None);
    }
    let tcp_flags = if proto == IPPROTO_TCP {
        let flags = at::<u8>(ctx, L4_OFF + 13).ok_or(0i64)?;
        // SAFETY: as above.
        unsafe { core::ptr::read_unaligned(flags) }
    } else {
        0
    };
    Ok(Some(Flow {
        src: Be32(raw32(IP_SRC)),
        dst: Be32(raw32(IP_DST)),
        sport: Be16(raw16(L4_OFF)),
        dport: Be16(raw16(L4_OFF + 2)),
        proto,
        tcp_flags,
    }))
}

/// A reply of a translated flow: reversed to come from the frontend (and
/// go back to the client when SNATed); None when `f` is no reply.
#[inline(always)]
fn reply(ctx: &TcContext, f: &Flow) -> Result<Option<Ct4Value>, i64> {
    let Some(ct) = CT4.get_ptr_mut(f.key(CT_REPLY)) else {
        return Ok(None);
    };
    let v = touch(f, ct);
    reverse(ctx, f, &v)?;
    count(LbCounter::TcReply);
    Ok(Some(v))
}

/// Ingress: replies of SNATed flows, tracked flows, then new flows to a
/// frontend.
#[inline(always)]
pub fn ingress(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
    if let Some(v) = reply(ctx, f)? {
        let dst = if v.nat_addr.0 != 0 { v.nat_addr } else { f.dst };
        return forward(ctx, v.addr, dst);
    }
    if let Some(ct) = CT4.get_ptr_mut(f.key(CT_FORWARD)) {
        // SAFETY: a pointer from a successful lookup.
        let v = unsafe { *ct };
        if backend_unchanged(&v) {
            let v = touch(f, ct);
            translate(ctx, f, &v)?;
            count(LbCounter::TcTracked);
            let src = if v.nat_addr.0 != 0 { v.nat_addr } else { f.src };
            return forward(ctx, src, v.addr);
        }
        // The backend left: this flow goes to a live one (UDP must not be
        // blackholed on a stale entry).
        count(LbCounter::TcRepicked);
    }
    new_flow(ctx, f)
}

/// Egress: replies of flows translated without SNAT (their backend runs
/// on this node behind an interface Ferry is not attached to).
#[inline(always)]
pub fn egress(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
    reply(ctx, f)?;
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn new_flow(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
    let svc_key = Service4Key {
        addr: f.dst,
        port: f.dport,
        slot: 0,
        proto: f.proto,
        pad: [0; 3],
    };
    let Some(svc) = SERVICES4.get_ptr(svc_key) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: a pointer from a successful lookup.
    let svc = unsafe { *svc };
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let key = LpmKey::new(
            64,
            SourceRange4 {
                frontend_id: Be32::from_host(svc.frontend_id),
                addr: f.src,
            },
        );
        if SOURCE_RANGES4.get(key).is_none() {
            count(LbCounter::TcSourceDenied);
            return Ok(TC_ACT_SHOT);
        }
    }
    if svc.flags & SVC_FLAG_DROP != 0 {
        count(LbCounter::TcDropped);
        return Ok(TC_ACT_SHOT);
    }
    if svc.flags & SVC_FLAG_REJECT != 0 || svc.count == 0 {
        count(LbCounter::TcRejected);
        return reject(ctx, f);
    }
    let client = AFFINITY_CLIENT_ADDR | u64::from(f.src.to_host());
    let picked = match pick::affinity_backend(client, &svc, svc_key) {
        Some(hit) => Some(hit),
        None if svc.flags & SVC_FLAG_MAGLEV != 0 && svc.affinity_timeout == 0 => {
            pick::maglev(&svc, flow_hash4(f.src, f.dst, f.sport, f.dport, f.proto))
        }
        None => pick::random_slot(&svc, svc_key),
    };
    let Some(picked) = picked else {
        count(LbCounter::TcLookupMiss);
        return Ok(TC_ACT_SHOT);
    };
    if svc.affinity_timeout != 0 {
        pick::remember_affinity(client, &svc, &picked);
    }
    let be = picked.backend;
    // Replies must come back through this node: SNAT when the backend is
    // on another node and the source need not be kept, and always when the
    // client is the backend itself (hairpin).
    let snat = (svc.flags & SVC_FLAG_PRESERVE_SOURCE == 0 && be.flags & BACKEND_FLAG_LOCAL == 0)
        || be.addr == f.src;
    let mut fib = fib_params(ctx, if snat { Be32(0) } else { f.src }, be.addr);
    let rc = fib_lookup(ctx, &mut fib, if snat { BPF_FIB_LOOKUP_SRC } else { 0 });
    // The source address the flow leaves with, when its port must change:
    // the node's (SNAT), or the client's own when a live flow from this
    // client port to another frontend holds the same backend tuple (the
    // port is remapped, as the kernel's NAT does on a tuple clash).
    let nat_from = if snat {
        Some(
            if rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH {
                // SAFETY: the union member the IPv4 lookup filled in.
                Be32(unsafe { fib.__bindgen_anon_3.ipv4_src })
            } else {
                f.dst
            },
        )
    } else if claim_reply(f, &reply_key(f, &picked, f.src, f.sport), now()) {
        None
    } else {
        count(LbCounter::TcPortRemapped);
        Some(f.src)
    };
    let (nat_addr, nat_port) = match nat_from {
        None => (Be32(0), Be16(0)),
        Some(addr) => match snat_port(f, &picked, addr) {
            Some(port) => (addr, port),
            None => {
                count(LbCounter::TcSnatExhausted);
                return Ok(TC_ACT_SHOT);
            }
        },
    };
    let v = track(f, &svc, &picked, nat_addr, nat_port)?;
    translate(ctx, f, &v)?;
    count(LbCounter::TcNewFlow);
    finish(ctx, &fib, rc)
}

/// Forward direction: destination to the backend, source to the SNAT
/// address when there is one.
#[inline(always)]
fn translate(ctx: &TcContext, f: &Flow, v: &Ct4Value) -> Result<(), i64> {
    let (src, sport) = if v.nat_addr.0 != 0 {
        (v.nat_addr, v.nat_port)
    } else {
        (f.src, f.sport)
    };
    rewrite(ctx, f, (src, sport), (v.addr, v.port))
}

/// Reply direction: source back to the frontend, destination back to the
/// client when the flow was SNATed.
#[inline(always)]
fn reverse(ctx: &TcContext, f: &Flow, v: &Ct4Value) -> Result<(), i64> {
    let (dst, dport) = if v.nat_addr.0 != 0 {
        (v.nat_addr, v.nat_port)
    } else {
        (f.dst, f.dport)
    };
    rewrite(ctx, f, (v.addr, v.port), (dst, dport))
}

#[inline(always)]
fn fib_params(ctx: &TcContext, src: Be32, dst: Be32) -> FibParams {
    // SAFETY: an all-zero bpf_fib_lookup is valid (plain integers).
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    // SAFETY: the kernel hands every TC program a valid skb.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_3.ipv4_src = src.0;
    p.__bindgen_anon_4.ipv4_dst = dst.0;
    p
}

#[inline(always)]
fn fib_lookup(ctx: &TcContext, p: &mut FibParams, flags: u32) -> u32 {
    // SAFETY: the helper reads and fills `p`, which lives on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    rc as u32
}

/// Sends the translated packet to `dst` (seen from `src`).
#[inline(always)]
fn forward(ctx: &TcContext, src: Be32, dst: Be32) -> Result<i32, i64> {
    let mut fib = fib_params(ctx, src, dst);
    let rc = fib_lookup(ctx, &mut fib, 0);
    finish(ctx, &fib, rc)
}

/// Redirects by the FIB result (what the stack's forwarding would have
/// done: new MACs, TTL - 1); anything the FIB cannot answer (local
/// delivery, no route, fragmentation needed, forwarding off) goes to the
/// stack with the translation applied.
#[inline(always)]
fn finish(ctx: &TcContext, fib: &FibParams, rc: u32) -> Result<i32, i64> {
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Ok(TC_ACT_OK);
    }
    let word = at::<[u8; 2]>(ctx, IP_TTL).ok_or(0i64)?;
    // SAFETY: bounds-checked by `at`.
    let [ttl, proto] = unsafe { core::ptr::read_unaligned(word) };
    if ttl <= 1 {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_unaligned(word.cast::<u8>(), ttl - 1) };
    let diff = csum_diff(
        u32::from(u16::from_ne_bytes([ttl, proto])),
        u32::from(u16::from_ne_bytes([ttl - 1, proto])),
    );
    ctx.l3_csum_replace(IP_CSUM, 0, u64::from(diff), 0)?;
    count(LbCounter::TcRedirected);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let macs = at::<[u8; 12]>(ctx, 0).ok_or(0i64)?;
        let mut new = [0u8; 12];
        new[..6].copy_from_slice(&fib.dmac);
        new[6..].copy_from_slice(&fib.smac);
        // SAFETY: bounds-checked by `at`.
        unsafe { core::ptr::write_unaligned(macs, new) };
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32);
    }
    // SAFETY: plain helper call; a null neighbour means "the packet's own
    // destination".
    Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}
