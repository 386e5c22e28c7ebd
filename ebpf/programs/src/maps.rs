//! The load-balancing maps, pinned by name under the agent's bpffs
//! directory so they outlive the agent (hitless restarts). Capacities here
//! are defaults; the agent sets the configured ones at load time.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use ferry_common::lb::{
    Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, MaglevTable, RevNat4, Service4Key,
    Service4Value, SockRevNat4Key, SockRevNat4Value, SourceRange4, LB_COUNTERS,
};

/// Maps whose entries are allocated on use (Maglev tables are 64 KiB each).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "ferry_svc4")]
pub static SERVICES4: HashMap<Service4Key, Service4Value> = HashMap::pinned(262_144, 0);

#[map(name = "ferry_be4")]
pub static BACKENDS4: HashMap<u32, Backend4> = HashMap::pinned(262_144, 0);

#[map(name = "ferry_revnat4")]
pub static REVNAT4: HashMap<u32, RevNat4> = HashMap::pinned(65_536, 0);

#[map(name = "ferry_maglev4")]
pub static MAGLEV4: HashMap<u32, MaglevTable> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

#[map(name = "ferry_aff4")]
pub static AFFINITY4: LruHashMap<Affinity4Key, AffinityValue> = LruHashMap::pinned(65_536, 0);

#[map(name = "ferry_srcrng4")]
pub static SOURCE_RANGES4: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(16_384, 0);

#[map(name = "ferry_sknat4")]
pub static SOCK_REVNAT4: LruHashMap<SockRevNat4Key, SockRevNat4Value> =
    LruHashMap::pinned(262_144, 0);

#[map(name = "ferry_ct4")]
pub static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(262_144, 0);

/// The next SNAT port index, per CPU: ports are handed out in turn, so one
/// comes around again only after every other one was used, by which time
/// its flow has mostly ended. (A per-CPU cursor needs no atomics; the
/// CPUs start far apart in the range.)
#[map(name = "ferry_snatcur")]
pub static SNAT_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "ferry_lbstat")]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(LB_COUNTERS, 0);

#[inline(always)]
pub fn count(counter: ferry_common::lb::LbCounter) {
    if let Some(c) = LB_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *c += 1 };
    }
}
