//! Network namespaces, the one helper the privileged tests and `cargo
//! xtask` (the demo, the benchmark harness) share: created with their
//! loopback up, linked by veth pairs or to a bridge, entered by a thread,
//! and deleted on drop (also when a test panics or a run is interrupted).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// A veth pair: `local` (with `local_cidr`) in one namespace, `remote` (with
/// `remote_cidr`) in the other.
#[derive(Debug, Clone, Copy)]
pub struct VethLink<'a> {
    pub local: &'a str,
    pub local_cidr: &'a str,
    pub remote: &'a str,
    pub remote_cidr: &'a str,
}

impl Netns {
    /// Creates `ferry-<tag>-<pid>-<n>`, a name unique to this process.
    pub fn new(tag: &str) -> Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Netns::named(&format!("ferry-{tag}-{}-{n}", std::process::id()))
    }

    /// Creates the namespace `name` (it must not exist).
    pub fn named(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into() };
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
        let out = self
            .command(program)
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

    /// `program` to run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.name, program)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        run_in(&self.name, f)
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

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing network namespace {}: {e:#}", self.name);
        }
    }
}

/// `program` to run inside the namespace `ns` (`ip netns exec`).
pub fn command_in(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `f` on a new thread whose network namespace is `ns` (setns is per
/// thread for network namespaces; the cgroup stays the caller's) and
/// returns its result.
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let handle = std::thread::spawn(move || -> Result<T> {
        enter(&path)?;
        f()
    });
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread into the network namespace pinned at `path`.
pub fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects namespace `ns` to bridge `br0` of namespace `node`: a veth
/// `host_if` (in `node`, a port of br0) to `eth0` (in `ns`) holding
/// `cidr`, with a default route via `gateway` when given.
pub fn bridge_port(
    node: &str,
    host_if: &str,
    ns: &str,
    cidr: &str,
    gateway: Option<&str>,
) -> Result<()> {
    ip(&[
        "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", node, "link", "set", host_if, "master", "br0", "up"])?;
    ip(&["-n", ns, "addr", "add", cidr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    if let Some(gw) = gateway {
        ip(&["-n", ns, "route", "add", "default", "via", gw])?;
    }
    Ok(())
}

/// `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<Output> {
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
