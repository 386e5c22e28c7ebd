//! BPF_MAP_UPDATE_BATCH (Linux 5.6+): many upserts of one map in one
//! syscall. A full sync writes some 220,000 entries at 10,000 Services; one
//! syscall each spent more time entering and leaving the kernel than
//! updating the hash tables. aya 0.14 has no batch operations, so this is
//! the raw syscall.

use std::os::fd::RawFd;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch stopped: how many elements went in, and the error.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: std::io::Error,
}

/// Upserts `keys[i] -> values[i]` (BPF_ANY) into the map behind `fd`.
///
/// `K` and `V` must be the map's key and value types (repr(C), no padding
/// the kernel would read uninitialised): the caller passes the ferry-common
/// map types.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` keys and values of the map's sizes,
    // alive for the call.
    if unsafe { update(&mut attr) } {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    // The kernel writes back how many went in, except on errors before the
    // first element; then the count is still ours. Upserts are idempotent,
    // so counting too few only repeats some.
    let count = attr.count as usize;
    Err(BatchError {
        done: if count >= keys.len() { 0 } else { count },
        error,
    })
}

/// Whether the map behind `fd` takes batch updates (a batch of none).
pub fn supported(fd: RawFd) -> bool {
    let mut attr = BatchAttr {
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: a batch of zero elements reads no key or value.
    unsafe { update(&mut attr) }
}

/// BPF_MAP_UPDATE_BATCH with `attr`; true on success. The kernel writes
/// back only `attr.count`.
///
/// # Safety
/// `attr.keys` and `attr.values` must point at `attr.count` keys and
/// values of the map's sizes.
unsafe fn update(attr: &mut BatchAttr) -> bool {
    // SAFETY: the caller vouches for the pointers in `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            std::ptr::from_mut::<BatchAttr>(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    rc == 0
}
