//! Reads multi-document YAML (the file source's format and the golden
//! tests' input) into Kubernetes objects. A document that does not parse is
//! reported with its position and skipped; the others are kept.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

/// One object Ferry understands.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// A document that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: document {index}: {reason}")]
pub struct DocumentError {
    pub origin: String,
    pub index: usize,
    pub reason: String,
}

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
}

/// Parses every document of `text`; `origin` (a file name) goes into
/// errors. Empty documents are skipped; `List` objects are flattened.
pub fn parse_documents(text: &str, origin: &str) -> (Vec<Object>, Vec<DocumentError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(DocumentError {
                    origin: origin.into(),
                    index,
                    reason: format!("not YAML: {e}"),
                });
                // A syntax error ends the stream: nothing after it is usable.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        push_value(value, origin, index, &mut objects, &mut errors);
    }
    (objects, errors)
}

fn push_value(
    value: serde_yaml::Value,
    origin: &str,
    index: usize,
    objects: &mut Vec<Object>,
    errors: &mut Vec<DocumentError>,
) {
    let err = |reason: String| DocumentError {
        origin: origin.into(),
        index,
        reason,
    };
    let kind = match Header::deserialize(&value) {
        Ok(Header { kind: Some(k) }) => k,
        Ok(Header { kind: None }) => return errors.push(err("no kind".into())),
        Err(e) => return errors.push(err(format!("not an object: {e}"))),
    };
    let parsed = match kind.as_str() {
        "Service" => Service::deserialize(value).map(|s| Object::Service(Box::new(s))),
        "EndpointSlice" => {
            EndpointSlice::deserialize(value).map(|s| Object::EndpointSlice(Box::new(s)))
        }
        "Node" => Node::deserialize(value).map(|n| Object::Node(Box::new(n))),
        "List" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    push_value(item, origin, index, objects, errors);
                }
            }
            return;
        }
        other => return errors.push(err(format!("kind {other} is not used by ferry"))),
    };
    match parsed {
        Ok(o) => objects.push(o),
        Err(e) => errors.push(err(format!("invalid {kind}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_and_reports_bad_documents() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [198.18.1.1]}]
ports: [{port: 8080}]
---
kind: Service
metadata: {name: bad}
spec: {ports: "not a list"}
---
kind: ConfigMap
metadata: {name: x}
---
"#;
        let (objects, errors) = parse_documents(text, "test.yaml");
        assert_eq!(objects.len(), 2);
        assert!(matches!(objects[0], Object::Service(_)));
        assert!(matches!(objects[1], Object::EndpointSlice(_)));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].index, 2);
        assert!(errors[0].reason.contains("invalid Service"));
        assert!(errors[1].reason.contains("ConfigMap"));
    }
}
