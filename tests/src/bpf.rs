//! Per-test bpffs pin directories and cgroups, removed on drop.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "ferry-test-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory under /sys/fs/bpf for one test's pinned maps and links.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Result<PinDir> {
        let path = Path::new("/sys/fs/bpf").join(unique(tag));
        ferry_proxy::ebpf::lb::ensure_pin_dir(&path)?;
        Ok(PinDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        ferry_proxy::ebpf::lb::remove_pins(&self.path);
        if self.path.exists() {
            eprintln!("warning: {} left behind", self.path.display());
        }
    }
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (_, Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("no cgroup2 filesystem mounted")
}

/// A child cgroup for one test's client processes.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Result<TestCgroup> {
        let path = cgroup2_root()?.join(unique(tag));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited by now; an empty cgroup can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: cgroup {} left behind", self.path.display());
    }
}
