//! Privileged: the dataplane changed under a running agent (`ferry run`
//! in a node namespace, TC on the client and backend links). Every pin
//! under its bpffs directory removed (which detaches the programs): the
//! agent pins the maps again and attaches the programs again, NodePort
//! traffic flows again, and a restart after it finds its state. The
//! client link removed and created again: its TC programs are attached to
//! the new device.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::agent::EbpfAgent;
use ferry_tests::bpf::{PinDir, TestCgroup};
use ferry_tests::netns::{TcTopology, VethLink};
use ferry_tests::userspace::EchoBackend;
use ferry_tests::KillOnDrop;

const YAML: &str = "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: t}
spec:
  type: NodePort
  clusterIP: 198.19.0.33
  ports: [{port: 80, targetPort: 9100, nodePort: 30133}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: t, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{port: 9100}]
endpoints:
- {addresses: [198.18.21.2], nodeName: node-b}
";

fn agent(t: &TcTopology, bin: &Path, dir: &Path, pins: &Path, cg: &Path) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    KillOnDrop(
        EbpfAgent {
            netns: Some(t.node.name()),
            source: format!("--source=file:{}", dir.join("svc.yaml").display()),
            pins,
            cgroup: cg,
            interfaces: "tce0,tcb0",
            hostname: "node-a",
        }
        .command(bin)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    )
}

/// One request through the NodePort from the client namespace.
fn ask(t: &TcTopology) -> anyhow::Result<String> {
    t.cli.run(|| {
        let to: SocketAddr = "198.18.20.1:30133".parse()?;
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"hi\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        anyhow::ensure!(n > 0, "closed");
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Waits (10 s at most) until a request succeeds; how long it took.
fn until_served(t: &TcTopology, what: &str, log: &dyn Fn() -> String) -> Duration {
    let start = Instant::now();
    while ask(t).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not served again:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn pins_removed_and_links_recreated_under_the_agent_are_repaired() {
    let Some(bin) = ferry_tests::privileged_ferry(
        "pins_removed_and_links_recreated_under_the_agent_are_repaired",
    ) else {
        return;
    };
    let t = TcTopology::new("rp").unwrap();
    let _backend = t
        .srv
        .run(|| EchoBackend::start("198.18.21.2:9100"))
        .unwrap();
    let pins = PinDir::new("rp").unwrap();
    let cg = TestCgroup::new("rp").unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-test-rp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("svc.yaml"), YAML).unwrap();
    let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let mut a = agent(&t, &bin, &dir, pins.path(), cg.path());
    until_served(&t, "at start", &log);

    // Every pin removed: the programs detach, the agent puts them back.
    ferry_proxy::ebpf::lb::remove_pins(pins.path());
    assert!(!pins.path().join("ferry_svc4").exists());
    let took = until_served(&t, "after the pins were removed", &log);
    let deadline = Instant::now() + Duration::from_secs(5);
    let links = ["tce0-ingress", "tce0-egress", "tcb0-ingress", "tcb0-egress"];
    let pinned = || {
        links
            .iter()
            .all(|l| pins.path().join(format!("links/tc-{l}")).exists())
    };
    while !pinned() {
        assert!(
            Instant::now() < deadline,
            "links not pinned again:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pins.path().join("ferry_svc4").exists() && pins.path().join("ferry_ct4").exists());
    eprintln!("pins removed: NodePort served again after {took:?}");
    // A restart finds the maps (the Service is served at once).
    a.0.kill().unwrap();
    let _ = a.0.wait();
    // The dataplane serves without an agent; the new one restores its
    // state from the pins (the Service is served before and after).
    assert!(ask(&t).is_ok(), "served between the agents:\n{}", log());
    let _b = agent(&t, &bin, &dir, pins.path(), cg.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while log().matches("ready: the first full sync").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the restart never got ready:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        log().contains("restored the applied state from the maps frontends=4"),
        "{}",
        log()
    );
    assert!(ask(&t).is_ok(), "the restart broke the Service:\n{}", log());

    // The client link removed and made again: TC on the new device.
    t.node.ip(&["link", "del", "tce0"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    t.cli
        .veth_to(
            &t.node,
            VethLink {
                local: "tce1",
                local_cidr: "198.18.20.2/24",
                remote: "tce0",
                remote_cidr: "198.18.20.1/24",
            },
        )
        .unwrap();
    t.cli
        .ip(&["route", "replace", "default", "via", "198.18.20.1"])
        .unwrap();
    let took = until_served(&t, "after the link came back", &log);
    eprintln!("client link recreated: NodePort served again after {took:?}");
    // The keeper logs its repairs after making them: traffic may be served
    // a moment before the line is written.
    let logged = Instant::now();
    while !log().contains("TC ingress attached to tce0") {
        assert!(logged.elapsed() < Duration::from_secs(3), "{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
