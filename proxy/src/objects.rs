//! Reads multi-document YAML (the file source's format and the golden
//! tests' input) into Kubernetes objects. A document that does not parse is
//! reported with its position and skipped; the others are kept.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use yaml_serde::Value;

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
    /// The document is not YAML at all (as a torn or garbled file is),
    /// rather than a YAML object Ferry cannot use.
    pub syntax: bool,
}

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
}

/// Parses every document of `text`; `origin` (a file name) goes into
/// errors. Empty documents are skipped; `List` objects are flattened. A
/// document is parsed once into a tree; only when its object turns out
/// invalid is it parsed again as that object, for the line and column of
/// the bad field.
pub fn parse_documents(text: &str, origin: &str) -> (Vec<Object>, Vec<DocumentError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, (first_line, doc)) in split_documents(text).into_iter().enumerate() {
        let err = |reason: String| DocumentError {
            origin: origin.into(),
            index,
            reason,
            syntax: false,
        };
        let mut value: Value = match yaml_serde::from_str(doc) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(DocumentError {
                    syntax: true,
                    ..err(format!("not YAML: {}", message(&e, first_line)))
                });
                continue;
            }
        };
        if let Err(e) = value.apply_merge() {
            errors.push(err(format!("bad merge key: {e}")));
            continue;
        }
        let kind = match Header::deserialize(&value) {
            Ok(Header { kind: Some(k) }) => k,
            Ok(Header { kind: None }) => {
                errors.push(err("no kind".into()));
                continue;
            }
            Err(e) => {
                errors.push(err(format!("not an object: {e}")));
                continue;
            }
        };
        if kind == "List" {
            for item in list_items(value) {
                match item_object(item) {
                    Ok(o) => objects.push(o),
                    Err(e) => errors.push(err(format!("in a List: {e}"))),
                }
            }
            continue;
        }
        match to_object(&kind, value) {
            Ok(Some(o)) => objects.push(o),
            Ok(None) => errors.push(err(format!("kind {kind} is not used by ferry"))),
            Err(e) => {
                let at = positioned(&kind, doc, first_line).unwrap_or_else(|| e.to_string());
                errors.push(err(format!("invalid {kind}: {at}")));
            }
        }
    }
    (objects, errors)
}

/// The object of a tree of kind `kind`; None for a kind Ferry does not use.
fn to_object(kind: &str, value: Value) -> Result<Option<Object>, yaml_serde::Error> {
    Ok(Some(match kind {
        "Service" => Object::Service(Box::new(Service::deserialize(value)?)),
        "EndpointSlice" => Object::EndpointSlice(Box::new(EndpointSlice::deserialize(value)?)),
        "Node" => Object::Node(Box::new(Node::deserialize(value)?)),
        _ => return Ok(None),
    }))
}

/// The items of a `List`.
fn list_items(value: Value) -> Vec<Value> {
    match value {
        Value::Mapping(mut m) => match m.remove("items") {
            Some(Value::Sequence(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// One item of a `List` (already a tree, so its errors carry no line).
fn item_object(item: Value) -> Result<Object, String> {
    let kind = Header::deserialize(&item).ok().and_then(|h| h.kind);
    let kind = kind.ok_or("an item has no kind")?;
    match to_object(&kind, item) {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err(format!("kind {kind} is not used by ferry")),
        Err(e) => Err(format!("invalid {kind}: {e}")),
    }
}

/// The error of parsing `doc` straight into its kind, with its position.
fn positioned(kind: &str, doc: &str, first_line: usize) -> Option<String> {
    let e = match kind {
        "Service" => yaml_serde::from_str::<Service>(doc).err(),
        "EndpointSlice" => yaml_serde::from_str::<EndpointSlice>(doc).err(),
        "Node" => yaml_serde::from_str::<Node>(doc).err(),
        _ => None,
    }?;
    Some(message(&e, first_line))
}

/// `e`'s message with its position counted in the whole file (`doc`
/// starts after `first_line` lines of it).
fn message(e: &yaml_serde::Error, first_line: usize) -> String {
    let text = e.to_string();
    match e.location() {
        Some(at) => {
            let bare = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(m, _)| m);
            format!(
                "{bare} at line {} column {}",
                at.line() + first_line,
                at.column()
            )
        }
        None => text,
    }
}

/// The documents of a YAML stream, each with the number of lines before
/// it. YAML forbids a line that starts with a document marker (`---` or
/// `...` followed by a blank or the end) inside a document's content (YAML
/// 1.2, c-forbidden), so the stream is cut at such lines: a `---` line
/// opens the next document (it may hold content, as in `--- {a: 1}`), a
/// `...` line ends the current one.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0, 0);
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches('\n');
        if marker(bare, "---") && offset > start {
            docs.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, n);
        }
        offset += line.len();
        if marker(bare, "...") {
            docs.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, n + 1);
        }
    }
    if offset > start {
        docs.push((start_line, &text[start..]));
    }
    docs
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

    #[test]
    fn anchors_lists_and_document_markers() {
        let text = r"# a comment before the first marker
--- 
kind: Service
metadata: {name: a, namespace: default, labels: &labels {app: web}}
spec: {clusterIP: 198.19.0.10, ports: [&http {name: http, port: 80}]}
...
--- {kind: Service, metadata: {name: b, labels: &l {app: api}, annotations: *l}, spec: {ports: [&p {port: 80}, {<<: *p, name: x}]}}
---
kind: List
items:
- {kind: Node, metadata: {name: n1}}
- {kind: Secret, metadata: {name: s}}
- {kind: Service, spec: {ports: 7}}
";
        let (objects, errors) = parse_documents(text, "f.yaml");
        let names: Vec<String> = objects
            .iter()
            .map(|o| match o {
                Object::Service(s) => s.metadata.name.clone().unwrap_or_default(),
                Object::Node(n) => n.metadata.name.clone().unwrap_or_default(),
                Object::EndpointSlice(_) => "slice".into(),
            })
            .collect();
        assert_eq!(names, ["a", "b", "n1"]);
        let Object::Service(b) = &objects[1] else {
            panic!("b is a Service")
        };
        // Anchors are local to their document (YAML 1.2); aliases and
        // merge keys within one.
        assert_eq!(b.metadata.annotations.as_ref().unwrap()["app"], "api");
        let ports = b.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!((ports[1].port, ports[1].name.as_deref()), (80, Some("x")));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].reason.contains("Secret"), "{errors:?}");
        assert!(
            errors[1].reason.contains("in a List: invalid Service"),
            "{errors:?}"
        );
    }

    #[test]
    fn errors_name_the_line_and_column_in_the_file() {
        let text = "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: b}\nspec:\n  ports:\n  - port: eighty\n---\nkind: [\n---\nkind: Node\nmetadata: {name: n}\n";
        let (objects, errors) = parse_documents(text, "f.yaml");
        assert_eq!(objects.len(), 2, "{errors:?}");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].index, 1);
        assert!(
            errors[0].reason.contains("line 8 column 11"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[1].index, 2);
        assert!(errors[1].reason.starts_with("not YAML"), "{}", errors[1]);
        // The document starts on line 10; the parser stops at its end.
        assert!(
            errors[1].reason.contains("at line 11 column 1"),
            "{}",
            errors[1]
        );
        assert!(errors.iter().all(|e| !e.to_string().contains('\n')));
    }

    #[test]
    fn documents_are_cut_only_at_markers_at_the_start_of_a_line() {
        let text = "a: 1\n---\nb: |\n  --- not a marker\n  ...\n--- # c\nc: 3\n...\n";
        let docs = split_documents(text);
        let firsts: Vec<usize> = docs.iter().map(|d| d.0).collect();
        assert_eq!(firsts, [0, 1, 5]);
        assert_eq!(docs[1].1, "---\nb: |\n  --- not a marker\n  ...\n");
        assert_eq!(docs.iter().map(|d| d.1).collect::<String>(), text);
        assert!(split_documents("").is_empty());
        assert_eq!(split_documents("---a: 1\n").len(), 1, "---a is no marker");
    }
}
