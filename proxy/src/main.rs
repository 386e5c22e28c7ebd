//! `ferry`: the agent and its CLI. The command line is typed here; each
//! command is a file under commands/.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use commands::Output;
use ferry_proxy::cli::flags::RunFlags;

/// mimalloc: the pipeline allocates many small objects; glibc malloc was a
/// quarter of a full sync's instructions (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: watch the source, program the dataplane, until
    /// SIGINT/SIGTERM (which leave the dataplane in place).
    Run(RunFlags),
    /// List every frontend with its backends: from the pinned maps (eBPF),
    /// else from a userspace agent's /services endpoint.
    Services {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
        /// The userspace agent's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_address: String,
    },
    /// Which backend a flow would reach, and why, from the pinned maps.
    Explain {
        /// SRC_IP:SRC_PORT
        source: std::net::SocketAddr,
        /// DST_IP:DST_PORT/PROTO (TCP, UDP or SCTP)
        destination: String,
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
    },
    /// Remove everything Ferry pinned (links, which detaches the programs,
    /// and maps).
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/ferry")]
        bpffs_path: PathBuf,
    },
    /// Print the FerryLoadBalancerIPPool CustomResourceDefinition (YAML;
    /// deploy/crd.yaml is this output).
    Crd,
    /// Print the version and the eBPF programs embedded in this binary.
    Version,
    /// Load every embedded eBPF program into the kernel (runs the verifier
    /// on each; needs root) and report the result.
    Verify {
        /// bpffs mount where scratch maps are pinned (and removed again).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(flags) => commands::run::main(flags),
        Command::Services {
            output,
            bpffs_path,
            metrics_address,
        } => commands::services::main(output, &bpffs_path, &metrics_address),
        Command::Explain {
            source,
            destination,
            bpffs_path,
        } => commands::explain::main(source, &destination, &bpffs_path),
        Command::Cleanup { bpffs_path } => commands::cleanup::main(&bpffs_path),
        Command::Crd => commands::info::crd(),
        Command::Version => commands::info::version(),
        Command::Verify { bpffs } => commands::info::verify(&bpffs),
    }
}
