//! `cargo xtask build-ebpf`: builds ebpf/programs with the verified recipe
//! (host-target bitcode, linked to BPF by bpf-linker through
//! ebpf/programs/bpf-link.sh) and checks that the object holds programs.

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection, SectionFlags};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps;

/// Where the finished object goes; proxy/build.rs embeds it from here.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("target/ebpf/ferry-ebpf.o")
}

const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the programs and returns the path of the checked object.
pub fn build(root: &Path) -> Result<PathBuf> {
    let llvm_bin = deps::llvm22_bin().ok_or_else(|| {
        anyhow::anyhow!(
            "LLVM 22 is missing (bpf-linker and the link script need it at {}).\n\
             Install it with:\n    {}",
            deps::LLVM22_BIN,
            deps::LLVM22_INSTALL
        )
    })?;
    let linker = deps::bpf_linker().ok_or_else(|| {
        anyhow::anyhow!(
            "bpf-linker is missing (not on PATH nor in ~/.cargo/bin).\n\
             Install it with:\n    {}",
            deps::BPF_LINKER_INSTALL
        )
    })?;

    let programs = root.join("ebpf/programs");
    let link_script = programs.join("bpf-link.sh");
    let target_dir = root.join("target/ebpf-build");
    let flags = [
        format!("-Clinker={}", link_script.display()),
        "-Clinker-plugin-lto".into(),
        "-Cpanic=abort".into(),
        "-Cdebuginfo=2".into(),
        "-Cforce-unwind-tables=no".into(),
    ];
    let mut cmd = Command::new(deps::cargo());
    cmd.current_dir(&programs)
        .args(["build", "--release", "--locked", "--target", HOST_TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        // With an explicit --target these flags reach only the programs'
        // crates, never build scripts or proc-macros.
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env("FERRY_LLVM_BIN", &llvm_bin)
        .env("FERRY_BPF_LINKER", &linker);
    crate::run(&mut cmd).context("building the eBPF programs")?;

    let built = target_dir.join(HOST_TARGET).join("release/ferry-ebpf");
    let out = object_path(root);
    std::fs::create_dir_all(out.parent().context("object path has a parent")?)?;
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    let programs = check_object(&bytes).with_context(|| format!("checking {}", built.display()))?;
    // Written only when it changed: its mtime is what makes cargo build
    // ferry-proxy (which embeds it) again.
    if std::fs::read(&out).ok().as_deref() != Some(&bytes[..]) {
        std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    }
    eprintln!(
        "xtask: eBPF object {} ({} bytes), programs: {}",
        out.display(),
        bytes.len(),
        programs.join(", ")
    );
    Ok(out)
}

/// Fails unless `bytes` is a BPF ELF object with at least one non-empty
/// program section; returns the program section names.
pub fn check_object(bytes: &[u8]) -> Result<Vec<String>> {
    let file = object::File::parse(bytes).context("not an ELF object")?;
    if file.architecture() != object::Architecture::Bpf {
        bail!("object is for {:?}, not BPF", file.architecture());
    }
    let mut programs = Vec::new();
    for section in file.sections() {
        let exec = matches!(section.flags(), SectionFlags::Elf { sh_flags }
            if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0);
        let name = section.name().unwrap_or("");
        if exec && section.size() > 0 && name != ".text" {
            programs.push(name.to_string());
        }
    }
    if programs.is_empty() {
        bail!(
            "no program section in the object: the link dropped every program \
             (check -Clinker-plugin-lto and the export list in bpf-link.sh)"
        );
    }
    Ok(programs)
}

/// Builds the release `ferry` with the eBPF object embedded and returns its
/// path (the benchmarks run this binary).
pub fn build_release_ferry(root: &Path) -> Result<std::path::PathBuf> {
    build(root)?;
    crate::run(
        std::process::Command::new(crate::deps::cargo())
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "ferry-proxy",
                "--bin",
                "ferry",
            ])
            .env("FERRY_EBPF_OBJECT", object_path(root)),
    )?;
    Ok(root.join("target/release/ferry"))
}
