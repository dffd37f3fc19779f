//! `blkshim` subcommands. Each subcommand is a thin shell over a module's
//! own entry point, so the library stays usable without the binary.

use crate::control::ctl::{self, CtlRequest};
use crate::nbd::config::CacheMode;
use crate::nbd::config::{self, CliSet, ServeConfig};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

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
    Serve(Box<ServeArgs>),
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
    /// TLS is then required unless --tls off.
    #[arg(long)]
    listen: Option<String>,
    /// TLS (STARTTLS): off, on (offered) or require [default: require over
    /// TCP; over the unix socket on with --tls-certificates, else off].
    #[arg(long, value_enum)]
    tls: Option<crate::nbd::tls::TlsMode>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (as
    /// qemu's tls-creds-x509 and nbdkit's --tls-certificates).
    #[arg(long)]
    tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by ca-cert.pem (as qemu's
    /// verify-peer); false: one is asked for but optional.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    tls_verify_peer: Option<bool>,
    /// TLS with pre-shared keys instead of certificates: a file of
    /// USERNAME:HEXKEY lines (as qemu's tls-creds-psk and nbdkit's
    /// --tls-psk); the username is the client's identity.
    #[arg(long, conflicts_with = "tls_certificates")]
    tls_psk: Option<PathBuf>,
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
    /// Testing only: hold I/Os for a delay before they reach the storage
    /// (like nbdkit's delay filter), e.g. write=2s[,read=0][,flush=0]
    /// [,trim=..][,zeroes=..][,armed-file=PATH: only while PATH exists].
    #[arg(long, value_parser = |s: &str| config::parse_storage_delay(s).map(Box::new))]
    storage_delay: Option<Box<crate::storage::StorageDelay>>,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics
    /// (HOST:PORT; a bare port binds 127.0.0.1) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Control socket [default: ./blkshim.ctl].
    #[arg(long)]
    control: Option<PathBuf>,
    /// A group that may use the control socket besides root and the
    /// server's user (the socket is then mode 0660, owned by this group).
    #[arg(long)]
    control_group: Option<String>,
    /// State directory: the epoch store (unless --epoch-store) and, with
    /// --fence, the hand-off ledger, which stays here even with an etcd
    /// epoch store [default: .blkshim-epochs next to the first disk].
    #[arg(long, alias = "epoch-dir")]
    state_dir: Option<PathBuf>,
    /// Where the epochs live: file:DIR or
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] [default: file: the state
    /// directory].
    #[arg(long, value_parser = crate::epoch::StoreUrl::parse)]
    epoch_store: Option<crate::epoch::StoreUrl>,
    /// Host-side mode: this server is one host's writer of disks on shared
    /// storage, and this is what keeps an older host's writes off them
    /// (none: take over only from a host that handed over, or one an
    /// operator confirmed dead; pr: persistent reservations; sanlock:
    /// leases). Omit for a gateway (one server for every writer).
    #[arg(long, value_enum)]
    fence: Option<crate::storage::fencing::FenceMode>,
    /// Host-side: this host's name in the shared hand-off ledger
    /// [default: the machine's identity].
    #[arg(long, requires = "fence")]
    host_id: Option<String>,
    /// Host-side: how long a first write waits for the holder's hand-off
    /// record before fencing it (or, with --fence none, refusing).
    #[arg(long, value_parser = config::parse_duration, default_value = "30s", requires = "fence")]
    resume_wait: std::time::Duration,
    /// Host-side with an etcd epoch store: the TTL in seconds of this
    /// host's liveness lease in etcd; a holder whose lease ended is fenced
    /// without waiting --resume-wait.
    #[arg(long, default_value_t = 10, requires = "fence")]
    host_lease_ttl: u64,
    /// --fence pr: the block device to register through, NAME=DEV or DEV
    /// [default: the disk's path].
    #[arg(long, requires = "fence")]
    pr_device: Vec<String>,
    /// --fence pr: preempt-and-abort (also aborts the old host's commands
    /// queued at the target) or preempt (Linux 6.1's tcm_loop hangs on the
    /// abort).
    #[arg(long, value_parser = config::parse_preempt, default_value = "preempt-and-abort", requires = "fence")]
    pr_preempt: crate::storage::fencing::PreemptMode,
    /// --fence sanlock: lockspace, host id, lease device, per-disk leases.
    #[command(flatten)]
    sanlock: crate::storage::fencing::sanlock::SanlockArgs,
    /// Also export DISK over vhost-user-blk on the unix socket SOCKET, its
    /// frontend writing at EPOCH [default: the disk's current epoch]
    /// (repeatable; one frontend at a time per socket; a migration
    /// destination gets a socket of its own at the next epoch).
    #[arg(long, value_name = "DISK[@EPOCH]=SOCKET", value_parser = crate::vhost::VhostSpec::parse)]
    vhost_user_blk: Vec<crate::vhost::VhostSpec>,
    /// Queues each vhost-user-blk device offers (qemu's num-queues may be
    /// fewer) [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    vhost_queues: Option<u16>,
    /// TOML config file naming several disks.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NAME=PATH or PATH (the name is then the file's stem)
    /// [default, with no config file: vm1=./vm1.img, 1 GiB unless --size].
    disks: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    // The default is clap's to print: repeating it here printed it twice.
    /// Control socket of the server.
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
    /// Serve DISK[@EPOCH] over vhost-user-blk on a new unix socket SOCKET
    /// (e.g. for a migration destination: vm1@8).
    VhostAdd { export: String, socket: PathBuf },
    /// Stop serving the vhost-user-blk socket SOCKET (its frontend is cut).
    VhostRemove { socket: PathBuf },
    /// Host-side: hand the disk over (drain, wait until this host's writes
    /// left the storage, publish the record, stop writing).
    Suspend { disk: String },
    /// Host-side, `--fence none`: state that the host holding DISK is dead,
    /// so that a new host may take the disk without its record. Needs no
    /// running server; writes the confirmation into the shared state
    /// directory. Only for a host that is powered off or otherwise cannot
    /// write: its queued writes would land over the new host's.
    Takeover {
        disk: String,
        /// Confirm the holder's host is dead (required).
        #[arg(long)]
        source_dead: bool,
        /// The shared state directory (epochs and hand-off ledger).
        #[arg(long, alias = "epoch-dir")]
        state_dir: PathBuf,
        /// The epoch store, when not the state directory (file:DIR or
        /// etcd://HOST:PORT[,...][/PREFIX]).
        #[arg(long, value_parser = crate::epoch::StoreUrl::parse)]
        epoch_store: Option<crate::epoch::StoreUrl>,
    },
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let set = CliSet {
        socket: a.socket.is_some(),
        control: a.control.is_some(),
        fence_timeout: a.fence_timeout.is_some(),
        cache: a.cache.is_some(),
        tls_verify_peer: a.tls_verify_peer.is_some(),
        vhost_queues: a.vhost_queues.is_some(),
    };
    let mut cfg = ServeConfig {
        socket: a.socket,
        listen: a.listen,
        control: a.control.unwrap_or_else(|| PathBuf::from("blkshim.ctl")),
        control_group: a.control_group,
        state_dir: a.state_dir,
        epoch_store: a.epoch_store,
        fence_timeout: a.fence_timeout.unwrap_or(std::time::Duration::from_secs(5)),
        cache: a.cache.unwrap_or(CacheMode::Writeback),
        engine: a.engine,
        storage_delay: a.storage_delay.map(|d| *d),
        metrics: a.metrics,
        disks: Vec::new(),
        host_side: a.fence.map(|fence| config::HostSideConfig {
            fence,
            host_id: a.host_id,
            resume_wait: a.resume_wait,
            host_lease_ttl: a.host_lease_ttl,
            pr_devices: a
                .pr_device
                .iter()
                .map(|s| config::parse_pr_device(s))
                .collect(),
            pr_preempt: a.pr_preempt,
            sanlock: a.sanlock.clone(),
        }),
        tls: a.tls,
        tls_certificates: a.tls_certificates,
        tls_verify_peer: a.tls_verify_peer.unwrap_or(true),
        tls_psk: a.tls_psk,
        clients: Vec::new(),
        vhost_user_blk: a.vhost_user_blk,
        vhost_queues: a.vhost_queues.unwrap_or(2),
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

/// `blkshim ctl takeover DISK --source-dead`: the operator's confirmation,
/// written where every host's admission reads it.
fn confirm_source_dead(
    disk: &str,
    source_dead: bool,
    state_dir: &Path,
    epoch_store: Option<crate::epoch::StoreUrl>,
) -> Result<(), String> {
    if !source_dead {
        return Err(format!(
            "refusing: say --source-dead only if the host holding {disk:?} is powered off or otherwise cannot write (its queued writes would land over the new host's); with --fence pr or sanlock no confirmation is needed"
        ));
    }
    let url = epoch_store.unwrap_or_else(|| crate::epoch::StoreUrl::File(state_dir.to_path_buf()));
    let epochs = url.open().map_err(|e| format!("epoch store {url}: {e}"))?;
    let epoch = epochs.current(disk).map_err(|e| e.to_string())?;
    if epoch == 0 {
        return Err(format!("disk {disk:?} has no holder: nothing to confirm"));
    }
    let ledger = crate::handoff::HandoffLedger::open(state_dir)
        .map_err(|e| format!("hand-off ledger {}: {e}", state_dir.display()))?;
    let by = format!(
        "{}@{}",
        std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".into()),
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    );
    let c = ledger
        .confirm_source_dead(disk, epoch, &by)
        .map_err(|e| format!("writing the confirmation: {e}"))?;
    log::warn!(
        "disk {disk:?}: {by} confirmed the holder of epoch {epoch} ({}) dead",
        c.holder
            .as_ref()
            .map_or("no claim".into(), |h| format!("{} on {}", h.label, h.host))
    );
    println!("{}", serde_json::to_string(&c).map_err(|e| e.to_string())?);
    Ok(())
}

fn ctl(a: CtlArgs) -> Result<(), String> {
    let req = match a.action {
        CtlAction::Status => CtlRequest::Status,
        CtlAction::Fence { disk } => CtlRequest::Fence { disk },
        CtlAction::Handoff { disk, to } => CtlRequest::Handoff { disk, to },
        CtlAction::Suspend { disk } => CtlRequest::Suspend { disk },
        CtlAction::VhostAdd { export, socket } => {
            let (disk, epoch) = crate::vhost::export::parse_export(&export)?;
            CtlRequest::VhostAdd {
                disk,
                epoch,
                socket: std::path::absolute(&socket).unwrap_or(socket),
            }
        }
        CtlAction::VhostRemove { socket } => CtlRequest::VhostRemove {
            socket: std::path::absolute(&socket).unwrap_or(socket),
        },
        CtlAction::Takeover {
            disk,
            source_dead,
            state_dir,
            epoch_store,
        } => return confirm_source_dead(&disk, source_dead, &state_dir, epoch_store),
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
            CtlRequest::Suspend { .. } => println!(
                "disk {}: handed over at epoch {} ({}); the next writer takes epoch {}",
                v["disk"].as_str().unwrap_or("?"),
                v["source_epoch"],
                v["method"].as_str().unwrap_or("?"),
                v["destination_epoch"]
            ),
            CtlRequest::VhostAdd { .. } | CtlRequest::VhostRemove { .. } => println!(
                "{} disk {} epoch {} on {}",
                v["action"].as_str().unwrap_or("?"),
                v["disk"].as_str().unwrap_or("?"),
                v["epoch"],
                v["socket"].as_str().unwrap_or("?")
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

/// The clap definition of the whole command line, for tools that render it
/// (`examples/mangen.rs` writes the man pages from it).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parse the command line and run the subcommand.
pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(*a)?,
        Command::Ctl(a) => ctl(a)?,
        Command::Sim(args) => crate::sim::cli_main(args)?,
        Command::XenBackend(args) => crate::xen::daemon::run(args)?,
        Command::Pr(args) => crate::storage::fencing::cli::run(args)?,
        #[cfg(feature = "sanlock")]
        Command::Lease(args) => crate::storage::fencing::sanlock::cli::run(args)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks (unique argument ids across flattened
    /// option groups, valid defaults), which otherwise fire only when a
    /// subcommand is first parsed.
    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command of the tree, with its path (`blkshim ctl status`).
    fn walk(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        out.push((path.clone(), cmd.clone()));
        for sub in cmd.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    /// No option says its default twice in `--help` or `-h` (once in its
    /// doc comment and once from clap's `default_value`), as `ctl
    /// --control` did: per argument, and per rendered help line.
    #[test]
    fn no_default_printed_twice() {
        let mut cmds = Vec::new();
        walk(&command(), "blkshim".into(), &mut cmds);
        assert!(cmds.len() > 10, "the walk sees the subcommands");
        for (path, mut cmd) in cmds {
            for a in cmd.get_arguments() {
                let doc = [a.get_help(), a.get_long_help()]
                    .into_iter()
                    .flatten()
                    .map(|h| h.to_string())
                    .collect::<String>();
                let clap_shows_default =
                    !a.get_default_values().is_empty() && !a.is_hide_default_value_set();
                assert!(
                    !(doc.contains("[default:") && clap_shows_default),
                    "{path} --{}: the doc comment and clap both give the default",
                    a.get_id()
                );
            }
            cmd.build();
            for help in [cmd.render_help(), cmd.render_long_help()] {
                for line in help.to_string().lines() {
                    assert!(
                        line.matches("[default:").count() <= 1,
                        "{path} --help: {line:?}"
                    );
                }
            }
        }
    }
}
