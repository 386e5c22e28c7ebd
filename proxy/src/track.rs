//! The track stage: coalesces object events into {previous, current} per
//! key and drops no-ops; caches EndpointSlices per Service (endpoints may
//! move between slices or appear in two at once); and gates pruning until
//! every source has listed.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::sync::Arc;

use crate::model::{EndpointInfo, FastMap, ObjectName, Protocol, ServiceName, SliceInfo};

/// One key's net change since the last [`ChangeTracker::take`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change<K, V> {
    pub key: K,
    pub previous: Option<V>,
    pub current: Option<V>,
}

/// Current values plus the pending changes since the last take; a change
/// that returns a key to its previous value disappears.
#[derive(Debug)]
pub struct ChangeTracker<K, V> {
    current: FastMap<K, V>,
    pending: FastMap<K, Option<V>>,
}

impl<K, V> Default for ChangeTracker<K, V> {
    fn default() -> Self {
        ChangeTracker {
            current: FastMap::default(),
            pending: FastMap::default(),
        }
    }
}

impl<K: Clone + Eq + Hash, V: Clone + PartialEq> ChangeTracker<K, V> {
    /// Records `value` (None: deleted) for `key`.
    pub fn update(&mut self, key: K, value: Option<V>) {
        if !self.pending.contains_key(&key) {
            let previous = self.current.get(&key).cloned();
            self.pending.insert(key.clone(), previous);
        }
        // Back to what it was before the pending change: nothing pending.
        if self.pending.get(&key) == Some(&value) {
            self.pending.remove(&key);
        }
        match value {
            Some(v) => {
                self.current.insert(key, v);
            }
            None => {
                self.current.remove(&key);
            }
        }
    }

    /// Replaces everything with `items` (a relist): keys missing from it are
    /// deleted.
    pub fn replace_all(&mut self, items: impl IntoIterator<Item = (K, V)>) {
        let fresh: FastMap<K, V> = items.into_iter().collect();
        let gone: Vec<K> = self
            .current
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.update(k, None);
        }
        for (k, v) in fresh {
            self.update(k, Some(v));
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.current.get(key)
    }

    pub fn current(&self) -> &FastMap<K, V> {
        &self.current
    }

    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The net changes since the last take; the tracker starts afresh.
    pub fn take(&mut self) -> Vec<Change<K, V>> {
        self.pending
            .drain()
            .map(|(key, previous)| Change {
                current: self.current.get(&key).cloned(),
                key,
                previous,
            })
            .collect()
    }
}

/// An endpoint of one Service port: the address, its port for that Service
/// port and what its slice said about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortEndpoint<'a> {
    pub port: u16,
    pub info: &'a EndpointInfo,
}

/// EndpointSlices indexed by the Service they belong to.
#[derive(Debug, Default)]
pub struct EndpointSliceCache {
    slices: FastMap<ObjectName, Arc<SliceInfo>>,
    by_service: FastMap<ServiceName, BTreeSet<ObjectName>>,
}

impl EndpointSliceCache {
    /// Sets or deletes one slice; returns the Services whose endpoints may
    /// have changed (two when the slice changed owner).
    pub fn update(&mut self, name: ObjectName, slice: Option<Arc<SliceInfo>>) -> Vec<ServiceName> {
        let mut touched = Vec::new();
        if let Some(old) = self.slices.remove(&name) {
            if let Some(set) = self.by_service.get_mut(&old.service) {
                set.remove(&name);
                if set.is_empty() {
                    self.by_service.remove(&old.service);
                }
            }
            touched.push(old.service.clone());
        }
        if let Some(new) = slice {
            self.by_service
                .entry(new.service.clone())
                .or_default()
                .insert(name.clone());
            if !touched.contains(&new.service) {
                touched.push(new.service.clone());
            }
            self.slices.insert(name, new);
        }
        touched
    }

    pub fn len(&self) -> usize {
        self.slices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Every endpoint of `service` for the Service port named `port_name`
    /// with `protocol`, merged over its slices in slice-name order. An
    /// address listed twice (in two slices, or moving between them) appears
    /// once, with its best state (ready > serving+terminating > other).
    pub fn endpoints(
        &self,
        service: &ServiceName,
        port_name: &str,
        protocol: Protocol,
    ) -> Vec<PortEndpoint<'_>> {
        let Some(names) = self.by_service.get(service) else {
            return Vec::new();
        };
        let mut merged: Vec<(usize, PortEndpoint<'_>)> = Vec::new();
        for slice in names.iter().filter_map(|n| self.slices.get(n)) {
            let Some(port) = slice
                .ports
                .iter()
                .find(|p| &*p.name == port_name && p.protocol == protocol)
            else {
                continue;
            };
            let base = merged.len();
            merged.extend(slice.endpoints.iter().enumerate().map(|(i, info)| {
                (
                    base + i,
                    PortEndpoint {
                        port: port.port,
                        info,
                    },
                )
            }));
        }
        // Address order; among duplicates the best state first, then the
        // earliest (slice-name order), and keep that one.
        merged.sort_unstable_by(|(ia, a), (ib, b)| {
            (a.info.ip, a.port)
                .cmp(&(b.info.ip, b.port))
                .then(b.info.state.rank().cmp(&a.info.state.rank()))
                .then(ia.cmp(ib))
        });
        merged.dedup_by(|(_, later), (_, first)| {
            (later.info.ip, later.port) == (first.info.ip, first.port)
        });
        merged.into_iter().map(|(_, e)| e).collect()
    }
}

/// Pruning waits until every source has delivered its initial list.
#[derive(Debug, Clone)]
pub struct SyncedGate {
    sources: BTreeMap<&'static str, bool>,
}

impl SyncedGate {
    pub fn new(sources: &[&'static str]) -> SyncedGate {
        SyncedGate {
            sources: sources.iter().map(|s| (*s, false)).collect(),
        }
    }

    pub fn mark_synced(&mut self, source: &'static str) {
        self.sources.insert(source, true);
    }

    pub fn all_synced(&self) -> bool {
        self.sources.values().all(|s| *s)
    }

    /// The sources still waiting for their initial list.
    pub fn waiting(&self) -> Vec<&'static str> {
        self.sources
            .iter()
            .filter(|(_, s)| !**s)
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointState, SlicePort};

    #[test]
    fn tracker_drops_noops_and_coalesces() {
        let mut t: ChangeTracker<&str, u32> = ChangeTracker::default();
        t.update("a", Some(1));
        t.update("a", Some(2));
        let changes = t.take();
        assert_eq!(
            changes,
            vec![Change {
                key: "a",
                previous: None,
                current: Some(2)
            }]
        );
        t.update("a", Some(3));
        t.update("a", Some(2));
        assert!(!t.has_changes(), "back to the previous value is a no-op");
        t.update("a", Some(2));
        assert!(!t.has_changes(), "same value is a no-op");
        t.update("b", Some(1));
        t.update("b", None);
        assert!(t.take().is_empty(), "add then delete is a no-op");
    }

    #[test]
    fn tracker_replace_all_deletes_missing_keys() {
        let mut t: ChangeTracker<&str, u32> = ChangeTracker::default();
        t.update("a", Some(1));
        t.update("b", Some(1));
        t.take();
        t.replace_all([("b", 1), ("c", 5)]);
        let mut changes = t.take();
        changes.sort_by_key(|c| c.key);
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].key, changes[0].current), ("a", None));
        assert_eq!((changes[1].key, changes[1].current), ("c", Some(5)));
    }

    fn ep(ip: &str, state: EndpointState) -> EndpointInfo {
        EndpointInfo {
            ip: ip.parse().unwrap(),
            state,
            node: None,
            zone: None,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn slice(name: &str, svc: &str, eps: Vec<EndpointInfo>) -> Arc<SliceInfo> {
        Arc::new(SliceInfo {
            name: ObjectName::new("ns", name),
            service: ObjectName::new("ns", svc),
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: eps,
            trigger_time_ms: None,
        })
    }

    const TERMINATING: EndpointState = EndpointState {
        ready: false,
        serving: true,
        terminating: true,
    };

    #[test]
    fn cache_merges_duplicates_with_best_state() {
        let mut c = EndpointSliceCache::default();
        let svc = ObjectName::new("ns", "web");
        c.update(
            ObjectName::new("ns", "web-a"),
            Some(slice("web-a", "web", vec![ep("10.0.0.1", TERMINATING)])),
        );
        c.update(
            ObjectName::new("ns", "web-b"),
            Some(slice(
                "web-b",
                "web",
                vec![
                    ep("10.0.0.1", EndpointState::READY),
                    ep("10.0.0.2", EndpointState::READY),
                ],
            )),
        );
        let eps = c.endpoints(&svc, "http", Protocol::Tcp);
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| e.info.state.ready));
        assert!(c.endpoints(&svc, "http", Protocol::Udp).is_empty());
        assert!(c.endpoints(&svc, "other", Protocol::Tcp).is_empty());
    }

    #[test]
    fn cache_endpoint_moving_between_slices_is_seen_once() {
        let mut c = EndpointSliceCache::default();
        let svc = ObjectName::new("ns", "web");
        let a = ObjectName::new("ns", "web-a");
        let b = ObjectName::new("ns", "web-b");
        c.update(
            a.clone(),
            Some(slice(
                "web-a",
                "web",
                vec![ep("10.0.0.1", EndpointState::READY)],
            )),
        );
        // Added to b before it is removed from a.
        c.update(
            b.clone(),
            Some(slice(
                "web-b",
                "web",
                vec![ep("10.0.0.1", EndpointState::READY)],
            )),
        );
        assert_eq!(c.endpoints(&svc, "http", Protocol::Tcp).len(), 1);
        c.update(a.clone(), Some(slice("web-a", "web", vec![])));
        assert_eq!(c.endpoints(&svc, "http", Protocol::Tcp).len(), 1);
        assert_eq!(c.update(b, None), vec![svc.clone()]);
        assert!(c.endpoints(&svc, "http", Protocol::Tcp).is_empty());
    }

    #[test]
    fn cache_reports_both_services_when_a_slice_changes_owner() {
        let mut c = EndpointSliceCache::default();
        let n = ObjectName::new("ns", "s");
        c.update(n.clone(), Some(slice("s", "one", vec![])));
        let touched = c.update(n, Some(slice("s", "two", vec![])));
        assert_eq!(
            touched,
            vec![ObjectName::new("ns", "one"), ObjectName::new("ns", "two")]
        );
    }

    #[test]
    fn gate_opens_when_every_source_synced() {
        let mut g = SyncedGate::new(&["services", "endpointslices"]);
        assert!(!g.all_synced());
        g.mark_synced("services");
        assert_eq!(g.waiting(), vec!["endpointslices"]);
        g.mark_synced("endpointslices");
        assert!(g.all_synced());
    }
}
