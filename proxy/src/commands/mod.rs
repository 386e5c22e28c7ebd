//! One file per `ferry` command; main.rs parses the command line and
//! calls the one asked for.

pub mod cleanup;
pub mod explain;
pub mod info;
pub mod run;
pub mod services;

use std::process::ExitCode;

/// `ferry services` and `ferry explain` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A bad setting: one line naming it, exit code 2.
pub fn usage_error(e: &ferry_proxy::cli::resolve::UsageError) -> ExitCode {
    eprintln!("ferry: {e}");
    ExitCode::from(2)
}

/// A command that failed: one line, exit code 1.
pub fn failed(command: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry {command}: {e}");
    ExitCode::FAILURE
}
