//! `cargo xtask fuzz [--seconds N] [--target NAME]...`: the cargo-fuzz
//! targets of fuzz/ (libFuzzer, AddressSanitizer, the nightly toolchain
//! cargo-fuzz needs), each run for N seconds on its corpus (fuzz/corpus/NAME,
//! not kept in git) seeded from the repository's fixtures and fuzz/seeds/.
//! A crash fails the run; its input is in fuzz/artifacts/NAME, and once
//! fixed it goes to fuzz/regressions/NAME, which tests/tests/fuzz_regressions.rs
//! replays in every test run. The packet target needs root.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{deps, ebpf};

/// cargo-fuzz, pinned.
pub const CARGO_FUZZ: &str = "0.13.2";

/// Each target and the directories (besides its own corpus and fuzz/seeds)
/// its seeds come from.
const TARGETS: &[(&str, &[&str])] = &[
    ("objects_yaml", &["proxy/testdata", "deploy/kind"]),
    ("objects_json", &[]),
    ("file_source", &["proxy/testdata"]),
    ("config", &["deploy/config.yaml"]),
    (
        "pool",
        &[
            "deploy/kind/lb-pool.yaml",
            "tools/cluster/manifests/lb-pool.yaml",
        ],
    ),
    ("tc_packets", &[]),
];

const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [--target NAME]...";

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let (seconds, wanted) = parse_args(args)?;
    let fuzz_dir = root.join("fuzz");
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let object = ebpf::build(root).context("the packet target embeds the eBPF programs")?;
    let mut summary = Vec::new();
    for (name, seed_dirs) in TARGETS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        if *name == "tc_packets" && !deps::is_root() {
            bail!("the tc_packets target loads eBPF programs: run as root");
        }
        let corpus = fuzz_dir.join("corpus").join(name);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new(&cargo_fuzz);
        toolchain(&mut cmd);
        cmd.current_dir(&fuzz_dir)
            .args(["fuzz", "run", name])
            .arg(&corpus)
            .env("FERRY_EBPF_OBJECT", &object);
        for d in seeds(root, name, seed_dirs) {
            if d.is_dir() {
                cmd.arg(d);
            } else if let Some(file) = d.file_name() {
                // libFuzzer takes directories only: a seed file joins the
                // corpus.
                std::fs::copy(&d, corpus.join(file))
                    .with_context(|| format!("seeding {name} with {}", d.display()))?;
            }
        }
        cmd.arg("--").args([
            format!("-max_total_time={seconds}"),
            "-timeout=10".into(),
            "-rss_limit_mb=4096".into(),
            "-print_final_stats=1".into(),
        ]);
        let started = Instant::now();
        let result = crate::run(&mut cmd);
        if *name == "tc_packets" {
            remove_packet_oracle_leftovers();
        }
        result.with_context(|| {
            format!(
                "fuzz target {name} failed: the input is in {}",
                fuzz_dir.join("artifacts").join(name).display()
            )
        })?;
        let inputs = std::fs::read_dir(&corpus).map_or(0, std::iter::Iterator::count);
        summary.push(format!(
            "{name}: {:.0} s, corpus {inputs} inputs, no crash",
            started.elapsed().as_secs_f64()
        ));
    }
    for line in summary {
        println!("== fuzz {line}");
    }
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(u64, Vec<String>)> {
    let (mut seconds, mut wanted) = (60, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--seconds" => {
                seconds = value?
                    .parse()
                    .with_context(|| format!("--seconds takes whole seconds\n{USAGE}"))?;
            }
            "--target" => {
                let t = value?;
                if !TARGETS.iter().any(|(n, _)| n == t) {
                    bail!("no fuzz target {t:?}\n{USAGE}");
                }
                wanted.push(t.clone());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok((seconds, wanted))
}

/// The seeds of a target that exist: fuzz/seeds/NAME and its fixture
/// directories (libFuzzer reads them recursively and writes none) or files.
fn seeds(root: &Path, name: &str, dirs: &[&str]) -> Vec<PathBuf> {
    std::iter::once(root.join("fuzz/seeds").join(name))
        .chain(dirs.iter().map(|d| root.join(d)))
        .filter(|p| p.exists())
        .collect()
}

/// cargo-fuzz on PATH or in ~/.cargo/bin, installed from crates.io when
/// missing.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let found = || {
        deps::find_on_path("cargo-fuzz").or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from)?;
            let p = home.join(".cargo/bin/cargo-fuzz");
            p.is_file().then_some(p)
        })
    };
    if found().is_none() {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ}");
        crate::run(Command::new(deps::cargo()).args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ,
        ]))?;
    }
    // cargo-fuzz is a cargo subcommand: run through cargo (rustup's proxy
    // picks the toolchain).
    found().context("cargo-fuzz not found after installing it")?;
    Ok(PathBuf::from("cargo"))
}

/// cargo-fuzz needs nightly flags: the nightly toolchain when rustup has
/// one, else the pinned one told to accept them.
fn toolchain(cmd: &mut Command) {
    let has_nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nightly"));
    if has_nightly {
        cmd.arg("+nightly");
    } else {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO");
}

/// The packet oracle's pins and namespace outlive a libFuzzer process
/// (it exits without running destructors): remove them.
fn remove_packet_oracle_leftovers() {
    if let Ok(d) = std::fs::read_dir("/sys/fs/bpf") {
        for e in d.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("ferry-test-fuzzpkt-")
            {
                remove_pins(&e.path());
            }
        }
    }
    if let Ok(d) = std::fs::read_dir("/run/netns") {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ferry-fuzzpkt-") {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

fn remove_pins(dir: &Path) {
    for sub in [dir.join("links"), dir.to_path_buf()] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.flatten() {
                if !e.path().is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&sub);
    }
}
