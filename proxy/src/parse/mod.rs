//! Parses Kubernetes objects into the model, validating every field Ferry
//! uses. A bad object yields an [`InvalidObject`] naming its kind,
//! namespace/name, the field and the cause; it never panics.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

mod annotations;
mod node;
mod service;
mod slice;

pub use node::parse_node;
pub use service::{parse_service, ParsedService, PROXY_NAME_LABEL};
pub use slice::{parse_slice, ParsedSlice, HEADLESS_LABEL, SERVICE_NAME_LABEL};

use crate::model::ObjectName;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// An object Ferry cannot serve, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct InvalidObject {
    pub kind: &'static str,
    pub object: ObjectName,
    pub field: String,
    pub reason: String,
}

/// The object's namespace/name ("default" namespace when unset).
/// Whether `meta` carries the label `key` (with any value).
pub fn has_label(meta: &ObjectMeta, key: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(key))
}

pub fn object_name(meta: &ObjectMeta) -> ObjectName {
    ObjectName::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// A port number from the API's i32, which must be 1..=65535.
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}
