//! Closes connected UDP sockets that socket-level balancing sent to a
//! backend that is now deleted (their cookies are in the socket reverse-NAT
//! map; a socket connected to that address directly is left alone), through
//! sock_diag (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY), in this network
//! namespace and every one under /var/run/netns (where CNI plugins and
//! `ip netns` keep pod namespaces). Socket-level balancing translated such
//! a socket once, at connect(); without this it would keep sending to the
//! dead backend. The application sees ECONNABORTED and, as DNS resolvers
//! and most UDP clients do, opens a new socket, which gets a live backend.

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use netlink_packet_sock_diag::constants::{AF_INET, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink::{request, socket, Kind};

const NETNS_DIR: &str = "/var/run/netns";

/// A UDP peer (address, port) whose connected sockets must go.
pub type Peer = (Ipv4Addr, u16);

/// Destroys, in this namespace and every one under /var/run/netns, the
/// connected UDP sockets whose peer is in `peers` and whose cookie is in
/// `cookies`; returns how many.
pub fn destroy_udp_sockets(peers: &[Peer], cookies: &Arc<HashSet<u64>>) -> usize {
    if peers.is_empty() || cookies.is_empty() {
        return 0;
    }
    let mut done = destroy_here(peers, cookies).unwrap_or_else(|e| {
        tracing::debug!(
            error = &e as &dyn std::error::Error,
            "UDP socket cleanup in the agent's namespace"
        );
        0
    });
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return done;
    };
    for e in entries.flatten() {
        let path = e.path();
        let peers = peers.to_vec();
        let cookies = cookies.clone();
        let ns = path.clone();
        let joined = std::thread::spawn(move || -> std::io::Result<usize> {
            let ns = File::open(&ns)?;
            // SAFETY: setns on a valid namespace fd; it affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            destroy_here(&peers, &cookies)
        })
        .join();
        match joined {
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => {
                tracing::debug!(namespace = %path.display(), error = &e as &dyn std::error::Error, "UDP socket cleanup");
            }
            Err(_) => tracing::warn!("UDP socket cleanup thread panicked"),
        }
    }
    done
}

/// A UDP/IPv4 request for `socket_id` (all zero: every socket, in a dump)
/// among the connected ones (TCP_ESTABLISHED is what a connected UDP
/// socket reports).
fn udp_request(socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED,
        socket_id,
    })
}

/// The cookie of a socket ID (two host-order u32, low first).
fn cookie(id: &SocketId) -> u64 {
    let c = id.cookie;
    let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Whether a socket ID is one to destroy: its peer in `peers`, its cookie
/// in `cookies`.
fn wanted(id: &SocketId, peers: &[Peer], cookies: &HashSet<u64>) -> bool {
    let IpAddr::V4(dst) = id.destination_address else {
        return false;
    };
    peers.contains(&(dst, id.destination_port)) && cookies.contains(&cookie(id))
}

/// Destroys the wanted sockets of this thread's namespace (sock_diag);
/// an error is the sock_diag socket's or its dump's.
fn destroy_here(peers: &[Peer], cookies: &HashSet<u64>) -> std::io::Result<usize> {
    let sock = socket(NETLINK_SOCK_DIAG)?;
    let dump = request(&sock, udp_request(SocketId::new_v4()), Kind::Dump, 1)?;
    let ids: Vec<SocketId> = dump
        .into_iter()
        .filter_map(|m| match m {
            SockDiagMessage::InetResponse(r) => Some(r.header.socket_id),
            _ => None,
        })
        .filter(|id| wanted(id, peers, cookies))
        .collect();
    let mut done = 0;
    for (i, id) in ids.into_iter().enumerate() {
        let destroy = SockDiagDestroy::new(udp_request(id));
        match request(&sock, destroy, Kind::Change { flags: 0 }, 2 + i as u32) {
            Ok(_) => done += 1,
            Err(e) => tracing::debug!(error = %e, "SOCK_DESTROY refused"),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(dst: [u8; 4], port: u16, cookie: u64) -> SocketId {
        let mut id = SocketId::new_v4();
        id.destination_address = IpAddr::from(dst);
        id.destination_port = port;
        let (lo, hi) = (cookie as u32, (cookie >> 32) as u32);
        id.cookie[..4].copy_from_slice(&lo.to_ne_bytes());
        id.cookie[4..].copy_from_slice(&hi.to_ne_bytes());
        id
    }

    #[test]
    fn cookies_read_low_word_first() {
        assert_eq!(cookie(&id([0; 4], 0, (1 << 32) | 7)), (1 << 32) | 7);
    }

    #[test]
    fn only_sockets_to_a_gone_peer_with_our_cookie_are_wanted() {
        let peers = [(Ipv4Addr::new(198, 18, 1, 1), 53)];
        let cookies: HashSet<u64> = [42].into_iter().collect();
        assert!(wanted(&id([198, 18, 1, 1], 53, 42), &peers, &cookies));
        assert!(!wanted(&id([198, 18, 1, 1], 53, 43), &peers, &cookies));
        assert!(!wanted(&id([198, 18, 1, 1], 54, 42), &peers, &cookies));
        assert!(!wanted(&id([198, 18, 1, 2], 53, 42), &peers, &cookies));
    }

    /// Unprivileged: a dump of this namespace's connected UDP sockets
    /// finds one of ours by its cookie (SO_COOKIE).
    #[test]
    fn a_dump_finds_a_connected_udp_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect("127.0.0.1:9").unwrap();
        let mut cookie_of_s = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt on our socket into a u64 of the given length.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie_of_s).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0);
        let sock = socket(NETLINK_SOCK_DIAG).unwrap();
        let dump = request(&sock, udp_request(SocketId::new_v4()), Kind::Dump, 1).unwrap();
        let found = dump.iter().any(|m| {
            matches!(m, SockDiagMessage::InetResponse(r)
                if cookie(&r.header.socket_id) == cookie_of_s
                    && r.header.socket_id.destination_port == 9)
        });
        assert!(found, "{dump:?}");
    }
}
