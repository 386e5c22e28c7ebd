//! Sources: the I/O edges that deliver Kubernetes objects to the sync
//! loop, as events on a channel.

pub mod file;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// Every object the source has now (a relist): anything not in it is
    /// gone. The first snapshot also marks the source as synced.
    Snapshot {
        source: &'static str,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    },
}
