//! The userspace dataplane with real sockets on loopback (unprivileged: the
//! agent runs as nobody when the tests run as root) and, privileged, inside
//! a network namespace with frontend addresses on ferry0.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ferry_tests::userspace::{
    ask_once, service_yaml, udp_ask, EchoBackend, LineClient, UdpEcho, UserspaceAgent,
};
use ferry_tests::{require_privileged, Netns};

fn served(rows: &[serde_json::Value], frontend: &str) -> bool {
    rows.iter()
        .any(|r| r["frontend"] == frontend && r["served"] == "yes")
}

fn row<'a>(rows: &'a [serde_json::Value], frontend: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["frontend"] == frontend)
}

fn tally(addr: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(ask_once(addr).unwrap()).or_insert(0) += 1;
    }
    seen
}

#[test]
fn unprivileged_tcp_udp_affinity_reject_and_unservable_frontends() {
    let _a = EchoBackend::start("127.31.1.1:28081").unwrap();
    let _b = EchoBackend::start("127.31.1.2:28081").unwrap();
    let _ua = UdpEcho::start("127.31.1.1:28053").unwrap();
    let _ub = UdpEcho::start("127.31.1.2:28053").unwrap();
    let ready = |ip| (ip, true, true, false);
    let eps = [ready("127.31.1.1"), ready("127.31.1.2")];
    let yaml = [
        service_yaml("web", "127.31.0.1", 28080, 28081, "TCP", &eps, "", ""),
        service_yaml(
            "sticky",
            "127.31.0.2",
            28080,
            28081,
            "TCP",
            &eps,
            ", sessionAffinity: ClientIP",
            "",
        ),
        service_yaml("dns", "127.31.0.3", 28053, 28053, "UDP", &eps, "", ""),
        service_yaml("empty", "127.31.0.4", 28080, 28081, "TCP", &[], "", ""),
        service_yaml("low", "127.31.0.5", 80, 28081, "TCP", &eps, "", ""),
        service_yaml("remote", "198.19.77.1", 28080, 28081, "TCP", &eps, "", ""),
        // externalTrafficPolicy Local, endpoints not on this node: external
        // clients are dropped, the node's own go via the ClusterIP.
        service_yaml(
            "etl",
            "127.31.0.6",
            28080,
            28081,
            "TCP",
            &eps,
            ", externalIPs: [127.31.0.7], externalTrafficPolicy: Local",
            "",
        ),
    ]
    .concat();
    // auto: as nobody eBPF cannot load, so this also checks the fallback.
    let agent =
        UserspaceAgent::start("basic", &yaml, 28249, true, &["--dataplane", "auto"]).unwrap();
    agent
        .wait_for("the TCP and UDP frontends", |r| {
            served(r, "127.31.0.1:28080/TCP") && served(r, "127.31.0.3:28053/UDP")
        })
        .unwrap();
    assert!(
        agent
            .log()
            .contains("eBPF unavailable: using the userspace dataplane"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.get("/proxyMode").unwrap(), "userspace");

    // TCP: both backends, every connection answered.
    let seen = tally("127.31.0.1:28080", 40);
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A client on the node (loopback) of an externalTrafficPolicy Local
    // address: every endpoint, as through the ClusterIP.
    let rows = agent.services().unwrap();
    assert_eq!(
        row(&rows, "127.31.0.7:28080/TCP").unwrap()["action"],
        "drop"
    );
    let seen = tally("127.31.0.7:28080", 20);
    assert_eq!(seen.len(), 2, "{seen:?}");

    // ClientIP affinity: one backend for every connection from this client.
    let seen = tally("127.31.0.2:28080", 20);
    assert_eq!(seen.len(), 1, "{seen:?}");

    // UDP: replies come from the Service address; sessions spread.
    let mut backends = BTreeMap::new();
    for _ in 0..20 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (from, who) = udp_ask(&sock, "127.31.0.3:28053", "ping").unwrap();
        assert_eq!(from.to_string(), "127.31.0.3:28053");
        *backends.entry(who).or_insert(0) += 1;
        // The same socket stays on its backend.
        let (_, again) = udp_ask(&sock, "127.31.0.3:28053", "ping").unwrap();
        assert!(backends.contains_key(&again));
    }
    assert_eq!(backends.len(), 2, "{backends:?}");

    // No endpoints: refused at once, never a hang.
    let t = Instant::now();
    let err = LineClient::connect("127.31.0.4:28080").unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}: {err}",
        t.elapsed()
    );
    let rows = agent.services().unwrap();
    assert_eq!(
        row(&rows, "127.31.0.4:28080/TCP").unwrap()["action"],
        "reject"
    );

    // What an unprivileged agent cannot serve is reported, not fatal.
    let low = row(&rows, "127.31.0.5:80/TCP").unwrap()["served"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        low.starts_with("no: binding TCP 127.31.0.5:80: Permission denied"),
        "{low}"
    );
    let remote = row(&rows, "198.19.77.1:28080/TCP").unwrap()["served"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(remote.contains("not on this host"), "{remote}");
    assert_eq!(
        agent.metric("ferry_userspace_frontends_unserved"),
        Some(2.0)
    );
    assert!(agent.metric("ferry_userspace_connections_total").unwrap() >= 60.0);
}

#[test]
fn health_checks_take_a_backend_out_and_bring_it_back() {
    let a = EchoBackend::start("127.32.1.1:28081").unwrap();
    let _b = EchoBackend::start("127.32.1.2:28081").unwrap();
    let eps = [
        ("127.32.1.1", true, true, false),
        ("127.32.1.2", true, true, false),
    ];
    let annotations = "ferry.dev/health-check: 'http:/healthz', ferry.dev/health-check-interval: 100ms, \
                       ferry.dev/health-check-unhealthy-threshold: '2', ferry.dev/health-check-healthy-threshold: '2'";
    let yaml = service_yaml(
        "hc",
        "127.32.0.1",
        28080,
        28081,
        "TCP",
        &eps,
        "",
        annotations,
    );
    let agent = UserspaceAgent::start("health", &yaml, 28250, true, &[]).unwrap();
    agent
        .wait_for("the frontend", |r| served(r, "127.32.0.1:28080/TCP"))
        .unwrap();
    assert_eq!(tally("127.32.0.1:28080", 30).len(), 2);

    a.set_healthy(false);
    agent
        .wait_for("backend a marked unhealthy", |r| {
            row(r, "127.32.0.1:28080/TCP").is_some_and(|f| {
                f["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["address"] == "127.32.1.1:28081/TCP" && b["health"] == "unhealthy")
            })
        })
        .unwrap();
    let seen = tally("127.32.0.1:28080", 30);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["127.32.1.2:28081"],
        "{seen:?}"
    );
    assert!(
        agent
            .metric("ferry_health_check_marked_down_total")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        agent.metric("ferry_userspace_backends_unhealthy"),
        Some(1.0)
    );

    a.set_healthy(true);
    agent
        .wait_for("backend a back", |r| {
            row(r, "127.32.0.1:28080/TCP").is_some_and(|f| {
                f["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|b| b["health"] == "healthy")
            })
        })
        .unwrap();
    assert_eq!(tally("127.32.0.1:28080", 30).len(), 2);
    assert!(agent.metric("ferry_health_check_marked_up_total").unwrap() >= 1.0);
}

#[test]
fn dead_backend_is_retried_elsewhere_then_ejected() {
    let _b = EchoBackend::start("127.33.1.2:28081").unwrap();
    // 127.33.1.1 has no server: every connect to it is refused.
    let eps = [
        ("127.33.1.1", true, true, false),
        ("127.33.1.2", true, true, false),
    ];
    let yaml = service_yaml("dead", "127.33.0.1", 28080, 28081, "TCP", &eps, "", "");
    let agent = UserspaceAgent::start("eject", &yaml, 28251, true, &[]).unwrap();
    agent
        .wait_for("the frontend", |r| served(r, "127.33.0.1:28080/TCP"))
        .unwrap();
    // Every client connection succeeds: a failed connect is retried on
    // the other backend.
    let seen = tally("127.33.0.1:28080", 40);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["127.33.1.2:28081"]);
    assert!(
        agent
            .metric("ferry_userspace_connect_failures_total")
            .unwrap()
            >= 5.0
    );
    let rows = agent.services().unwrap();
    let dead = row(&rows, "127.33.0.1:28080/TCP").unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "127.33.1.1:28081/TCP")
        .unwrap()["health"]
        .clone();
    assert_eq!(dead, "ejected");
    assert_eq!(agent.metric("ferry_userspace_backends_ejected"), Some(1.0));
}

#[test]
fn terminating_backend_drains_and_udp_moves_off_a_removed_one() {
    let _a = EchoBackend::start("127.34.1.1:28081").unwrap();
    let _b = EchoBackend::start("127.34.1.2:28081").unwrap();
    let _ua = UdpEcho::start("127.34.1.1:28053").unwrap();
    let _ub = UdpEcho::start("127.34.1.2:28053").unwrap();
    let both = [
        ("127.34.1.1", true, true, false),
        ("127.34.1.2", true, true, false),
    ];
    let yaml = |tcp: &[(&str, bool, bool, bool)], udp: &[(&str, bool, bool, bool)]| {
        [
            service_yaml("drain", "127.34.0.1", 28080, 28081, "TCP", tcp, "", ""),
            service_yaml("udp", "127.34.0.2", 28053, 28053, "UDP", udp, "", ""),
        ]
        .concat()
    };
    let agent = UserspaceAgent::start("drain", &yaml(&both, &both), 28252, true, &[]).unwrap();
    agent
        .wait_for("the frontends", |r| {
            served(r, "127.34.0.1:28080/TCP") && served(r, "127.34.0.2:28053/UDP")
        })
        .unwrap();
    let mut open = LineClient::connect("127.34.0.1:28080").unwrap();
    let first = open.ask("one").unwrap();
    let (leaving, staying) = if first == "127.34.1.1:28081" {
        ("127.34.1.1", "127.34.1.2")
    } else {
        ("127.34.1.2", "127.34.1.1")
    };
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (_, udp_first) = udp_ask(&udp, "127.34.0.2:28053", "u").unwrap();
    let udp_leaving = udp_first.split(':').next().unwrap().to_string();
    let udp_staying = if udp_leaving == "127.34.1.1" {
        "127.34.1.2"
    } else {
        "127.34.1.1"
    };

    // The TCP backend starts terminating (serving, not ready); the UDP one
    // is removed.
    agent
        .update(&yaml(
            &[(leaving, false, true, true), (staying, true, true, false)],
            &[(udp_staying, true, true, false)],
        ))
        .unwrap();
    agent
        .wait_for("one TCP slot and one UDP slot", |r| {
            row(r, "127.34.0.1:28080/TCP")
                .is_some_and(|f| f["backends"].as_array().unwrap().len() == 1)
                && row(r, "127.34.0.2:28053/UDP")
                    .is_some_and(|f| f["backends"].as_array().unwrap().len() == 1)
        })
        .unwrap();
    // New TCP connections avoid the terminating backend...
    let seen = tally("127.34.0.1:28080", 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec![&format!("{staying}:28081")]
    );
    // ...while the open one keeps flowing to it.
    assert_eq!(open.ask("two").unwrap(), first);
    // The UDP flow moved to the live backend (at once, on its next datagram).
    let t = Instant::now();
    let (_, now) = udp_ask(&udp, "127.34.0.2:28053", "u").unwrap();
    assert_eq!(now, format!("{udp_staying}:28053"));
    assert!(t.elapsed() < Duration::from_secs(1));
    // Removing the endpoint entirely does not cut the open connection.
    agent
        .update(&yaml(
            &[(staying, true, true, false)],
            &[(udp_staying, true, true, false)],
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(open.ask("three").unwrap(), first);
}

#[test]
fn connection_limit_resets_extra_clients_and_idle_connections_end() {
    let _a = EchoBackend::start("127.35.1.1:28081").unwrap();
    let eps = [("127.35.1.1", true, true, false)];
    let yaml = service_yaml("lim", "127.35.0.1", 28080, 28081, "TCP", &eps, "", "");
    let agent = UserspaceAgent::start(
        "limit",
        &yaml,
        28253,
        true,
        &["--max-connections", "3", "--idle-timeout", "1500ms"],
    )
    .unwrap();
    agent
        .wait_for("the frontend", |r| served(r, "127.35.0.1:28080/TCP"))
        .unwrap();
    let mut held: Vec<LineClient> = (0..3)
        .map(|i| {
            let mut c = LineClient::connect("127.35.0.1:28080").unwrap();
            c.ask(&format!("held {i}")).unwrap();
            c
        })
        .collect();
    // A fourth client is reset at once instead of queueing.
    // (The reset may already be there when connect() returns.)
    if let Ok(mut extra) = LineClient::connect("127.35.0.1:28080") {
        assert!(extra.ask("extra").is_err());
    }
    assert!(
        agent
            .metric("ferry_userspace_refused_total{reason=\"limit\"}")
            .unwrap()
            >= 1.0
    );
    // Freeing one slot admits a new client.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut c = LineClient::connect("127.35.0.1:28080").unwrap();
    c.ask("after").unwrap();
    // Idle connections are reset after the idle timeout.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(held[0].closed() && c.closed());
    assert!(agent.metric("ferry_userspace_idle_timeouts_total").unwrap() >= 3.0);
    assert_eq!(
        agent.metric("ferry_userspace_connections_active"),
        Some(0.0)
    );
}

#[test]
fn privileged_service_addresses_on_ferry0_in_a_namespace() {
    if !require_privileged(
        "privileged_service_addresses_on_ferry0_in_a_namespace",
        Ok(()),
    ) {
        return;
    }
    // The agent and everything it does live in a namespace of ours.
    let ns = Netns::new("us0").unwrap();
    let name = ns.name().to_string();
    let yaml = service_yaml(
        "web",
        "198.19.40.1",
        80,
        28081,
        "TCP",
        &[("127.0.0.1", true, true, false)],
        "",
        "",
    );
    let backend = ns.run(|| EchoBackend::start("127.0.0.1:28081")).unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-us-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cluster.yaml"), yaml).unwrap();
    let bin = ferry_tests::ferry_path().unwrap();
    // The agent manages addresses over netlink: it runs with a PATH that
    // holds no `ip` (nor anything else).
    let empty = dir.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("iproute2's ip (the test uses it for the namespace)");
    let mut agent = ferry_tests::KillOnDrop(
        std::process::Command::new(ip)
            .args(["netns", "exec", &name])
            .arg(&bin)
            .env("PATH", &empty)
            .arg("run")
            .arg(format!(
                "--source=file:{}",
                dir.join("cluster.yaml").display()
            ))
            .args(["--dataplane", "userspace", "--hostname-override", "node-a"])
            .args([
                "--min-sync-period",
                "50ms",
                "--healthz-bind-address",
                "",
                "--metrics-bind-address",
                "",
            ])
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answer = None;
    while Instant::now() < deadline && answer.is_none() {
        answer = ns.run(|| ask_once("198.19.40.1:80")).ok();
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert_eq!(answer.as_deref(), Some("127.0.0.1:28081"), "{log}");
    // On ferry0, or on lo where the kernel has no dummy driver.
    let addrs = String::from_utf8(ns.ip(&["-o", "addr"]).unwrap().stdout).unwrap();
    assert!(addrs.contains("198.19.40.1/32"), "{addrs}");
    // SIGTERM: the address (and ferry0) go away.
    assert!(agent.terminate().is_some_and(|s| s.success()), "{log}");
    let addrs = String::from_utf8(ns.ip(&["-o", "addr"]).unwrap().stdout).unwrap();
    assert!(!addrs.contains("198.19.40.1"), "{addrs}");
    let links = String::from_utf8(ns.ip(&["-o", "link"]).unwrap().stdout).unwrap();
    assert!(!links.contains("ferry0"), "{links}");
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_frontends_fit_a_small_descriptor_limit() {
    // 150 TCP frontends on two threads under RLIMIT_NOFILE 256: one
    // listener per thread each would need 300 descriptors. Beyond a quarter
    // of the limit, frontends get one listener on one thread, so all are
    // served and connections still have descriptors left.
    let backend = EchoBackend::start("127.36.1.1:0").unwrap();
    let port = backend.addr.port();
    let eps = [("127.36.1.1", true, true, false)];
    let yaml: String = (0..150u16)
        .map(|i| {
            service_yaml(
                &format!("s{i}"),
                "127.36.0.1",
                29300 + i,
                port,
                "TCP",
                &eps,
                "",
                "",
            )
        })
        .collect();
    let agent =
        UserspaceAgent::start_limited("nofile", &yaml, 28256, true, &[], Some(256)).unwrap();
    agent
        .wait_for("all 150 frontends", |rows| {
            (0..150u16).all(|i| served(rows, &format!("127.36.0.1:{}/TCP", 29300 + i)))
        })
        .unwrap();
    for i in [0u16, 75, 149] {
        let reply = ask_once(&format!("127.36.0.1:{}", 29300 + i)).unwrap();
        assert_eq!(reply, backend.addr.to_string());
    }
    assert!(
        agent.log().contains("listener budget"),
        "log: {}",
        agent.log()
    );
}

/// /readyz turns 200 only once the first full sync is in the dataplane:
/// a client that starts connecting the moment it does reaches every
/// Service, after a start and after a restart (when /healthz already
/// answered 200 before anything was served).
#[test]
fn readiness_waits_for_the_first_full_sync_across_a_restart() {
    let _backend = EchoBackend::start("127.32.1.1:28091").unwrap();
    let eps = [("127.32.1.1", true, true, false)];
    let frontends: Vec<String> = (1..=60).map(|i| format!("127.32.0.{i}")).collect();
    let yaml: String = frontends
        .iter()
        .enumerate()
        .map(|(i, ip)| service_yaml(&format!("r{i}"), ip, 28090, 28091, "TCP", &eps, "", ""))
        .collect();
    for round in ["start", "restart"] {
        let agent = UserspaceAgent::start("ready", &yaml, 28257, true, &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.ready() {
            assert!(
                Instant::now() < deadline,
                "{round}: never ready: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // At once, every Service, each on a new connection.
        let failures: Vec<String> = frontends
            .iter()
            .filter_map(|ip| {
                let to = format!("{ip}:28090");
                ask_once(&to).err().map(|e| format!("{to}: {e}"))
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{round}: {failures:?}\n{}",
            agent.log()
        );
        assert!(
            agent.log().contains("ready: the first full sync"),
            "{round}"
        );
    }
}

/// Bad input never disturbs the other Services: an invalid Service next to
/// valid ones in one file is skipped with a line naming it and its field
/// (and counted), the valid ones are served; a file rewritten as garbage
/// leaves its last good version in force.
#[test]
fn invalid_objects_are_skipped_alone_and_a_garbled_file_keeps_the_last_good_state() {
    let _backend = EchoBackend::start("127.33.1.1:28093").unwrap();
    let eps = [("127.33.1.1", true, true, false)];
    let good = service_yaml("good", "127.33.0.1", 28092, 28093, "TCP", &eps, "", "");
    let bad = service_yaml("bad", "127.33.0.2", 28094, 28093, "TCP", &eps, "", "")
        .replace("port: 28094,", "port: 70000,");
    let yaml = format!(
        "{good}{bad}---\nkind: Service\nmetadata: {{name: shape, namespace: t}}\nspec: 7\n"
    );
    let agent = UserspaceAgent::start("badinput", &yaml, 28258, true, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.ready() {
        assert!(Instant::now() < deadline, "never ready: {}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ask_once("127.33.0.1:28092").unwrap(), "127.33.1.1:28093");
    let log = agent.log();
    assert!(log.contains("t/bad"), "{log}");
    assert!(
        log.contains("spec.ports[0].port: 70000 is not a port"),
        "{log}"
    );
    assert!(
        log.contains("document 4") && log.contains("at line 38 column 7"),
        "{log}"
    );
    assert_eq!(
        agent.metric("ferry_invalid_objects{kind=\"Service\"}"),
        Some(1.0)
    );

    // The file rewritten as garbage: the last good state stays in force.
    agent.update("this: [is not yaml\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("last good version stays in force") {
        assert!(
            Instant::now() < deadline,
            "garbage not noticed: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..5 {
        assert_eq!(ask_once("127.33.0.1:28092").unwrap(), "127.33.1.1:28093");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.ready(), "{}", agent.log());
}

/// RLIMIT_NOFILE reached: a connection that finds no descriptor is reset
/// at once (the client fails fast instead of hanging in the accept queue),
/// logged and counted; the open connections keep working, and once they
/// close new ones are served again.
#[test]
fn out_of_descriptors_resets_new_connections_fast_and_recovers() {
    let backend = EchoBackend::start("127.37.1.1:0").unwrap();
    let port = backend.addr.port();
    let eps = [("127.37.1.1", true, true, false)];
    let yaml = service_yaml("fd", "127.37.0.1", 29500, port, "TCP", &eps, "", "");
    let agent = UserspaceAgent::start_limited("fds", &yaml, 28259, true, &[], Some(64)).unwrap();
    agent
        .wait_for("the frontend", |rows| served(rows, "127.37.0.1:29500/TCP"))
        .unwrap();
    let (mut open, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        let started = Instant::now();
        let mut c = match LineClient::connect("127.37.0.1:29500") {
            Ok(c) => c,
            Err(e) => {
                refused.push((started.elapsed(), format!("{e:#}")));
                continue;
            }
        };
        match c.ask("hi") {
            Ok(_) => open.push(c),
            Err(e) => refused.push((started.elapsed(), format!("{e:#}"))),
        }
    }
    assert!(
        !open.is_empty() && !refused.is_empty(),
        "{} open, {refused:?}",
        open.len()
    );
    let slowest = refused.iter().map(|r| r.0).max().unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "a refusal took {slowest:?}: {refused:?}"
    );
    // The connections that got descriptors still work.
    for c in &mut open {
        assert_eq!(c.ask("again").unwrap(), backend.addr.to_string());
    }
    let counted = agent
        .metric("ferry_userspace_refused_total{reason=\"descriptors\"}")
        .unwrap_or(0.0);
    let log = agent.log();
    assert!(log.contains("out of descriptors"), "{log}");
    eprintln!(
        "RLIMIT_NOFILE 64: {} connections open, {} reset (slowest {slowest:?}, {counted} counted as descriptors)",
        open.len(),
        refused.len()
    );
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask_once("127.37.0.1:29500").is_err() {
        assert!(
            Instant::now() < deadline,
            "never served again: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
