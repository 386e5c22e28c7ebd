//! `cargo xtask bench core|datapath`: runs a criterion bench set (the
//! control-plane one, or the root-only datapath one: map writes and the TC
//! program per packet) and prints its medians as a markdown table (the
//! ones in docs/BENCHMARKS.md).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

use crate::deps;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("core") | None => criterion(
            root,
            "control_plane",
            &[
                "translate_plan_full",
                "file_source_parse",
                "endpoint_change_10k",
                "maglev_build_16381",
            ],
            args.iter().any(|a| a == "--quick"),
        ),
        Some("datapath") => criterion(
            root,
            "datapath",
            &["datapath_apply", "tc_ingress_per_packet"],
            args.iter().any(|a| a == "--quick"),
        ),
        Some("control-plane") => control_plane(root, args.iter().any(|a| a == "--quick")),
        Some("dataplane") => crate::dataplane::run(root, &args[1..]),
        Some(other) => bail!(
            "unknown benchmark set {other:?}: `cargo xtask bench core|datapath|control-plane|dataplane [--quick]`"
        ),
    }
}

fn criterion(root: &Path, bench: &str, groups: &[&str], quick: bool) -> Result<()> {
    let mut cmd = Command::new(deps::cargo());
    cmd.current_dir(root).args([
        "bench",
        "--locked",
        "-p",
        "ferry-benches",
        "--bench",
        bench,
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
    for group in groups {
        let dir = criterion.join(group);
        if !dir.exists() {
            println!(
                "| {group} | not measured (the datapath benches need root and the eBPF object) | |"
            );
            continue;
        }
        let mut benches: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("new/estimates.json").exists())
            .collect();
        benches.sort();
        for b in benches {
            let text = std::fs::read_to_string(b.join("new/estimates.json"))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let med = &v["median"];
            let get = |p: &str| {
                med.pointer(p)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(f64::NAN)
            };
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
