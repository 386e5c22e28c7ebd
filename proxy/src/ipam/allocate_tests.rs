use super::*;
use crate::ipam::pool::{parse_pool, PoolBlock, PoolSpec, ServiceSelector};

fn pool(name: &str, created: i64, blocks: &[&str]) -> PoolInfo {
    let blocks = blocks
        .iter()
        .map(|b| match b.split_once('-') {
            Some((start, stop)) => PoolBlock {
                start: Some(start.into()),
                stop: Some(stop.into()),
                cidr: None,
            },
            None => PoolBlock {
                cidr: Some(b.to_string()),
                ..Default::default()
            },
        })
        .collect();
    parse_pool(
        name,
        created,
        &PoolSpec {
            blocks,
            ..Default::default()
        },
    )
}

fn svc(name: &str, created: i64) -> LbService {
    let mut labels = BTreeMap::new();
    labels.insert(
        crate::ipam::pool::NAMESPACE_LABEL.to_string(),
        "default".to_string(),
    );
    LbService {
        name: ServiceName::new("default", name),
        labels,
        created,
        families: vec![false],
        requested: Ok(vec![]),
        sharing_key: None,
        ports: vec![(Protocol::Tcp, 80)],
        local_policy: false,
        current: vec![],
    }
}

fn ips(a: &Allocations, name: &str) -> Vec<String> {
    a.services[&ServiceName::new("default", name)]
        .addresses
        .iter()
        .map(|(ip, _)| ip.to_string())
        .collect()
}

fn failure(a: &Allocations, name: &str) -> Option<Failure> {
    a.services[&ServiceName::new("default", name)]
        .failure
        .as_ref()
        .map(|f| f.0)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

#[test]
fn oldest_first_then_exhaustion() {
    let pools = [pool("a", 0, &["10.0.0.0/30"])];
    let services = [svc("x", 3), svc("y", 1), svc("z", 2)];
    let a = allocate(&pools, &services);
    assert_eq!(ips(&a, "y"), ["10.0.0.1"]);
    assert_eq!(ips(&a, "z"), ["10.0.0.2"]);
    assert_eq!(ips(&a, "x"), Vec::<String>::new());
    assert_eq!(failure(&a, "x"), Some(Failure::PoolExhausted));
    let report = &a.pools["a"];
    assert_eq!((report.total, report.used), (2, 2));
}

#[test]
fn current_addresses_stay_put_across_restarts_and_changes() {
    let pools = [pool("a", 0, &["10.0.0.10-10.0.0.19"])];
    let mut x = svc("x", 5);
    x.current = vec![ip("10.0.0.17")];
    let services = [svc("new", 1), x.clone()];
    let a = allocate(&pools, &services);
    assert_eq!(ips(&a, "x"), ["10.0.0.17"]);
    assert_eq!(ips(&a, "new"), ["10.0.0.10"]);
    // Feeding the result back changes nothing.
    let mut again = services.clone();
    again[0].current = vec![ip("10.0.0.10")];
    assert_eq!(allocate(&pools, &again).services, a.services);
    // An address no pool holds any more is given back and replaced.
    let moved = [pool("b", 0, &["10.0.1.0/29"])];
    let b = allocate(&moved, &[x]);
    assert_eq!(ips(&b, "x"), ["10.0.1.1"]);
}

#[test]
fn duplicate_current_address_goes_to_the_older_service() {
    let pools = [pool("a", 0, &["10.0.0.0/29"])];
    let mut old = svc("old", 1);
    let mut young = svc("young", 2);
    old.current = vec![ip("10.0.0.3")];
    young.current = vec![ip("10.0.0.3")];
    let a = allocate(&pools, &[young, old]);
    assert_eq!(ips(&a, "old"), ["10.0.0.3"]);
    assert_eq!(ips(&a, "young"), ["10.0.0.1"]);
}

#[test]
fn requested_addresses() {
    let pools = [pool("a", 0, &["10.0.0.0/29"])];
    let mut want = svc("want", 2);
    want.requested = Ok(vec![ip("10.0.0.5")]);
    let mut clash = svc("clash", 3);
    clash.requested = Ok(vec![ip("10.0.0.5")]);
    let mut outside = svc("outside", 4);
    outside.requested = Ok(vec![ip("192.0.2.1")]);
    let mut bad = svc("bad", 5);
    bad.requested = Err("ferry.dev/load-balancer-ips: \"x\" is not an address".into());
    let a = allocate(&pools, &[want.clone(), clash, outside, bad]);
    assert_eq!(ips(&a, "want"), ["10.0.0.5"]);
    assert_eq!(failure(&a, "clash"), Some(Failure::AddressInUse));
    let msg = &a.services[&ServiceName::new("default", "clash")]
        .failure
        .as_ref()
        .expect("a failure")
        .1;
    assert!(msg.contains("default/want"), "{msg}");
    assert_eq!(failure(&a, "outside"), Some(Failure::NoPool));
    assert_eq!(failure(&a, "bad"), Some(Failure::InvalidRequest));
    // A changed request moves the Service off its current address.
    want.current = vec![ip("10.0.0.5")];
    want.requested = Ok(vec![ip("10.0.0.6")]);
    assert_eq!(ips(&allocate(&pools, &[want]), "want"), ["10.0.0.6"]);
}

#[test]
fn sharing_needs_one_key_disjoint_ports_and_one_policy() {
    let pools = [pool("a", 0, &["10.0.0.0/29"])];
    let shared = |name: &str, created: i64, port: u16| {
        let mut s = svc(name, created);
        s.sharing_key = Some("k".into());
        s.ports = vec![(Protocol::Tcp, port)];
        s
    };
    let first = shared("first", 1, 80);
    let second = shared("second", 2, 443);
    let same_port = shared("sameport", 3, 80);
    let mut udp = shared("udp", 4, 80);
    udp.ports = vec![(Protocol::Udp, 80)];
    let mut local = shared("local", 5, 8080);
    local.local_policy = true;
    let mut other_key = shared("otherkey", 6, 9090);
    other_key.sharing_key = Some("j".into());
    let a = allocate(
        &pools,
        &[
            first,
            second,
            same_port,
            udp,
            local,
            other_key,
            svc("plain", 7),
        ],
    );
    assert_eq!(ips(&a, "first"), ["10.0.0.1"]);
    assert_eq!(ips(&a, "second"), ["10.0.0.1"]);
    assert_eq!(ips(&a, "udp"), ["10.0.0.1"]);
    assert_eq!(ips(&a, "sameport"), ["10.0.0.2"]);
    assert_eq!(ips(&a, "local"), ["10.0.0.3"]);
    assert_eq!(ips(&a, "otherkey"), ["10.0.0.4"]);
    assert_eq!(ips(&a, "plain"), ["10.0.0.5"]);
    assert_eq!(a.pools["a"].used, 5);
    // A requested shared address with a port clash is refused.
    let mut clash = shared("clash", 8, 443);
    clash.requested = Ok(vec![ip("10.0.0.1")]);
    let mut fine = shared("fine", 9, 22);
    fine.requested = Ok(vec![ip("10.0.0.1")]);
    let b = allocate(
        &pools,
        &[
            shared("first", 1, 80),
            shared("second", 2, 443),
            clash,
            fine,
        ],
    );
    assert_eq!(failure(&b, "clash"), Some(Failure::AddressInUse));
    assert_eq!(ips(&b, "fine"), ["10.0.0.1"]);
}

#[test]
fn selectors_disabled_and_overlapping_pools() {
    let mut prod = pool("prod", 0, &["10.0.1.0/30"]);
    prod.selector = Some(ServiceSelector {
        match_labels: [(
            crate::ipam::pool::NAMESPACE_LABEL.to_string(),
            "prod".to_string(),
        )]
        .into(),
        ..Default::default()
    });
    let mut off = pool("off", 0, &["10.0.2.0/30"]);
    off.disabled = true;
    let newer = pool("newer", 9, &["10.0.2.2-10.0.2.9"]);
    let mut in_prod = svc("p", 1);
    in_prod.name = ServiceName::new("prod", "p");
    in_prod.labels.insert(
        crate::ipam::pool::NAMESPACE_LABEL.to_string(),
        "prod".to_string(),
    );
    let mut kept = svc("kept", 2);
    kept.current = vec![ip("10.0.2.1")];
    let pools = [prod, off, newer];
    let a = allocate(&pools, &[in_prod, kept, svc("lost", 3)]);
    assert_eq!(
        a.services[&ServiceName::new("prod", "p")].addresses[0].0,
        ip("10.0.1.1")
    );
    // A disabled pool keeps its Services but hands out nothing new.
    assert_eq!(ips(&a, "kept"), ["10.0.2.1"]);
    assert_eq!(failure(&a, "lost"), Some(Failure::NoPool));
    let conflict = a.pools["newer"].conflict.as_deref().expect("a conflict");
    assert!(conflict.contains("pool off"), "{conflict}");
    assert_eq!(a.pools["off"].conflict, None);
    assert_eq!((a.pools["off"].total, a.pools["off"].used), (2, 1));
}

#[test]
fn dual_stack_gets_one_address_per_family() {
    let pools = [
        pool("v4", 0, &["10.0.0.0/30"]),
        pool("v6", 0, &["fd00::/126"]),
    ];
    let mut both = svc("both", 1);
    both.families = vec![false, true];
    let mut v6only = svc("v6only", 2);
    v6only.families = vec![true];
    let a = allocate(&pools[..1], &[both.clone()]);
    assert_eq!(ips(&a, "both"), ["10.0.0.1"]);
    assert_eq!(failure(&a, "both"), Some(Failure::NoPool));
    let b = allocate(&pools, &[both, v6only]);
    assert_eq!(ips(&b, "both"), ["10.0.0.1", "fd00::1"]);
    assert_eq!(ips(&b, "v6only"), ["fd00::2"]);
}
