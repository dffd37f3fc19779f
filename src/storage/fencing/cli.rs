//! `blkshim pr DEV ...`: persistent reservations by hand, for operators and
//! tests, over the same code as [`PrFencing`]. Every command prints one JSON
//! object on stdout; a failure prints `"ok": false` with the error's `kind`
//! (see [`FenceError::kind`]) and exits non-zero.
//!
//! Keys are `0x`-hex, decimal, or `epoch:N` (blkshim's key of epoch N).

use super::key::{key_hex, parse_key_arg};
use super::parse::{key_json, Reservation, ReservationType};
use super::pr::{PrFencing, PrOptions, PreemptMode};
use super::{take_over, FenceError, StorageFencing};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PrArgs {
    /// The block device (SCSI, NVMe or multipath; opened read-write).
    pub device: PathBuf,
    #[command(subcommand)]
    pub action: PrAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum PrAction {
    /// List the registered keys (READ KEYS).
    Keys,
    /// Show the reservation (READ RESERVATION).
    Reservation,
    /// Register KEY for this path (REGISTER).
    Register {
        key: String,
        /// The key this path is registered with now (default: none).
        #[arg(long)]
        old: Option<String>,
        /// REGISTER AND IGNORE EXISTING KEY.
        #[arg(long)]
        ignore_existing: bool,
    },
    /// Remove this path's registration of KEY.
    Unregister { key: String },
    /// Reserve with KEY (registered through this path).
    Reserve {
        key: String,
        /// we, we-ro, we-ar, ea, ea-ro, ea-ar.
        #[arg(long = "type", default_value = "we")]
        rtype: ReservationType,
    },
    /// PREEMPT: this path, registered with KEY, removes VICTIM's registrations.
    Preempt {
        key: String,
        victim: String,
        /// PREEMPT AND ABORT (hangs LIO over tcm_loop on Linux 6.1).
        #[arg(long)]
        abort: bool,
        #[arg(long = "type", default_value = "we")]
        rtype: ReservationType,
    },
    /// Release the reservation held with KEY.
    Release {
        key: String,
        #[arg(long = "type", default_value = "we")]
        rtype: ReservationType,
    },
    /// Remove every registration and the reservation (KEY registered here).
    Clear { key: String },
    /// What a new writer does: register epoch EPOCH's key, preempt every
    /// older blkshim key (PREEMPT AND ABORT unless --no-abort), reserve.
    Takeover {
        epoch: u64,
        /// Plain PREEMPT (for LIO over tcm_loop).
        #[arg(long)]
        no_abort: bool,
        /// we or we-ro.
        #[arg(long = "type", default_value = "we")]
        rtype: ReservationType,
    },
}

fn reservation_json(r: &Option<Reservation>) -> Value {
    match r {
        None => Value::Null,
        Some(r) => {
            let mut v = key_json(r.key);
            v["type"] = match r.rtype {
                Some(t) => json!(t.name()),
                None => json!(format!("unknown-{}", r.type_code)),
            };
            v["scope"] = json!(r.scope);
            v
        }
    }
}

/// The JSON of a failed command (shared with `blkshim lease`).
pub(crate) fn error_json(e: &FenceError) -> Value {
    let mut v = json!({ "ok": false, "kind": e.kind(), "error": e.to_string() });
    match e {
        FenceError::HeldByNewer { key, holder } => {
            v["epoch"] = json!(key);
            v["holder_epoch"] = json!(holder);
        }
        FenceError::NotRegistered { key } => v["epoch"] = json!(key),
        FenceError::Conflict { command, status } => {
            v["failed_command"] = json!(command);
            v["status"] = json!(format!("{status:#x}"));
        }
        FenceError::Device { command, status } => {
            v["failed_command"] = json!(command);
            v["status"] = json!(format!("{:#x}", status.raw));
        }
        FenceError::Foreign { key } => v["key"] = json!(key_hex(*key)),
        FenceError::Io(err) => v["errno"] = json!(err.raw_os_error()),
        FenceError::BadResponse(_) | FenceError::Config(_) => {}
        FenceError::Sanlock { op, rv } => {
            v["failed_command"] = json!(op);
            v["rv"] = json!(rv);
        }
        FenceError::LeaseBusy { resource, rv } => {
            v["resource"] = json!(resource);
            v["rv"] = json!(rv);
        }
    }
    v
}

fn key(s: &str) -> Result<u64, FenceError> {
    parse_key_arg(s)
        .map_err(|m| FenceError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, m)))
}

fn act(pr: &PrFencing, action: &PrAction) -> Result<Value, FenceError> {
    Ok(match action {
        PrAction::Keys => {
            let k = pr.read_keys()?;
            json!({ "generation": k.generation, "keys": k.keys.iter().map(|&k| key_json(k)).collect::<Vec<_>>() })
        }
        PrAction::Reservation => {
            let r = pr.read_reservation_full()?;
            json!({ "generation": r.generation, "reservation": reservation_json(&r.reservation) })
        }
        PrAction::Register {
            key: k,
            old,
            ignore_existing,
        } => {
            let new = key(k)?;
            let old = old.as_deref().map(key).transpose()?.unwrap_or(0);
            pr.register_key(old, new, *ignore_existing)?;
            json!({ "key": key_hex(new) })
        }
        PrAction::Unregister { key: k } => {
            let k = key(k)?;
            pr.register_key(k, 0, false)?;
            json!({ "key": key_hex(k) })
        }
        PrAction::Reserve { key: k, rtype } => {
            let k = key(k)?;
            pr.reserve_key(k, *rtype)?;
            json!({ "key": key_hex(k), "type": rtype.name() })
        }
        PrAction::Preempt {
            key: k,
            victim,
            abort,
            rtype,
        } => {
            let (k, v) = (key(k)?, key(victim)?);
            pr.preempt_key(k, v, *rtype, *abort)?;
            json!({ "key": key_hex(k), "victim": key_hex(v), "abort": abort, "type": rtype.name() })
        }
        PrAction::Release { key: k, rtype } => {
            let k = key(k)?;
            pr.release_key(k, *rtype)?;
            json!({ "key": key_hex(k), "type": rtype.name() })
        }
        PrAction::Clear { key: k } => {
            let k = key(k)?;
            pr.clear_key(k)?;
            json!({ "key": key_hex(k) })
        }
        PrAction::Takeover { epoch, .. } => {
            let p = take_over(pr, *epoch)?;
            let r = pr.read_reservation()?;
            json!({
                "epoch": epoch,
                "key": key_hex(super::encode_key(*epoch).unwrap_or(0)),
                "mode": pr.options().preempt.name(),
                "preempted_epochs": p.keys,
                "reservation": reservation_json(&r),
                "holder_epoch": pr.reservation(),
            })
        }
    })
}

fn command_name(a: &PrAction) -> &'static str {
    match a {
        PrAction::Keys => "keys",
        PrAction::Reservation => "reservation",
        PrAction::Register { .. } => "register",
        PrAction::Unregister { .. } => "unregister",
        PrAction::Reserve { .. } => "reserve",
        PrAction::Preempt { .. } => "preempt",
        PrAction::Release { .. } => "release",
        PrAction::Clear { .. } => "clear",
        PrAction::Takeover { .. } => "takeover",
    }
}

/// Run `blkshim pr`: print the JSON answer; `Err` (after printing the JSON
/// error) when the command failed.
pub fn run(a: PrArgs) -> Result<(), String> {
    let mut opts = PrOptions::default();
    if let PrAction::Takeover {
        no_abort, rtype, ..
    } = &a.action
    {
        if *no_abort {
            opts.preempt = PreemptMode::Preempt;
        }
        opts.rtype = *rtype;
    }
    let name = command_name(&a.action);
    let result = PrFencing::open(&a.device, opts).and_then(|pr| {
        let mut v = act(&pr, &a.action)?;
        v["transport"] = serde_json::to_value(pr.transport()).unwrap_or(Value::Null);
        Ok(v)
    });
    let (mut v, err) = match result {
        Ok(v) => (v, None),
        Err(e) => (error_json(&e), Some(e)),
    };
    v["device"] = json!(a.device.display().to_string());
    v["command"] = json!(name);
    if err.is_none() {
        v["ok"] = json!(true);
    }
    println!("{v}");
    match err {
        None => Ok(()),
        Some(e) => Err(format!("pr {name}: {e}")),
    }
}
