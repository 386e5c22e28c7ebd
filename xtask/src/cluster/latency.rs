//! Ferry's network programming latency in the cluster: the
//! `kubeproxy_network_programming_duration_seconds` histograms of every
//! node's agent (its metrics address, 127.0.0.1:10249 in the node's network
//! namespace), summed over the nodes, and quantiles of what changed between
//! two scrapes, interpolated within buckets as Prometheus'
//! histogram_quantile does.

use anyhow::Result;
use std::collections::BTreeMap;

use super::{node, NodeSpec, NODES};

const METRIC: &str = "kubeproxy_network_programming_duration_seconds_bucket";

/// Cumulative bucket counts by upper bound (f64::INFINITY for +Inf).
pub type Buckets = Vec<(f64, f64)>;

#[derive(Debug, Clone, Copy)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub count: f64,
}

impl std::fmt::Display for Quantiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} s, p99 {:.2} s over {} programmed changes",
            self.p50, self.p99, self.count
        )
    }
}

/// Every node's histogram, summed.
pub fn scrape() -> Result<Buckets> {
    let mut sum: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for spec in &NODES {
        let text = metrics(spec)?;
        for (le, count) in parse(&text) {
            let e = sum.entry(format!("{le:020.6}")).or_insert((le, 0.0));
            e.1 += count;
        }
    }
    let mut buckets: Buckets = sum.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// One node's Ferry /metrics (its metrics port listens on the node's
/// loopback).
pub fn metrics(spec: &NodeSpec) -> Result<String> {
    node::in_netns(
        spec.ns,
        "curl -s --max-time 3 http://127.0.0.1:10249/metrics",
    )
}

/// The bucket lines of the histogram in a Prometheus text exposition.
pub fn parse(text: &str) -> Buckets {
    text.lines()
        .filter(|l| l.starts_with(METRIC))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// p50 and p99 of the observations made between `before` and `after`.
pub fn quantiles(before: &Buckets, after: &Buckets) -> Option<Quantiles> {
    let delta: Buckets = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - was)
        })
        .collect();
    let count = delta.last()?.1;
    (count > 0.0).then(|| Quantiles {
        p50: quantile(&delta, 0.5),
        p99: quantile(&delta, 0.99),
        count,
    })
}

/// histogram_quantile: linear within the bucket the rank falls in.
fn quantile(buckets: &Buckets, q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = count - lower.1;
            let into = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * into;
        }
        lower = (le, count);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let text = "\
kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 2
kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 10
kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 12
kubeproxy_network_programming_duration_seconds_bucket{le=\"+Inf\"} 12
kubeproxy_network_programming_duration_seconds_sum 9
";
        let after = parse(text);
        assert_eq!(after.len(), 4);
        let before = vec![(0.5, 2.0), (1.0, 2.0), (2.0, 2.0), (f64::INFINITY, 2.0)];
        let q = quantiles(&before, &after).unwrap();
        assert_eq!(q.count, 10.0);
        // 10 new observations: 8 in (0.5, 1], 2 in (1, 2].
        assert!((q.p50 - (0.5 + 0.5 * 5.0 / 8.0)).abs() < 1e-9, "{q:?}");
        assert!((q.p99 - (1.0 + 1.0 * 1.9 / 2.0)).abs() < 1e-9, "{q:?}");
        assert!(quantiles(&after, &after).is_none());
    }
}
