//! Attaching the TC programs (tcx ingress and egress) to the interfaces
//! traffic enters the node by, with their links pinned beside the maps.
//! A link already pinned (a restart, an upgrade) gets the freshly loaded
//! program swapped in atomically: no packet meets an interface without a
//! program. `remove_pins` detaches them with everything else.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use ferry_common::counters::TC_INGRESS_PROGRAM;
use ferry_common::lb::TC_EGRESS_PROGRAM;

use super::{load_program, Cause, EbpfError};

/// Where the link of `program` on `interface` is pinned.
pub fn tc_link_pin(dir: &Path, interface: &str, attach: &str) -> PathBuf {
    dir.join("links").join(format!("tc-{interface}-{attach}"))
}

/// What attaching did on one interface and direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcAttached {
    pub interface: String,
    pub direction: &'static str,
    /// The link was pinned already: the program in it was replaced.
    pub replaced: bool,
}

/// Attaches ingress and egress programs to every interface in
/// `interfaces` (by name, in the calling thread's network namespace).
pub fn attach_tc(
    ebpf: &mut Ebpf,
    dir: &Path,
    interfaces: &[String],
) -> Result<Vec<TcAttached>, EbpfError> {
    let mut out = Vec::new();
    if interfaces.is_empty() {
        return Ok(out);
    }
    for (program, attach, direction) in [
        (TC_INGRESS_PROGRAM, TcAttachType::Ingress, "ingress"),
        (TC_EGRESS_PROGRAM, TcAttachType::Egress, "egress"),
    ] {
        load_program(ebpf, program)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or_else(|| EbpfError::MissingProgram {
                name: program.into(),
            })?
            .try_into()
            .map_err(prog_err(program))?;
        for interface in interfaces {
            let exists = crate::netif::Rtnl::open()
                .and_then(|mut r| r.link_index(interface))
                .is_ok_and(|i| i.is_some());
            if !exists {
                // The keeper attaches it once it appears.
                tracing::warn!(interface = %interface, direction,
                    "no such interface now: its TC program is attached once it appears");
                continue;
            }
            let link = Attach {
                program,
                interface,
                kind: attach,
                direction,
            };
            let replaced = link.pin_link(prog, dir)?;
            out.push(TcAttached {
                interface: interface.clone(),
                direction,
                replaced,
            });
        }
    }
    Ok(out)
}

fn prog_err(program: &str) -> impl Fn(aya::programs::ProgramError) -> EbpfError + '_ {
    move |source| EbpfError::Program {
        name: program.into(),
        source: Box::new(source),
    }
}

/// One TC program on one interface and direction.
struct Attach<'a> {
    program: &'a str,
    interface: &'a str,
    kind: TcAttachType,
    direction: &'static str,
}

impl Attach<'_> {
    /// Attaches the program and pins its link; an existing pinned link is
    /// updated in place (its program replaced), a dead one (its device
    /// gone) replaced. Returns whether a pinned link was there.
    fn pin_link(&self, prog: &mut SchedClassifier, dir: &Path) -> Result<bool, EbpfError> {
        let (program, interface, direction) = (self.program, self.interface, self.direction);
        let pin = tc_link_pin(dir, interface, direction);
        let link_err = |source: Box<dyn std::error::Error + Send + Sync>| EbpfError::Link {
            path: pin.display().to_string(),
            cause: Cause::new(format!("{program} on {interface}"), source),
        };
        let prog_err = prog_err(program);
        let (id, replaced) = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| link_err(e.into()))?;
                match prog.attach_to_link(link) {
                    Ok(id) => (id, true),
                    // A link whose device went away (severed): a new one
                    // replaces its pin.
                    Err(e) => {
                        tracing::warn!(interface = %interface, direction, error = %e,
                            "the pinned TC link is dead: attaching a new one");
                        std::fs::remove_file(&pin).map_err(|e| link_err(e.into()))?;
                        (prog.attach(interface, self.kind).map_err(&prog_err)?, false)
                    }
                }
            }
            Err(LinkError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                (prog.attach(interface, self.kind).map_err(&prog_err)?, false)
            }
            Err(e) => return Err(link_err(e.into())),
        };
        let link = prog.take_link(id).map_err(&prog_err)?;
        let fd: FdLink = link.try_into().map_err(|e: LinkError| link_err(e.into()))?;
        if replaced {
            std::fs::remove_file(&pin).map_err(|e| link_err(e.into()))?;
        }
        fd.pin(&pin).map_err(|e| link_err(e.into()))?;
        Ok(replaced)
    }
}

/// The interfaces the TC path attaches to by default: those holding a
/// global IPv4 address, except loopback and pod veths (`veth*`, `lxc*`,
/// `cali*`), whose traffic the socket-level programs already translate.
pub fn default_interfaces() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let addresses = crate::netif::interface_addresses().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list the interfaces for the TC path");
        Vec::new()
    });
    for (name, ip) in addresses {
        let global_v4 = matches!(ip, std::net::IpAddr::V4(v4) if !v4.is_link_local());
        if global_v4 && !is_pod_link(&name) && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn is_pod_link(name: &str) -> bool {
    ["veth", "lxc", "cali", "lo"]
        .iter()
        .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_links_and_loopback_are_not_default_interfaces() {
        assert!(is_pod_link("veth1a2b3c"));
        assert!(is_pod_link("lxc_health"));
        assert!(is_pod_link("lo"));
        assert!(!is_pod_link("eth0"));
        assert!(!default_interfaces().iter().any(|n| n == "lo"));
    }

    #[test]
    fn link_pins_name_interface_and_direction() {
        assert_eq!(
            tc_link_pin(Path::new("/sys/fs/bpf/ferry"), "eth0", "ingress"),
            PathBuf::from("/sys/fs/bpf/ferry/links/tc-eth0-ingress")
        );
    }
}
