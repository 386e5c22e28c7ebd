//! Frontend addresses on the dummy interface `ferry0` (privileged runs):
//! Service IPs that are not local are added so the kernel delivers their
//! traffic to our sockets, and removed again when no frontend needs them
//! and on exit. Where the kernel has no dummy driver they go on `lo`
//! instead (and only the ones Ferry added are removed). Over rtnetlink
//! (crate::netif), so no `ip` binary is needed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::netif::Rtnl;

pub const DUMMY: &str = "ferry0";

/// A failed change of the frontend addresses.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot open a route netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("cannot find the interface lo")]
    NoLoopback(#[source] std::io::Error),
    #[error("cannot {action} {ip}/{prefix} on {device}")]
    Change {
        action: &'static str,
        ip: IpAddr,
        prefix: u8,
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The interface holding the addresses.
#[derive(Debug, Clone, Copy)]
struct Device {
    name: &'static str,
    index: u32,
}

#[derive(Debug)]
pub struct Addresses {
    /// Whether we manage addresses at all (root).
    pub enabled: bool,
    rtnl: Option<Rtnl>,
    /// Chosen with the first address: ferry0 (created by us) or lo.
    device: Option<Device>,
    have: BTreeSet<IpAddr>,
}

fn prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Addresses {
    pub fn new(enabled: bool) -> Addresses {
        Addresses {
            enabled,
            rtnl: None,
            device: None,
            have: BTreeSet::new(),
        }
    }

    fn rtnl(&mut self) -> Result<&mut Rtnl, AddressError> {
        if self.rtnl.is_none() {
            self.rtnl = Some(Rtnl::open().map_err(AddressError::Netlink)?);
        }
        self.rtnl
            .as_mut()
            .ok_or_else(|| AddressError::Netlink(std::io::ErrorKind::NotConnected.into()))
    }

    fn device(&mut self) -> Result<Device, AddressError> {
        if let Some(d) = self.device {
            return Ok(d);
        }
        let rtnl = self.rtnl()?;
        // A ferry0 left by an earlier run goes: its addresses are unknown.
        if let Ok(Some(old)) = rtnl.link_index(DUMMY) {
            let _ = rtnl.delete_link(old);
        }
        let d = match rtnl.add_dummy(DUMMY) {
            Ok(index) => Device { name: DUMMY, index },
            Err(e) => {
                tracing::info!(reason = %e, "no dummy interface: frontend addresses go on lo");
                let lo = rtnl.link_index("lo").map_err(AddressError::NoLoopback)?;
                let index = lo
                    .ok_or_else(|| AddressError::NoLoopback(std::io::ErrorKind::NotFound.into()))?;
                Device { name: "lo", index }
            }
        };
        self.device = Some(d);
        Ok(d)
    }

    /// Makes the device hold exactly `wanted` (less the addresses other
    /// interfaces already have). Every change is tried; the first failure
    /// is returned, and what failed is tried again at the next sync.
    pub fn sync(
        &mut self,
        wanted: &BTreeSet<IpAddr>,
        local: &BTreeSet<IpAddr>,
    ) -> Result<(), AddressError> {
        if !self.enabled {
            return Ok(());
        }
        let wanted: BTreeSet<IpAddr> = wanted.difference(local).copied().collect();
        if wanted.is_empty() && self.have.is_empty() {
            return Ok(());
        }
        let dev = self.device()?;
        let add: Vec<IpAddr> = wanted.difference(&self.have).copied().collect();
        let del: Vec<IpAddr> = self.have.difference(&wanted).copied().collect();
        let mut first = None;
        for ip in add {
            match self.change("add", dev, ip) {
                Ok(()) => {
                    self.have.insert(ip);
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        for ip in del {
            match self.change("remove", dev, ip) {
                Ok(()) => {
                    self.have.remove(&ip);
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn change(
        &mut self,
        action: &'static str,
        dev: Device,
        ip: IpAddr,
    ) -> Result<(), AddressError> {
        let rtnl = self.rtnl()?;
        let r = if action == "add" {
            rtnl.add_address(dev.index, ip, prefix(&ip))
        } else {
            rtnl.delete_address(dev.index, ip, prefix(&ip))
        };
        r.map_err(|source| AddressError::Change {
            action,
            ip,
            prefix: prefix(&ip),
            device: dev.name,
            source,
        })
    }

    /// Whether `ip` was added by us.
    pub fn holds(&self, ip: &IpAddr) -> bool {
        self.have.contains(ip)
    }

    pub fn remove_all(&mut self) {
        match self.device.take() {
            Some(d) if d.name == DUMMY => {
                if let Ok(rtnl) = self.rtnl() {
                    let _ = rtnl.delete_link(d.index);
                }
            }
            Some(d) => {
                for ip in std::mem::take(&mut self.have) {
                    let _ = self.change("remove", d, ip);
                }
            }
            None => {}
        }
        self.have.clear();
    }
}

impl Drop for Addresses {
    fn drop(&mut self) {
        self.remove_all();
    }
}
