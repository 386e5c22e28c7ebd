//! `ferry`: the agent and its CLI.

use clap::{Parser, Subcommand};

/// mimalloc: the pipeline allocates many small objects; glibc malloc was a
/// quarter of a full sync's instructions (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Kubernetes service proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version and the eBPF programs embedded in this binary.
    Version,
    /// Load every embedded eBPF program into the kernel (runs the verifier
    /// on each; needs root) and report the result.
    Verify {
        /// bpffs mount where scratch maps are pinned (and removed again).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ferry {}", env!("CARGO_PKG_VERSION"));
            match ferry_proxy::ebpf::embedded_programs() {
                Ok(names) => println!("eBPF programs: {}", names.join(", ")),
                Err(e) => println!("eBPF programs: none ({e})"),
            }
            ExitCode::SUCCESS
        }
        Command::Verify { bpffs } => match ferry_proxy::ebpf::verify_all(&bpffs) {
            Ok(names) => {
                for n in names {
                    println!("{n}: accepted by the verifier");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry verify: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
