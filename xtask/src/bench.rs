//! `cargo xtask bench core`: runs the criterion control-plane benches and
//! prints their medians as a markdown table (the one in docs/BENCHMARKS.md).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

use crate::deps;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("core") | None => core(root, args.iter().any(|a| a == "--quick")),
        Some("control-plane") => control_plane(root, args.iter().any(|a| a == "--quick")),
        Some("dataplane") => crate::dataplane::run(root, &args[1..]),
        Some(other) => bail!(
            "unknown benchmark set {other:?}: `cargo xtask bench core|control-plane|dataplane [--quick]`"
        ),
    }
}

fn core(root: &Path, quick: bool) -> Result<()> {
    let mut cmd = Command::new(deps::cargo());
    cmd.current_dir(root).args([
        "bench",
        "--locked",
        "-p",
        "ferry-benches",
        "--bench",
        "control_plane",
        "--",
    ]);
    if quick {
        cmd.args(["--warm-up-time", "0.5", "--measurement-time", "2"]);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    crate::run(&mut cmd)?;
    let criterion = root.join("target/criterion");
    println!("\n| benchmark | median | min-max of the estimate |");
    println!("|---|---|---|");
    for group in [
        "translate_plan_full",
        "endpoint_change_10k",
        "maglev_build_16381",
    ] {
        let dir = criterion.join(group);
        let mut benches: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("new/estimates.json").exists())
            .collect();
        benches.sort();
        for b in benches {
            let text = std::fs::read_to_string(b.join("new/estimates.json"))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let med = &v["median"];
            let get = |p: &str| med.pointer(p).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
            println!(
                "| {group}/{} | {} | {} - {} |",
                b.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                human(get("/point_estimate")),
                human(get("/confidence_interval/lower_bound")),
                human(get("/confidence_interval/upper_bound")),
            );
        }
    }
    println!("\nload average before the run: {}", load.trim());
    Ok(())
}

/// The agent end to end against the fake API server (root: it loads the
/// eBPF programs and pins maps in a scratch bpffs directory).
pub fn control_plane(root: &Path, quick: bool) -> Result<()> {
    if !deps::is_root() {
        bail!("bench control-plane needs root (it runs ferry with the eBPF dataplane)");
    }
    let ferry = crate::ebpf::build_release_ferry(root)?;
    let (services, changes) = if quick {
        ("1000", "50")
    } else {
        ("10000", "200")
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    crate::run(
        Command::new(deps::cargo())
            .current_dir(root)
            .args([
                "run",
                "--release",
                "--locked",
                "-p",
                "ferry-benches",
                "--example",
                "control_plane_e2e",
                "--",
            ])
            .arg(&ferry)
            .args([services, changes]),
    )?;
    println!("\nload average before the run: {}", load.trim());
    Ok(())
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}
