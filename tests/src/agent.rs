//! `ferry run` with the eBPF dataplane as the privileged tests start it.

use std::path::Path;
use std::process::Command;

/// Where and how an agent runs.
#[derive(Debug)]
pub struct EbpfAgent<'a> {
    /// The network namespace (under /var/run/netns) it runs in; `None`:
    /// the test's own.
    pub netns: Option<&'a str>,
    /// The source flag, e.g. `--source=file:/x.yaml` or `--kubeconfig=/k`.
    pub source: String,
    pub pins: &'a Path,
    pub cgroup: &'a Path,
    /// `--interfaces` (`none`, or a comma-separated list).
    pub interfaces: &'a str,
    pub hostname: &'a str,
}

impl EbpfAgent<'_> {
    /// The command (health and metrics servers off, a 50 ms minimum sync
    /// period); the caller adds flags and sets stdio. In a namespace only
    /// the network namespace is entered, with nsenter: bpffs and cgroup2
    /// stay the host's (`ip netns exec` would remount /sys).
    pub fn command(&self, bin: &Path) -> Command {
        let mut cmd = match self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("run")
            .arg(&self.source)
            .arg(format!("--bpffs-path={}", self.pins.display()))
            .arg(format!("--cgroup-path={}", self.cgroup.display()))
            .args(["--dataplane", "ebpf", "--interfaces", self.interfaces])
            .args(["--hostname-override", self.hostname])
            .args(["--min-sync-period", "50ms"])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""]);
        cmd
    }
}
