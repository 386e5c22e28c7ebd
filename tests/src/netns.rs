//! Network namespaces created by a test, named with a per-test unique
//! prefix and deleted on drop (also when the test panics).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `ferry-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ferry-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a program inside the namespace; fails on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Runs `f` on a new thread whose network namespace is this one (setns
    /// is per thread for network namespaces) and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A veth pair between `self` and `peer`, addressed and up.
    pub fn veth_to(&self, peer: &Netns, link: VethLink<'_>) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            link.local,
            "type",
            "veth",
            "peer",
            "name",
            link.remote,
            "netns",
            &peer.name,
        ])?;
        self.ip(&["addr", "add", link.local_cidr, "dev", link.local])?;
        peer.ip(&["addr", "add", link.remote_cidr, "dev", link.remote])?;
        self.ip(&["link", "set", link.local, "up"])?;
        peer.ip(&["link", "set", link.remote, "up"])?;
        Ok(())
    }
}

/// The topology most dataplane tests use: a client namespace with
/// 198.18.`net`.1/24 and a backend namespace with 198.18.`net`.2/24 and
/// .3/24 (two backend addresses), joined by a veth pair named after `tag`.
pub fn client_and_backends(tag: &str, net: u8) -> Result<(Netns, Netns)> {
    let srv = Netns::new(&format!("{tag}srv"))?;
    let cli = Netns::new(&format!("{tag}cli"))?;
    let (local, remote) = (format!("{tag}0"), format!("{tag}1"));
    srv.veth_to(
        &cli,
        VethLink {
            local: &local,
            local_cidr: &format!("198.18.{net}.2/24"),
            remote: &remote,
            remote_cidr: &format!("198.18.{net}.1/24"),
        },
    )?;
    srv.ip(&["addr", "add", &format!("198.18.{net}.3/24"), "dev", &local])?;
    Ok((srv, cli))
}

/// The TC tests' topology: client (198.18.20.2) -- ext -- node (.20.1 |
/// .21.1 | .22.1) -- int -- backends (198.18.21.2, .3); node -- pod link
/// (no TC program) -- pod (198.18.22.2). The node forwards.
#[derive(Debug)]
pub struct TcTopology {
    pub cli: Netns,
    pub node: Netns,
    pub srv: Netns,
    pub pod: Netns,
}

impl TcTopology {
    pub fn new(tag: &str) -> Result<TcTopology> {
        let cli = Netns::new(&format!("{tag}c"))?;
        let node = Netns::new(&format!("{tag}n"))?;
        let srv = Netns::new(&format!("{tag}s"))?;
        let pod = Netns::new(&format!("{tag}p"))?;
        let links = [
            (&cli, "tce1", "198.18.20.2/24", "tce0", "198.18.20.1/24"),
            (&srv, "tcb1", "198.18.21.2/24", "tcb0", "198.18.21.1/24"),
            (&pod, "vethp1", "198.18.22.2/24", "vethp0", "198.18.22.1/24"),
        ];
        for (peer, local, local_cidr, remote, remote_cidr) in links {
            peer.veth_to(
                &node,
                VethLink {
                    local,
                    local_cidr,
                    remote,
                    remote_cidr,
                },
            )?;
        }
        srv.ip(&["addr", "add", "198.18.21.3/24", "dev", "tcb1"])?;
        for (ns, gw) in [
            (&cli, "198.18.20.1"),
            (&srv, "198.18.21.1"),
            (&pod, "198.18.22.1"),
        ] {
            ns.ip(&["route", "add", "default", "via", gw])?;
        }
        node.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        Ok(TcTopology {
            cli,
            node,
            srv,
            pod,
        })
    }

    /// Loads the programs with maps pinned at `pins` and attaches TC to the
    /// client and backend links of the node.
    pub fn attach(&self, pins: &std::path::Path) -> Result<aya::Ebpf> {
        self.attach_with(pins, ferry_proxy::datapath::MapCapacities::default())
    }

    /// [`TcTopology::attach`] with maps of these capacities.
    pub fn attach_with(
        &self,
        pins: &std::path::Path,
        caps: ferry_proxy::datapath::MapCapacities,
    ) -> Result<aya::Ebpf> {
        let pins = pins.to_path_buf();
        self.node.run(move || {
            let mut ebpf = ferry_proxy::ebpf::open(&pins, &caps)?;
            let links = ["tce0".to_string(), "tcb0".to_string()];
            let done = ferry_proxy::ebpf::tc::attach_tc(&mut ebpf, &pins, &links)?;
            anyhow::ensure!(done.len() == 4, "attached {done:?}");
            Ok(ebpf)
        })
    }
}

/// Names and addresses of the two ends of a veth pair.
#[derive(Debug, Clone, Copy)]
pub struct VethLink<'a> {
    pub local: &'a str,
    pub local_cidr: &'a str,
    pub remote: &'a str,
    pub remote_cidr: &'a str,
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing network namespace {}: {e:#}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<Output> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {args:?}"))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
