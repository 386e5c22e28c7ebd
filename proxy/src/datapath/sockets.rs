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
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// TCP_ESTABLISHED: what a connected UDP socket reports.
const STATE_CONNECTED: u32 = 1 << 1;
const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_sockid.
const SOCKID_LEN: usize = 48;
/// struct inet_diag_req_v2.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// struct inet_diag_msg.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
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
        tracing::debug!(error = %e, "UDP socket cleanup in the agent's namespace");
        0
    });
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return done;
    };
    for e in entries.flatten() {
        let path = e.path();
        let peers = peers.to_vec();
        let cookies = cookies.clone();
        let joined = std::thread::spawn(move || -> Result<usize, String> {
            let ns = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: setns on a valid namespace fd; it affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            destroy_here(&peers, &cookies)
        })
        .join();
        match joined {
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => tracing::debug!(error = %e, "UDP socket cleanup"),
            Err(_) => tracing::warn!("UDP socket cleanup thread panicked"),
        }
    }
    done
}

fn netlink() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(format!(
            "sock_diag socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A netlink message: header, then an inet_diag_req_v2 for UDP/IPv4 with
/// `id` (48 bytes) as its socket ID.
fn request(kind: u16, flags: u16, seq: u32, id: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_INET as u8);
    m.push(libc::IPPROTO_UDP as u8);
    m.push(0); // idiag_ext
    m.push(0); // pad
    m.extend_from_slice(&STATE_CONNECTED.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), String> {
    // SAFETY: sending our own buffer on our socket (to the kernel: the
    // default destination of a netlink socket).
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(format!(
            "sock_diag send: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: receiving into our own buffer.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(format!(
            "sock_diag recv: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(n as usize)
}

/// The netlink messages in `buf[..n]`: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        out.push((kind, &buf[off + NLMSG_HDRLEN..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// The cookie in an inet_diag_sockid (two host-order u32, low first).
fn cookie(id: &[u8]) -> u64 {
    let lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The socket IDs of connected UDP sockets in this namespace whose peer is
/// in `peers` and whose cookie is in `cookies`.
fn matching(fd: &OwnedFd, peers: &[Peer], cookies: &HashSet<u64>) -> Result<Vec<Vec<u8>>, String> {
    send(
        fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        if n == 0 {
            return Ok(found);
        }
        for (kind, body) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err("sock_diag dump refused".into()),
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                    let id = &body[4..4 + SOCKID_LEN];
                    let dport = u16::from_be_bytes([id[2], id[3]]);
                    let dst = Ipv4Addr::new(id[20], id[21], id[22], id[23]);
                    if peers.contains(&(dst, dport)) && cookies.contains(&cookie(id)) {
                        found.push(id.to_vec());
                    }
                }
                _ => {}
            }
        }
    }
}

fn destroy_here(peers: &[Peer], cookies: &HashSet<u64>) -> Result<usize, String> {
    let fd = netlink()?;
    let ids = matching(&fd, peers, cookies)?;
    let mut done = 0;
    let mut buf = vec![0u8; 4096];
    for (i, id) in ids.iter().enumerate() {
        send(
            &fd,
            &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2 + i as u32, id),
        )?;
        let n = recv(&fd, &mut buf)?;
        for (kind, body) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR && body.len() >= 4 {
                let err = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                if err == 0 {
                    done += 1;
                } else {
                    tracing::debug!(errno = -err, "SOCK_DESTROY refused");
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_kernel_layout() {
        let m = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &[0xab; SOCKID_LEN],
        );
        assert_eq!(m.len(), 16 + 56);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&m[24..], &[0xab; SOCKID_LEN][..]);
    }

    #[test]
    fn cookies_read_low_word_first() {
        let mut id = [0u8; SOCKID_LEN];
        id[40..44].copy_from_slice(&7u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(cookie(&id), (1 << 32) | 7);
    }

    #[test]
    fn messages_split_on_aligned_lengths() {
        let mut buf = Vec::new();
        for kind in [NLMSG_DONE, NLMSG_ERROR] {
            buf.extend_from_slice(&20u32.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&[1, 2, 3, 4]);
        }
        let m = messages(&buf);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], (NLMSG_DONE, &[1u8, 2, 3, 4][..]));
        assert_eq!(m[1].0, NLMSG_ERROR);
    }
}
