//! Loading and attaching the socket-level load balancer: maps pinned under a
//! bpffs directory, the four cgroup programs attached to a cgroup v2 with
//! their links pinned beside the maps, so the agent can exit or crash
//! without detaching anything. `remove_pins` undoes it all.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;

use super::{load_program, Cause, EbpfError};

/// The socket-level programs, in attach order.
pub const SOCK_PROGRAMS: [&str; 4] = [
    "ferry_connect4",
    "ferry_sendmsg4",
    "ferry_recvmsg4",
    "ferry_getpeer4",
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

/// Creates `dir` on a mounted bpffs: `dir` may be a bpffs mount itself or
/// a directory (existing or not) on one. When it is below the usual
/// /sys/fs/bpf and that is not mounted yet, bpffs is mounted there first.
/// An error names `dir` as given.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    let err = |cause: Cause| EbpfError::Bpffs {
        path: dir.display().to_string(),
        cause,
    };
    let usual = Path::new("/sys/fs/bpf");
    if dir.starts_with(usual) && dir != usual && !is_bpffs(usual) {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .map_err(|e| err(Cause::new("mounting bpffs at /sys/fs/bpf", e)))?;
        if !status.success() {
            return Err(err(Cause::msg(format!(
                "mount -t bpf at /sys/fs/bpf failed: {status}"
            ))));
        }
    }
    // The nearest existing directory tells which filesystem `dir` is on.
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
    if !is_bpffs(existing) {
        return Err(err(Cause::msg(format!(
            "not on a bpf filesystem ({} is not one; mount one with `mount -t bpf bpf DIR`)",
            existing.display()
        ))));
    }
    std::fs::create_dir_all(dir.join("links")).map_err(|e| err(Cause::new("creating links/", e)))
}

/// Where the link of `program` is pinned.
pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join("links").join(program)
}

/// Attaches the socket-level programs to `cgroup` unless their pinned links
/// are already there (a restart: the running programs stay). Returns the
/// programs attached now.
pub fn attach_sock_lb(
    ebpf: &mut Ebpf,
    dir: &Path,
    cgroup: &Path,
) -> Result<Vec<&'static str>, EbpfError> {
    let mut attached = Vec::new();
    for name in SOCK_PROGRAMS {
        let pin = link_pin(dir, name);
        if pin.exists() {
            continue;
        }
        load_program(ebpf, name)?;
        let cg = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let prog_err = |source| EbpfError::Program {
            name: name.into(),
            source: Box::new(source),
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| EbpfError::MissingProgram { name: name.into() })?
            .try_into()
            .map_err(prog_err)?;
        // With bpf_link (always used on this kernel) "Single" means no flags;
        // links coexist with other programs on the cgroup anyway.
        let id = prog
            .attach(cg, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        let link = prog.take_link(id).map_err(prog_err)?;
        let link_err = |cause: Cause| EbpfError::Link {
            path: pin.display().to_string(),
            cause,
        };
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| link_err(Cause::new(name, e)))?;
        fd.pin(&pin)
            .map_err(|e| link_err(Cause::new("pinning", e)))?;
        attached.push(name);
    }
    Ok(attached)
}

/// Removes everything pinned under `dir` (links first, which detaches the
/// programs, then maps) and the directory. Missing entries are fine.
pub fn remove_pins(dir: &Path) {
    for sub in [dir.join("links"), dir.to_path_buf()] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.flatten() {
                if e.path().is_file() || !e.path().is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&sub);
    }
}

/// The datapath's event counters ([`ferry_common::lb::LbCounter`]) from the
/// map pinned under `dir`, summed over CPUs, by name.
pub fn read_lb_counters(dir: &Path) -> Result<Vec<(&'static str, u64)>, EbpfError> {
    use ferry_common::lb::{LbCounter, LB_COUNTERS_MAP};
    let path = dir.join(LB_COUNTERS_MAP);
    let map_err = |source| EbpfError::Map {
        name: LB_COUNTERS_MAP.into(),
        source: Box::new(source),
    };
    let data = aya::maps::MapData::from_pin(&path).map_err(map_err)?;
    let array: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err)?;
    let mut out = Vec::with_capacity(LbCounter::ALL.len());
    // A map pinned by an older release has fewer counters: those it has.
    for c in LbCounter::ALL.into_iter().take(array.len() as usize) {
        let per_cpu = array.get(&(c as u32), 0).map_err(map_err)?;
        out.push((c.name(), per_cpu.iter().sum()));
    }
    Ok(out)
}
