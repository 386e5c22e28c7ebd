//! `cargo xtask test`: the one command that proves the tree. Installs what
//! is missing, builds the eBPF programs, then runs fmt, clippy, the unit
//! tests and the privileged integration tests.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

use crate::{deps, ebpf};

/// rustfmt and clippy (-D warnings) on the workspace and the eBPF crate.
fn lint(root: &Path) -> Result<()> {
    let cargo = deps::cargo();
    crate::run(
        Command::new(&cargo)
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    crate::run(
        Command::new(&cargo)
            .current_dir(root.join("ebpf/programs"))
            .args(["fmt", "--all", "--check"]),
    )?;
    crate::run(Command::new(&cargo).current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    crate::run(
        Command::new(&cargo)
            .current_dir(root.join("ebpf/programs"))
            .args(["clippy", "--locked", "--", "-D", "warnings"])
            .env("CARGO_TARGET_DIR", root.join("target/ebpf-clippy")),
    )?;
    Ok(())
}

pub fn run(root: &Path) -> Result<()> {
    let require = std::env::var("FERRY_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    if require && !deps::is_root() {
        bail!("FERRY_REQUIRE_PRIVILEGED=1 but not running as root: privileged tests cannot run");
    }
    deps::ensure()?;
    ebpf::build(root).context("the eBPF build is part of every test run")?;

    crate::deploy::check(root)?;

    lint(root)?;
    let cargo = deps::cargo();
    // Unit tests and integration tests (privileged ones run because we are
    // root; with FERRY_REQUIRE_PRIVILEGED=1 they fail rather than skip).
    crate::run(
        Command::new(&cargo)
            .current_dir(root)
            .args(["test", "--workspace", "--locked"])
            .env("FERRY_EBPF_OBJECT", ebpf::object_path(root)),
    )?;
    // Every benchmark runs once as a test, so they keep working.
    crate::run(Command::new(&cargo).current_dir(root).args([
        "bench",
        "--locked",
        "-p",
        "ferry-benches",
        "--",
        "--test",
    ]))?;
    // The end-to-end control-plane benchmark in its short mode (root: it
    // loads the eBPF programs), so it keeps working.
    if deps::is_root() {
        crate::bench::run(root, &["control-plane".into(), "--quick".into()])?;
        // The dataplane harness in its short mode (a second per metric and
        // row), so every row keeps working.
        crate::dataplane::run(root, &["--quick".into()])?;
        // Every fuzz target a short while (crashes fail the run; longer
        // runs: docs/reliability.md).
        crate::fuzz::run(root, &["--seconds".into(), "15".into()])?;
        // A real Kubernetes cluster in namespaces, Ferry installed from
        // deploy/ as its only service proxy, the story and the upstream
        // conformance subset (docs/cluster.md, docs/CONFORMANCE.md).
        crate::cluster::ci(root)?;
    } else if require {
        bail!("FERRY_REQUIRE_PRIVILEGED=1 but not root: the cluster tests cannot run");
    }
    eprintln!("xtask: all checks and tests passed");
    Ok(())
}
