//! Privileged, end to end: fake API server -> `ferry run --source kube` ->
//! pinned eBPF maps -> a real connection in a network namespace, then a
//! Service update through the API reaching the next connection. The fake
//! API server enforces deploy/'s ClusterRole: the agent must never need a
//! verb the DaemonSet's role lacks (watching, listing, reporting Events,
//! allocating a LoadBalancer address: leases, pools, Service status).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::fake_api::FakeApi;
use ferry_tests::netns::client_and_backends;
use ferry_tests::servers::Servers;
use ferry_tests::Netns;
use serde_json::json;

fn slice(ip: &str) -> serde_json::Value {
    json!({"kind": "EndpointSlice",
           "metadata": {"name": "web-1", "namespace": "e2e",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"port": 9000}],
           "endpoints": [{"addresses": [ip]}]})
}

/// Connects through the ClusterIP until the reply is `want` (10 s at most).
fn until_reply(cg: &TestCgroup, ns: &Netns, want: &str) {
    until_reply_from(cg, ns, "198.19.0.30:80", want);
}

/// Connects to `to` until the reply is `want` (10 s at most).
fn until_reply_from(cg: &TestCgroup, ns: &Netns, to: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry-test-client"))
            .args([cg.path().to_str().unwrap(), ns.name(), "tcp", to, "1"])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if last == format!("ok {to} {want}") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never reached {want}; last answer: {last}");
}

#[test]
fn service_update_via_api_reaches_a_real_connection() {
    let Some(bin) =
        ferry_tests::privileged_ferry("service_update_via_api_reaches_a_real_connection")
    else {
        return;
    };
    let (srv, cli) = client_and_backends("ke", 3).unwrap();
    let listeners = srv
        .run(|| {
            Ok(vec![
                TcpListener::bind("198.18.3.2:9000")?,
                TcpListener::bind("198.18.3.3:9000")?,
            ])
        })
        .unwrap();
    let _servers = Servers::start(listeners, vec![]);

    let api = FakeApi::start().unwrap();
    api.enforce_cluster_role(&ferry_tests::deploy::cluster_role().unwrap());
    // An invalid Service: reported as an Event, which the role must allow.
    api.apply(
        json!({"kind": "Service", "metadata": {"name": "broken", "namespace": "e2e"},
                     "spec": {"clusterIP": "198.19.0.31", "ports": [{"port": 0}]}}),
    );
    api.apply(json!({"kind": "Service", "metadata": {"name": "web", "namespace": "e2e"},
                     "spec": {"clusterIP": "198.19.0.30", "ports": [{"port": 80, "targetPort": 9000}]}}));
    api.apply(slice("198.18.3.2"));
    // A LoadBalancer Service and a pool: the agent, as the allocator,
    // writes the address into the status, and then serves it.
    api.apply(
        json!({"kind": "FerryLoadBalancerIPPool", "metadata": {"name": "e2e"},
                     "spec": {"blocks": [{"cidr": "198.19.77.0/30"}]}}),
    );
    api.apply(
        json!({"kind": "Service", "metadata": {"name": "lb", "namespace": "e2e"},
                     "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.32",
                              "ports": [{"port": 80, "targetPort": 9000, "nodePort": 30032}]}}),
    );
    api.apply(json!({"kind": "EndpointSlice",
           "metadata": {"name": "lb-1", "namespace": "e2e",
                        "labels": {"kubernetes.io/service-name": "lb"}},
           "addressType": "IPv4", "ports": [{"port": 9000}],
           "endpoints": [{"addresses": ["198.18.3.3"]}]}));
    let dir = std::env::temp_dir().join(format!("ferry-test-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    let pins = PinDir::new("e2e").unwrap();
    let cg = TestCgroup::new("e2e").unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let _agent = ferry_tests::KillOnDrop(
        Command::new(&bin)
            .arg("run")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--bpffs-path={}", pins.path().display()))
            .arg(format!("--cgroup-path={}", cg.path().display()))
            .args([
                "--dataplane",
                "ebpf",
                // The root namespace's interfaces are not the test's.
                "--interfaces",
                "none",
                "--hostname-override",
                "node-a",
                "--min-sync-period",
                "50ms",
            ])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    until_reply(&cg, &cli, "198.18.3.2:9000");
    until_reply_from(&cg, &cli, "198.19.77.1:80", "198.18.3.3:9000");
    let lb = api
        .get(ferry_tests::fake_api::Kind::Service, "e2e", "lb")
        .unwrap();
    assert_eq!(
        lb["status"]["loadBalancer"]["ingress"][0]["ip"],
        "198.19.77.1"
    );
    // The endpoint moves to the other pod through the API.
    api.apply(slice("198.18.3.3"));
    until_reply(&cg, &cli, "198.18.3.3:9000");
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.posted_events().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !api.posted_events().is_empty(),
        "the invalid Service was not reported as an Event"
    );
    assert_eq!(
        api.denied(),
        Vec::<String>::new(),
        "the agent needed verbs deploy/rbac.yaml lacks"
    );

    let _ = std::fs::remove_dir_all(&dir);
}
