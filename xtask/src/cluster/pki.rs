//! The cluster's certificates and kubeconfigs, made with openssl the way
//! kubeadm lays them out: one CA, the API server's serving certificate, a
//! client certificate per component and node, and the service-account key.

use anyhow::{Context, Result};
use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Layout, API_PORT, CONTROL_PLANE_IP, KUBERNETES_SERVICE_IP};

/// A client identity: the file stem, the user (CN) and its group (O).
pub struct Client<'a> {
    pub stem: &'a str,
    pub user: &'a str,
    pub group: Option<&'a str>,
}

/// Creates the CA, the serving certificate and the service-account keys.
pub fn create(layout: &Layout) -> Result<()> {
    let pki = layout.pki();
    std::fs::create_dir_all(&pki)?;
    openssl(&pki, &["genrsa", "-out", "ca.key", "2048"])?;
    openssl(
        &pki,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "30",
            "-subj",
            "/CN=ferry-cluster-ca",
            "-out",
            "ca.crt",
        ],
    )?;
    let sans = format!(
        "subjectAltName=IP:{CONTROL_PLANE_IP},IP:{KUBERNETES_SERVICE_IP},IP:127.0.0.1,\
         DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
         DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:{}",
        super::NODES[0].name
    );
    sign(&pki, "apiserver", "/CN=kube-apiserver", Some(&sans))?;
    openssl(&pki, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}

/// A client certificate for `client` and a kubeconfig that uses it.
pub fn kubeconfig(layout: &Layout, client: &Client<'_>) -> Result<PathBuf> {
    let pki = layout.pki();
    let subject = match client.group {
        Some(group) => format!("/O={group}/CN={}", client.user),
        None => format!("/CN={}", client.user),
    };
    sign(&pki, client.stem, &subject, None)?;
    let b64 = |file: &str| -> Result<String> {
        let path = pki.join(file);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry\n  cluster:\n    \
         server: https://{CONTROL_PLANE_IP}:{API_PORT}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {user}\n  user:\n    client-certificate-data: {crt}\n    \
         client-key-data: {key}\ncontexts:\n- name: ferry\n  context:\n    cluster: ferry\n    \
         user: {user}\ncurrent-context: ferry\n",
        ca = b64("ca.crt")?,
        user = client.user,
        crt = b64(&format!("{}.crt", client.stem))?,
        key = b64(&format!("{}.key", client.stem))?,
    );
    let path = layout.state.join(format!("{}.kubeconfig", client.stem));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A key and a certificate signed by the CA, with extensions when given.
fn sign(pki: &Path, stem: &str, subject: &str, ext: Option<&str>) -> Result<()> {
    let (key, csr, crt) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.crt"),
    );
    openssl(pki, &["genrsa", "-out", &key, "2048"])?;
    openssl(
        pki,
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
    )?;
    let extfile = format!("{stem}.ext");
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-out",
        &crt,
    ];
    if let Some(ext) = ext {
        std::fs::write(pki.join(&extfile), format!("{ext}\n"))?;
        args.extend(["-extfile", &extfile]);
    }
    openssl(pki, &args)
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    crate::host::sh(Command::new("openssl").current_dir(dir).args(args))
        .with_context(|| format!("openssl {}", args.join(" ")))
        .map(|_| ())
}
