//! Backend choice shared by the socket-level and TC programs: session
//! affinity, a random slot, or the frontend's Maglev table.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use ferry_common::lb::{
    Affinity4Key, AffinityValue, Backend4, Service4Key, Service4Value, BACKEND_FLAG_TERMINATING,
    MAGLEV_TABLE_SIZE,
};

use crate::maps::{AFFINITY4, BACKENDS4, MAGLEV4, SERVICES4};

/// A backend picked for a new flow: its ID, address and the slot it came
/// from (0 when it came from the Maglev table).
#[derive(Clone, Copy)]
pub struct Picked {
    pub id: u32,
    pub backend: Backend4,
    pub slot: u16,
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend4> {
    let be = BACKENDS4.get_ptr(id)?;
    // SAFETY: a pointer from a successful lookup.
    Some(unsafe { *be })
}

/// A random backend slot of the frontend.
#[inline(always)]
pub fn random_slot(svc: &Service4Value, mut key: Service4Key) -> Option<Picked> {
    if svc.count == 0 {
        return None;
    }
    // SAFETY: plain helper call.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(svc.count);
    key.slot = pick as u16 + 1;
    let slot = SERVICES4.get_ptr(key)?;
    // SAFETY: a pointer from a successful lookup.
    let id = unsafe { (*slot).backend_id };
    Some(Picked {
        id,
        backend: backend(id)?,
        slot: key.slot,
    })
}

/// The backend the frontend's Maglev table holds for `hash`.
#[inline(always)]
pub fn maglev(svc: &Service4Value, hash: u32) -> Option<Picked> {
    let table = MAGLEV4.get_ptr(svc.frontend_id)?;
    let idx = hash % MAGLEV_TABLE_SIZE;
    // LLVM turns the modulo into multiplications the verifier cannot bound
    // and then drops a bounds check it proves redundant; a volatile reload
    // hides the range from LLVM so the check the verifier needs stays.
    // SAFETY: reading a local.
    let idx = unsafe { core::ptr::read_volatile(&raw const idx) };
    if idx >= MAGLEV_TABLE_SIZE {
        return None;
    }
    // SAFETY: a pointer from a successful lookup; idx < the table's size.
    let id = *unsafe { (*table).backends.get(idx as usize)? };
    Some(Picked {
        id,
        backend: backend(id)?,
        slot: 0,
    })
}

/// The backend this client used within the affinity timeout, if it is
/// still in the slot it was picked from and is not terminating.
#[inline(always)]
pub fn affinity_backend(
    client: u64,
    svc: &Service4Value,
    mut svc_key: Service4Key,
) -> Option<Picked> {
    if svc.affinity_timeout == 0 {
        return None;
    }
    let key = Affinity4Key {
        client,
        frontend_id: svc.frontend_id,
        pad: 0,
    };
    let hit = AFFINITY4.get_ptr(key)?;
    // SAFETY: a pointer from a successful lookup.
    let hit = unsafe { *hit };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(hit.last_used_ns) > u64::from(svc.affinity_timeout) * 1_000_000_000 {
        return None;
    }
    if hit.slot == 0 || hit.slot > svc.count {
        return None;
    }
    svc_key.slot = hit.slot;
    let slot = SERVICES4.get_ptr(svc_key)?;
    // SAFETY: a pointer from a successful lookup.
    if unsafe { (*slot).backend_id } != hit.backend_id {
        return None;
    }
    let be = backend(hit.backend_id)?;
    // The ID may name another backend by now (deleted, then reused).
    if be.addr != hit.backend_addr || be.port != hit.backend_port {
        return None;
    }
    if be.flags & BACKEND_FLAG_TERMINATING != 0 {
        return None;
    }
    Some(Picked {
        id: hit.backend_id,
        backend: be,
        slot: hit.slot,
    })
}

/// Remembers `picked` for `client` (sessionAffinity ClientIP).
#[inline(always)]
pub fn remember_affinity(client: u64, svc: &Service4Value, picked: &Picked) {
    let key = Affinity4Key {
        client,
        frontend_id: svc.frontend_id,
        pad: 0,
    };
    let value = AffinityValue {
        backend_id: picked.id,
        backend_addr: picked.backend.addr,
        // SAFETY: plain helper call.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
        backend_port: picked.backend.port,
        slot: picked.slot,
        pad: [0; 4],
    };
    let _ = AFFINITY4.insert(key, value, 0);
}
