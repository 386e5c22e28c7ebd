//! `cargo xtask`: builds the eBPF programs, installs missing tools and runs
//! every check and test; the README's commands all start here.

mod bench;
mod cluster;
mod dataplane;
mod demo;
mod deploy;
mod deps;
mod ebpf;
mod fuzz;
mod host;
mod kind;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  demo [--userspace | --cluster]
               a namespace cluster, ferry run from YAML files, live traffic
               through a ClusterIP and a NodePort, one endpoint removed (root)
  build-ebpf   build the eBPF programs into target/ebpf/ferry-ebpf.o
  test         install what is missing, build the eBPF programs, run fmt,
               clippy, unit tests and privileged integration tests
  bench core [--quick]
               criterion benches of translate + plan, one EndpointSlice
               change at 10,000 Services, Maglev builds; prints a table
  bench control-plane [--quick]
               10,000 Services from the fake API server into the eBPF maps
  bench dataplane [--quick] [--rows a,b] [--seconds N] [--repeats N]
                  [--max-services 1] [--only-iperf3]
                  [--congestion-control reno|bbr|...]
               Ferry vs direct, iptables, nftables, IPVS, HAProxy in
               namespaces (wrk, iperf3); bench-results/dataplane-*.{csv,md,svg}
  fuzz [--seconds N] [--target NAME]...
               the cargo-fuzz targets (parsers, file source, config, pool;
               the TC program's packets, root), N seconds each (default
               60); a crash fails (docs/reliability.md)
  deploy-check render deploy/ with kustomize and validate it (--strict,
               Kubernetes 1.33)
  kind up|load|deploy|e2e|down|all [--conformance]
               Ferry on a kind cluster without kube-proxy: create it, build
               and load the image, apply deploy/, run the smoke test (and the
               sig-network conformance subset); needs Docker and kind
  cluster build|up|down|status|kubeconfig
               a real Kubernetes cluster (built from its Go modules) whose
               nodes are network namespaces, Ferry from deploy/ as its only
               service proxy (root; docs/cluster.md)
  conformance [--ci|--focus REGEX]
               the upstream sig-network e2e tests against that cluster
               (the CI subset with --ci, the tests matching REGEX with
               --focus); docs/CONFORMANCE.md
  help         this text

environment:
  FERRY_REQUIRE_PRIVILEGED=1   a privileged test that cannot run fails
                               instead of skipping (set by .ci/run)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-ebpf") => ebpf::build(&workspace_root()).map(|_| ()),
        Some("test") => test::run(&workspace_root()),
        Some("bench") => bench::run(&workspace_root(), &args[1..]),
        Some("demo") => demo::run(&workspace_root(), &args[1..]),
        Some("deploy-check") => deploy::check(&workspace_root()),
        Some("fuzz") => fuzz::run(&workspace_root(), &args[1..]),
        Some("kind") => kind::run(&workspace_root(), &args[1..]),
        Some("cluster") => cluster::run(&workspace_root(), &args[1..]),
        Some("conformance") => {
            let mut rest = vec!["conformance".to_string()];
            rest.extend(args[1..].iter().cloned());
            cluster::run(&workspace_root(), &rest)
        }
        Some("help" | "-h" | "--help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("xtask: unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs a command, echoing it first; fails with the command line and its
/// exit status.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", display(cmd));
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start `{}`: {e}", display(cmd)))?;
    if !status.success() {
        anyhow::bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
