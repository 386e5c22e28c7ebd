//! Service translation in TC for IPv4 TCP and UDP: a new flow to a
//! frontend gets a backend (affinity, Maglev or a random slot), a
//! conntrack entry for each direction, DNAT, and SNAT to the node when the
//! backend is elsewhere and the policy is Cluster (or the client is the
//! backend itself); later packets follow their entry, replies are reversed.
//! The packet then leaves by bpf_fib_lookup + redirect when the FIB knows
//! the way, else the stack routes it. A frontend without backends answers
//! a SYN with a RST and a datagram with an ICMP port unreachable.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SRC, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_tail,
    },
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use ferry_common::counters::{ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use ferry_common::lb::{
    flow_hash4, Be16, Be32, Ct4Key, Ct4Value, LbCounter, Service4Key, SourceRange4,
    AFFINITY_CLIENT_ADDR, BACKEND_FLAG_LOCAL, CT_FLAG_CLOSING, CT_FORWARD, CT_REPLY,
    SNAT_PORT_COUNT, SNAT_PORT_MIN, SVC_FLAG_DROP, SVC_FLAG_MAGLEV, SVC_FLAG_PRESERVE_SOURCE,
    SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES,
};

use crate::maps::{count, BACKENDS4, CT4, SERVICES4, SNAT_CURSOR, SOURCE_RANGES4};
use crate::pick::{self, Picked};

const ETH_HLEN: usize = 14;
const IP_OFF: usize = ETH_HLEN;
const IP_TTL: usize = IP_OFF + 8;
const IP_CSUM: usize = IP_OFF + 10;
const IP_SRC: usize = IP_OFF + 12;
const IP_DST: usize = IP_OFF + 16;
const AF_INET: u8 = 2;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// A SNAT port's reply entry may go to a new flow once its flow closed
/// and stayed idle this long, or once idle this long anyway (UDP, TCP).
const SNAT_REUSE_CLOSED_NS: u64 = 1_000_000_000;
const SNAT_REUSE_UDP_NS: u64 = 60 * 1_000_000_000;
const SNAT_REUSE_TCP_NS: u64 = 600 * 1_000_000_000;
/// How far apart the CPUs' SNAT cursors start (a prime near range / 3).
const SNAT_CPU_STRIDE: u32 = 1_511;

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
    fn key(&self, dir: u8) -> Ct4Key {
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
    fn csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            L4_OFF + 16
        } else {
            L4_OFF + 6
        }
    }

    /// UDP may carry no checksum (0), which must stay 0.
    #[inline(always)]
    fn csum_flags(&self) -> u64 {
        if self.proto == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

/// A pointer to a `T` at `off` in the packet's linear data, if it is there.
#[inline(always)]
fn at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Offset of the L4 header: IPv4 options are not translated (such packets
/// go to the stack untouched), which keeps every offset a constant the
/// verifier follows.
const L4_OFF: usize = IP_OFF + 20;
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

/// Refreshes a conntrack entry a packet of `f` matched: its last-use time,
/// and for TCP whether the flow is closing (a FIN or RST; a new SYN on the
/// entry, the client reusing its port, opens it again). Returns a copy.
#[inline(always)]
fn touch(f: &Flow, ct: *mut Ct4Value) -> Ct4Value {
    // SAFETY: `ct` comes from a successful map lookup.
    unsafe {
        (*ct).last_ns = now();
        if f.proto == IPPROTO_TCP {
            if f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                (*ct).flags |= CT_FLAG_CLOSING;
            } else if f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                (*ct).flags &= !CT_FLAG_CLOSING;
            }
        }
        *ct
    }
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

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
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

/// The tracked backend still exists at the same address.
#[inline(always)]
fn backend_unchanged(v: &Ct4Value) -> bool {
    match BACKENDS4.get_ptr(v.backend_id) {
        // SAFETY: a pointer from a successful lookup.
        Some(be) => unsafe { (*be).addr == v.addr && (*be).port == v.port },
        None => false,
    }
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
    let (nat_addr, nat_port) = if snat {
        let addr = if rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH {
            // SAFETY: the union member the IPv4 lookup filled in.
            Be32(unsafe { fib.__bindgen_anon_3.ipv4_src })
        } else {
            f.dst
        };
        match snat_port(f, &picked, addr) {
            Some(port) => (addr, port),
            None => {
                count(LbCounter::TcSnatExhausted);
                return Ok(TC_ACT_SHOT);
            }
        }
    } else if claim_reply(f, &reply_key(f, &picked, f.src, f.sport), now()) {
        (Be32(0), Be16(0))
    } else {
        // A live flow from this client port to another frontend holds the
        // same backend tuple: the client's port is remapped (its address
        // kept), as the kernel's NAT does on a tuple clash.
        count(LbCounter::TcPortRemapped);
        match snat_port(f, &picked, f.src) {
            Some(port) => (f.src, port),
            None => {
                count(LbCounter::TcSnatExhausted);
                return Ok(TC_ACT_SHOT);
            }
        }
    };
    track(f, &svc, &picked, nat_addr, nat_port)?;
    let v = Ct4Value {
        last_ns: 0,
        backend_id: picked.id,
        frontend_id: svc.frontend_id,
        addr: be.addr,
        nat_addr,
        port: be.port,
        nat_port,
        flags: 0,
        pad: [0; 3],
    };
    translate(ctx, f, &v)?;
    count(LbCounter::TcNewFlow);
    finish(ctx, &fib, rc)
}

/// Writes both conntrack entries of a new flow.
#[inline(always)]
fn track(
    f: &Flow,
    svc: &ferry_common::lb::Service4Value,
    picked: &Picked,
    nat_addr: Be32,
    nat_port: Be16,
) -> Result<(), i64> {
    let snat = nat_addr.0 != 0;
    let t = now();
    let reply_key = if snat {
        reply_key(f, picked, nat_addr, nat_port)
    } else {
        reply_key(f, picked, f.src, f.sport)
    };
    let reply = Ct4Value {
        last_ns: t,
        backend_id: picked.id,
        frontend_id: svc.frontend_id,
        addr: f.dst,
        nat_addr: if snat { f.src } else { Be32(0) },
        port: f.dport,
        nat_port: if snat { f.sport } else { Be16(0) },
        flags: 0,
        pad: [0; 3],
    };
    let fwd = Ct4Value {
        last_ns: t,
        backend_id: picked.id,
        frontend_id: svc.frontend_id,
        addr: picked.backend.addr,
        nat_addr,
        port: picked.backend.port,
        nat_port,
        flags: 0,
        pad: [0; 3],
    };
    CT4.insert(reply_key, reply, 0).map_err(i64::from)?;
    CT4.insert(f.key(CT_FORWARD), fwd, 0).map_err(i64::from)
}

/// A source port in the SNAT range whose reply tuple this flow may claim
/// ([`claim_reply`]). Ports are handed out in turn (a cursor per CPU),
/// trying up to 16.
#[inline(always)]
fn snat_port(f: &Flow, picked: &Picked, addr: Be32) -> Option<Be16> {
    let cursor = SNAT_CURSOR.get_ptr_mut(0)?;
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let t = now();
    for _ in 0..16u32 {
        // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
        let n = unsafe {
            let n = *cursor;
            *cursor = n.wrapping_add(1);
            n
        };
        let idx = n.wrapping_add(cpu.wrapping_mul(SNAT_CPU_STRIDE)) % u32::from(SNAT_PORT_COUNT);
        let port = Be16::from_host(SNAT_PORT_MIN + idx as u16);
        if claim_reply(f, &reply_key(f, picked, addr, port), t) {
            return Some(port);
        }
    }
    None
}

/// The reply tuple of `f` sent to `picked` from `addr`:`port`.
#[inline(always)]
fn reply_key(f: &Flow, picked: &Picked, addr: Be32, port: Be16) -> Ct4Key {
    Ct4Key {
        src: picked.backend.addr,
        dst: addr,
        sport: picked.backend.port,
        dport: port,
        proto: f.proto,
        dir: CT_REPLY,
        pad: 0,
    }
}

/// Whether new flow `f` may hold reply tuple `key`: nobody holds it, `f`
/// itself does (same client and frontend), or its flow ended (closed a
/// second ago, or idle past the protocol's limit). A tuple is never taken
/// from a live flow: one client port to two frontends that pick the same
/// backend would otherwise send one flow's replies from the other's
/// frontend. Taking it from an ended flow removes that flow's forward
/// entry too, so its client reopening the tuple starts a new flow instead
/// of following the old entry onto replies that now go elsewhere.
#[inline(always)]
fn claim_reply(f: &Flow, key: &Ct4Key, t: u64) -> bool {
    let Some(v) = CT4.get_ptr(*key) else {
        return true;
    };
    // SAFETY: a pointer from a successful lookup.
    let v = unsafe { *v };
    let (client, client_port) = if v.nat_addr.0 != 0 {
        (v.nat_addr, v.nat_port)
    } else {
        (key.dst, key.dport)
    };
    if client == f.src && client_port == f.sport && v.addr == f.dst && v.port == f.dport {
        return true;
    }
    let idle = t.saturating_sub(v.last_ns);
    let limit = if f.proto == IPPROTO_TCP {
        SNAT_REUSE_TCP_NS
    } else {
        SNAT_REUSE_UDP_NS
    };
    let closed = v.flags & CT_FLAG_CLOSING != 0 && idle > SNAT_REUSE_CLOSED_NS;
    if !closed && idle <= limit {
        return false;
    }
    let old = Ct4Key {
        src: client,
        dst: v.addr,
        sport: client_port,
        dport: v.port,
        proto: f.proto,
        dir: CT_FORWARD,
        pad: 0,
    };
    let _ = CT4.remove(&old);
    true
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

/// One's-complement add of 32-bit partial sums (the kernel's csum_add).
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}

/// The checksum change of replacing `old` by `new` (raw, as in memory).
#[inline(always)]
fn csum_diff(old: u32, new: u32) -> u32 {
    csum_add(!old, new)
}

/// Writes the new addresses and ports in place, then fixes the IPv4 and
/// L4 checksums with three helper calls (by difference; the L4 one in two
/// parts, since the addresses are in the pseudo-header and the ports are
/// not, which matters for offloaded checksums).
#[inline(always)]
fn rewrite(
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

/// Answers a flow to a frontend without backends where it came from: a
/// TCP SYN gets a RST, a UDP datagram an ICMP port unreachable (from the
/// Service address). Anything else of such a flow is dropped.
#[inline(always)]
fn reject(ctx: &TcContext, f: &Flow) -> Result<i32, i64> {
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
fn resize(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: plain helper call on our skb.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    Ok(())
}

/// Ethernet back to the sender, and an IPv4 header from `src` to `dst`.
#[inline(always)]
fn headers(pkt: &mut [u8], macs: &[u8; 12], src: Be32, dst: Be32, total: u16, proto: u8) {
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
fn tcp_rst(macs: &[u8; 12], f: &Flow, ack: u32) -> [u8; 54] {
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
fn icmp_unreachable(macs: &[u8; 12], f: &Flow, quoted: &[u8; 28]) -> [u8; 70] {
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
fn sum_words<const N: usize>(b: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
