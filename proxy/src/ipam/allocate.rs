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
    for ip in state.usage.keys() {
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
#[path = "allocate_tests.rs"]
mod tests;
