//! `blkshim` subcommands. Each subcommand is a thin shell over a module's
//! own entry point, so the library stays usable without the binary.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blkshim",
    version,
    about = "Migration-safe userspace block backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version (placeholder until the real subcommands land).
    Version,
    /// Run the deterministic simulation (guest, blkfront, backends, adversarial storage).
    Sim(crate::sim::SimArgs),
    /// Serve Xen blkif vbds (watches backend/vbd like tapback).
    XenBackend(crate::xen::daemon::XenBackendArgs),
}

/// Parse the command line and run the subcommand.
pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("blkshim {}", env!("CARGO_PKG_VERSION")),
        Command::Sim(args) => crate::sim::cli_main(args)?,
        Command::XenBackend(args) => crate::xen::daemon::run(args)?,
    }
    Ok(())
}
