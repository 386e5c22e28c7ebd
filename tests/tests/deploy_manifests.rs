//! deploy/: every manifest deserialises into the k8s-openapi types of
//! Kubernetes 1.33 without losing a key (a misspelt or misplaced key would be
//! silently dropped by the API server), both as written and as kustomize
//! renders it; the DaemonSet has what a kube-proxy replacement needs; the
//! agent config in the ConfigMap is one `ferry run --config` accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use ferry_tests::deploy::{rendered_objects, written_objects};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// Keys of `original` that are absent from `round_trip`, as paths.
fn dropped(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => dropped(v, w, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                match b.get(i) {
                    Some(w) => dropped(v, w, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// The keys k8s-openapi would drop from this object, or why it does not parse.
fn lost_keys(object: &Value) -> Result<Vec<String>, String> {
    let back = match object["kind"].as_str().unwrap_or("") {
        "DaemonSet" => round_trip::<DaemonSet>(object)?,
        "ServiceAccount" => round_trip::<ServiceAccount>(object)?,
        "ClusterRole" => round_trip::<ClusterRole>(object)?,
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object)?,
        "ConfigMap" => round_trip::<ConfigMap>(object)?,
        "Deployment" => round_trip::<Deployment>(object)?,
        "Service" => round_trip::<Service>(object)?,
        "Namespace" => round_trip::<Namespace>(object)?,
        "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(object)?,
        other => return Err(format!("kind {other:?} has no typed check; add it here")),
    };
    let mut out = Vec::new();
    dropped(object, &back, "", &mut out);
    Ok(out)
}

fn check_all(objects: &[(String, Value)]) {
    let mut problems = Vec::new();
    for (origin, object) in objects {
        let id = format!(
            "{origin}: {} {}",
            object["kind"], object["metadata"]["name"]
        );
        match lost_keys(object) {
            Ok(lost) if lost.is_empty() => {}
            Ok(lost) => problems.push(format!("{id}: keys dropped by the typed schema: {lost:?}")),
            Err(e) => problems.push(format!("{id}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn written_manifests_keep_every_key() {
    let objects = written_objects().unwrap();
    assert!(
        objects.len() >= 4,
        "deploy/ should hold the agent's objects: {objects:?}"
    );
    check_all(&objects);
}

#[test]
fn rendered_manifests_keep_every_key_and_wire_the_agent() {
    let Some(objects) = rendered_objects().unwrap() else {
        assert!(
            std::env::var("FERRY_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "kubectl is not installed; `cargo xtask test` installs it"
        );
        eprintln!("SKIPPED: kubectl not installed, the kustomize rendering is not checked");
        return;
    };
    let tagged: Vec<(String, Value)> = objects
        .iter()
        .map(|v| ("kubectl kustomize deploy/".to_string(), v.clone()))
        .collect();
    check_all(&tagged);

    let find = |kind: &str, prefix: &str| {
        objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with(prefix)
            })
            .unwrap_or_else(|| panic!("no {kind} {prefix}* in the rendering"))
            .clone()
    };
    let ds: DaemonSet = serde_json::from_value(find("DaemonSet", "ferry")).unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("ferry"));
    assert!(pod
        .tolerations
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let agent = &pod.containers[0];
    let image = agent.image.clone().unwrap_or_default();
    assert!(
        image.contains(':') && !image.ends_with(":latest"),
        "image {image} must have a non-latest tag"
    );
    assert_eq!(agent.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(
            env.iter().any(|e| e.name == var),
            "{var} must be set: no Service routing exists before Ferry runs"
        );
    }
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&agent.liveness_probe).as_deref(), Some("/livez"));
    // Ready once the first full sync is in the dataplane.
    assert_eq!(
        probe_path(&agent.readiness_probe).as_deref(),
        Some("/readyz")
    );
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));

    // The agent config: the ConfigMap the DaemonSet mounts holds a file that
    // `ferry run --config` accepts, and its cgroup path is the one the init
    // container mounts.
    let config_map: ConfigMap = serde_json::from_value(find("ConfigMap", "ferry-config")).unwrap();
    let text = config_map
        .data
        .unwrap_or_default()
        .get("config.yaml")
        .cloned()
        .expect("config.yaml");
    let settings: ferry_proxy::cli::RunSettings = yaml_serde::from_str(&text).unwrap();
    let cgroup = settings
        .cgroup_path
        .expect("cgroupPath set")
        .display()
        .to_string();
    let init = pod.init_containers.unwrap_or_default();
    assert!(init.iter().any(|c| c
        .args
        .clone()
        .unwrap_or_default()
        .join(" ")
        .contains(&cgroup)));
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "config")
        .and_then(|v| v.config_map)
        .map(|c| c.name);
    assert_eq!(volume, config_map.metadata.name);
}

#[test]
fn a_misplaced_key_is_caught() {
    // The check itself: a DaemonSet with `hostNetwork` at the wrong level and
    // a misspelt key must be reported.
    let mut ds = written_objects()
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "DaemonSet")
        .unwrap();
    ds["spec"]["hostNetwork"] = Value::Bool(true);
    ds["spec"]["template"]["spec"]["dnsPolicyy"] = Value::String("Default".into());
    let lost = lost_keys(&ds).unwrap();
    assert_eq!(
        lost,
        vec![".spec.hostNetwork", ".spec.template.spec.dnsPolicyy"]
    );
}

/// deploy/crd.yaml is what `ferry crd` prints for this build.
#[test]
fn crd_yaml_is_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let written = std::fs::read_to_string(root.join("deploy/crd.yaml")).unwrap();
    let generated = ferry_proxy::ipam::pool::crd_yaml().unwrap();
    assert!(
        written == generated,
        "deploy/crd.yaml is stale: run `cargo run -p ferry-proxy -- crd > deploy/crd.yaml`"
    );
}

/// The kind example pool parses as a pool and is valid.
#[test]
fn example_pool_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/kind/lb-pool.yaml")).unwrap();
    let pool: ferry_proxy::ipam::pool::FerryLoadBalancerIPPool =
        yaml_serde::from_str(&text).unwrap();
    let parsed = ferry_proxy::ipam::pool::parse_pool("kind", 0, &pool.spec);
    assert_eq!(parsed.invalid, None);
    assert!(!parsed.ranges.is_empty());
}
