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
type Census = Vec<(&'static str, u64, u32)>;

/// How long a census of the map entries is reused.
const CENSUS_TTL: Duration = Duration::from_secs(30);

fn count<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Option<u64> {
    let map: HashMap<MapData, K, V> = crate::datapath::typed(dir, name).ok()?;
    Some(map.keys().filter(Result::is_ok).count() as u64)
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
    fn census(&self) -> Census {
        let mut cached = self.census.lock().unwrap_or_else(|p| p.into_inner());
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
        *cached = Some((Instant::now(), c.clone()));
        c
    }
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
            .map(|ops| crate::cli::service_rows(&AppliedState::restore(ops)));
        match rows {
            Ok(rows) => serde_json::to_string_pretty(&rows)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        }
    }
}
