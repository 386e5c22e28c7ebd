//! The TC path's conntrack: touching an entry, writing both entries of a
//! new flow, SNAT ports, and who may hold a reply tuple.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use ferry_common::counters::IPPROTO_TCP;
use ferry_common::lb::{
    Be16, Be32, Ct4Key, Ct4Value, CT_FLAG_CLOSING, CT_FORWARD, CT_REPLY, SNAT_PORT_COUNT,
    SNAT_PORT_MIN,
};

use crate::maps::{BACKENDS4, CT4, SNAT_CURSOR};
use crate::nat::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::pick::Picked;

/// A SNAT port's reply entry may go to a new flow once its flow closed
/// and stayed idle this long, or once idle this long anyway (UDP, TCP).
pub(super) const SNAT_REUSE_CLOSED_NS: u64 = 1_000_000_000;

pub(super) const SNAT_REUSE_UDP_NS: u64 = 60 * 1_000_000_000;

pub(super) const SNAT_REUSE_TCP_NS: u64 = 600 * 1_000_000_000;

/// How far apart the CPUs' SNAT cursors start (a prime near range / 3).
pub(super) const SNAT_CPU_STRIDE: u32 = 1_511;

/// Refreshes a conntrack entry a packet of `f` matched: its last-use time,
/// and for TCP whether the flow is closing (a FIN or RST; a new SYN on the
/// entry, the client reusing its port, opens it again). Returns a copy.
#[inline(always)]
pub(super) fn touch(f: &Flow, ct: *mut Ct4Value) -> Ct4Value {
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

#[inline(always)]
pub(super) fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// The tracked backend still exists at the same address.
#[inline(always)]
pub(super) fn backend_unchanged(v: &Ct4Value) -> bool {
    match BACKENDS4.get_ptr(v.backend_id) {
        // SAFETY: a pointer from a successful lookup.
        Some(be) => unsafe { (*be).addr == v.addr && (*be).port == v.port },
        None => false,
    }
}

/// Writes both conntrack entries of a new flow; returns the forward one.
#[inline(always)]
pub(super) fn track(
    f: &Flow,
    svc: &ferry_common::lb::Service4Value,
    picked: &Picked,
    nat_addr: Be32,
    nat_port: Be16,
) -> Result<Ct4Value, i64> {
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
    CT4.insert(f.key(CT_FORWARD), fwd, 0).map_err(i64::from)?;
    Ok(fwd)
}

/// A source port in the SNAT range whose reply tuple this flow may claim
/// ([`claim_reply`]). Ports are handed out in turn (a cursor per CPU),
/// trying up to 16.
#[inline(always)]
pub(super) fn snat_port(f: &Flow, picked: &Picked, addr: Be32) -> Option<Be16> {
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
pub(super) fn reply_key(f: &Flow, picked: &Picked, addr: Be32, port: Be16) -> Ct4Key {
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
pub(super) fn claim_reply(f: &Flow, key: &Ct4Key, t: u64) -> bool {
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
    let _ = CT4.remove(old);
    true
}
