//! Privileged, end to end: a LoadBalancer address on "bare metal". Two
//! nodes (network namespaces, each running `ferry run --source kube` with
//! the eBPF dataplane) and a client share a bridge; the fake API server
//! listens in the client's namespace. The agents allocate the Service's
//! address from a pool on the bridge's subnet, one of them wins the
//! Service's L2 lease and answers ARP for it, and the client resolves the
//! address to that node and connects through it to a backend. When that
//! agent is killed (SIGKILL: no lease release), the other node takes the
//! lease over, sends gratuitous ARP, and the client's next connection goes
//! through it — within 5 s. And the API server going away for a minute,
//! answering 500s, or answering slowly leaves the address and the
//! dataplane serving, and the agents converge once it is back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::fake_api::{FakeApi, Fault, Kind};
use ferry_tests::netns::VethLink;
use ferry_tests::userspace::{EchoBackend, LineClient};
use ferry_tests::{ferry_binary, require_privileged, KillOnDrop, Netns};
use serde_json::json;

const LB_IP: &str = "198.18.40.240";

/// One node: its namespace, pod namespace, LAN interface and agent pins.
struct Node {
    ns: Netns,
    pod: Netns,
    lan_if: String,
    pins: PinDir,
    cg: TestCgroup,
}

/// cli (198.18.40.100 on bridge br0) -- bridge -- node-1 (.40.1), node-2
/// (.40.2); node-N -- pod-N (198.18.4N.2), each node routing the other
/// node's pod network over the bridge.
fn topology(tag: &str) -> (Netns, Vec<Node>) {
    let cli = Netns::new(&format!("{tag}c")).unwrap();
    cli.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    cli.ip(&["addr", "add", "198.18.40.100/24", "dev", "br0"])
        .unwrap();
    cli.ip(&["link", "set", "br0", "up"]).unwrap();
    let mut nodes = Vec::new();
    for n in 1..=2u8 {
        let ns = Netns::new(&format!("{tag}n{n}")).unwrap();
        let pod = Netns::new(&format!("{tag}p{n}")).unwrap();
        let (port, lan_if) = (format!("{tag}b{n}"), format!("{tag}l{n}"));
        cli.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            &lan_if,
            "netns",
            ns.name(),
        ])
        .unwrap();
        cli.ip(&["link", "set", &port, "master", "br0"]).unwrap();
        cli.ip(&["link", "set", &port, "up"]).unwrap();
        ns.ip(&["addr", "add", &format!("198.18.40.{n}/24"), "dev", &lan_if])
            .unwrap();
        ns.ip(&["link", "set", &lan_if, "up"]).unwrap();
        pod.veth_to(
            &ns,
            VethLink {
                local: "eth0",
                local_cidr: &format!("198.18.4{n}.2/24"),
                remote: &format!("{tag}v{n}"),
                remote_cidr: &format!("198.18.4{n}.1/24"),
            },
        )
        .unwrap();
        pod.ip(&["route", "add", "default", "via", &format!("198.18.4{n}.1")])
            .unwrap();
        let other = 3 - n;
        ns.ip(&[
            "route",
            "add",
            &format!("198.18.4{other}.0/24"),
            "via",
            &format!("198.18.40.{other}"),
        ])
        .unwrap();
        ns.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            .unwrap();
        nodes.push(Node {
            ns,
            pod,
            lan_if,
            pins: PinDir::new(&format!("{tag}{n}")).unwrap(),
            cg: TestCgroup::new(&format!("{tag}{n}")).unwrap(),
        });
    }
    (cli, nodes)
}

fn mac(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"))
        .to_string()
}

/// The MAC the client's neighbour table has for the LoadBalancer address.
fn resolved(cli: &Netns) -> Option<String> {
    let out = cli.ip(&["neigh", "show", LB_IP, "dev", "br0"]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace().skip_while(|w| *w != "lladdr");
    words.next()?;
    words.next().map(str::to_string)
}

/// One request through the LoadBalancer address; the backend's address.
fn ask(cli: &Netns) -> anyhow::Result<String> {
    cli.run(|| LineClient::connect(&format!("{LB_IP}:80"))?.ask("hello"))
}

fn l2_holder(api: &FakeApi) -> Option<String> {
    api.get(Kind::Lease, "kube-system", "ferry-l2.t.web")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

/// Two nodes with agents, a client, the fake API server on the bridge and
/// a LoadBalancer Service whose address is allocated and announced.
struct Lan {
    cli: Netns,
    _nodes: Vec<Node>,
    api: FakeApi,
    agents: Vec<Option<KillOnDrop>>,
    dir: std::path::PathBuf,
    _backends: Vec<EchoBackend>,
    /// The MACs of the nodes' LAN interfaces.
    macs: Vec<String>,
}

impl Lan {
    /// Everything up and the address reachable, the agents holding the L2
    /// lease for `lease`; None without root.
    fn start(tag: &str, lease: &str) -> Option<Lan> {
        let bin = ferry_binary();
        if !require_privileged(tag, bin.as_ref().map(|_| ()).map_err(Clone::clone)) {
            return None;
        }
        let bin = bin.unwrap();
        let (cli, nodes) = topology(tag);
        let backends: Vec<EchoBackend> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let addr = format!("198.18.4{}.2:9100", i + 1);
                n.pod.run(move || EchoBackend::start(&addr)).unwrap()
            })
            .collect();
        // The API server, reachable from both nodes over the bridge.
        let listener = cli
            .run(|| Ok(TcpListener::bind("198.18.40.100:0")?))
            .unwrap();
        let api = FakeApi::start_on(listener).unwrap();
        api.enforce_cluster_role(&ferry_tests::deploy::cluster_role().unwrap());
        api.apply(
            json!({"kind": "FerryLoadBalancerIPPool", "metadata": {"name": "lan"},
                         "spec": {"blocks": [{"cidr": format!("{LB_IP}/32")}]}}),
        );
        api.apply(
            json!({"kind": "Service", "metadata": {"name": "web", "namespace": "t"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.40",
                     "ports": [{"port": 80, "targetPort": 9100, "nodePort": 30040}]}}),
        );
        api.apply(slice(&["198.18.41.2", "198.18.42.2"]));
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let agents = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let log = std::fs::File::create(dir.join(format!("agent-{}.log", i + 1))).unwrap();
                Some(KillOnDrop(
                    ferry_tests::agent::EbpfAgent {
                        netns: Some(n.ns.name()),
                        source: format!("--kubeconfig={}", kubeconfig.display()),
                        pins: n.pins.path(),
                        cgroup: n.cg.path(),
                        interfaces: &n.lan_if,
                        hostname: &format!("node-{}", i + 1),
                    }
                    .command(&bin)
                    .args(["--l2-lease-duration", lease])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
                ))
            })
            .collect();
        let macs = nodes.iter().map(|n| mac(&n.ns, &n.lan_if)).collect();
        let lan = Lan {
            cli,
            _nodes: nodes,
            api,
            agents,
            dir,
            _backends: backends,
            macs,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while l2_holder(&lan.api).is_none() || ask(&lan.cli).is_err() {
            assert!(
                Instant::now() < deadline,
                "never reachable; agents:\n{}",
                lan.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(lan)
    }

    fn logs(&self) -> String {
        (1..=2)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("agent-{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// The index of the node holding the L2 lease.
    fn holder(&self) -> usize {
        usize::from(l2_holder(&self.api).as_deref() == Some("node-2"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Service's EndpointSlice with these endpoints (node-1's pod network
/// is 198.18.41.0/24, node-2's 198.18.42.0/24).
fn slice(ips: &[&str]) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| {
            let node = if ip.starts_with("198.18.41.") {
                "node-1"
            } else {
                "node-2"
            };
            json!({"addresses": [ip], "nodeName": node})
        })
        .collect();
    json!({"kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "t", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 9100}], "endpoints": eps})
}

#[test]
fn client_reaches_the_announcing_node_and_fails_over() {
    // Fast failover is what is measured here (the default lease of 15 s
    // outlasts an agent's rolling restart).
    let Some(mut lan) = Lan::start("l2", "3s") else {
        return;
    };
    let (cli, api) = (&lan.cli, &lan.api);
    let first = l2_holder(api).unwrap();
    let svc = api.get(Kind::Service, "t", "web").unwrap();
    assert_eq!(svc["status"]["loadBalancer"]["ingress"][0]["ip"], LB_IP);
    let (a, b) = (lan.holder(), 1 - lan.holder());
    assert_eq!(
        resolved(cli).as_deref(),
        Some(lan.macs[a].as_str()),
        "{first} holds the lease"
    );
    // Both backends answer through the announcing node (one of them over
    // the other node, SNATed).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(ask(cli).unwrap());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|a| a.ends_with(":9100")), "{seen:?}");
    assert_eq!(
        api.denied(),
        Vec::<String>::new(),
        "verbs deploy/rbac.yaml lacks"
    );

    // The announcing agent dies.
    lan.agents[a].take().unwrap().0.kill().unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    while resolved(&lan.cli).as_deref() != Some(lan.macs[b].as_str()) {
        assert!(
            Instant::now() < deadline,
            "the address never moved to node-{}; agents:\n{}",
            b + 1,
            lan.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    eprintln!(
        "L2 failover: the client resolved {LB_IP} to node-{} {took:?} after node-{} died",
        b + 1,
        a + 1
    );
    assert!(took <= Duration::from_secs(5), "failover took {took:?}");
    assert_eq!(
        l2_holder(&lan.api).as_deref(),
        Some(format!("node-{}", b + 1).as_str())
    );
    let answer = ask(&lan.cli).unwrap();
    assert!(answer.ends_with(":9100"), "{answer}");
}

/// One fault of the API server, with a change of the Service's endpoints
/// made meanwhile: new connections through the LoadBalancer address keep
/// working (the client forgets its ARP entry every 2 s, so the announcing
/// node must keep answering ARP), the address stays on its node, and after
/// the fault the agents converge. Returns (failed connections, the time
/// from the end of the fault to the change being served).
fn ride_out(lan: &Lan, fault: Fault, seconds: u64, endpoints: &[&str]) -> (usize, Duration) {
    let holder = lan.holder();
    lan.api.set_fault(fault);
    lan.api.apply(slice(endpoints));
    let (start, mut failed, mut flushed) = (Instant::now(), 0, Instant::now());
    while start.elapsed() < Duration::from_secs(seconds) {
        if flushed.elapsed() > Duration::from_secs(2) {
            let _ = lan.cli.ip(&["neigh", "flush", "dev", "br0"]);
            flushed = Instant::now();
        }
        if let Err(e) = ask(&lan.cli) {
            failed += 1;
            eprintln!("{fault:?}: at {:?}: {e:#}", start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    lan.api.set_fault(Fault::None);
    let healed = Instant::now();
    // Converged: twenty answers in a row from the endpoints now wanted.
    // The watches retry with kube-rs's default backoff (as client-go's):
    // doubling to 30 s, plus up to as much again in jitter, so the first
    // retry after a long fault can come up to a minute after it ended.
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(
            healed.elapsed() < Duration::from_secs(75),
            "{fault:?}: never converged:\n{}",
            lan.logs()
        );
        match ask(&lan.cli) {
            Ok(a) if endpoints.iter().any(|e| a.starts_with(&format!("{e}:"))) => in_a_row += 1,
            _ => in_a_row = 0,
        }
    }
    let converged = healed.elapsed();
    assert_eq!(
        lan.holder(),
        holder,
        "{fault:?}: the address moved:\n{}",
        lan.logs()
    );
    (failed, converged)
}

#[test]
fn api_server_faults_leave_the_dataplane_and_the_address_alone() {
    // The default lease: a holder renews with a read and a write, so with
    // 3 s per request it renews every 6 s or more, and a lease shorter than
    // that expires under it (rightly: another node takes it over).
    let Some(lan) = Lan::start("l2f", "15s") else {
        return;
    };
    for (fault, seconds, endpoints) in [
        (Fault::Unreachable, 60, &["198.18.41.2"][..]),
        (Fault::Status(500), 15, &["198.18.42.2"][..]),
        (
            Fault::Slow(Duration::from_secs(3)),
            15,
            &["198.18.41.2", "198.18.42.2"][..],
        ),
    ] {
        let (failed, converged) = ride_out(&lan, fault, seconds, endpoints);
        eprintln!(
            "API server {fault:?} for {seconds} s: {failed} connections failed meanwhile; the change made meanwhile served {converged:?} after it ended"
        );
        assert_eq!(failed, 0, "{fault:?}:\n{}", lan.logs());
    }
}
