use super::own::BUCKETS;
use super::*;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[test]
fn health_turns_bad_when_a_sync_is_owed_too_long() {
    let m = Metrics::default();
    let timeout = Duration::from_mins(1);
    assert!(m.health(at(1_000), timeout, true).0, "nothing owed");
    m.pending(at(1_000));
    assert!(m.health(at(30_000), timeout, true).0);
    assert!(!m.health(at(62_000), timeout, true).0, "owed for 61 s");
    m.record_sync(
        SyncRecord {
            ok: true,
            took: Duration::from_millis(3),
            ops_ok: 5,
            ops_failed: 0,
            plan_errors: 0,
            service_changes: 1,
            endpoint_changes: 2,
        },
        at(62_500),
    );
    let (ok, body) = m.health(at(63_000), timeout, true);
    assert!(ok);
    assert_eq!(
        body,
        "{\"lastUpdated\": \"1970-01-01T00:01:02.500Z\",\"currentTime\": \"1970-01-01T00:01:03.000Z\"}"
    );
    m.set_node_deleting(true);
    assert!(
        !m.health(at(63_000), timeout, true).0,
        "/healthz fails while the node goes"
    );
    assert!(m.health(at(63_000), timeout, false).0, "/livez does not");
}

fn a_sync_with_one_failed_op() -> SyncRecord {
    SyncRecord {
        ok: true,
        took: Duration::from_millis(3),
        ops_ok: 5,
        ops_failed: 1,
        plan_errors: 0,
        service_changes: 1,
        endpoint_changes: 2,
    }
}

#[test]
fn renders_kube_proxy_names() {
    let m = Metrics::default();
    m.record_sync(a_sync_with_one_failed_op(), at(5_000));
    let text = m.render();
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1"));
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1"));
    assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 2"));
    assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds 5"));
    assert!(text.contains("ferry_map_operations_total{result=\"error\"} 1"));
    m.programmed(3_000, at(5_000));
    let text = m.render();
    assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1"));
    assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0"));
}

#[derive(Debug)]
struct FakeDataplane;

impl DataplaneStatus for FakeDataplane {
    fn mode(&self) -> &'static str {
        "fake"
    }
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        family(
            &mut enc,
            "ferry_fake_events",
            "Events with \\ and \"quotes\"",
            MetricType::Counter,
            [(label("event", "a\"b"), 3), (label("event", "c\\d\ne"), 4)],
        )?;
        single(
            &mut enc,
            "ferry_fake_level",
            "A level",
            MetricType::Gauge,
            7,
        )
    }
    fn services_json(&self) -> String {
        "[]".into()
    }
}

/// The whole exposition parses as Prometheus text: every sample has its
/// HELP, kube-proxy's buckets are exact, label values are escaped.
#[test]
fn the_exposition_parses_as_prometheus_text() {
    use prometheus_parse::{Scrape, Value};
    let m = Metrics::default();
    m.set_dataplane(Arc::new(FakeDataplane));
    m.record_sync(a_sync_with_one_failed_op(), at(5_000));
    m.programmed(3_500, at(5_000));
    let text = m.render();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| s.value.clone())
    };
    for s in &scrape.samples {
        // A histogram's _sum and _count come as samples of their own.
        let base = ["_sum", "_count"]
            .iter()
            .find_map(|x| s.metric.strip_suffix(x))
            .filter(|b| scrape.docs.contains_key(*b));
        let name = base.unwrap_or(&s.metric);
        assert!(scrape.docs.contains_key(name), "no HELP for {}", s.metric);
    }
    let buckets = |name| match value(name, &[]) {
        Some(Value::Histogram(b)) => b.iter().map(|c| (c.less_than, c.count)).collect(),
        other => panic!("{name}: {other:?}"),
    };
    let sync: Vec<(f64, f64)> = buckets("kubeproxy_sync_proxy_rules_duration_seconds");
    let bounds: Vec<f64> = sync.iter().map(|b| b.0).collect();
    let mut want = BUCKETS.to_vec();
    want.push(f64::INFINITY);
    assert_eq!(bounds, want);
    assert_eq!(sync[3], (0.002, 0.0));
    assert_eq!(sync[4], (0.004, 1.0));
    let prog: Vec<(f64, f64)> = buckets("kubeproxy_network_programming_duration_seconds");
    assert_eq!(prog[1], (0.5, 0.0));
    assert_eq!(prog[2], (1.0, 0.0));
    assert_eq!(prog[3], (2.0, 1.0));
    let counter = |name, labels: &[(&str, &str)]| match value(name, labels) {
        Some(Value::Counter(v)) => v,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(counter("ferry_syncs_total", &[("result", "ok")]), 1.0);
    assert_eq!(counter("ferry_syncs_total", &[("result", "error")]), 0.0);
    assert_eq!(
        counter("ferry_map_operations_total", &[("result", "error")]),
        1.0
    );
    assert_eq!(
        counter("kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]),
        2.0
    );
    // prometheus-parse keeps label values as escaped in the text.
    assert_eq!(
        counter("ferry_fake_events_total", &[("event", r#"a\"b"#)]),
        3.0
    );
    assert_eq!(
        counter("ferry_fake_events_total", &[("event", r"c\\d\ne")]),
        4.0
    );
    assert!(matches!(
        value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]),
        Some(Value::Gauge(v)) if v == 5.0
    ));
    assert!(matches!(value("ferry_fake_level", &[]), Some(Value::Gauge(v)) if v == 7.0));
    assert!(
        text.contains("# TYPE ferry_fake_events_total counter\n"),
        "{text}"
    );
    assert!(text.contains("event=\"c\\\\d\\ne\""), "escaped: {text}");
}
