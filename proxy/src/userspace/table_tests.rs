use super::*;
use crate::model::{Protocol, Scope};
use crate::plan::FrontendId;
use ferry_common::lb::{flow_hash4, Be16, Be32};

fn l4(s: &str) -> L4Addr {
    let a: SocketAddr = s.parse().unwrap();
    L4Addr {
        ip: a.ip(),
        port: a.port(),
        protocol: Protocol::Tcp,
    }
}

fn frontend(algorithm: Algorithm, n: usize) -> Frontend {
    Frontend {
        key: l4("198.19.0.10:80"),
        service: None,
        port_name: "".into(),
        entry: FrontendEntry {
            id: FrontendId(1),
            count: n as u16,
            scope: Scope::ClusterIp,
            action: Action::Forward,
            algorithm,
            affinity_timeout: 0,
            preserve_source: false,
            source_ranges: false,
            internal_via: None,
        },
        slots: (0..n)
            .map(|i| Backend {
                id: i as u32 + 1,
                addr: l4(&format!("198.18.0.{}:8080", i + 1)),
                local: false,
                terminating: false,
                state: Arc::default(),
            })
            .collect(),
        maglev: (0..31).map(|i| (i % n) as u16).collect(),
        source_ranges: Vec::new(),
        probe: None,
        internal_via: None,
    }
}

#[test]
fn node_clients_of_an_external_local_frontend_go_via_the_internal_one() {
    let cluster_ip = frontend(Algorithm::Random, 3);
    let mut node_port = frontend(Algorithm::Maglev, 1);
    node_port.key = l4("198.18.0.2:30080");
    node_port.internal_via = Some(l4("198.19.0.10:80"));
    let mut lone = frontend(Algorithm::Maglev, 1);
    lone.key = l4("198.18.0.2:30081");
    lone.internal_via = Some(l4("198.19.0.99:80")); // not programmed
    let table = Table {
        frontends: [cluster_ip, node_port, lone]
            .into_iter()
            .map(|f| (f.key, Arc::new(f)))
            .collect(),
        node_addresses: ["198.18.0.2".parse().unwrap()].into_iter().collect(),
        generation: 1,
    };
    let served = |key: &str, client: &str| {
        table
            .serving(&l4(key), client.parse().unwrap())
            .map(|f| f.key.to_string())
    };
    let via = Some("198.19.0.10:80/TCP".to_string());
    assert_eq!(served("198.18.0.2:30080", "198.18.0.2"), via);
    assert_eq!(served("198.18.0.2:30080", "127.0.0.1"), via);
    let own = Some("198.18.0.2:30080/TCP".to_string());
    assert_eq!(served("198.18.0.2:30080", "198.18.0.100"), own);
    let lone_own = Some("198.18.0.2:30081/TCP".to_string());
    assert_eq!(served("198.18.0.2:30081", "198.18.0.2"), lone_own);
    assert_eq!(served("198.18.0.9:80", "198.18.0.2"), None);
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 9, 9], port))
}

#[test]
fn random_spreads_and_skips_unavailable_backends() {
    let fe = frontend(Algorithm::Random, 3);
    fe.slots[1].state.healthy.store(false, Ordering::Relaxed);
    let mut rng = Rng::new(7);
    let mut seen = [0; 3];
    for p in 0..300 {
        let b = choose(&fe, client(p), &[], None, 0, &mut rng).unwrap();
        seen[(b.id - 1) as usize] += 1;
    }
    assert_eq!(seen[1], 0, "{seen:?}");
    assert!(seen[0] > 100 && seen[2] > 100, "{seen:?}");
}

#[test]
fn every_backend_down_fails_open_and_exclusions_exhaust() {
    let fe = frontend(Algorithm::Random, 2);
    for b in &fe.slots {
        b.state.healthy.store(false, Ordering::Relaxed);
    }
    let mut rng = Rng::new(1);
    assert!(choose(&fe, client(1), &[], None, 0, &mut rng).is_ok());
    let all: Vec<L4Addr> = fe.slots.iter().map(|b| b.addr).collect();
    assert_eq!(
        choose(&fe, client(1), &all, None, 0, &mut rng).unwrap_err(),
        Refusal::Exhausted
    );
}

#[test]
fn maglev_is_stable_per_flow_and_matches_the_table() {
    let fe = frontend(Algorithm::Maglev, 3);
    let mut rng = Rng::new(3);
    for p in 1000..1100 {
        let a = choose(&fe, client(p), &[], None, 0, &mut rng).unwrap();
        let b = choose(&fe, client(p), &[], None, 0, &mut rng).unwrap();
        assert_eq!(a.addr, b.addr);
        let h = flow_hash4(
            Be32::from_host(u32::from_be_bytes([198, 18, 9, 9])),
            Be32::from_host(u32::from_be_bytes([198, 19, 0, 10])),
            Be16::from_host(p),
            Be16::from_host(80),
            6,
        );
        assert_eq!(usize::from(fe.maglev[h as usize % 31]), (a.id - 1) as usize);
    }
}

#[test]
fn least_connections_prefers_idle_backends() {
    let fe = frontend(Algorithm::LeastConnections, 2);
    fe.slots[0].state.active.store(100, Ordering::Relaxed);
    let mut rng = Rng::new(5);
    let idle = (0..200)
        .filter(|p| choose(&fe, client(*p), &[], None, 0, &mut rng).unwrap().id == 2)
        .count();
    // Two random picks: the busy one wins only when both picks are it.
    assert!(idle > 120, "{idle}");
}

#[test]
fn affinity_source_ranges_reject_and_ejection() {
    let mut fe = frontend(Algorithm::Random, 3);
    let mut rng = Rng::new(9);
    let sticky = fe.slots[2].addr;
    for p in 0..20 {
        assert_eq!(
            choose(&fe, client(p), &[], Some(sticky), 0, &mut rng)
                .unwrap()
                .addr,
            sticky
        );
    }
    // Passive ejection: after the threshold the backend takes no new
    // flows until the ejection expires.
    let st = &fe.slots[2].state;
    for i in 0..EJECT_AFTER_FAILURES {
        assert_eq!(st.connect_failed(1000), i + 1 == EJECT_AFTER_FAILURES);
    }
    assert!(!st.available(1000) && st.available(1000 + EJECT_FOR_MS));
    assert_eq!(st.describe(1000), "ejected");
    assert_ne!(
        choose(&fe, client(1), &[], Some(sticky), 1000, &mut rng)
            .unwrap()
            .addr,
        sticky
    );
    fe.entry.source_ranges = true;
    fe.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    assert_eq!(
        choose(&fe, client(1), &[], None, 0, &mut rng).unwrap_err(),
        Refusal::SourceRange
    );
    fe.source_ranges.push("198.18.0.0/15".parse().unwrap());
    assert!(choose(&fe, client(1), &[], None, 0, &mut rng).is_ok());
    fe.entry.action = Action::Reject;
    assert_eq!(
        choose(&fe, client(1), &[], None, 0, &mut rng).unwrap_err(),
        Refusal::NoEndpoints
    );
}
