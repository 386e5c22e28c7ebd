//! Socket-level load balancing on a cgroup v2: connect4 and sendmsg4
//! rewrite a Service address to a backend once, before any packet exists;
//! recvmsg4 and getpeername4 rewrite the backend back to the Service address
//! so applications only ever see the address they asked for.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use ferry_common::lb::{
    Be16, Be32, LbCounter, Service4Key, Service4Value, SockRevNat4Key, SockRevNat4Value,
    SVC_FLAG_DROP, SVC_FLAG_INTERNAL_VIA, SVC_FLAG_REJECT,
};

use crate::maps::{count, REVNAT4, SERVICES4, SOCK_REVNAT4};
use crate::pick;

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// Linux's ECONNREFUSED: what a kube-proxy reject (TCP RST, ICMP port
/// unreachable) makes connect() or a UDP socket return.
const ECONNREFUSED: i32 = 111;

/// Unconnected UDP: datagrams of one socket to one Service keep going to
/// the same backend while it lives, for this long after the last one.
const UDP_STICKY_SECS: u32 = 30;
/// Marks a socket cookie used as an affinity client (netns cookies, the
/// other kind of client, come from another counter).
const SOCKET_CLIENT: u64 = 1 << 63;

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    try_translate(&ctx, false).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ferry_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_translate(&ctx, true).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ferry_recvmsg4(ctx: SockAddrContext) -> i32 {
    let _ = try_reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeer4(ctx: SockAddrContext) -> i32 {
    let _ = try_reverse(&ctx);
    ALLOW
}

/// Rewrites a Service destination to a backend. A reject fails the
/// connect()/sendmsg() at once with ECONNREFUSED (no backend), a drop with
/// EPERM (a Local policy without a local endpoint); an address that is no
/// Service is left alone.
#[inline(always)]
fn try_translate(ctx: &SockAddrContext, datagram: bool) -> Result<i32, i64> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut key = Service4Key {
        addr: Be32(sa.user_ip4),
        // user_port holds the port in network order in its low 16 bits.
        port: Be16(sa.user_port as u16),
        slot: 0,
        proto: sa.protocol as u8,
        pad: [0; 3],
    };
    let mut svc: Service4Value = match SERVICES4.get_ptr(key) {
        // SAFETY: a pointer from a successful lookup.
        Some(v) => unsafe { *v },
        None => return Ok(ALLOW),
    };
    if svc.flags & SVC_FLAG_INTERNAL_VIA != 0 {
        if let Some((via_key, via)) = internal_via(&key, &svc) {
            key = via_key;
            svc = via;
        }
    }
    // The client whose choice is remembered: its netns for ClientIP
    // affinity, else the socket itself for unconnected UDP.
    let client = if svc.affinity_timeout != 0 {
        // SAFETY: plain helper call on our context.
        unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
    } else if datagram {
        svc.affinity_timeout = UDP_STICKY_SECS;
        // SAFETY: plain helper call on our context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        cookie | SOCKET_CLIENT
    } else {
        0
    };
    if svc.flags & SVC_FLAG_DROP != 0 {
        count(LbCounter::SockDropped);
        return Ok(DENY);
    }
    if svc.flags & SVC_FLAG_REJECT != 0 || svc.count == 0 {
        count(LbCounter::SockRejected);
        return Ok(refused());
    }
    let picked = match pick::affinity_backend(client, &svc, key) {
        Some(hit) => {
            count(LbCounter::SockAffinityHit);
            hit
        }
        None => match pick::random_slot(&svc, key) {
            Some(p) => p,
            None => {
                count(LbCounter::SockLookupMiss);
                return Ok(refused());
            }
        },
    };
    if svc.affinity_timeout != 0 {
        pick::remember_affinity(client, &svc, &picked);
    }
    let backend = picked.backend;
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev_key = SockRevNat4Key {
        cookie,
        backend_addr: backend.addr,
        backend_port: backend.port,
        pad: 0,
    };
    let rev = SockRevNat4Value {
        frontend_addr: Be32(sa.user_ip4),
        frontend_port: Be16(sa.user_port as u16),
        pad: 0,
        frontend_id: svc.frontend_id,
    };
    let _ = SOCK_REVNAT4.insert(rev_key, rev, 0);
    sa.user_ip4 = backend.addr.0;
    sa.user_port = u32::from(backend.port.0);
    count(LbCounter::SockTranslated);
    Ok(ALLOW)
}

/// The frontend that serves traffic from this node in place of `svc`
/// (the Service's ClusterIP for an externalTrafficPolicy Local address).
/// None while that frontend is not (yet) in the maps: `svc` serves then.
#[inline(always)]
fn internal_via(key: &Service4Key, svc: &Service4Value) -> Option<(Service4Key, Service4Value)> {
    // SAFETY: a pointer from a successful lookup, copied at once.
    let target = unsafe { *REVNAT4.get_ptr(svc.backend_id)? };
    let via_key = Service4Key {
        addr: target.addr,
        port: target.port,
        slot: 0,
        proto: key.proto,
        pad: [0; 3],
    };
    // SAFETY: as above.
    let via = unsafe { *SERVICES4.get_ptr(via_key)? };
    Some((via_key, via))
}

/// Denies the call with ECONNREFUSED instead of the default EPERM.
#[inline(always)]
fn refused() -> i32 {
    // SAFETY: a helper of cgroup programs (kernel 5.19+) that only sets the
    // error the filtered system call returns when the verdict is DENY.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Shows the Service address instead of the backend (UDP replies,
/// getpeername()).
#[inline(always)]
fn try_reverse(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevNat4Key {
        // SAFETY: plain helper call on our context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        backend_addr: Be32(sa.user_ip4),
        backend_port: Be16(sa.user_port as u16),
        pad: 0,
    };
    let rev = SOCK_REVNAT4.get_ptr(key).ok_or(0i64)?;
    // SAFETY: a pointer from a successful lookup.
    let rev = unsafe { *rev };
    sa.user_ip4 = rev.frontend_addr.0;
    sa.user_port = u32::from(rev.frontend_port.0);
    Ok(())
}
