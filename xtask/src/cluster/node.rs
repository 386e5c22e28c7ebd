//! The cluster's machines, modelled on kind: a switch namespace holding the
//! test bridge, a client namespace on it, and per node a network namespace
//! with its own PID 1 (init.rs), mounts and cgroup subtree. Processes are
//! started inside a node through its init's namespaces, in its cgroups.

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::poll::poll;
use super::{init, Layout, NodeSpec, CLIENT_IP, CLIENT_NS, GATEWAY, NODES, SWITCH_NS};
use crate::host::{bridge_port, ip, sh};

/// The bridge, its gateway address (a dead end: the test network has no
/// way out) and the client namespace on it.
pub fn create_network() -> Result<()> {
    ip(&["netns", "add", SWITCH_NS])?;
    ip(&["-n", SWITCH_NS, "link", "set", "lo", "up"])?;
    ip(&["-n", SWITCH_NS, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        SWITCH_NS,
        "addr",
        "add",
        &format!("{GATEWAY}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", SWITCH_NS, "link", "set", "br0", "up"])?;
    ip(&["netns", "add", CLIENT_NS])?;
    ip(&["-n", CLIENT_NS, "link", "set", "lo", "up"])?;
    bridge_port(
        SWITCH_NS,
        "v-client",
        CLIENT_NS,
        &format!("{CLIENT_IP}/24"),
        Some(GATEWAY),
    )
}

/// A node's network namespace, directories, cgroups and init; returns the
/// init's PID once its mounts are in place.
pub fn start(layout: &Layout, node: &NodeSpec) -> Result<u32> {
    ip(&["netns", "add", node.ns])?;
    ip(&["-n", node.ns, "link", "set", "lo", "up"])?;
    let port = format!("v-{}", node.ns);
    bridge_port(
        SWITCH_NS,
        &port,
        node.ns,
        &format!("{}/24", node.ip),
        Some(GATEWAY),
    )?;
    in_netns(node.ns, "echo 1 > /proc/sys/net/ipv4/ip_forward")?;

    let dir = layout.node(node.name);
    for (name, target) in init::BINDS {
        std::fs::create_dir_all(dir.join(name))?;
        layout.mount_point(Path::new(target))?;
    }
    let cgroups = create_cgroups(layout, node)?;
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut cmd = in_cgroups(&cgroups);
    cmd.arg("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns))
        .args([
            "--", "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc",
        ])
        .args(["--cgroup", "--propagation", "private", "--"])
        .arg(exe)
        .args(["cluster", "__init"])
        .arg(&dir)
        .arg(node.name);
    let unshare = spawn_detached(cmd, &layout.log(node.name, "init"))?;
    let ready = init::ready_file(&dir);
    let what = format!(
        "node {}: its init ready (see {})",
        node.name,
        layout.log(node.name, "init").display()
    );
    poll(
        &what,
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            Ok(if ready.exists() {
                Ok(())
            } else {
                Err("no ready file".into())
            })
        },
    )?;
    let pid = child_of(unshare)
        .with_context(|| format!("node {}: finding its init process", node.name))?;
    std::fs::write(layout.pid_file(node.name, "init"), pid.to_string())?;
    Ok(pid)
}

/// Starts `argv` in `node` (all of its init's namespaces, its cgroups),
/// detached, logging to the node's log for `name`; returns its host PID.
pub fn spawn(layout: &Layout, node: &NodeSpec, name: &str, argv: &[String]) -> Result<u32> {
    let mut cmd = entered(layout, node)?;
    cmd.args(argv);
    let nsenter = spawn_detached(cmd, &layout.log(node.name, name))?;
    // nsenter forks into the PID namespace; the program is its child.
    let what = format!("node {}: {name} started", node.name);
    let pid = poll(
        &what,
        Duration::from_secs(5),
        Duration::from_millis(20),
        || Ok(child_of(nsenter).map_err(|e| format!("{e:#}"))),
    )?;
    std::fs::write(layout.pid_file(node.name, name), pid.to_string())?;
    Ok(pid)
}

/// Runs `argv` in `node` and waits for it; its stdout.
pub fn exec(layout: &Layout, node: &NodeSpec, argv: &[&str]) -> Result<String> {
    let mut cmd = entered(layout, node)?;
    cmd.args(argv).current_dir("/");
    sh(&mut cmd).with_context(|| format!("node {}: {}", node.name, argv.join(" ")))
}

/// A command that joins `node`'s cgroups and enters all of its init's
/// namespaces; the program and its arguments follow.
fn entered(layout: &Layout, node: &NodeSpec) -> Result<Command> {
    let init = init_pid(layout, node)?;
    let mut cmd = in_cgroups(&node_cgroups(layout, node)?);
    cmd.args(["nsenter", "-t", &init.to_string(), "-a", "--"]);
    Ok(cmd)
}

/// A shell line run in namespace `ns`'s network only (sysctls, probes).
pub fn in_netns(ns: &str, script: &str) -> Result<String> {
    sh(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["sh", "-c", script]))
}

pub fn init_pid(layout: &Layout, node: &NodeSpec) -> Result<u32> {
    let path = layout.pid_file(node.name, "init");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("node {} is not running ({})", node.name, path.display()))?;
    Ok(text.trim().parse()?)
}

/// `sh -c` that moves itself into `cgroups` and then runs its arguments.
fn in_cgroups(cgroups: &[PathBuf]) -> Command {
    let mut script = String::new();
    for dir in cgroups {
        script.push_str(&format!("echo $$ > '{}/cgroup.procs' && ", dir.display()));
    }
    script.push_str("exec \"$@\"");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh"]);
    cmd
}

fn spawn_detached(mut cmd: Command, log: &Path) -> Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    Ok(child.id())
}

/// The first child of `pid` (the process nsenter or unshare forked).
fn child_of(pid: u32) -> Result<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    text.split_whitespace()
        .next()
        .context("no child yet")?
        .parse()
        .map_err(Into::into)
}

/// The host's cgroup hierarchies and, in each, the cgroup this process is
/// in: the node subtrees are created below it.
fn hierarchies() -> Result<Vec<(PathBuf, String)>> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let mut out = Vec::new();
    for init::Hierarchy { dir, options, .. } in init::host_hierarchies()? {
        let path = own
            .lines()
            .filter_map(|l| {
                let mut fields = l.splitn(3, ':').skip(1);
                Some((fields.next()?, fields.next()?))
            })
            .find(|(controllers, _)| *controllers == options)
            .map(|(_, path)| path.trim_start_matches('/').to_string())
            .unwrap_or_default();
        out.push((dir.join(path), options));
    }
    Ok(out)
}

fn node_cgroups(layout: &Layout, node: &NodeSpec) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(layout.node(node.name).join("cgroups"))?;
    Ok(text.lines().map(PathBuf::from).collect())
}

fn create_cgroups(layout: &Layout, node: &NodeSpec) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for (base, options) in hierarchies()? {
        let cluster = base.join("ferry-cluster");
        let dir = cluster.join(node.name);
        for d in [&cluster, &dir] {
            if !d.exists() {
                std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
                if options == "cpuset" {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let parent = d.parent().unwrap_or(&base);
                        std::fs::write(d.join(file), std::fs::read(parent.join(file))?)?;
                    }
                }
            }
        }
        dirs.push(dir);
    }
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    std::fs::write(layout.node(node.name).join("cgroups"), list.join("\n"))?;
    Ok(dirs)
}

/// Stops every node (their inits end all their processes) and removes the
/// namespaces and cgroups; best effort, so a half-made cluster goes too.
pub fn destroy(layout: &Layout) {
    for node in &NODES {
        if let Ok(pid) = init_pid(layout, node) {
            // SAFETY: signalling the node's init, which stops the node.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for node in &NODES {
        if let Ok(pid) = init_pid(layout, node) {
            wait_or_kill(pid, Duration::from_secs(10));
        }
    }
    if let Ok(list) = hierarchies() {
        for (base, _) in list {
            remove_cgroup_tree(&base.join("ferry-cluster"));
        }
    }
    for ns in NODES.iter().map(|n| n.ns).chain([CLIENT_NS, SWITCH_NS]) {
        let _ = ip(&["netns", "del", ns]);
    }
}

/// Waits up to `grace` for process `pid` (already signalled) to exit, then
/// kills it.
pub fn wait_or_kill(pid: u32, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        // SAFETY: signalling a process of the cluster that did not stop.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// rmdir of a cgroup and everything below it, deepest first; a cgroup whose
/// processes are still exiting is retried for a few seconds.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}
