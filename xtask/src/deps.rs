//! Finds the tools the build needs and, when allowed, installs the missing
//! ones (idempotent: nothing is done when everything is present).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const LLVM22_BIN: &str = "/usr/lib/llvm-22/bin";
pub const LLVM22_INSTALL: &str = "apt-get install -y llvm-22-dev zlib1g-dev libzstd-dev";
pub const BPF_LINKER_INSTALL: &str = "PATH=/usr/lib/llvm-22/bin:$PATH cargo install --locked \
     bpf-linker --version 0.13.0 --no-default-features --features llvm-22";

/// Debian packages the build and the privileged tests use.
const APT_PACKAGES: &[&str] = &["llvm-22-dev", "zlib1g-dev", "libzstd-dev", "iproute2"];

/// The manifest validator (PyPI), pinned.
pub const KUBERNETES_VALIDATE: &str = "1.37.0";

/// The LLVM 22 tool directory, when llvm-nm is there.
pub fn llvm22_bin() -> Option<PathBuf> {
    let bin = PathBuf::from(LLVM22_BIN);
    bin.join("llvm-nm").is_file().then_some(bin)
}

/// bpf-linker on PATH or in ~/.cargo/bin.
pub fn bpf_linker() -> Option<PathBuf> {
    find_on_path("bpf-linker").or_else(|| {
        let p = cargo_home().join("bin/bpf-linker");
        p.is_file().then_some(p)
    })
}

/// The cargo that runs us (so the pinned toolchain is used throughout).
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The programs `cargo xtask bench dataplane` runs, and their Debian
/// packages.
pub const BENCH_TOOLS: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("nginx", "nginx-light"),
    ("haproxy", "haproxy"),
    ("nft", "nftables"),
    ("iptables-legacy-restore", "iptables"),
    ("bpftool", "bpftool"),
];

/// Installs the programs `cargo xtask bench dataplane` drives (wrk, iperf3,
/// nginx, haproxy, nft, iptables), when missing and root on Debian.
pub fn ensure_bench_tools() -> Result<()> {
    let missing: Vec<&str> = BENCH_TOOLS
        .iter()
        .filter(|(bin, _)| {
            find_on_path(bin).is_none() && !Path::new("/usr/sbin").join(bin).is_file()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !(is_root() && is_debian()) {
        anyhow::bail!(
            "missing benchmark tools; install the Debian packages: {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing benchmark tools: {}", missing.join(" "));
    apt_install(&missing).context("installing benchmark tools")
}

/// Whether `python3 -m kubernetes_validate` works.
pub fn kubernetes_validate_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `apt-get update` then `apt-get install` of `packages`.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    crate::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn apt_missing() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !deb_installed(pkg))
        .collect()
}

/// Whether the Debian package `pkg` is installed.
pub fn deb_installed(pkg: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs what is missing. As root on Debian: apt packages and bpf-linker.
/// Otherwise it only reports what is missing; the eBPF build then fails with
/// the install command.
/// Debian's kubectl (1.20, with kustomize built in) renders deploy/; a
/// newer kubectl already on the machine is used as it is.
fn install_kubectl() -> Result<()> {
    eprintln!("xtask: installing kubectl (Debian package kubernetes-client)");
    crate::run(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "kubernetes-client",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing kubernetes-client")
}

pub fn ensure() -> Result<()> {
    let missing = if is_debian() {
        apt_missing()
    } else {
        Vec::new()
    };
    if !missing.is_empty() {
        if is_root() {
            eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
            apt_install(&missing).context("installing Debian packages")?;
        } else {
            eprintln!(
                "xtask: missing Debian packages (not root, not installing): {}",
                missing.join(" ")
            );
        }
    }
    if find_on_path("kubectl").is_none() && is_debian() && is_root() {
        install_kubectl()?;
    }
    if !kubernetes_validate_installed() && is_root() {
        eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE} (PyPI)");
        crate::run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
        ]))
        .context("installing kubernetes-validate")?;
    }
    if bpf_linker().is_none() && llvm22_bin().is_some() {
        eprintln!("xtask: installing bpf-linker 0.13.0 (about 2 minutes)");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![PathBuf::from(LLVM22_BIN)];
        paths.extend(std::env::split_paths(&path));
        crate::run(
            Command::new(cargo())
                .args(["install", "--locked", "bpf-linker", "--version", "0.13.0"])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", std::env::join_paths(paths)?),
        )
        .context("installing bpf-linker")?;
    }
    Ok(())
}
