//! PID 1 of a cluster node (`xtask cluster __init DIR HOSTNAME`), run by
//! `unshare` in the node's new PID, mount, UTS, IPC and cgroup namespaces
//! inside its network namespace: the node's own /proc, /sys (its network
//! namespace's devices), cgroup hierarchies rooted at its cgroup subtree,
//! bpffs, /run, and per-node directories bound over the paths kubelet,
//! containerd and CNI use. Then it reaps orphans until it is told to stop;
//! its exit ends every process of the node.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Paths bound from the node's directory, as (directory name, mount point).
pub const BINDS: &[(&str, &str)] = &[
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("var-lib-containerd", "/var/lib/containerd"),
    ("var-lib-cni", "/var/lib/cni"),
    ("var-log", "/var/log"),
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("etc-kubernetes", "/etc/kubernetes"),
    ("etc-containerd", "/etc/containerd"),
];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// A cgroup hierarchy of the host: where it is mounted, its type and the
/// options naming its controllers.
pub struct Hierarchy {
    pub dir: PathBuf,
    pub fstype: String,
    pub options: String,
}

pub fn run(args: &[String]) -> Result<()> {
    let [dir, hostname] = args else {
        bail!("usage: xtask cluster __init DIR HOSTNAME");
    };
    let dir = PathBuf::from(dir);
    // SAFETY: handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    set_hostname(hostname)?;
    let hierarchies = host_hierarchies()?;
    let links = cgroup_links()?;
    mount(&["-t", "proc", "proc", "/proc"])?;
    mount(&["-t", "sysfs", "sysfs", "/sys"])?;
    mount(&["-t", "tmpfs", "-o", "mode=755", "cgroup", "/sys/fs/cgroup"])?;
    for h in &hierarchies {
        std::fs::create_dir_all(&h.dir)?;
        let dir = h.dir.to_string_lossy();
        let mut args = vec!["-t", &h.fstype];
        if !h.options.is_empty() {
            args.extend(["-o", &h.options]);
        }
        args.extend([h.fstype.as_str(), &dir]);
        mount(&args)?;
    }
    for (link, target) in links {
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    }
    mount(&["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    mount(&["-t", "tmpfs", "-o", "mode=755", "run", "/run"])?;
    for (name, target) in BINDS {
        let source = dir.join(name);
        mount(&["--bind", &source.to_string_lossy(), target])?;
    }
    mount(&["--make-rshared", "/"])?;
    std::fs::write(dir.join("ready"), b"1")?;
    reap();
    Ok(())
}

/// Reaps every child until SIGTERM, then stops the node's processes.
fn reap() {
    while !STOP.load(Ordering::Relaxed) {
        let mut status = 0;
        // SAFETY: waitpid on any child; EINTR (the signal) and ECHILD (no
        // child yet) just loop.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, 0) };
        if pid < 0 {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    // SAFETY: signalling every process of this PID namespace.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_secs(2));
}

fn set_hostname(name: &str) -> Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        bail!("sethostname {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup, from mountinfo.
pub fn host_hierarchies() -> Result<Vec<Hierarchy>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let dir = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let super_opts = r.nth(1)?;
            let cgroup = fstype == "cgroup" || fstype == "cgroup2";
            (cgroup && dir.starts_with("/sys/fs/cgroup/")).then(|| Hierarchy {
                dir: PathBuf::from(dir),
                fstype: fstype.to_string(),
                options: super_opts
                    .split(',')
                    .filter(|o| *o != "rw")
                    .collect::<Vec<_>>()
                    .join(","),
            })
        })
        .collect())
}

/// Symbolic links under /sys/fs/cgroup (e.g. cpu -> cpu,cpuacct).
fn cgroup_links() -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir("/sys/fs/cgroup")? {
        let path = entry?.path();
        if let Ok(target) = std::fs::read_link(&path) {
            links.push((path, target));
        }
    }
    Ok(links)
}

fn mount(args: &[&str]) -> Result<()> {
    crate::host::sh(Command::new("mount").args(args)).map(|_| ())
}

/// Where the node's init says it is ready.
pub fn ready_file(node_dir: &Path) -> PathBuf {
    node_dir.join("ready")
}
