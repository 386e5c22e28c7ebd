//! Keeps the eBPF dataplane in place while the agent runs (an I/O edge).
//! Every few seconds: a map whose pin was removed is pinned again (the
//! programs and the agent still hold it, so nothing is lost, but a restart
//! would have started empty); a socket-level link whose pin was removed
//! (which detached its program) is attached again; and the TC programs are
//! attached to every interface that should carry them and does not: one
//! created after the start (a CNI bridge), or one removed and added again
//! (its link died with the old device).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::Ebpf;
use ferry_common::lb::{
    AFFINITY4_MAP, BACKENDS4_MAP, CT4_MAP, LB_COUNTERS_MAP, MAGLEV4_MAP, REVNAT4_MAP,
    SERVICES4_MAP, SOCK_REVNAT4_MAP, SOURCE_RANGES4_MAP,
};

use super::{lb, tc, Cause, EbpfError};

/// The maps pinned by name under the agent's directory.
const PINNED_MAPS: [&str; 9] = [
    SERVICES4_MAP,
    BACKENDS4_MAP,
    REVNAT4_MAP,
    MAGLEV4_MAP,
    AFFINITY4_MAP,
    SOURCE_RANGES4_MAP,
    SOCK_REVNAT4_MAP,
    CT4_MAP,
    LB_COUNTERS_MAP,
];

/// The loaded programs and where they belong.
pub struct Keeper {
    pub ebpf: Ebpf,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    /// `--interfaces`; None: the default set, looked up at each check.
    pub interfaces: Option<Vec<String>>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("dir", &self.dir)
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

impl Keeper {
    /// Repairs what is missing; returns what it did, one line each.
    pub fn check(&mut self) -> Result<Vec<String>, EbpfError> {
        let mut done = Vec::new();
        let err = |cause: Cause| EbpfError::Bpffs {
            path: self.dir.display().to_string(),
            cause,
        };
        std::fs::create_dir_all(self.dir.join("links"))
            .map_err(|e| err(Cause::new("creating links/", e)))?;
        for name in PINNED_MAPS {
            let pin = self.dir.join(name);
            if pin.exists() {
                continue;
            }
            if let Some(map) = self.ebpf.map(name) {
                map.pin(&pin)
                    .map_err(|e| err(Cause::new(format!("pinning {name} again"), e)))?;
                done.push(format!("map {name} pinned again"));
            }
        }
        for name in lb::attach_sock_lb(&mut self.ebpf, &self.dir, &self.cgroup)? {
            done.push(format!(
                "{name} attached again to {}",
                self.cgroup.display()
            ));
        }
        let wanted = self
            .interfaces
            .clone()
            .unwrap_or_else(tc::default_interfaces);
        let stale: Vec<String> = wanted
            .into_iter()
            .filter(|i| !tc_attached(&self.dir, i))
            .collect();
        for interface in &stale {
            for direction in ["ingress", "egress"] {
                let _ = std::fs::remove_file(tc::tc_link_pin(&self.dir, interface, direction));
            }
        }
        for a in tc::attach_tc(&mut self.ebpf, &self.dir, &stale)? {
            done.push(format!("TC {} attached to {}", a.direction, a.interface));
        }
        Ok(done)
    }

    /// Checks every `every` on a thread of its own until `stop`; logs what
    /// it repaired and what it could not.
    pub fn spawn(mut self, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match self.check() {
                    Ok(done) => {
                        for d in done {
                            tracing::warn!(repaired = %d, "the eBPF dataplane was changed under the agent");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot repair the eBPF dataplane"),
                }
                let mut left = every;
                while !left.is_zero() && !stop.load(Ordering::Relaxed) {
                    let nap = left.min(Duration::from_millis(200));
                    std::thread::sleep(nap);
                    left -= nap;
                }
            }
        })
    }
}

/// Whether both TC links of `interface` are pinned and alive on the
/// interface of that name now (a link outlives its device, dead).
fn tc_attached(dir: &Path, interface: &str) -> bool {
    let Ok(Some(index)) = crate::netif::Rtnl::open().and_then(|mut r| r.link_index(interface))
    else {
        return true; // no such interface now: nothing to attach to
    };
    ["ingress", "egress"]
        .into_iter()
        .all(|direction| link_ifindex(&tc::tc_link_pin(dir, interface, direction)) == Some(index))
}

/// The interface the TC (tcx) link pinned at `pin` is attached to, from
/// its fdinfo; 0 once the device is gone, None without a pin.
fn link_ifindex(pin: &Path) -> Option<u32> {
    let fd = pinned_fd(pin)?;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("ifindex:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A descriptor of the object pinned at `pin` (BPF_OBJ_GET).
fn pinned_fd(pin: &Path) -> Option<OwnedFd> {
    /// The BPF_OBJ_GET part of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(pin.as_os_str().as_bytes()).ok()?;
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads `attr`, whose path outlives the call; a
    // non-negative result is a new descriptor, owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    // SAFETY: a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
