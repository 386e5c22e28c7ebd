//! ARP for announced addresses, I/O: one AF_PACKET socket per interface
//! answers ARP requests for the addresses in the shared set with the
//! interface's MAC, and [`ArpResponder::gratuitous`] tells the segment that
//! an address moved here. The kernel never owns these addresses; only this
//! responder makes the node reachable for them.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

const ETH_P_ARP: u16 = 0x0806;
const ARP_LEN: usize = 42;

/// An ARP frame's fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

/// Parses an Ethernet+ARP (IPv4 over Ethernet) frame.
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < ARP_LEN || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &frame[14..];
    if a[0..2] != [0, 1] || a[2..4] != [8, 0] || a[4] != 6 || a[5] != 4 {
        return None;
    }
    let mac = |s: &[u8]| <[u8; 6]>::try_from(s).ok();
    let ip = |s: &[u8]| Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]));
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sender_mac: mac(&a[8..14])?,
        sender_ip: ip(&a[14..18])?,
        target_mac: mac(&a[18..24])?,
        target_ip: ip(&a[24..28])?,
    })
}

/// An Ethernet+ARP frame from `eth_src` to `eth_dst`.
pub fn build_arp(eth_dst: [u8; 6], eth_src: [u8; 6], arp: &Arp) -> [u8; ARP_LEN] {
    let mut f = [0u8; ARP_LEN];
    f[0..6].copy_from_slice(&eth_dst);
    f[6..12].copy_from_slice(&eth_src);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 0]);
    f[20..22].copy_from_slice(&arp.op.to_be_bytes());
    f[22..28].copy_from_slice(&arp.sender_mac);
    f[28..32].copy_from_slice(&arp.sender_ip.octets());
    f[32..38].copy_from_slice(&arp.target_mac);
    f[38..42].copy_from_slice(&arp.target_ip.octets());
    f
}

/// The reply to `request` when `ip` is announced with `mac`.
pub fn reply_to(request: &Arp, mac: [u8; 6]) -> Option<[u8; ARP_LEN]> {
    (request.op == 1 && request.sender_ip != request.target_ip).then(|| {
        build_arp(
            request.sender_mac,
            mac,
            &Arp {
                op: 2,
                sender_mac: mac,
                sender_ip: request.target_ip,
                target_mac: request.sender_mac,
                target_ip: request.sender_ip,
            },
        )
    })
}

/// The addresses this node answers for.
pub type Announced = Arc<RwLock<HashSet<Ipv4Addr>>>;

#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    #[error("interface {0}: no such interface")]
    NoInterface(String),
    #[error("interface {0}: reading its MAC address: {1}")]
    Mac(String, String),
    #[error("interface {0}: AF_PACKET socket: {1}")]
    Socket(String, std::io::Error),
}

/// One interface's raw ARP socket.
#[derive(Debug)]
struct Port {
    name: String,
    index: i32,
    mac: [u8; 6],
    fd: OwnedFd,
}

/// The interface's MAC (SIOCGIFHWADDR: of this network namespace, unlike
/// /sys/class/net, which shows the namespace sysfs was mounted in).
fn mac_of(name: &str) -> Result<[u8; 6], ArpError> {
    let bad = |why: String| ArpError::Mac(name.into(), why);
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(bad("name too long".into()));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2); owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

fn sockaddr(index: i32, dst: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ARP.to_be();
    sa.sll_ifindex = index;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&dst);
    sa
}

impl Port {
    fn open(name: &str) -> Result<Port, ArpError> {
        let cname = std::ffi::CString::new(name).map_err(|_| ArpError::NoInterface(name.into()))?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        if index == 0 {
            return Err(ArpError::NoInterface(name.into()));
        }
        let mac = mac_of(name)?;
        let os = |name: &str| ArpError::Socket(name.into(), std::io::Error::last_os_error());
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if raw < 0 {
            return Err(os(name));
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sa = sockaddr(index, [0; 6]);
        // SAFETY: a valid sockaddr_ll of its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(os(name));
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid timeval of its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Port {
            name: name.into(),
            index,
            mac,
            fd,
        })
    }

    fn send(&self, dst: [u8; 6], frame: &[u8]) -> std::io::Result<()> {
        let sa = sockaddr(self.index, dst);
        // SAFETY: `frame` and `sa` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Answers requests until `stop`.
    fn serve(&self, announced: &Announced, replies: &AtomicU64, stop: &AtomicBool) {
        let mut buf = [0u8; 128];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                continue; // timeout or EINTR: check `stop`
            };
            let Some(req) = parse_arp(&buf[..n]) else {
                continue;
            };
            let ours = announced
                .read()
                .is_ok_and(|set| set.contains(&req.target_ip));
            if !ours {
                continue;
            }
            if let Some(frame) = reply_to(&req, self.mac) {
                match self.send(req.sender_mac, &frame) {
                    Ok(()) => {
                        replies.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(interface = %self.name, error = %e, "cannot send an ARP reply");
                    }
                }
            }
        }
    }
}

/// The responder on a set of interfaces.
#[derive(Debug)]
pub struct ArpResponder {
    ports: Vec<Arc<Port>>,
    pub announced: Announced,
    pub replies: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl ArpResponder {
    /// Opens every interface and starts answering (a thread each).
    pub fn start(interfaces: &[String]) -> Result<ArpResponder, ArpError> {
        let ports = interfaces
            .iter()
            .map(|i| Port::open(i).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let responder = ArpResponder {
            ports,
            announced: Arc::default(),
            replies: Arc::default(),
            stop: Arc::default(),
        };
        for port in &responder.ports {
            let (port, announced, replies, stop) = (
                port.clone(),
                responder.announced.clone(),
                responder.replies.clone(),
                responder.stop.clone(),
            );
            std::thread::Builder::new()
                .name(format!("arp-{}", port.name))
                .spawn(move || port.serve(&announced, &replies, &stop))
                .map_err(|e| ArpError::Socket(interfaces.join(","), e))?;
        }
        Ok(responder)
    }

    /// Gratuitous ARP for `ip` on every interface (a request and a reply,
    /// as peers differ in which one they accept).
    pub fn gratuitous(&self, ip: Ipv4Addr) {
        for port in &self.ports {
            for op in [1u16, 2] {
                let frame = build_arp(
                    [0xff; 6],
                    port.mac,
                    &Arp {
                        op,
                        sender_mac: port.mac,
                        sender_ip: ip,
                        target_mac: if op == 1 { [0; 6] } else { [0xff; 6] },
                        target_ip: ip,
                    },
                );
                if let Err(e) = port.send([0xff; 6], &frame) {
                    tracing::warn!(interface = %port.name, address = %ip, error = %e, "cannot send gratuitous ARP");
                }
            }
        }
    }
}

impl Drop for ArpResponder {
    fn drop(&mut self) {
        // The threads see it within their 200 ms receive timeout.
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_for_an_announced_address_gets_our_mac() {
        let client = [2, 0, 0, 0, 0, 1];
        let ours = [2, 0, 0, 0, 0, 9];
        let request = build_arp(
            [0xff; 6],
            client,
            &Arp {
                op: 1,
                sender_mac: client,
                sender_ip: Ipv4Addr::new(198, 18, 0, 100),
                target_mac: [0; 6],
                target_ip: Ipv4Addr::new(198, 18, 0, 240),
            },
        );
        let req = parse_arp(&request).expect("an ARP request");
        let reply = reply_to(&req, ours).expect("a reply");
        assert_eq!(&reply[0..6], &client);
        let r = parse_arp(&reply).expect("an ARP reply");
        assert_eq!(
            r,
            Arp {
                op: 2,
                sender_mac: ours,
                sender_ip: Ipv4Addr::new(198, 18, 0, 240),
                target_mac: client,
                target_ip: Ipv4Addr::new(198, 18, 0, 100),
            }
        );
        // Gratuitous requests (sender = target) and replies are not answered;
        // other frames do not parse.
        let garp = Arp {
            sender_ip: req.target_ip,
            ..req
        };
        assert!(reply_to(&garp, ours).is_none());
        assert!(reply_to(&r, ours).is_none());
        let mut ipv4 = request;
        ipv4[12..14].copy_from_slice(&[8, 0]);
        assert!(parse_arp(&ipv4).is_none());
        assert!(parse_arp(&request[..41]).is_none());
    }
}
