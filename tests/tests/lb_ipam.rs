//! The LoadBalancer IP allocator against the fake API server: pools and
//! selectors, requested addresses, sharing, conflicts, exhaustion, release,
//! pool status and Events, a restart that moves no address, and leader
//! failover within 15 s. The allocator runs in-process (the code `ferry
//! run` runs), each instance on a runtime of its own so a test can kill one
//! without it releasing its lease.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
// The object builders take json! values by value, as json! itself reads.
#![allow(clippy::needless_pass_by_value)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proxy::ipam::controller::{self, IpamConfig, IpamStatus};
use ferry_tests::fake_api::{FakeApi, Kind};
use serde_json::{json, Value};

/// One allocator instance on its own runtime.
struct Allocator {
    rt: Option<tokio::runtime::Runtime>,
    status: Arc<IpamStatus>,
    stop: Arc<AtomicBool>,
}

impl Allocator {
    fn start(api: &FakeApi, identity: &str) -> Allocator {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let status = Arc::new(IpamStatus::default());
        let stop = Arc::new(AtomicBool::new(false));
        let url: http::Uri = api.url().parse().unwrap();
        let cfg = IpamConfig::new("kube-system", identity);
        let (st, sp) = (status.clone(), stop.clone());
        rt.spawn(async move {
            let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
            controller::run(client, cfg, st, sp).await;
        });
        Allocator {
            rt: Some(rt),
            status,
            stop,
        }
    }

    /// Dies: the tasks are dropped where they are, the lease is not
    /// released.
    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Stops as on SIGTERM: gives the lease up.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status.is_leader() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        self.kill();
    }

    fn metrics(&self) -> String {
        let metrics = ferry_proxy::metrics::Metrics::default();
        metrics.add_source(Box::new(self.status.clone()));
        metrics.render()
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pool(name: &str, spec: Value) -> Value {
    json!({"kind": "FerryLoadBalancerIPPool", "metadata": {"name": name}, "spec": spec})
}

fn lb(ns: &str, name: &str, annotations: Value, ports: Value) -> Value {
    json!({"kind": "Service",
           "metadata": {"name": name, "namespace": ns, "annotations": annotations},
           "spec": {"type": "LoadBalancer", "ports": ports}})
}

fn tcp(port: u16) -> Value {
    json!([{"port": port, "protocol": "TCP"}])
}

/// The ingress IPs of a Service's status.
fn ips(api: &FakeApi, ns: &str, name: &str) -> Vec<String> {
    api.get(Kind::Service, ns, name)
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect()
}

/// (status, reason) of the allocator's condition on a Service.
fn condition(api: &FakeApi, ns: &str, name: &str) -> Option<(String, String)> {
    let svc = api.get(Kind::Service, ns, name)?;
    svc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "ferry.dev/LoadBalancerIPAllocated")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn wait_ips(api: &FakeApi, ns: &str, name: &str, want: &[&str]) {
    wait_for(
        &format!("{ns}/{name} has {want:?}"),
        Duration::from_secs(10),
        || ips(api, ns, name) == want,
    );
}

fn wait_condition(api: &FakeApi, ns: &str, name: &str, status: &str, reason: &str) {
    wait_for(
        &format!("{ns}/{name} condition {status} {reason}"),
        Duration::from_secs(10),
        || condition(api, ns, name) == Some((status.into(), reason.into())),
    );
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(Kind::Lease, "kube-system", "ferry-lb-ipam")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

#[test]
fn pools_selectors_requests_sharing_conflicts_and_exhaustion() {
    let api = FakeApi::start().unwrap();
    let not_prod = json!({"matchExpressions": [
        {"key": "io.kubernetes.service.namespace", "operator": "NotIn", "values": ["prod"]}]});
    api.apply(pool(
        "main",
        json!({"blocks": [{"cidr": "198.19.100.0/30"}],
                                  "serviceSelector": not_prod}),
    ));
    api.apply(pool(
        "prod",
        json!({"blocks": [{"start": "198.19.101.10", "stop": "198.19.101.11"}],
        "serviceSelector": {"matchLabels": {"io.kubernetes.service.namespace": "prod"}}}),
    ));
    api.apply(pool(
        "zz-overlap",
        json!({"blocks": [{"cidr": "198.19.100.2/32"}]}),
    ));
    api.apply(lb("default", "a", json!({}), tcp(80)));
    let ipam = Allocator::start(&api, "node-a");

    wait_ips(&api, "default", "a", &["198.19.100.1"]);
    wait_condition(&api, "default", "a", "True", "Allocated");
    // A namespace selector.
    api.apply(lb("prod", "b", json!({}), tcp(80)));
    wait_ips(&api, "prod", "b", &["198.19.101.10"]);
    // A requested address another Service holds.
    api.apply(lb(
        "default",
        "c",
        json!({"ferry.dev/load-balancer-ips": "198.19.100.1"}),
        tcp(80),
    ));
    wait_condition(&api, "default", "c", "False", "AddressInUse");
    assert!(ips(&api, "default", "c").is_empty());
    // Two Services with one sharing key and disjoint ports share.
    api.apply(lb(
        "default",
        "d",
        json!({"ferry.dev/sharing-key": "web"}),
        tcp(80),
    ));
    wait_ips(&api, "default", "d", &["198.19.100.2"]);
    api.apply(lb(
        "default",
        "e",
        json!({"ferry.dev/sharing-key": "web"}),
        tcp(443),
    ));
    wait_ips(&api, "default", "e", &["198.19.100.2"]);
    // Nothing is left.
    api.apply(lb("default", "f", json!({}), tcp(80)));
    wait_condition(&api, "default", "f", "False", "PoolExhausted");
    // Not ours: another class, or not a LoadBalancer.
    let mut other = lb("default", "g", json!({}), tcp(80));
    other["spec"]["loadBalancerClass"] = json!("example.com/other");
    api.apply(other);

    // Pool status: counts and the overlap.
    wait_for("pool statuses", Duration::from_secs(10), || {
        let main = api.get(Kind::Pool, "", "main").unwrap();
        let over = api.get(Kind::Pool, "", "zz-overlap").unwrap();
        main["status"]["addressesUsed"] == 2
            && main["status"]["addressesFree"] == 0
            && over["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "ferry.dev/Conflict" && c["status"] == "True")
            })
    });
    let m = ipam.metrics();
    assert!(m.contains("ferry_lb_ipam_leader 1"), "{m}");
    assert!(
        m.contains("ferry_lb_ipam_addresses{pool=\"main\",state=\"used\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("ferry_lb_ipam_addresses{pool=\"prod\",state=\"free\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_lb_ipam_unsatisfied_services{reason=\"PoolExhausted\"} 1"),
        "{m}"
    );

    // Release: a deleted Service frees its address for the one that asked
    // for it; a Service no longer of type LoadBalancer gives its share back.
    api.delete(Kind::Service, "default", "a");
    wait_ips(&api, "default", "c", &["198.19.100.1"]);
    wait_condition(&api, "default", "c", "True", "Allocated");
    let mut d = api.get(Kind::Service, "default", "d").unwrap();
    d["spec"]["type"] = json!("ClusterIP");
    api.apply(d);
    wait_ips(&api, "default", "d", &[]);
    wait_for("d's condition removed", Duration::from_secs(10), || {
        condition(&api, "default", "d").is_none()
    });
    assert_eq!(ips(&api, "default", "e"), ["198.19.100.2"]);
    assert!(ips(&api, "default", "g").is_empty());
    assert_eq!(condition(&api, "default", "g"), None);

    // Events: one per condition change, Warnings for the failures (the
    // last one follows its status write).
    let released = |e: &Value| e["regarding"]["name"] == "d" && e["reason"] == "Released";
    wait_for("the Released Event", Duration::from_secs(5), || {
        api.posted_events().iter().any(released)
    });
    let reasons: Vec<(String, String, String)> = api
        .posted_events()
        .iter()
        .map(|e| {
            (
                e["regarding"]["name"].as_str().unwrap_or("").to_string(),
                e["type"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("a", "Normal", "Allocated"),
        ("c", "Warning", "AddressInUse"),
        ("f", "Warning", "PoolExhausted"),
        ("c", "Normal", "Allocated"),
        ("d", "Normal", "Released"),
    ] {
        let want = (want.0.to_string(), want.1.to_string(), want.2.to_string());
        assert!(reasons.contains(&want), "no Event {want:?} in {reasons:?}");
    }
}

/// A new allocator (after a restart or a failover) rebuilds the allocation
/// from the Services' status and writes nothing, even where a fresh
/// allocation would have chosen other addresses.
#[test]
fn a_restart_moves_no_address() {
    let api = FakeApi::start().unwrap();
    api.apply(pool(
        "main",
        json!({"blocks": [{"cidr": "198.19.100.0/29"}]}),
    ));
    // Statuses from an earlier run, not in the order a fresh run would pick.
    for (name, ip) in [
        ("x", "198.19.100.5"),
        ("y", "198.19.100.1"),
        ("z", "198.19.100.3"),
    ] {
        let mut svc = lb("default", name, json!({}), tcp(80));
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]},
            "conditions": [{"type": "ferry.dev/LoadBalancerIPAllocated", "status": "True",
                            "reason": "Allocated", "message": format!("{ip} from pool main"),
                            "lastTransitionTime": "2026-11-27T00:00:00Z"}]});
        api.apply(svc);
    }
    let mut first = Allocator::start(&api, "node-a");
    wait_for("node-a leads", Duration::from_secs(10), || {
        first.status.is_leader()
    });
    api.apply(lb("default", "w", json!({}), tcp(80)));
    wait_ips(&api, "default", "w", &["198.19.100.2"]);
    first.stop();
    assert_eq!(holder(&api), None, "a stopped allocator releases its lease");

    let patches = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH /api/v1/namespaces/default/services/"))
            .count()
    };
    let before = patches(&api);
    let second = Allocator::start(&api, "node-b");
    wait_for("node-b leads", Duration::from_secs(10), || {
        second.status.is_leader()
    });
    wait_for("node-b counted the pool", Duration::from_secs(10), || {
        second
            .metrics()
            .contains("ferry_lb_ipam_addresses{pool=\"main\",state=\"used\"} 4")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        patches(&api),
        before,
        "the restarted allocator rewrote a Service"
    );
    for (name, ip) in [
        ("x", "198.19.100.5"),
        ("y", "198.19.100.1"),
        ("z", "198.19.100.3"),
        ("w", "198.19.100.2"),
    ] {
        assert_eq!(ips(&api, "default", name), [ip], "{name} moved");
    }
    api.apply(lb("default", "v", json!({}), tcp(80)));
    wait_ips(&api, "default", "v", &["198.19.100.4"]);
}

/// Two allocators: exactly one allocates; when it dies (no release), the
/// other takes over within 15 s.
#[test]
fn leader_failover_within_15_seconds() {
    let api = FakeApi::start().unwrap();
    api.apply(pool(
        "main",
        json!({"blocks": [{"cidr": "198.19.100.0/29"}]}),
    ));
    let mut a = Allocator::start(&api, "node-a");
    wait_for("node-a leads", Duration::from_secs(10), || {
        a.status.is_leader()
    });
    let mut b = Allocator::start(&api, "node-b");
    api.apply(lb("default", "one", json!({}), tcp(80)));
    wait_ips(&api, "default", "one", &["198.19.100.1"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!b.status.is_leader(), "two leaders");
    assert_eq!(holder(&api).as_deref(), Some("node-a"));

    a.kill();
    let killed = Instant::now();
    api.apply(lb("default", "two", json!({}), tcp(80)));
    wait_for("node-b allocates", Duration::from_secs(16), || {
        ips(&api, "default", "two") == ["198.19.100.2"]
    });
    let took = killed.elapsed();
    eprintln!("failover: the new leader allocated {took:?} after the old one died");
    assert!(took < Duration::from_secs(15), "failover took {took:?}");
    assert_eq!(holder(&api).as_deref(), Some("node-b"));
    let lease = api
        .get(Kind::Lease, "kube-system", "ferry-lb-ipam")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(ips(&api, "default", "one"), ["198.19.100.1"]);
    b.stop();
}
