//! `blkshim` subcommands. Each subcommand is a thin shell over a module's
//! own entry point, so the library stays usable without the binary.

use crate::control::ctl::{self, CtlRequest};
use crate::nbd::config::CacheMode;
use crate::nbd::config::{self, CliSet, ServeConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// Serve disks over NBD (unix socket, optionally TCP).
    Serve(ServeArgs),
    /// Query or drive a running server through its control socket.
    Ctl(CtlArgs),
    /// Run the deterministic simulation (guest, blkfront, backends, adversarial storage).
    Sim(crate::sim::SimArgs),
    /// Serve Xen blkif vbds (watches backend/vbd like tapback).
    XenBackend(crate::xen::daemon::XenBackendArgs),
    // --- host-side fencing (src/storage/fencing/cli.rs) ---
    /// Persistent reservations of a block device by hand (JSON out).
    Pr(crate::storage::fencing::cli::PrArgs),
    /// sanlock leases by hand (JSON out; feature `sanlock`).
    #[cfg(feature = "sanlock")]
    Lease(crate::storage::fencing::sanlock::cli::LeaseArgs),
}

/// What `blkshim serve` serves when given no disk and no config file.
const DEFAULT_DISK: &str = "vm1=vm1.img";
const DEFAULT_DISK_SIZE: u64 = 1 << 30;

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Unix socket to serve NBD on [default: ./blkshim.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve NBD over TCP on HOST:PORT (a bare port binds 127.0.0.1).
    #[arg(long)]
    listen: Option<String>,
    /// Size of the sparse image created when a disk file does not exist (e.g. 10G).
    #[arg(long, value_parser = config::parse_size)]
    size: Option<u64>,
    /// How long an older writer's in-flight writes may drain after a newer
    /// writer takes over before they are fenced (e.g. 5s, 500ms).
    #[arg(long, value_parser = config::parse_duration)]
    fence_timeout: Option<std::time::Duration>,
    /// none: O_DIRECT (like qemu cache=none); writeback: page cache.
    #[arg(long)]
    cache: Option<CacheMode>,
    /// Storage engine: io_uring when the kernel allows it, else a thread pool.
    #[arg(long, value_enum, default_value_t = crate::storage::EngineKind::Auto)]
    engine: crate::storage::EngineKind,
    /// Control socket [default: ./blkshim.ctl].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory of the persisted epoch store [default: .blkshim-epochs next to the first disk].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TOML config file naming several disks.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NAME=PATH or PATH (the name is then the file's stem)
    /// [default, with no config file: vm1=./vm1.img, 1 GiB unless --size].
    disks: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// Control socket of the server [default: ./blkshim.ctl].
    #[arg(long, default_value = "blkshim.ctl")]
    control: PathBuf,
    /// Print the raw JSON response.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Per disk: epoch, connections and their epochs, in flight, refused writes.
    Status,
    /// Fence now every writer below the disk's current epoch.
    Fence { disk: String },
    /// Advance the disk's epoch (default: to the newest registered writer).
    Handoff {
        disk: String,
        #[arg(long)]
        to: Option<u64>,
    },
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let set = CliSet {
        socket: a.socket.is_some(),
        control: a.control.is_some(),
        fence_timeout: a.fence_timeout.is_some(),
        cache: a.cache.is_some(),
    };
    let mut cfg = ServeConfig {
        socket: a.socket,
        listen: a.listen,
        control: a.control.unwrap_or_else(|| PathBuf::from("blkshim.ctl")),
        state_dir: a.state_dir,
        fence_timeout: a.fence_timeout.unwrap_or(std::time::Duration::from_secs(5)),
        cache: a.cache.unwrap_or(CacheMode::Writeback),
        engine: a.engine,
        disks: Vec::new(),
    };
    if let Some(p) = &a.config {
        config::load_file(p, &mut cfg, &set)?;
    }
    for d in &a.disks {
        cfg.disks.push(config::parse_disk_arg(d, a.size)?);
    }
    if cfg.disks.is_empty() && a.config.is_none() {
        // The embedded default: one disk next to the socket, made on first use.
        let size = a.size.unwrap_or(DEFAULT_DISK_SIZE);
        log::info!(
            "no DISK given: serving {DEFAULT_DISK} ({size} bytes, created sparse when missing)"
        );
        cfg.disks
            .push(config::parse_disk_arg(DEFAULT_DISK, Some(size))?);
    }
    crate::nbd::server::run(cfg)
}

fn ctl(a: CtlArgs) -> Result<(), String> {
    let req = match a.action {
        CtlAction::Status => CtlRequest::Status,
        CtlAction::Fence { disk } => CtlRequest::Fence { disk },
        CtlAction::Handoff { disk, to } => CtlRequest::Handoff { disk, to },
    };
    let v = ctl::request(&a.control, &req)?;
    if a.json {
        println!("{v}");
    } else {
        match req {
            CtlRequest::Status => print!("{}", ctl::format_status(&v)),
            CtlRequest::Fence { .. } => println!(
                "disk {}: fenced below epoch {}: {} cancelled, {} fenced at storage",
                v["disk"].as_str().unwrap_or("?"),
                v["epoch"],
                v["cancelled"],
                v["fenced"]
            ),
            CtlRequest::Handoff { .. } => println!(
                "disk {}: epoch {} -> {}",
                v["disk"].as_str().unwrap_or("?"),
                v["from"],
                v["to"]
            ),
        }
    }
    Ok(())
}

/// Parse the command line and run the subcommand.
pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(a)?,
        Command::Ctl(a) => ctl(a)?,
        Command::Sim(args) => crate::sim::cli_main(args)?,
        Command::XenBackend(args) => crate::xen::daemon::run(args)?,
        Command::Pr(args) => crate::storage::fencing::cli::run(args)?,
        #[cfg(feature = "sanlock")]
        Command::Lease(args) => crate::storage::fencing::sanlock::cli::run(args)?,
    }
    Ok(())
}
