//! Track + translate together, still pure: objects go in as they arrive
//! from any source; out comes the desired state and, per step, the frontend
//! keys a plan must look at. Invalid objects are kept aside with their
//! errors and never disturb other Services.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{FastSet, NodeInfo, ObjectName, ServiceName};
use crate::parse::{
    object_name, parse_node, parse_service, parse_slice, InvalidObject, ParsedService, ParsedSlice,
};
use crate::track::{ChangeTracker, EndpointSliceCache};
use crate::translate::{translate_service, DesiredState, Touched, TranslateConfig};

/// The service-proxy-name Ferry answers to by default.
pub const DEFAULT_PROXY_NAME: &str = "ferry";

type ServiceOutcome = Result<ParsedService, InvalidObject>;
type SliceOutcome = Result<ParsedSlice, InvalidObject>;
type TranslateResult = Result<Option<crate::model::ServiceDesired>, InvalidObject>;

/// A Service parsed ahead of [`Core::replace_parsed_services`] (a list
/// streamed in object by object).
pub type ParsedServiceEntry = (ServiceName, Arc<ServiceOutcome>);
/// An EndpointSlice parsed ahead of [`Core::replace_parsed_slices`].
pub type ParsedSliceEntry = (ObjectName, Arc<SliceOutcome>);

/// What one [`Core::translate_changes`] did.
#[derive(Debug, Default)]
pub struct Translated {
    /// Frontend keys and backend addresses whose desired state may differ
    /// from before: the scope of an incremental plan.
    pub touched: Touched,
    /// Services translated again.
    pub services: usize,
    /// Services whose endpoints changed.
    pub endpoint_changes: usize,
    /// Services that changed (added, updated, deleted).
    pub service_changes: usize,
    /// Trigger times (unix ms) of the EndpointSlice changes taken in.
    pub trigger_times_ms: Vec<i64>,
    /// Everything was translated (node change or first run).
    pub full: bool,
}

#[derive(Debug)]
pub struct Core {
    proxy_name: String,
    node: NodeInfo,
    /// This node as the local interfaces show it: in force while no source
    /// delivers a Node object of its name.
    local_node: NodeInfo,
    cfg: TranslateConfig,
    services: ChangeTracker<ServiceName, Arc<ServiceOutcome>>,
    slices: ChangeTracker<ObjectName, Arc<SliceOutcome>>,
    cache: EndpointSliceCache,
    desired: DesiredState,
    /// Invalid objects by (kind, name), with their error.
    invalid: BTreeMap<(&'static str, ObjectName), InvalidObject>,
    /// Services refused because another held their address or NodePort:
    /// tried again whenever a Service goes away or changes.
    clash_refused: BTreeSet<ServiceName>,
    node_changed: bool,
}

impl Core {
    pub fn new(proxy_name: &str, node: NodeInfo, cfg: TranslateConfig) -> Core {
        Core {
            proxy_name: proxy_name.into(),
            local_node: node.clone(),
            node,
            cfg,
            services: ChangeTracker::default(),
            slices: ChangeTracker::default(),
            cache: EndpointSliceCache::default(),
            desired: DesiredState::default(),
            invalid: BTreeMap::new(),
            clash_refused: BTreeSet::new(),
            node_changed: true,
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// This node from the Node objects a source delivered: ours by name
    /// (NodePorts on its addresses within `nodeport_cidrs`; empty: all),
    /// else the node as the local interfaces show it. Returns whether ours
    /// is being deleted.
    pub fn set_node_from(&mut self, nodes: &[Node], nodeport_cidrs: &[IpNet]) -> bool {
        let name = self.local_node.name.as_str();
        let ours = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name));
        let deleting = ours.is_some_and(|n| n.metadata.deletion_timestamp.is_some());
        let node = ours.map_or_else(
            || self.local_node.clone(),
            |n| parse_node(n, nodeport_cidrs),
        );
        self.set_node(node);
        deleting
    }

    pub fn set_node(&mut self, node: NodeInfo) {
        if node != self.node {
            self.node = node;
            self.node_changed = true;
        }
    }

    pub fn upsert_service(&mut self, svc: &Service) {
        let name = object_name(&svc.metadata);
        let parsed = parse_service(svc, &self.proxy_name);
        self.services.update(name, Some(Arc::new(parsed)));
    }

    pub fn delete_service(&mut self, name: &ServiceName) {
        self.services.update(name.clone(), None);
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let name = object_name(&slice.metadata);
        self.slices.update(name, Some(Arc::new(parse_slice(slice))));
    }

    pub fn delete_slice(&mut self, name: &ObjectName) {
        self.slices.update(name.clone(), None);
    }

    /// Replaces every Service (a relist); missing ones are deleted.
    pub fn replace_services(&mut self, svcs: &[Service]) {
        let parsed: Vec<ParsedServiceEntry> =
            svcs.iter().map(|s| self.parse_service_entry(s)).collect();
        self.replace_parsed_services(parsed);
    }

    /// Replaces every EndpointSlice (a relist); missing ones are deleted.
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) {
        let parsed: Vec<ParsedSliceEntry> = slices.iter().map(Core::parse_slice_entry).collect();
        self.replace_parsed_slices(parsed);
    }

    /// Parses one Service of a list, to be handed to
    /// [`Core::replace_parsed_services`] with the rest.
    pub fn parse_service_entry(&self, svc: &Service) -> ParsedServiceEntry {
        (
            object_name(&svc.metadata),
            Arc::new(parse_service(svc, &self.proxy_name)),
        )
    }

    /// Parses one EndpointSlice of a list.
    pub fn parse_slice_entry(slice: &EndpointSlice) -> ParsedSliceEntry {
        (object_name(&slice.metadata), Arc::new(parse_slice(slice)))
    }

    /// Replaces every Service with a parsed list; missing ones are deleted.
    pub fn replace_parsed_services(&mut self, items: Vec<ParsedServiceEntry>) {
        self.services.replace_all(items);
    }

    /// Replaces every EndpointSlice with a parsed list.
    pub fn replace_parsed_slices(&mut self, items: Vec<ParsedSliceEntry>) {
        self.slices.replace_all(items);
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Every invalid object with its error, in name order.
    pub fn invalid(&self) -> impl Iterator<Item = &InvalidObject> {
        self.invalid.values()
    }

    /// Services Ferry does not serve, with the reason, in name order.
    pub fn ignored(&self) -> Vec<(ServiceName, &'static str)> {
        let mut out: Vec<_> = self
            .services
            .current()
            .iter()
            .filter_map(|(n, o)| match o.as_ref() {
                Ok(ParsedService::Ignore(why)) => Some((n.clone(), *why)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// Number of Services and EndpointSlices known (valid or not).
    pub fn object_counts(&self) -> (usize, usize) {
        (self.services.current().len(), self.slices.current().len())
    }

    /// Applies the pending changes to the desired state.
    pub fn translate_changes(&mut self) -> Translated {
        let mut out = Translated::default();
        let mut todo: FastSet<ServiceName> = FastSet::default();
        for change in self.slices.take() {
            let slice = change.current.as_ref().and_then(|o| match o.as_ref() {
                Ok(ParsedSlice::Serve(s)) => Some(s.clone()),
                _ => None,
            });
            if let Some(t) = slice.as_ref().and_then(|s| s.trigger_time_ms) {
                out.trigger_times_ms.push(t);
            }
            if !self.invalid.is_empty() {
                self.invalid.remove(&("EndpointSlice", change.key.clone()));
            }
            if let Some(Err(e)) = change.current.as_deref() {
                self.invalid
                    .insert(("EndpointSlice", change.key.clone()), e.clone());
            }
            todo.extend(self.cache.update(change.key, slice));
        }
        out.endpoint_changes = todo.len();
        let service_changes = self.services.take();
        let any_service_change = !service_changes.is_empty();
        out.service_changes = service_changes.len();
        todo.extend(service_changes.into_iter().map(|c| c.key));
        if std::mem::take(&mut self.node_changed) {
            out.full = true;
            self.desired.reserve(self.services.current().len());
            todo.extend(self.services.current().keys().cloned());
        }
        if any_service_change {
            todo.extend(self.clash_refused.iter().cloned());
        }
        // Oldest first, so the older of two clashing Services wins.
        let mut ordered: Vec<(i64, ServiceName)> =
            todo.into_iter().map(|n| (self.created(&n), n)).collect();
        ordered.sort_unstable();
        // (Spreading this over threads was measured: no gain, the work is
        // bound by memory and the sequential commit.)
        let results: Vec<TranslateResult> =
            ordered.iter().map(|(_, n)| self.translate_one(n)).collect();
        // A full plan looks at everything: no need to record what changed.
        let mut touched = (!out.full).then_some(&mut out.touched);
        for ((_, name), result) in ordered.iter().zip(results) {
            out.services += 1;
            self.commit(name, result, touched.as_deref_mut());
        }
        out.touched.normalize();
        out
    }

    fn translate_one(&self, name: &ServiceName) -> TranslateResult {
        match self.services.get(name).map(std::convert::AsRef::as_ref) {
            Some(Ok(ParsedService::Serve(info))) => {
                translate_service(info, &self.cache, &self.node, &self.cfg).map(Some)
            }
            Some(Ok(ParsedService::Ignore(_))) | None => Ok(None),
            Some(Err(e)) => Err(e.clone()),
        }
    }

    fn created(&self, name: &ServiceName) -> i64 {
        match self.services.get(name).map(std::convert::AsRef::as_ref) {
            Some(Ok(ParsedService::Serve(info))) => info.created,
            _ => 0,
        }
    }

    /// Puts one Service's translation into the desired state, recording
    /// errors and clashes.
    fn commit(
        &mut self,
        name: &ServiceName,
        result: TranslateResult,
        touched: Option<&mut Touched>,
    ) {
        if !self.invalid.is_empty() {
            self.invalid.remove(&("Service", name.clone()));
        }
        if !self.clash_refused.is_empty() {
            self.clash_refused.remove(name);
        }
        let result = match result {
            Ok(desired) => {
                let r = self.desired.set(name, desired, touched);
                if r.is_err() {
                    self.clash_refused.insert(name.clone());
                }
                r
            }
            Err(e) => self.desired.set(name, None, touched).and(Err(e)),
        };
        if let Err(e) = result {
            self.invalid.insert(("Service", name.clone()), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn this_node_by_name_else_the_local_one() {
        let local = NodeInfo {
            name: "node-a".into(),
            zone: None,
            nodeport_addresses: vec!["198.18.0.1".parse().unwrap()],
        };
        let mut core = Core::new("", local.clone(), TranslateConfig::default());
        let other = node("metadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 198.18.0.2}]}");
        assert!(!core.set_node_from(std::slice::from_ref(&other), &[]));
        assert_eq!(core.node(), &local, "another node's object changes nothing");
        let ours = node(
            "metadata: {name: node-a, deletionTimestamp: '2026-12-06T00:00:00Z'}\n\
             status: {addresses: [{type: InternalIP, address: 198.18.0.9}]}",
        );
        assert!(core.set_node_from(&[other, ours], &[]), "being deleted");
        assert_eq!(
            core.node().nodeport_addresses,
            vec!["198.18.0.9".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(!core.set_node_from(&[], &[]));
        assert_eq!(core.node(), &local, "no Node object: the local view again");
    }
}
