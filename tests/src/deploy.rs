//! The manifests under deploy/, as JSON values: the files as written, and
//! the kustomize rendering (`kubectl kustomize deploy/`) when kubectl is
//! available.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's deploy/ directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a multi-document YAML text, as JSON values.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The Kubernetes objects in deploy/*.yaml as written (not the
/// kustomization itself), each with the file it came from.
pub fn written_objects() -> anyhow::Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files.push(deploy_dir().join("kind/smoke.yaml"));
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name == "kustomization.yaml" || name == "config.yaml" {
            continue;
        }
        for doc in documents(&std::fs::read_to_string(&file)?)? {
            out.push((name.clone(), doc));
        }
    }
    Ok(out)
}

/// `kubectl kustomize deploy/`, or None when kubectl is not installed.
pub fn rendered_objects() -> anyhow::Result<Option<Vec<Value>>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !out.status.success() {
        anyhow::bail!(
            "kubectl kustomize deploy/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(documents(&String::from_utf8_lossy(&out.stdout))?))
}

/// The ClusterRole the DaemonSet runs with.
pub fn cluster_role() -> anyhow::Result<Value> {
    written_objects()?
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "ClusterRole")
        .ok_or_else(|| anyhow::anyhow!("no ClusterRole in deploy/"))
}
