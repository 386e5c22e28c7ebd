//! Sources: the I/O edges that deliver Kubernetes objects to the sync
//! loop, as events on a channel.

pub mod file;
pub mod kube;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Every object of one kind, after a (re)list: anything not in it is gone.
#[derive(Debug)]
pub enum Relist {
    Services(Vec<Service>),
    Slices(Vec<EndpointSlice>),
    /// This node (zero or one object).
    Nodes(Vec<Node>),
}

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// One kind listed anew (the first one marks that kind as synced).
    Relist(Relist),
    /// An object was added or changed.
    Apply(crate::objects::Object),
    /// An object was deleted (its last state).
    Delete(crate::objects::Object),
    /// Every object the source has now (a relist): anything not in it is
    /// gone. The first snapshot also marks the source as synced.
    Snapshot {
        source: &'static str,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    },
}
