//! Test support: the privileged-test gate and network namespaces that
//! clean themselves up. Test traffic never leaves namespaces made here.

pub mod agent;
pub mod bpf;
pub mod deploy;
pub mod fake_api;
pub mod fuzz;
pub mod fuzz_packets;
pub mod icmp;
pub mod netns;
pub mod objects;
pub mod packets;
pub mod privileged;
pub mod servers;
pub mod userspace;

pub use netns::Netns;
pub use privileged::require_privileged;

/// The `ferry` binary next to the running test (target/debug/ferry), if it
/// was built with its eBPF object; otherwise why not.
pub fn ferry_binary() -> Result<std::path::PathBuf, String> {
    let bin = ferry_path()?;
    ebpf_object().map(|()| bin)
}

/// Whether this build embeds the eBPF object, and why not if it does not
/// (what privileged eBPF tests hand to [`require_privileged`]).
pub fn ebpf_object() -> Result<(), String> {
    ferry_proxy::ebpf::object().map(|_| ()).ok_or_else(|| {
        "ferry was built without its eBPF object (run cargo xtask build-ebpf)".into()
    })
}

/// The `ferry` binary next to the running test (target/debug/ferry), with
/// or without its eBPF object.
pub fn ferry_path() -> Result<std::path::PathBuf, String> {
    // target/debug/deps/<test> -> target/debug/ferry
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("ferry"))
        .ok_or("no target directory")?;
    if !bin.exists() {
        return Err(format!(
            "{} is not built (cargo build -p ferry-proxy)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// The sync-loop settings tests use: node "node-a", syncs as soon as asked,
/// no healthCheckNodePort listeners, default capacities; `sources` are the
/// names the synced gate waits for.
pub fn agent_config(sources: Vec<&'static str>) -> ferry_proxy::agent::AgentConfig {
    ferry_proxy::agent::AgentConfig {
        node_name: "node-a".into(),
        nodeport_cidrs: vec![],
        min_sync_period: std::time::Duration::ZERO,
        sync_period: std::time::Duration::from_secs(30),
        retry_period: std::time::Duration::from_secs(1),
        sources,
        health_check_servers: false,
        translate: ferry_proxy::translate::TranslateConfig::default(),
        plan: ferry_proxy::plan::PlanConfig::default(),
    }
}

/// The `ferry` binary for a privileged test that runs it; None (the test
/// is skipped) when not root or not built, which with
/// FERRY_REQUIRE_PRIVILEGED=1 panics instead.
pub fn privileged_ferry(test: &str) -> Option<std::path::PathBuf> {
    let bin = ferry_binary();
    if !privileged::require_privileged(test, bin.as_ref().map(|_| ()).map_err(Clone::clone)) {
        return None;
    }
    bin.ok()
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test never leaves an agent running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// SIGTERM and wait (5 s at most, then SIGKILL).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
