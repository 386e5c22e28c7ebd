//! The Kubernetes source against the fake API server (real list/watch
//! protocol, kube-rs's own watcher): initial list, add/modify/delete, a cut
//! watch resumed, a 410 Gone relist that converges, and nothing programmed
//! before every kind has listed. Unprivileged: the agent runs on FakeMaps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proxy::agent::runner::SyncKind;
use ferry_proxy::agent::Agent;
use ferry_proxy::datapath::FakeMaps;
use ferry_proxy::source::SourceEvent;
use ferry_tests::fake_api::{FakeApi, Kind};
use serde_json::json;

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"clusterIP": ip, "ports": [{"port": 80}]}})
}

fn slice(service: &str, ips: &[&str]) -> serde_json::Value {
    let eps: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    json!({"kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-1"), "namespace": "ns",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps})
}

fn agent() -> Agent {
    let cfg = ferry_tests::agent_config(ferry_proxy::source::kube::SOURCES.to_vec());
    Agent::new(cfg, Box::new(FakeMaps::default())).unwrap()
}

/// What the agent's maps say about a ClusterIP: its backends, sorted.
fn backends(agent: &Agent, frontend: &str) -> Option<Vec<String>> {
    let rows = ferry_proxy::rows::service_rows(agent.applied());
    rows.into_iter().find(|r| r.frontend == frontend).map(|r| {
        let mut b: Vec<String> = r.backends.into_iter().map(|b| b.address).collect();
        b.sort();
        b
    })
}

/// Feeds events to the agent and syncs until `done` holds (10 s at most).
fn pump(agent: &mut Agent, rx: &Receiver<SourceEvent>, what: &str, done: impl Fn(&Agent) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(e) => {
                agent.handle(e);
                while let Ok(more) = rx.try_recv() {
                    agent.handle(more);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => panic!("the source stopped"),
        }
        agent.sync(SyncKind::Incremental).unwrap();
        if done(agent) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

#[test]
fn watch_list_change_cut_and_relist() {
    let api = FakeApi::start().unwrap();
    api.apply(service("web", "198.19.0.10"));
    api.apply(slice("web", &["198.18.1.1", "198.18.1.2"]));
    api.apply(json!({"kind": "Node", "metadata": {"name": "node-a"},
                     "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.10"}]}}));
    api.apply(json!({"kind": "Node", "metadata": {"name": "node-b"}}));
    let dir = std::env::temp_dir().join(format!("ferry-test-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (events_tx, events_rx) = ferry_proxy::source::kube::event_channel();
    let thread = ferry_proxy::source::kube::spawn(
        Some(kubeconfig),
        "node-a".into(),
        tx,
        Some(events_rx),
        stop.clone(),
    )
    .unwrap();
    let mut agent = agent();
    agent.report_invalid_to(Box::new(move |e| {
        let _ = events_tx.send(e.clone());
    }));

    // Initial list of every kind, then programmed.
    pump(&mut agent, &rx, "the initial list", |a| {
        backends(a, "198.19.0.10:80/TCP").is_some()
    });
    assert_eq!(
        backends(&agent, "198.19.0.10:80/TCP").unwrap(),
        vec!["198.18.1.1:8080/TCP", "198.18.1.2:8080/TCP"]
    );
    assert_eq!(
        agent.core().node().nodeport_addresses,
        vec!["198.18.0.10".parse::<std::net::IpAddr>().unwrap()]
    );

    // Add, modify, delete through the watch.
    api.apply(service("api", "198.19.0.11"));
    api.apply(slice("api", &["198.18.1.3"]));
    api.apply(slice("web", &["198.18.1.2"]));
    pump(&mut agent, &rx, "add and modify", |a| {
        backends(a, "198.19.0.11:80/TCP").is_some_and(|b| b == ["198.18.1.3:8080/TCP"])
            && backends(a, "198.19.0.10:80/TCP").is_some_and(|b| b == ["198.18.1.2:8080/TCP"])
    });
    api.delete(Kind::Service, "ns", "api");
    pump(&mut agent, &rx, "delete", |a| {
        backends(a, "198.19.0.11:80/TCP").is_none()
    });

    // A cut watch resumes from its resourceVersion.
    api.cut_watches();
    api.apply(slice("web", &["198.18.1.2", "198.18.1.4"]));
    pump(&mut agent, &rx, "a change after a cut", |a| {
        backends(a, "198.19.0.10:80/TCP").is_some_and(|b| b.len() == 2)
    });

    // History compacted while watches are cut: 410 Gone, relist, converge
    // (including a deletion the watch never saw).
    api.compact();
    api.delete(Kind::EndpointSlice, "ns", "web-1");
    api.apply(service("late", "198.19.0.12"));
    api.compact();
    api.cut_watches();
    // The open watches may deliver these events before the cut; the
    // relist then follows when the watchers reconnect (after a backoff),
    // so wait for it too.
    let service_lists = |log: &[String]| {
        log.iter()
            .filter(|r| r.contains("/api/v1/services?") && !r.contains("watch=true"))
            .count()
    };
    pump(&mut agent, &rx, "the relist after 410", |a| {
        backends(a, "198.19.0.12:80/TCP").is_some()
            && backends(a, "198.19.0.10:80/TCP").is_some_and(|b| b.is_empty())
            && service_lists(&api.requests()) >= 2
    });
    let log = api.requests();
    let watches = log.iter().filter(|r| r.contains("watch=true")).count();
    assert!(watches >= 6, "watches: {log:#?}");
    assert!(service_lists(&log) >= 2, "a relist after 410: {log:#?}");
    assert!(
        log.iter()
            .any(|r| r.contains("/api/v1/nodes?") && r.contains("metadata.name%3Dnode-a")),
        "the Node watch is limited to this node: {log:#?}"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(rx);
    thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nothing_is_programmed_before_every_kind_listed() {
    use ferry_proxy::source::{ListKind, Listing};
    let mut agent = agent();
    for kind in [ListKind::Services, ListKind::Slices] {
        agent.handle(SourceEvent::Listing(Listing::Begin(kind)));
        agent.handle(SourceEvent::Listing(Listing::End(kind)));
    }
    // The node has not listed yet: a sync does nothing (and prunes nothing).
    let r = agent.sync(SyncKind::Full).unwrap();
    assert_eq!(r.ops, 0);
    assert!(!r.full);
}

/// A streamed list takes effect at its end, atomically: until then the
/// previous state stands; at the end what it lacks is gone.
#[test]
fn a_streamed_list_replaces_a_kind_at_its_end() {
    use ferry_proxy::objects::Object;
    use ferry_proxy::source::{ListKind, Listing};
    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }
    let mut agent = agent();
    let list = |agent: &mut Agent, kind: ListKind, items: Vec<Object>| {
        agent.handle(SourceEvent::Listing(Listing::Begin(kind)));
        for o in items {
            agent.handle(SourceEvent::Listing(Listing::Item(o)));
        }
        agent.handle(SourceEvent::Listing(Listing::End(kind)));
    };
    let svc = |name: &str, ip: &str| Object::Service(Box::new(typed(service(name, ip))));
    let eps = |name: &str, ips: &[&str]| Object::EndpointSlice(Box::new(typed(slice(name, ips))));
    list(
        &mut agent,
        ListKind::Services,
        vec![svc("a", "198.19.0.1"), svc("b", "198.19.0.2")],
    );
    list(
        &mut agent,
        ListKind::Slices,
        vec![eps("a", &["198.18.0.1"]), eps("b", &["198.18.0.2"])],
    );
    list(&mut agent, ListKind::Nodes, vec![]);
    agent.sync(SyncKind::Full).unwrap();
    assert_eq!(
        backends(&agent, "198.19.0.1:80/TCP"),
        Some(vec!["198.18.0.1:8080/TCP".to_string()])
    );
    assert!(backends(&agent, "198.19.0.2:80/TCP").is_some());

    // A relist in progress changes nothing yet.
    agent.handle(SourceEvent::Listing(Listing::Begin(ListKind::Services)));
    agent.handle(SourceEvent::Listing(Listing::Item(svc("a", "198.19.0.1"))));
    agent.sync(SyncKind::Full).unwrap();
    assert!(
        backends(&agent, "198.19.0.2:80/TCP").is_some(),
        "b went before the list ended"
    );
    // Its end removes what it lacked.
    agent.handle(SourceEvent::Listing(Listing::End(ListKind::Services)));
    agent.sync(SyncKind::Full).unwrap();
    assert!(
        backends(&agent, "198.19.0.2:80/TCP").is_none(),
        "b outlived the relist"
    );
    assert!(backends(&agent, "198.19.0.1:80/TCP").is_some());
    // An object outside a list is an update.
    agent.handle(SourceEvent::Listing(Listing::Item(svc("c", "198.19.0.3"))));
    agent.handle(SourceEvent::Apply(eps("c", &["198.18.0.3"])));
    agent.sync(SyncKind::Incremental).unwrap();
    assert_eq!(
        backends(&agent, "198.19.0.3:80/TCP"),
        Some(vec!["198.18.0.3:8080/TCP".to_string()])
    );
}

/// One HTTP request to the fake API server; (status code, JSON body).
fn http(
    api: &FakeApi,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = api.url().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or_default();
    (code, json)
}

/// PATCH of a Service's status, as the LoadBalancer allocator will send it
/// (server-side apply and merge patch): the status is merged, the
/// resourceVersion moves on (watchers get a MODIFIED event); a missing
/// Service is 404 and a stale resourceVersion precondition 409.
#[test]
fn fake_api_patches_service_status() {
    let api = FakeApi::start().unwrap();
    let rv = api.apply(service("web", "198.19.0.10"));
    let path = "/api/v1/namespaces/ns/services/web/status";
    let (code, obj) = http(
        &api,
        "PATCH",
        &format!("{path}?fieldManager=ferry&force=true"),
        "application/apply-patch+yaml",
        r#"{"apiVersion":"v1","kind":"Service","status":{"loadBalancer":{"ingress":[{"ip":"198.19.9.1"}]}}}"#,
    );
    assert_eq!(code, 200, "{obj}");
    assert_eq!(
        obj["status"]["loadBalancer"]["ingress"][0]["ip"],
        "198.19.9.1"
    );
    assert_eq!(obj["spec"]["clusterIP"], "198.19.0.10", "spec untouched");
    let new_rv: u64 = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(new_rv > rv);
    // A read sees it.
    let (code, got) = http(
        &api,
        "GET",
        "/api/v1/namespaces/ns/services/web",
        "application/json",
        "",
    );
    assert_eq!(code, 200);
    assert_eq!(got["status"], obj["status"]);

    // Merge patch with a stale precondition: 409, nothing changed.
    let (code, obj) = http(
        &api,
        "PATCH",
        path,
        "application/merge-patch+json",
        &format!(r#"{{"metadata":{{"resourceVersion":"{rv}"}},"status":{{"loadBalancer":null}}}}"#),
    );
    assert_eq!(
        (code, obj["reason"].as_str()),
        (409, Some("Conflict")),
        "{obj}"
    );
    // ... and with the current one: applied (null deletes).
    let (code, obj) = http(
        &api,
        "PATCH",
        path,
        "application/merge-patch+json",
        &format!(
            r#"{{"metadata":{{"resourceVersion":"{new_rv}"}},"status":{{"loadBalancer":null}}}}"#
        ),
    );
    assert_eq!(code, 200, "{obj}");
    assert!(obj["status"].get("loadBalancer").is_none(), "{obj}");

    // A Service that does not exist: 404.
    let (code, obj) = http(
        &api,
        "PATCH",
        "/api/v1/namespaces/ns/services/nope/status",
        "application/merge-patch+json",
        r#"{"status":{}}"#,
    );
    assert_eq!(
        (code, obj["reason"].as_str()),
        (404, Some("NotFound")),
        "{obj}"
    );
    assert!(api
        .requests()
        .iter()
        .any(|r| r.starts_with("PATCH /api/v1/namespaces/ns/services/web/status")));
}
