//! The cluster's container images, assembled here and never pulled: a root
//! filesystem from the built programs and Debian's binaries (each with the
//! shared libraries ldd names), packed as a one-layer docker archive that
//! `ctr images import` takes under the name the manifests use.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::build::hex;
use super::Layout;
use crate::host::sh;

/// The registry of every image assembled here; e2e.test finds them through
/// its repo list (conformance.rs).
pub const REGISTRY: &str = "ferry.local";
pub const PAUSE: &str = "ferry.local/pause:3.10.2";
pub const AGNHOST: &str = "ferry.local/e2e-test-images/agnhost:2.66.1";
pub const BUSYBOX: &str = "ferry.local/e2e-test-images/busybox:1.37.0-2";
pub const COREDNS: &str = "ferry.local/coredns:v1.14.6";
/// The Conntrack test's server that sends an out-of-window packet.
pub const REGRESSION_74839: &str = "ferry.local/e2e-test-images/regression-issue-74839:1.5";
/// The DNS tests' glibc resolver (upstream: bookworm-slim with dnsutils).
pub const GLIBC_DNS: &str = "ferry.local/e2e-test-images/glibc-dns-testing:2.1.1";

/// Debian programs agnhost's image carries (its Dockerfile adds curl, nc,
/// dig, ip and socat to alpine), as (host path, image path).
const AGNHOST_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/curl", "/usr/bin/curl"),
    ("/bin/nc.openbsd", "/usr/bin/nc"),
    ("/usr/bin/dig", "/usr/bin/dig"),
    ("/usr/bin/nslookup", "/usr/bin/nslookup"),
    ("/usr/bin/socat", "/usr/bin/socat"),
    // The DNS tests' probes resolve /etc/hosts names with getent.
    ("/usr/bin/getent", "/usr/bin/getent"),
    ("/bin/ip", "/sbin/ip"),
    ("/bin/bash", "/bin/bash"),
    // Debian's busybox wget crashes with -T (a timeout), which the e2e
    // tests pass; GNU wget takes the same flags.
    ("/usr/bin/wget", "/usr/bin/wget"),
];

/// What goes into an image.
struct Spec<'a> {
    name: &'a str,
    files: Vec<(PathBuf, &'a str)>,
    busybox: bool,
    entrypoint: &'a [&'a str],
    cmd: &'a [&'a str],
}

fn spec<'a>(
    name: &'a str,
    files: Vec<(PathBuf, &'a str)>,
    busybox: bool,
    entrypoint: &'a [&'a str],
    cmd: &'a [&'a str],
) -> Spec<'a> {
    Spec {
        name,
        files,
        busybox,
        entrypoint,
        cmd,
    }
}

/// Assembles every image; returns the archives to import on each node.
pub fn assemble(
    root: &Path,
    layout: &Layout,
    ferry: &Path,
    ferry_image: &str,
) -> Result<Vec<PathBuf>> {
    let out = layout.state.join("images");
    std::fs::create_dir_all(&out)?;
    let source = kubernetes_source(root)?;
    let pause = compile_pause(&source, &out)?;
    let mut archives = Vec::new();
    for spec in &specs(layout, &source, pause, ferry, ferry_image) {
        archives.push(pack(&out, spec).with_context(|| format!("assembling image {}", spec.name))?);
    }
    Ok(archives)
}

/// Debian's busybox shell runs its own applets before any program on PATH
/// (its nsenter lacks --cgroup, its nc most flags), so images with real
/// tools get dash as /bin/sh.
fn dash() -> (PathBuf, &'static str) {
    (PathBuf::from("/bin/dash"), "/bin/sh")
}

/// agnhost, the tools its commands run, and porter's TLS files (its
/// Dockerfile adds them at /).
fn agnhost_files(layout: &Layout, source: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut files = vec![(layout.program("agnhost"), "/agnhost"), dash()];
    let porter = source.join("test/images/agnhost/porter");
    files.push((porter.join("localhost.crt"), "/localhost.crt"));
    files.push((porter.join("localhost.key"), "/localhost.key"));
    files.extend(AGNHOST_TOOLS.iter().map(|(h, i)| (PathBuf::from(h), *i)));
    files
}

/// What goes into each image: the test images conformance uses, CoreDNS
/// and Ferry's.
fn specs<'a>(
    layout: &Layout,
    source: &Path,
    pause: PathBuf,
    ferry: &'a Path,
    ferry_image: &'a str,
) -> Vec<Spec<'a>> {
    let bin = |name: &str| layout.program(name);
    let agnhost_files = agnhost_files(layout, source);
    vec![
        spec(PAUSE, vec![(pause, "/pause")], false, &["/pause"], &[]),
        spec(AGNHOST, agnhost_files, true, &["/agnhost"], &["pause"]),
        spec(
            REGRESSION_74839,
            vec![(bin("regression-issue-74839"), "/regression-issue-74839")],
            false,
            &["/regression-issue-74839"],
            &[],
        ),
        spec(
            GLIBC_DNS,
            vec![
                dash(),
                (PathBuf::from("/usr/bin/dig"), "/usr/bin/dig"),
                (PathBuf::from("/usr/bin/getent"), "/usr/bin/getent"),
            ],
            true,
            &[],
            &["sh"],
        ),
        spec(BUSYBOX, vec![], true, &[], &["sh"]),
        spec(
            COREDNS,
            vec![(bin("coredns"), "/coredns")],
            false,
            &["/coredns"],
            &[],
        ),
        spec(
            ferry_image,
            vec![
                (ferry.to_path_buf(), "/usr/local/bin/ferry"),
                dash(),
                (PathBuf::from("/bin/mkdir"), "/bin/mkdir"),
                (PathBuf::from("/usr/bin/nsenter"), "/usr/bin/nsenter"),
                (PathBuf::from("/bin/mountpoint"), "/usr/bin/mountpoint"),
                (PathBuf::from("/bin/mount"), "/usr/bin/mount"),
            ],
            false,
            &["/usr/local/bin/ferry"],
            &["run", "--config", "/etc/ferry/config.yaml"],
        ),
    ]
}

/// Where the Go module cache holds k8s.io/kubernetes at the pinned release.
fn kubernetes_source(root: &Path) -> Result<PathBuf> {
    let version = super::build::module_version("kubernetes", "k8s.io/kubernetes")?;
    let out = sh(Command::new("go")
        .current_dir(root.join("tools/cluster/kubernetes"))
        .args([
            "mod",
            "download",
            "-json",
            &format!("k8s.io/kubernetes@{version}"),
        ]))?;
    let info: serde_json::Value = serde_json::from_str(&out)?;
    Ok(PathBuf::from(
        info["Dir"]
            .as_str()
            .context("go mod download named no directory")?,
    ))
}

/// The pause container of build/pause/linux/pause.c, linked statically.
fn compile_pause(source: &Path, out: &Path) -> Result<PathBuf> {
    let pause_c = source.join("build/pause/linux/pause.c");
    let binary = out.join("pause");
    sh(Command::new("gcc")
        .args(["-Os", "-static", "-Wall", "-o"])
        .arg(&binary)
        .arg(&pause_c)
        .arg("-DVERSION=3.10.2"))?;
    Ok(binary)
}

fn pack(out: &Path, spec: &Spec<'_>) -> Result<PathBuf> {
    let stem = spec.name.replace(['/', ':'], "_");
    let rootfs = out.join(format!("{stem}.rootfs"));
    fill_rootfs(&rootfs, spec)?;
    let layer = out.join(format!("{stem}.layer.tar"));
    sh(Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
            "-C",
        ])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let diff_id = hex(&Sha256::digest(std::fs::read(&layer)?));
    let config = image_config(spec, &diff_id)?;
    let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
    let archive_dir = out.join(format!("{stem}.archive"));
    let _ = std::fs::remove_dir_all(&archive_dir);
    std::fs::create_dir_all(archive_dir.join(&diff_id))?;
    std::fs::rename(&layer, archive_dir.join(&diff_id).join("layer.tar"))?;
    std::fs::write(archive_dir.join(&config_name), &config)?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [spec.name],
        "Layers": [format!("{diff_id}/layer.tar")],
    }]);
    std::fs::write(
        archive_dir.join("manifest.json"),
        serde_json::to_vec(&manifest)?,
    )?;
    let archive = out.join(format!("{stem}.tar"));
    sh(Command::new("tar")
        .arg("-C")
        .arg(&archive_dir)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    std::fs::remove_dir_all(&archive_dir)?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(archive)
}

/// The image's files: a minimal /etc, busybox if asked for, its programs
/// (each with the libraries it loads).
fn fill_rootfs(rootfs: &Path, spec: &Spec<'_>) -> Result<()> {
    let _ = std::fs::remove_dir_all(rootfs);
    for dir in ["bin", "etc", "tmp", "usr/bin", "sbin", "uploads"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    if spec.busybox {
        add_busybox(rootfs)?;
    }
    for (host, path) in &spec.files {
        add_program(rootfs, host, path)?;
    }
    Ok(())
}

/// The OCI image config of one layer.
fn image_config(spec: &Spec<'_>, diff_id: &str) -> Result<Vec<u8>> {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    });
    Ok(serde_json::to_vec(&config)?)
}

/// Debian's static busybox as /bin/busybox with a link per applet.
fn add_busybox(rootfs: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    std::fs::copy(busybox, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {} (Debian's busybox-static)", busybox.display()))?;
    let list = sh(Command::new(busybox).arg("--list"))?;
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    Ok(())
}

/// Copies a program and every shared library ldd lists for it.
fn add_program(rootfs: &Path, host: &Path, path: &str) -> Result<()> {
    if !host.is_file() {
        bail!("{} is missing", host.display());
    }
    copy_into(rootfs, host, path)?;
    let ldd = Command::new("ldd").arg(host).output()?;
    // A static binary makes ldd fail ("not a dynamic executable").
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            copy_into(rootfs, Path::new(lib), lib)?;
        }
    }
    Ok(())
}

fn copy_into(rootfs: &Path, host: &Path, path: &str) -> Result<()> {
    let dest = rootfs.join(path.trim_start_matches('/'));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::symlink_metadata(&dest).is_ok() {
        std::fs::remove_file(&dest)?;
    }
    std::fs::copy(host, &dest)
        .with_context(|| format!("copying {} to {}", host.display(), dest.display()))?;
    Ok(())
}
