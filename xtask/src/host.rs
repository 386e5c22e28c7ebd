//! Host plumbing shared by the demo and the dataplane benchmark: `ip`
//! commands, a namespace port on a bridge, stopping a child process, the
//! cgroup2 mount.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Runs a command; its stdout, or an error with its stderr.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<String> {
    sh(Command::new("ip").args(args))
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

/// SIGTERM, up to `grace` for the child to exit, then SIGKILL; reaped.
pub fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 filesystem is mounted")
}
