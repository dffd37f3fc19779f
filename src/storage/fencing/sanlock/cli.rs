//! `blkshim lease ...`: the sanlock fence by hand, for operators and the
//! guest test (`qemu-harness/hostside-sanlock.sh`), over the same
//! [`SanlockFence`] `blkshim serve --fence sanlock` uses. Every step prints
//! one JSON object on stdout (`"ok": false` with the error's `kind` on
//! failure, exit status non-zero). The daemon is found at
//! `$SANLOCK_RUN_DIR/sanlock.sock` (default `/run/sanlock`).

use super::options::SanlockArgs;
use super::plan::resource_name;
use super::SanlockFence;
use crate::storage::fencing::cli::error_json;
use crate::storage::fencing::writer::WriterFence;
use crate::storage::fencing::FenceError;
use serde_json::{json, Value};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct LeaseArgs {
    #[command(flatten)]
    pub sanlock: SanlockArgs,
    #[command(subcommand)]
    pub action: LeaseAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum LeaseAction {
    /// Write the lockspace and a fresh lease (lver 0) for every
    /// --sanlock-resource. Destroys the leases there: provisioning only.
    Init,
    /// The lver (the epoch of the last writer) of DISK's lease on the storage.
    Read {
        #[arg(long)]
        disk: String,
    },
    /// Join the lockspace, take DISK's lease at EPOCH (lver = EPOCH), then:
    /// run CMD and release after it exits 0 (a clean hand-off); or with
    /// --hold keep the lease until killed; or release at once.
    Acquire {
        #[arg(long)]
        disk: String,
        #[arg(long)]
        epoch: u64,
        /// While a live host holds the lease, retry every second for up
        /// to this many seconds (default: fail at once).
        #[arg(long, default_value_t = 0)]
        retry_busy_for: u64,
        /// Hold the lease until this process is killed.
        #[arg(long)]
        hold: bool,
        /// The writer to run while holding the lease (killed with SIGKILL
        /// when this process dies).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
}

fn print(mut v: Value, command: &str, t0: Instant) {
    v["command"] = json!(command);
    v["elapsed_s"] = json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    if v.get("ok").is_none() {
        v["ok"] = json!(true);
    }
    println!("{v}");
}

fn fail(e: FenceError, command: &str, t0: Instant) -> String {
    print(error_json(&e), command, t0);
    format!("lease {command}: {e}")
}

/// Run `blkshim lease`.
pub fn run(a: LeaseArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let opts = a.sanlock.to_options().map_err(|e| fail(e, "options", t0))?;
    match a.action {
        LeaseAction::Init => {
            SanlockFence::init_lease_area(&opts).map_err(|e| fail(e, "init", t0))?;
            let timings = opts.timings();
            print(
                json!({
                    "lockspace": opts.lockspace, "path": opts.path.display().to_string(),
                    "lockspace_offset": opts.lockspace_offset,
                    "resources": opts.resources.iter().map(|(d, o)| json!({"disk": d, "resource": resource_name(d), "offset": o})).collect::<Vec<_>>(),
                    "io_timeout": timings.io_timeout, "renewal_s": timings.renewal,
                    "kill_s": timings.renewal_fail, "host_dead_s": timings.host_dead,
                }),
                "init",
                t0,
            );
            Ok(())
        }
        LeaseAction::Read { disk } => {
            let lver = SanlockFence::read_lver(&opts, &disk).map_err(|e| fail(e, "read", t0))?;
            print(
                json!({"disk": disk, "resource": resource_name(&disk), "lver": lver}),
                "read",
                t0,
            );
            Ok(())
        }
        LeaseAction::Acquire {
            disk,
            epoch,
            retry_busy_for,
            hold,
            cmd,
        } => {
            let fence = SanlockFence::open(opts).map_err(|e| fail(e, "join", t0))?;
            print(
                json!({"lockspace": fence.options().lockspace, "host_id": fence.options().host_id, "pid": std::process::id()}),
                "join",
                t0,
            );
            let t1 = Instant::now();
            let mut busy = 0u64;
            loop {
                match fence.acquire(&disk, epoch) {
                    Ok(()) => break,
                    Err(FenceError::LeaseBusy { .. })
                        if t1.elapsed() < Duration::from_secs(retry_busy_for) =>
                    {
                        busy += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => {
                        let mut v = error_json(&e);
                        v["busy_retries"] = json!(busy);
                        v["waited_s"] = json!(t1.elapsed().as_secs_f64());
                        print(v, "acquire", t0);
                        return Err(format!("lease acquire: {e}"));
                    }
                }
            }
            let held = fence.inquire().map_err(|e| fail(e, "inquire", t0))?;
            print(
                json!({"disk": disk, "epoch": epoch, "resource": resource_name(&disk),
                       "held": held, "busy_retries": busy,
                       "waited_s": (t1.elapsed().as_secs_f64() * 10.0).round() / 10.0}),
                "acquire",
                t0,
            );
            if hold {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            if let Some((prog, args)) = cmd.split_first() {
                let mut c = std::process::Command::new(prog);
                c.args(args);
                // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and
                // touches no memory of the parent; it runs in the child
                // between fork and exec.
                unsafe {
                    c.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let status = c.status().map_err(|e| fail(FenceError::Io(e), "run", t0))?;
                if !status.success() {
                    print(
                        json!({"ok": false, "kind": "writer-failed", "exit": status.code(), "signal": status.signal(),
                               "error": "the writer failed: lease kept until this process exits (no clean hand-off)"}),
                        "run",
                        t0,
                    );
                    return Err(format!("lease: writer {prog:?} failed: {status}"));
                }
            }
            fence
                .release(&disk, epoch)
                .map_err(|e| fail(e, "release", t0))?;
            print(json!({"disk": disk, "epoch": epoch}), "release", t0);
            Ok(())
        }
    }
}
