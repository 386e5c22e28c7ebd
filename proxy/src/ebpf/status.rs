//! The eBPF dataplane's part of the agent's endpoints: its datapath event
//! counters (per-CPU, summed) as `ferry_datapath_events_total{event}`, the
//! fill of the main maps and the conntrack entries on /metrics (counted by
//! walking the maps, at most every 30 s), and /services read from the
//! pinned maps.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use ferry_common::lb::{
    Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, Service4Key, Service4Value,
    AFFINITY4_MAP, BACKENDS4_MAP, CT4_MAP, SERVICES4_MAP,
};

use crate::datapath::{BpfMaps, LbMaps, MapCapacities};
use crate::metrics::DataplaneStatus;
use crate::plan::AppliedState;
use prometheus_client::encoding::DescriptorEncoder;

/// Reads the maps pinned under `dir` on each request.
#[derive(Debug)]
pub struct EbpfStatus {
    pub dir: PathBuf,
    pub caps: MapCapacities,
    /// The last map census and when it was taken.
    census: Mutex<Option<(Instant, Census)>>,
}

/// (map, entries, capacity) per counted map.
pub type Census = Vec<(&'static str, u64, u32)>;

/// How long a census of the map entries is reused.
const CENSUS_TTL: Duration = Duration::from_secs(30);

fn count<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Option<u64> {
    let map: HashMap<MapData, K, V> = crate::datapath::typed(dir, name).ok()?;
    Some(map.keys().flatten().count() as u64)
}

impl EbpfStatus {
    pub fn new(dir: PathBuf, caps: MapCapacities) -> EbpfStatus {
        EbpfStatus {
            dir,
            caps,
            census: Mutex::new(None),
        }
    }

    /// (map, entries, capacity) of the services, backends, conntrack and
    /// affinity maps.
    pub fn census(&self) -> Census {
        let mut cached = self
            .census
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, c)) = cached.as_ref() {
            if at.elapsed() < CENSUS_TTL {
                return c.clone();
            }
        }
        let d = &self.dir;
        let c: Census = [
            (
                SERVICES4_MAP,
                count::<Service4Key, Service4Value>(d, SERVICES4_MAP),
                self.caps.services,
            ),
            (
                BACKENDS4_MAP,
                count::<u32, Backend4>(d, BACKENDS4_MAP),
                self.caps.backends,
            ),
            (
                CT4_MAP,
                count::<Ct4Key, Ct4Value>(d, CT4_MAP),
                self.caps.conntrack,
            ),
            (
                AFFINITY4_MAP,
                count::<Affinity4Key, AffinityValue>(d, AFFINITY4_MAP),
                self.caps.affinity,
            ),
        ]
        .into_iter()
        .filter_map(|(name, n, cap)| Some((name, n?, cap)))
        .collect();
        for w in fill_warnings(&c) {
            tracing::warn!("{w}");
        }
        *cached = Some((Instant::now(), c.clone()));
        c
    }

    /// Takes a census every `every` on a thread of its own, so a map
    /// filling up is logged even when nobody scrapes /metrics.
    pub fn watch(self: std::sync::Arc<Self>, every: Duration) {
        let spawned = std::thread::Builder::new()
            .name("ferry-census".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                self.census();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch the maps' fill");
        }
    }
}

/// What a map filling up means, one line each: a hash map at 90 % of its
/// capacity, an LRU map (conntrack, affinity) at half of it, since the
/// kernel evicts LRU entries in batches from per-CPU lists and a saturated
/// LRU map holds well below its capacity (58 % in tests/tests/exhaustion_maps.rs).
pub fn fill_warnings(census: &[(&'static str, u64, u32)]) -> Vec<String> {
    let threshold = |map: &str| match map {
        CT4_MAP | AFFINITY4_MAP => 5,
        _ => 9,
    };
    census
        .iter()
        .filter(|(map, n, cap)| *cap > 0 && *n * 10 >= u64::from(*cap) * threshold(map))
        .map(|(map, n, cap)| {
            let what = match *map {
                CT4_MAP => "new flows evict the least recently used ones (a TCP flow evicted mid-way is reset when SNATed; a UDP flow picks a backend again)",
                AFFINITY4_MAP => "new clients evict the oldest affinities (those clients may change backend)",
                _ => "frontends that do not fit are left out whole (ferry_plan_errors_total)",
            };
            let pct = n * 100 / u64::from(*cap);
            format!("the map {map} is {pct}% full ({n} of {cap} entries): when full, {what}")
        })
        .collect()
}

impl DataplaneStatus for EbpfStatus {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::{family, label, single};
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        let Ok(counters) = super::lb::read_lb_counters(&self.dir) else {
            return Ok(());
        };
        family(
            &mut enc,
            "ferry_datapath_events",
            "What the eBPF programs did, by event (sock_*: socket-level balancing; tc_*: the TC path)",
            Counter,
            counters
                .into_iter()
                .map(|(event, v)| (label("event", event), v)),
        )?;
        let census = self.census();
        family(
            &mut enc,
            "ferry_map_entries",
            "Entries in an eBPF map (counted at most every 30 s)",
            Gauge,
            census.iter().map(|(map, n, _)| (label("map", *map), *n)),
        )?;
        family(
            &mut enc,
            "ferry_map_capacity",
            "Capacity of an eBPF map",
            Gauge,
            census
                .iter()
                .map(|(map, _, cap)| (label("map", *map), u64::from(*cap))),
        )?;
        if let Some((_, n, _)) = census.iter().find(|(m, _, _)| *m == CT4_MAP) {
            single(
                &mut enc,
                "ferry_conntrack_entries",
                "Conntrack entries of the TC path (two per flow)",
                Gauge,
                *n,
            )?;
        }
        Ok(())
    }

    fn services_json(&self) -> String {
        let rows = BpfMaps::open(&self.dir, MapCapacities::default())
            .map_err(|e| e.to_string())
            .and_then(|m| m.dump().map_err(|e| e.to_string()))
            .map(|ops| crate::rows::service_rows(&AppliedState::restore(ops)));
        match rows {
            Ok(rows) => serde_json::to_string_pretty(&rows)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_at_nine_tenths_or_more_are_named_with_what_full_means() {
        let w = fill_warnings(&[
            (CT4_MAP, 480, 512),
            (AFFINITY4_MAP, 200, 512),
            (SERVICES4_MAP, 460, 512),
            (BACKENDS4_MAP, 512, 512),
        ]);
        assert_eq!(
            w.len(),
            2,
            "{w:?}: the affinity map under half, services under 90 %"
        );
        assert!(
            w[0].starts_with("the map ferry_ct4 is 93% full (480 of 512 entries)"),
            "{w:?}"
        );
        assert!(w[0].contains("least recently used"));
        assert!(w[1].contains("ferry_be4 is 100% full") && w[1].contains("left out whole"));
        assert!(fill_warnings(&[(CT4_MAP, 0, 0)]).is_empty());
    }
}
