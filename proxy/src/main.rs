//! `ferry`: the agent and its CLI.

use clap::{Parser, Subcommand};
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
    Verify,
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
        Command::Verify => match ferry_proxy::ebpf::verify_all() {
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
