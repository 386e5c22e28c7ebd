//! Allocation, pure: (pools, LoadBalancer Services with the addresses their
//! status already shows) -> the addresses each Service should have, why a
//! Service has none, and what each pool has left. Stateless by design: the
//! Services' status is the record, so a restarted allocator rebuilds the
//! same allocation and moves no address.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::pool::{from_int, selects, to_int, PoolInfo};
use crate::model::{Protocol, ServiceName};

/// A Service of type LoadBalancer that is ours to serve.
#[derive(Clone, Debug, PartialEq)]
pub struct LbService {
    pub name: ServiceName,
    /// Its labels plus the namespace and name pseudo-labels.
    pub labels: BTreeMap<String, String>,
    /// metadata.creationTimestamp (unix seconds): the older Service wins.
    pub created: i64,
    /// The families it wants an address of (false: IPv4, true: IPv6).
    pub families: Vec<bool>,
    /// Requested addresses (annotation or spec.loadBalancerIP); Err when
    /// the request cannot be parsed.
    pub requested: Result<Vec<IpAddr>, String>,
    /// `ferry.dev/sharing-key`: Services with the same key may share an
    /// address when their ports do not clash.
    pub sharing_key: Option<String>,
    pub ports: Vec<(Protocol, u16)>,
    /// externalTrafficPolicy Local (sharers must agree on it).
    pub local_policy: bool,
    /// The addresses its status shows now.
    pub current: Vec<IpAddr>,
}

/// Why a Service did not get (all) its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The requested address or the request is not acceptable.
    InvalidRequest,
    /// The requested address is held by a Service it cannot be shared with.
    AddressInUse,
    /// No enabled pool selects the Service (or holds the requested address).
    NoPool,
    /// The pools that select it have no free address.
    PoolExhausted,
}

impl Failure {
    /// The condition reason and Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::InvalidRequest => "InvalidRequest",
            Failure::AddressInUse => "AddressInUse",
            Failure::NoPool => "NoPool",
            Failure::PoolExhausted => "PoolExhausted",
        }
    }
}

/// The allocation of one Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Its addresses, each with the pool it comes from.
    pub addresses: Vec<(IpAddr, Arc<str>)>,
    pub failure: Option<(Failure, String)>,
}

/// What the allocator reports on one pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolReport {
    pub total: u64,
    pub used: u64,
    /// Overlaps an older pool: not used.
    pub conflict: Option<String>,
    pub invalid: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocations {
    pub services: BTreeMap<ServiceName, Outcome>,
    pub pools: BTreeMap<Arc<str>, PoolReport>,
}

/// A Service holding an address.
struct Holder<'a> {
    svc: &'a LbService,
}

/// Whether `svc` may take an address these Services hold.
fn compatible(holders: &[Holder<'_>], svc: &LbService) -> Result<(), String> {
    let Some(first) = holders.first() else {
        return Ok(());
    };
    if holders.iter().any(|h| h.svc.name == svc.name) {
        return Ok(());
    }
    let other = &first.svc.name;
    match (&svc.sharing_key, &first.svc.sharing_key) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(format!("held by {other} (no common sharing key)")),
    }
    for h in holders {
        if h.svc.local_policy != svc.local_policy {
            return Err(format!(
                "held by {} with another externalTrafficPolicy",
                h.svc.name
            ));
        }
        if let Some((proto, port)) = svc.ports.iter().find(|p| h.svc.ports.contains(p)) {
            return Err(format!(
                "held by {}, which also uses {port}/{proto:?}",
                h.svc.name
            ));
        }
    }
    Ok(())
}

struct State<'a> {
    /// Usable pools (valid, no conflict), oldest first.
    pools: Vec<&'a PoolInfo>,
    usage: HashMap<IpAddr, Vec<Holder<'a>>>,
    /// Per (pool, range): where the search for a free address resumes.
    cursors: HashMap<(usize, usize), u128>,
}

impl<'a> State<'a> {
    /// The first usable pool selecting `svc` that contains `ip`.
    fn pool_of(&self, ip: IpAddr, svc: &LbService, enabled_only: bool) -> Option<&'a PoolInfo> {
        self.pools.iter().copied().find(|p| {
            (!enabled_only || !p.disabled)
                && p.ranges.iter().any(|r| r.contains(ip))
                && selects(p.selector.as_ref(), &svc.labels)
        })
    }

    fn take(&mut self, ip: IpAddr, svc: &'a LbService) {
        let holders = self.usage.entry(ip).or_default();
        if !holders.iter().any(|h| h.svc.name == svc.name) {
            holders.push(Holder { svc });
        }
    }

    /// A new address of family `v6` for `svc`: a compatible shared one
    /// first (with a sharing key), then the first free one.
    fn pick(&mut self, svc: &'a LbService, v6: bool) -> Result<(IpAddr, Arc<str>), Failure> {
        let selecting: Vec<usize> = (0..self.pools.len())
            .filter(|&i| {
                let p = self.pools[i];
                !p.disabled
                    && p.ranges.iter().any(|r| r.v6 == v6)
                    && selects(p.selector.as_ref(), &svc.labels)
            })
            .collect();
        if selecting.is_empty() {
            return Err(Failure::NoPool);
        }
        if svc.sharing_key.is_some() {
            let mut shared: Vec<IpAddr> = self
                .usage
                .iter()
                .filter(|(ip, h)| ip.is_ipv6() == v6 && compatible(h, svc).is_ok())
                .map(|(ip, _)| *ip)
                .collect();
            shared.sort();
            for ip in shared {
                if let Some(pool) = self.pool_of(ip, svc, true) {
                    return Ok((ip, pool.name.clone()));
                }
            }
        }
        for i in selecting {
            let pool = self.pools[i];
            for (j, r) in pool.ranges.iter().enumerate() {
                if r.v6 != v6 {
                    continue;
                }
                let cursor = self.cursors.entry((i, j)).or_insert(r.first);
                while *cursor <= r.last {
                    let ip = from_int(v6, *cursor);
                    *cursor += 1;
                    if !self.usage.contains_key(&ip) {
                        return Ok((ip, pool.name.clone()));
                    }
                }
            }
        }
        Err(Failure::PoolExhausted)
    }
}

/// Marks pools overlapping an older one as conflicting; returns the
/// reports and the usable pools, oldest first.
fn check_pools(pools: &[PoolInfo]) -> (BTreeMap<Arc<str>, PoolReport>, Vec<&PoolInfo>) {
    let mut sorted: Vec<&PoolInfo> = pools.iter().collect();
    sorted.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut reports = BTreeMap::new();
    let mut usable: Vec<&PoolInfo> = Vec::new();
    for p in sorted {
        let mut report = PoolReport {
            total: p
                .ranges
                .iter()
                .map(|r| u64::try_from(r.size()).unwrap_or(u64::MAX))
                .fold(0u64, u64::saturating_add),
            invalid: p.invalid.clone(),
            ..Default::default()
        };
        let clash = usable.iter().find_map(|older| {
            p.ranges.iter().find_map(|r| {
                older
                    .ranges
                    .iter()
                    .find(|o| o.overlaps(r))
                    .map(|o| format!("{r} overlaps {o} of pool {}", older.name))
            })
        });
        report.conflict = clash;
        if report.conflict.is_none() && report.invalid.is_none() {
            usable.push(p);
        }
        reports.insert(p.name.clone(), report);
    }
    (reports, usable)
}

/// The allocation of every Service (see the module doc).
pub fn allocate(pools: &[PoolInfo], services: &[LbService]) -> Allocations {
    let (mut reports, usable) = check_pools(pools);
    let mut order: Vec<&LbService> = services.iter().collect();
    order.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut state = State {
        pools: usable,
        usage: HashMap::new(),
        cursors: HashMap::new(),
    };
    let mut outcomes: BTreeMap<ServiceName, Outcome> = BTreeMap::new();
    // Keep every current address that is still valid, oldest Service first.
    for svc in &order {
        let mut outcome = Outcome::default();
        for &ip in &svc.current {
            let requested_elsewhere = match &svc.requested {
                Ok(r) => !r.is_empty() && !r.contains(&ip),
                Err(_) => false,
            };
            if requested_elsewhere {
                continue;
            }
            let usage = state.usage.get(&ip).map_or(&[][..], |h| &h[..]);
            if compatible(usage, svc).is_err() {
                continue;
            }
            if let Some(pool) = state.pool_of(ip, svc, false) {
                let pool = pool.name.clone();
                state.take(ip, svc);
                outcome.addresses.push((ip, pool));
            }
        }
        outcomes.insert(svc.name.clone(), outcome);
    }
    // Then give each Service what it still lacks.
    for svc in &order {
        let mut outcome = outcomes.remove(&svc.name).unwrap_or_default();
        outcome.failure = fill(&mut state, svc, &mut outcome.addresses).err();
        outcomes.insert(svc.name.clone(), outcome);
    }
    for (ip, _) in state.usage.iter() {
        let (v6, n) = to_int(*ip);
        if let Some(p) = state.pools.iter().find(|p| {
            p.ranges
                .iter()
                .any(|r| r.v6 == v6 && (r.first..=r.last).contains(&n))
        }) {
            if let Some(r) = reports.get_mut(&p.name) {
                r.used += 1;
            }
        }
    }
    Allocations {
        services: outcomes,
        pools: reports,
    }
}

/// Adds the requested addresses, or one of each wanted family.
fn fill<'a>(
    state: &mut State<'a>,
    svc: &'a LbService,
    have: &mut Vec<(IpAddr, Arc<str>)>,
) -> Result<(), (Failure, String)> {
    let requested = svc
        .requested
        .as_ref()
        .map_err(|e| (Failure::InvalidRequest, e.clone()))?;
    if !requested.is_empty() {
        for &ip in requested {
            if have.iter().any(|(h, _)| *h == ip) {
                continue;
            }
            let Some(pool) = state.pool_of(ip, svc, true) else {
                return Err((
                    Failure::NoPool,
                    format!("no enabled pool selecting this Service holds {ip}"),
                ));
            };
            let usage = state.usage.get(&ip).map_or(&[][..], |h| &h[..]);
            compatible(usage, svc)
                .map_err(|why| (Failure::AddressInUse, format!("{ip} is {why}")))?;
            let pool = pool.name.clone();
            state.take(ip, svc);
            have.push((ip, pool));
        }
        return Ok(());
    }
    for &v6 in &svc.families {
        if have.iter().any(|(ip, _)| ip.is_ipv6() == v6) {
            continue;
        }
        let family = if v6 { "IPv6" } else { "IPv4" };
        match state.pick(svc, v6) {
            Ok((ip, pool)) => {
                state.take(ip, svc);
                have.push((ip, pool));
            }
            Err(Failure::NoPool) => {
                return Err((
                    Failure::NoPool,
                    format!("no enabled {family} pool selects this Service"),
                ))
            }
            Err(f) => {
                return Err((
                    f,
                    format!("every {family} pool selecting this Service is full"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
}
