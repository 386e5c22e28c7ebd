//! deploy/ checks that run everywhere (`cargo xtask test`): kustomize
//! renders the base and the rendering passes `kubernetes-validate --strict`
//! for Kubernetes 1.33. The typed round-trip and the RBAC check are Rust
//! tests (tests/tests/deploy_manifests.rs, tests/tests/kube_end_to_end.rs).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps;

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// Renders deploy/ into target/deploy/rendered.yaml and returns its path.
pub fn render(root: &Path) -> Result<PathBuf> {
    if deps::find_on_path("kubectl").is_none() {
        bail!("kubectl is not installed (apt-get install kubernetes-client, or any kubectl with kustomize)");
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root.join("deploy"))
        .output()
        .context("running kubectl kustomize deploy/")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = root.join("target/deploy");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("rendered.yaml");
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

/// Renders and validates; fails on any schema error or unknown field.
pub fn check(root: &Path) -> Result<()> {
    let rendered = render(root)?;
    if !deps::kubernetes_validate_installed() {
        bail!(
            "kubernetes-validate is not installed (python3 -m pip install kubernetes-validate=={})",
            deps::KUBERNETES_VALIDATE
        );
    }
    crate::run(
        Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                KUBERNETES_VERSION,
            ])
            .arg(&rendered)
            .arg(root.join("deploy/kind/smoke.yaml")),
    )
    .context("deploy/ does not validate against the Kubernetes schema")?;
    eprintln!(
        "xtask: deploy/ renders and validates (--strict, Kubernetes {KUBERNETES_VERSION}): {}",
        rendered.display()
    );
    Ok(())
}
