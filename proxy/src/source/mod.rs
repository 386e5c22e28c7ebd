//! Sources: the I/O edges that deliver Kubernetes objects to the sync
//! loop, as events on a channel.

pub mod file;
pub mod kube;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The kinds a source lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Services,
    Slices,
    Nodes,
}

/// One kind listed anew, streamed: `Begin`, each object, `End`; at `End`
/// the list replaces that kind (anything not in it is gone). The kube
/// source streams its lists so the decoded objects of a whole list of a
/// large cluster are never held at once: each is parsed and dropped as it
/// arrives.
#[derive(Debug)]
pub enum Listing {
    Begin(ListKind),
    Item(crate::objects::Object),
    End(ListKind),
}

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// One kind listed anew, streamed (the first list marks that kind as
    /// synced).
    Listing(Listing),
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
