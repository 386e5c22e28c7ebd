//! Frontend addresses on the dummy interface `ferry0` (privileged runs):
//! Service IPs that are not local are added so the kernel delivers their
//! traffic to our sockets, and removed again when no frontend needs them
//! and on exit. Where the kernel has no dummy driver they go on `lo`
//! instead (and only the ones Ferry added are removed).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

pub const DUMMY: &str = "ferry0";

#[derive(Debug)]
pub struct Addresses {
    /// Whether we manage addresses at all (root).
    pub enabled: bool,
    /// The interface holding them, once chosen: ferry0 (created by us) or lo.
    device: Option<&'static str>,
    have: BTreeSet<IpAddr>,
}

fn ip_batch(lines: &[String]) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(lines.join("\n").as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; "))
    }
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
            device: None,
            have: BTreeSet::new(),
        }
    }

    fn device(&mut self) -> Result<&'static str, String> {
        if let Some(d) = self.device {
            return Ok(d);
        }
        let _ = ip_batch(&[format!("link del {DUMMY}")]);
        let d = match ip_batch(&[
            format!("link add {DUMMY} type dummy"),
            format!("link set {DUMMY} up"),
        ]) {
            Ok(()) => DUMMY,
            Err(e) => {
                tracing::info!(reason = %e, "no dummy interface: frontend addresses go on lo");
                "lo"
            }
        };
        self.device = Some(d);
        Ok(d)
    }

    /// Makes the device hold exactly `wanted` (less the addresses other
    /// interfaces already have). Errors name the command's complaint.
    pub fn sync(
        &mut self,
        wanted: &BTreeSet<IpAddr>,
        local: &BTreeSet<IpAddr>,
    ) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let wanted: BTreeSet<IpAddr> = wanted.difference(local).copied().collect();
        if wanted.is_empty() && self.have.is_empty() {
            return Ok(());
        }
        let dev = self.device()?;
        let mut lines = Vec::new();
        for ip in wanted.difference(&self.have) {
            lines.push(format!("address add {ip}/{} dev {dev}", prefix(ip)));
        }
        for ip in self.have.difference(&wanted) {
            lines.push(format!("address del {ip}/{} dev {dev}", prefix(ip)));
        }
        let r = ip_batch(&lines);
        self.have = wanted;
        r.map_err(|e| format!("addresses on {dev}: {e}"))
    }

    /// Whether `ip` was added by us.
    pub fn holds(&self, ip: &IpAddr) -> bool {
        self.have.contains(ip)
    }

    pub fn remove_all(&mut self) {
        match self.device.take() {
            Some(DUMMY) => {
                let _ = ip_batch(&[format!("link del {DUMMY}")]);
            }
            Some(dev) => {
                let lines: Vec<String> = self
                    .have
                    .iter()
                    .map(|ip| format!("address del {ip}/{} dev {dev}", prefix(ip)))
                    .collect();
                let _ = ip_batch(&lines);
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
