//! This network namespace's interfaces and addresses over rtnetlink (an
//! I/O edge): the addresses NodePorts and health checks listen on, the
//! interfaces the TC programs attach to, and the dummy interface and
//! addresses the userspace dataplane manages. Messages are
//! netlink-packet-route's; no `ip` binary is needed.

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use crate::netlink::{request, socket, Kind};

/// A route netlink socket of this thread's network namespace.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        Ok(Rtnl {
            sock: socket(NETLINK_ROUTE)?,
            seq: 0,
        })
    }

    fn ask(
        &mut self,
        msg: RouteNetlinkMessage,
        kind: Kind,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        request(&self.sock, msg, kind, self.seq)
    }

    /// Every interface: (index, name).
    pub fn links(&mut self) -> io::Result<Vec<(u32, String)>> {
        let replies = self.ask(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            Kind::Dump,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                }
                _ => None,
            })
            .collect())
    }

    /// The index of the interface `name`, if there is one.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        Ok(self
            .links()?
            .into_iter()
            .find_map(|(i, n)| (n == name).then_some(i)))
    }

    /// Every address: (interface index, address, prefix length).
    pub fn addresses(&mut self) -> io::Result<Vec<(u32, IpAddr, u8)>> {
        let replies = self.ask(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            Kind::Dump,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    // IFA_LOCAL is the interface's own address (it differs
                    // from IFA_ADDRESS, the peer, on point-to-point links).
                    let local = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let any = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    Some((a.header.index, local.or(any)?, a.header.prefix_len))
                }
                _ => None,
            })
            .collect())
    }

    /// Creates the dummy interface `name` and sets it up.
    pub fn add_dummy(&mut self, name: &str) -> io::Result<u32> {
        let mut add = LinkMessage::default();
        add.attributes.push(LinkAttribute::IfName(name.into()));
        add.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Dummy,
            )]));
        self.ask(
            RouteNetlinkMessage::NewLink(add),
            Kind::Change {
                flags: NLM_F_CREATE | NLM_F_EXCL,
            },
        )?;
        let index = self.link_index(name)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} vanished after creation"),
            )
        })?;
        let mut up = LinkMessage::default();
        up.header.index = index;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        self.ask(RouteNetlinkMessage::SetLink(up), Kind::Change { flags: 0 })?;
        Ok(index)
    }

    /// Deletes the interface `index`.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut del = LinkMessage::default();
        del.header.index = index;
        self.ask(RouteNetlinkMessage::DelLink(del), Kind::Change { flags: 0 })
            .map(drop)
    }

    /// Adds `ip/prefix` to interface `index` (an existing one is success).
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let msg = RouteNetlinkMessage::NewAddress(address_message(index, ip, prefix));
        match self.ask(
            msg,
            Kind::Change {
                flags: NLM_F_CREATE | NLM_F_EXCL,
            },
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Removes `ip/prefix` from interface `index` (a missing one is success).
    pub fn delete_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, ip, prefix));
        match self.ask(msg, Kind::Change { flags: 0 }) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other.map(drop),
        }
    }
}

fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Address(ip));
    m.attributes.push(AddressAttribute::Local(ip));
    m
}

/// Every (interface name, address) of this network namespace, loopback
/// and IPv6 link-local addresses left out.
pub fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut rtnl = Rtnl::open()?;
    let names = rtnl.links()?;
    Ok(rtnl
        .addresses()?
        .into_iter()
        .filter(|(_, ip, _)| {
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            !ip.is_loopback() && !link_local
        })
        .filter_map(|(index, ip, _)| {
            let name = names.iter().find(|(i, _)| *i == index)?;
            Some((name.1.clone(), ip))
        })
        .collect())
}

/// The addresses of this network namespace's interfaces (no loopback, no
/// IPv6 link-local), within `cidrs` when given, sorted. A failed walk is
/// logged and gives none.
pub fn local_addresses(cidrs: &[IpNet]) -> Vec<IpAddr> {
    let all = interface_addresses().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list the interface addresses");
        Vec::new()
    });
    let mut out: Vec<IpAddr> = all
        .into_iter()
        .map(|(_, ip)| ip)
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs no privilege: every namespace has lo with 127.0.0.1/8.
    #[test]
    fn lists_loopback_by_name_and_leaves_it_out_of_interface_addresses() {
        let mut rtnl = Rtnl::open().unwrap();
        let lo = rtnl.link_index("lo").unwrap().expect("lo");
        let addrs = rtnl.addresses().unwrap();
        assert!(
            addrs.contains(&(lo, IpAddr::from([127, 0, 0, 1]), 8)),
            "{addrs:?}"
        );
        let named = interface_addresses().unwrap();
        assert!(named.iter().all(|(_, ip)| !ip.is_loopback()), "{named:?}");
        assert_eq!(rtnl.link_index("no-such-if0").unwrap(), None);
    }

    #[test]
    fn address_messages_carry_family_prefix_and_both_addresses() {
        let m = address_message(7, "2001:2::5".parse().unwrap(), 128);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!((m.header.index, m.header.prefix_len), (7, 128));
        assert_eq!(m.attributes.len(), 2);
    }
}
