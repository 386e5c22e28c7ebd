//! The dataplane benchmark's report: ratios to each row's baseline, the
//! tables (bench-results/dataplane.{csv,md,svg}) and the summary lines.

use super::measure::IDLE_CONNECTIONS;
use super::rows::{Metric, Row};
use super::{median, min_max, Samples, Settings, EXTRA_SERVICES};
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

pub(super) struct Report {
    pub(super) settings: Settings,
    pub(super) samples: Samples,
    pub(super) unavailable: BTreeMap<Row, String>,
    pub(super) programming: BTreeMap<(usize, Row), Duration>,
    /// One Service change applied at 10,000 Services.
    pub(super) changes: BTreeMap<Row, Duration>,
    /// Resident memory per idle connection, KiB.
    pub(super) memory: BTreeMap<Row, f64>,
    pub(super) loads: Vec<f64>,
    pub(super) took: Duration,
}

/// The host's default TCP congestion control, which the harness's
/// namespaces inherit. It shapes the bulk figures: BBR paces every sender,
/// and without the fq qdisc it does so with a kernel timer per burst, so a
/// proxy (a second sender on the path) pays more than forwarding does
/// (docs/BENCHMARKS.md).
pub(super) fn congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_string())
}

impl Report {
    pub(super) fn ratio(&self, extra: usize, row: Row, m: Metric) -> Option<f64> {
        let base = median(self.samples.get(&(extra, row.baseline(), m))?);
        let v = median(self.samples.get(&(extra, row, m))?);
        (base > 0.0).then(|| v / base)
    }

    /// Per-repeat ratios of a row to its baseline at 1 Service, where every
    /// repeat measures both (next to each other for the socket-LB row):
    /// slow drift of the machine cancels out of each pair.
    pub(super) fn paired_ratios(&self, row: Row, m: Metric) -> Option<Vec<f64>> {
        let base = self.samples.get(&(0, row.baseline(), m))?;
        let v = self.samples.get(&(0, row, m))?;
        (base.len() == v.len() && row != row.baseline()).then(|| {
            v.iter()
                .zip(base)
                .filter(|(_, b)| **b > 0.0)
                .map(|(x, b)| x / b)
                .collect()
        })
    }

    pub(super) fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mode = if self.settings.quick { "quick" } else { "full" };
        std::fs::write(dir.join(format!("dataplane-{mode}.csv")), self.csv())?;
        let mut md = String::new();
        self.md_header(&mut md);
        self.md_scales(&mut md);
        self.md_paired(&mut md);
        self.md_notes(&mut md);
        std::fs::write(dir.join(format!("dataplane-{mode}.md")), &md)?;
        std::fs::write(dir.join(format!("dataplane-{mode}.svg")), self.svg())?;
        println!("{md}");
        println!("wrote {}/dataplane-{mode}.{{csv,md,svg}}", dir.display());
        Ok(())
    }

    /// One line per (scale, row, metric).
    fn csv(&self) -> String {
        let mut csv =
            String::from("services,row,metric,median,min,max,runs,ratio_to_baseline,baseline\n");
        for ((extra, row, m), v) in &self.samples {
            let (lo, hi) = min_max(v);
            let _ = writeln!(
                csv,
                "{},{},{},{:.4},{:.4},{:.4},{},{},{}",
                extra + 1,
                row.name(),
                m.key(),
                median(v),
                lo,
                hi,
                v.len(),
                self.ratio(*extra, *row, *m)
                    .map_or(String::new(), |r| format!("{r:.3}")),
                row.baseline().name()
            );
        }
        csv
    }

    /// The settings line above the tables.
    fn md_header(&self, md: &mut String) {
        let (lmin, lmax) = min_max(&self.loads);
        let _ = writeln!(
            md,
            "`cargo xtask bench dataplane{}`: {} repeat(s) of {} s per metric, wrk -t1 -c{}, medians (min-max), ratio to the baseline row in brackets; load average {:.2}-{:.2} during the runs; TCP congestion control {}; whole run {:.0} s.\n",
            if self.settings.quick { " --quick" } else { "" },
            self.settings.repeats,
            self.settings.seconds,
            self.settings.connections,
            lmin,
            lmax,
            self.settings
                .congestion
                .clone()
                .unwrap_or_else(|| format!("{} (the host's)", congestion_control())),
            self.took.as_secs_f64()
        );
    }

    /// One table per scale: every row's medians, ratios in brackets.
    fn md_scales(&self, md: &mut String) {
        let scales: Vec<usize> = {
            let mut v: Vec<usize> = self.samples.keys().map(|k| k.0).collect();
            v.dedup();
            v
        };
        for extra in scales {
            let runs = self
                .samples
                .iter()
                .find(|(k, _)| k.0 == extra)
                .map_or(0, |(_, v)| v.len());
            let _ = writeln!(
                md,
                "#### {} Service(s) programmed ({runs} runs per row)\n",
                extra + 1
            );
            let _ = write!(md, "| row |");
            for m in Metric::ALL {
                let _ = write!(md, " {} |", m.name());
            }
            let _ = writeln!(md, "\n|---|{}", "---|".repeat(Metric::ALL.len()));
            for row in Row::ALL {
                if !self.samples.keys().any(|k| k.0 == extra && k.1 == row) {
                    continue;
                }
                let _ = write!(md, "| {} |", row.name());
                for m in Metric::ALL {
                    let Some(v) = self.samples.get(&(extra, row, m)) else {
                        let _ = write!(md, " - |");
                        continue;
                    };
                    let ratio = match (m, self.ratio(extra, row, m)) {
                        (Metric::NodeCpuPct | Metric::Errors, _) | (_, None) => String::new(),
                        (_, Some(r)) => format!(" [{r:.2}x]"),
                    };
                    let _ = write!(md, " {}{ratio} |", summary(v));
                }
                let _ = writeln!(md);
            }
            let _ = writeln!(md);
        }
    }

    /// Per-repeat ratios at 1 Service, where a row has them.
    fn md_paired(&self, md: &mut String) {
        let paired_metrics = [
            Metric::RpsKeepAlive,
            Metric::RpsNewConnection,
            Metric::ThroughputGbps,
        ];
        let paired: Vec<(Row, Vec<Option<Vec<f64>>>)> = Row::ALL
            .into_iter()
            .map(|r| (r, paired_metrics.map(|m| self.paired_ratios(r, m)).to_vec()))
            .filter(|(_, v)| v.iter().any(Option::is_some))
            .collect();
        if !paired.is_empty() {
            let _ = write!(md, "Paired ratios at 1 Service: each repeat's figure over its baseline's in the same repeat, median (min-max):\n\n| row |");
            for m in paired_metrics {
                let _ = write!(md, " {} |", m.name());
            }
            let _ = writeln!(md, "\n|---|{}", "---|".repeat(paired_metrics.len()));
            for (row, cols) in paired {
                let _ = write!(md, "| {} |", row.name());
                for c in cols {
                    match c {
                        Some(v) if !v.is_empty() => {
                            let (lo, hi) = min_max(&v);
                            let _ = write!(md, " {:.2}x ({:.2}-{:.2}) |", median(&v), lo, hi);
                        }
                        _ => {
                            let _ = write!(md, " - |");
                        }
                    }
                }
                let _ = writeln!(md);
            }
            let _ = writeln!(md);
        }
    }

    /// The connect4 cost, rows not measured, programming and change times,
    /// memory per idle connection.
    fn md_notes(&self, md: &mut String) {
        let prog: Vec<(usize, &Vec<f64>)> = self
            .samples
            .iter()
            .filter(|(k, _)| k.2 == Metric::Connect4Ns)
            .map(|(k, v)| (k.0, v))
            .collect();
        if !prog.is_empty() {
            let _ = writeln!(md, "Cost of the socket-LB connect4 program per connect() (kernel.bpf_stats_enabled during the new-connection runs of the socket-LB row):\n\n| Services | ns per connect() |\n|---|---|");
            for (extra, v) in prog {
                let _ = writeln!(md, "| {} | {} |", extra + 1, summary(v));
            }
            let _ = writeln!(md);
        }
        if !self.unavailable.is_empty() {
            let _ = writeln!(md, "Not measured:\n");
            for (row, why) in &self.unavailable {
                let _ = writeln!(md, "- {}: {why}", row.name());
            }
            let _ = writeln!(md);
        }
        if !self.programming.is_empty() {
            let _ = writeln!(md, "Time to program the rules (until the measured Service answers, for Ferry):\n\n| row | Services | time |\n|---|---|---|");
            for ((extra, row), d) in &self.programming {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.3} s |",
                    row.name(),
                    extra + 2,
                    d.as_secs_f64()
                );
            }
        }
        if !self.changes.is_empty() {
            let _ = writeln!(md, "\nOne Service's endpoint changed with {} Services programmed, applied as kube-proxy does today (iptables-restore --noflush of the changed chains; one nft transaction). Ferry's figure is the end-to-end change latency of `cargo xtask bench control-plane`:\n\n| row | time |\n|---|---|", EXTRA_SERVICES + 2);
            for (row, d) in &self.changes {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} ms |",
                    row.name(),
                    d.as_secs_f64() * 1000.0
                );
            }
        }
        if !self.memory.is_empty() {
            let _ = writeln!(md, "\nResident memory per idle connection ({IDLE_CONNECTIONS} idle client connections, each with its backend connection; process RSS only, kernel socket buffers not included):\n\n| row | KiB per connection |\n|---|---|");
            for (row, kib) in &self.memory {
                let _ = writeln!(md, "| {} | {kib:.2} |", row.name());
            }
        }
    }

    /// Bars per row: ratio to the baseline for the two request rates and
    /// the throughput, at each scale.
    pub(super) fn svg(&self) -> String {
        let metrics = [
            Metric::RpsKeepAlive,
            Metric::RpsNewConnection,
            Metric::ThroughputGbps,
        ];
        let colors = ["#4477aa", "#ee6677", "#228833"];
        let mut rows: Vec<(usize, Row)> = self.samples.keys().map(|k| (k.0, k.1)).collect();
        rows.dedup();
        let bar_h = 10.0;
        let group_h = bar_h * metrics.len() as f64 + 12.0;
        let left = 330.0;
        let width = 900.0;
        let scale_w = 400.0; // 1.0x
        let height = 60.0 + group_h * rows.len() as f64;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"18\" font-size=\"14\">Ratio to the baseline row (direct; direct from node for socket LB), medians</text>\n"
        );
        for (i, (m, c)) in metrics.iter().zip(colors).enumerate() {
            let x = 10.0 + i as f64 * 200.0;
            let _ = writeln!(s, "<rect x=\"{x}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"37\">{}</text>", x + 14.0, m.name());
        }
        let x1 = left + scale_w;
        let _ = writeln!(s, "<line x1=\"{x1}\" y1=\"45\" x2=\"{x1}\" y2=\"{height}\" stroke=\"#999\" stroke-dasharray=\"3,3\"/><text x=\"{}\" y=\"55\">1.0x</text>", x1 + 3.0);
        for (gi, (extra, row)) in rows.iter().enumerate() {
            let y0 = 60.0 + gi as f64 * group_h;
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{}\">{} ({} Svc)</text>",
                y0 + group_h / 2.0,
                row.name(),
                extra + 1
            );
            for (mi, (m, c)) in metrics.iter().zip(colors).enumerate() {
                let r = self.ratio(*extra, *row, *m).unwrap_or(0.0).min(2.0);
                let y = y0 + mi as f64 * bar_h;
                let _ = writeln!(
                    s,
                    "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"9\">{r:.2}</text>",
                    r * scale_w,
                    bar_h - 1.0,
                    left + r * scale_w + 3.0,
                    y + bar_h - 2.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

/// "median (min-max)" of samples, as the tables show them.
pub(super) fn summary(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{} ({}-{})", fmt(median(v)), fmt(lo), fmt(hi))
}

pub(super) fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
