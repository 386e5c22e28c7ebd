//! `cargo xtask cluster build`: the cluster's programs, built from the Go
//! modules pinned under tools/cluster/ and cached by the content of those
//! pins, so a warm run rebuilds nothing. Debian's packages supply runc, the
//! CNI plugins and the tools the images are assembled from.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::KUBERNETES;

/// Debian packages the cluster uses: runc and the CNI plugins on the nodes,
/// openssl for its certificates, gcc and libc6-dev for the static pause,
/// the rest for the images' root filesystems.
const APT_PACKAGES: &[&str] = &[
    "runc",
    "gcc",
    "libc6-dev",
    "containernetworking-plugins",
    "openssl",
    "busybox-static",
    "curl",
    "netcat-openbsd",
    "socat",
    "bind9-dnsutils",
    "wget",
    "util-linux",
    "iproute2",
];

/// One Go module of tools/cluster/ and the programs built from it.
struct Module {
    dir: &'static str,
    /// (package, program name); `go test -c` when the name ends in `.test`.
    programs: &'static [(&'static str, &'static str)],
    ldflags: fn() -> String,
}

const MODULES: &[Module] = &[
    Module {
        dir: "kubernetes",
        programs: &[
            ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
            (
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-controller-manager",
            ),
            ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
            ("k8s.io/kubernetes/cmd/kubelet", "kubelet"),
            ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
            ("k8s.io/kubernetes/test/images/agnhost", "agnhost"),
            (
                "k8s.io/kubernetes/test/images/regression-issue-74839",
                "regression-issue-74839",
            ),
            ("k8s.io/kubernetes/test/e2e", "e2e.test"),
            ("github.com/onsi/ginkgo/v2/ginkgo", "ginkgo"),
        ],
        ldflags: kubernetes_ldflags,
    },
    Module {
        dir: "etcd",
        programs: &[("go.etcd.io/etcd/server/v3", "etcd")],
        ldflags: String::new,
    },
    Module {
        dir: "containerd",
        programs: &[
            (
                "github.com/containerd/containerd/v2/cmd/containerd",
                "containerd",
            ),
            (
                "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
                "containerd-shim-runc-v2",
            ),
            ("github.com/containerd/containerd/v2/cmd/ctr", "ctr"),
        ],
        ldflags: containerd_ldflags,
    },
    Module {
        dir: "coredns",
        programs: &[("github.com/coredns/coredns", "coredns")],
        ldflags: String::new,
    },
];

/// The version stamps `make` would set, so every binary reports the release.
fn kubernetes_ldflags() -> String {
    let minor = KUBERNETES.split('.').nth(1).unwrap_or("0");
    let mut flags = String::new();
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (var, value) in [
            ("gitVersion", KUBERNETES),
            ("gitMajor", "1"),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ] {
            flags.push_str(&format!(" -X {pkg}.{var}={value}"));
        }
    }
    flags
}

fn containerd_ldflags() -> String {
    let version = module_version("containerd", "github.com/containerd/containerd/v2")
        .unwrap_or_else(|_| "unknown".into());
    format!(" -X github.com/containerd/containerd/v2/version.Version={version}")
}

/// The version a tools/cluster module requires of `path` (its go.mod).
pub fn module_version(dir: &str, path: &str) -> Result<String> {
    let gomod = crate::workspace_root()
        .join("tools/cluster")
        .join(dir)
        .join("go.mod");
    let text =
        std::fs::read_to_string(&gomod).with_context(|| format!("reading {}", gomod.display()))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let first = f.next()?;
            let (p, v) = if first == "require" {
                (f.next()?, f.next()?)
            } else {
                (first, f.next()?)
            };
            (p == path).then(|| v.to_string())
        })
        .with_context(|| format!("{} does not require {path}", gomod.display()))
}

/// Where built programs are kept between runs (outside the clone, so a
/// fresh clone on the same machine reuses them).
pub fn cache_root() -> PathBuf {
    std::env::var_os("FERRY_CLUSTER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/ferry-cluster")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/ferry-cluster"))
}

/// The directory holding the programs of the pinned release.
pub fn bin_dir() -> PathBuf {
    cache_root().join(format!("bin-{KUBERNETES}"))
}

/// Builds (or finds in the cache) every program into [`bin_dir`].
pub fn run(root: &Path) -> Result<()> {
    ensure_packages()?;
    let bin = bin_dir();
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for module in MODULES {
        build_module(root, module, &bin)?;
    }
    Ok(())
}

fn build_module(root: &Path, module: &Module, bin: &Path) -> Result<()> {
    let dir = root.join("tools/cluster").join(module.dir);
    let ldflags = format!("-s -w{}", (module.ldflags)());
    let key = pin_hash(&dir, &ldflags)?;
    let stamp = bin.join(format!(".{}.built", module.dir));
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key)
        && module
            .programs
            .iter()
            .all(|(_, name)| bin.join(name).is_file());
    if fresh {
        eprintln!("xtask: cluster: {} programs cached ({key})", module.dir);
        return Ok(());
    }
    let started = std::time::Instant::now();
    for (package, name) in module.programs {
        let mut go = Command::new("go");
        go.current_dir(&dir)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-buildvcs=false -mod=readonly");
        // A Go test binary's name (e2e.test), not a file extension.
        if name.strip_suffix(".test").is_some() {
            go.args(["test", "-c"]);
        } else {
            go.arg("build");
        }
        go.args(["-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(bin.join(name))
            .arg(package);
        crate::run(&mut go)
            .with_context(|| format!("building {name} from tools/cluster/{}", module.dir))?;
    }
    std::fs::write(&stamp, &key)?;
    eprintln!(
        "xtask: cluster: built {} programs in {:.0} s",
        module.dir,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A short hash of what decides a module's programs: its pins, the Go
/// version and the link flags.
fn pin_hash(dir: &Path, ldflags: &str) -> Result<String> {
    let mut hash = Sha256::new();
    for file in ["go.mod", "go.sum", "tools.go"] {
        let path = dir.join(file);
        hash.update(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    hash.update(crate::host::sh(Command::new("go").arg("version"))?);
    hash.update(ldflags);
    Ok(hex(&hash.finalize())[..16].to_string())
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !crate::deps::deb_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::deps::is_root() {
        bail!(
            "the cluster needs the Debian packages {} (run as root to install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    crate::deps::apt_install(&missing)
}
