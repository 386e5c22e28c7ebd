//! The eBPF dataplane's part of the agent's endpoints: its datapath event
//! counters (per-CPU, summed) as `ferry_datapath_events_total{event}` on
//! /metrics, and /services read from the pinned maps.

use std::path::PathBuf;

use crate::datapath::{BpfMaps, LbMaps, MapCapacities};
use crate::metrics::DataplaneStatus;
use crate::plan::AppliedState;

/// Reads the maps pinned under `dir` on each request.
#[derive(Debug)]
pub struct EbpfStatus {
    pub dir: PathBuf,
}

impl DataplaneStatus for EbpfStatus {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let Ok(counters) = super::lb::read_lb_counters(&self.dir) else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP ferry_datapath_events_total What the eBPF programs did, by event (sock_*: socket-level balancing; tc_*: the TC path)\n# TYPE ferry_datapath_events_total counter"
        );
        for (event, v) in counters {
            let _ = writeln!(out, "ferry_datapath_events_total{{event=\"{event}\"}} {v}");
        }
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
