//! [`WriterFence`]: what a host-side deployment (a blkshim per host over
//! shared storage) uses to make sure an older writer can no longer write
//! before a newer one writes, whether or not the older one answers.
//!
//! The epoch store orders writers; it cannot stop one. A source host that
//! is cut off (alive, unreachable, its I/O still queued toward the storage)
//! or dead never reads the store again, so only something outside it can
//! keep its queued writes off the disk:
//!
//! - [`FenceMode::Pr`]: the storage refuses them. The newer writer
//!   registers its epoch's key and preempts every older blkshim key
//!   ([`PrWriterFence`], over [`PrFencing`]); a preempted path's writes fail
//!   with EBADE at the target.
//! - [`FenceMode::Sanlock`]: the older host cannot keep writing. Its lease
//!   expires unless renewed; sanlock kills its writer, and failing that the
//!   watchdog resets the host, before another host may take the lease.
//! - [`FenceMode::None`]: nothing. A newer writer may only follow a holder
//!   that handed over a current record (or that this host knows is gone);
//!   any other takeover is refused unless an operator confirms the source
//!   host is dead (`blkshim ctl takeover DISK --source-dead`).

use super::{take_over, FenceError, PrFencing};
use crate::tracking::Epoch;
use serde::Serialize;

/// How a host-side writer keeps older writers off the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMode {
    /// No fence: take over only from a holder that handed the disk over
    /// (or is confirmed dead by an operator).
    None,
    /// SCSI-3 / NVMe persistent reservations, the key carrying the epoch.
    Pr,
    /// sanlock paxos leases (storage without reservations).
    Sanlock,
}

impl FenceMode {
    pub fn name(self) -> &'static str {
        match self {
            FenceMode::None => "none",
            FenceMode::Pr => "pr",
            FenceMode::Sanlock => "sanlock",
        }
    }
}

/// A host's means to take the right to write a shared disk away from every
/// older writer, on any host, whether that writer cooperates or not.
pub trait WriterFence: Send + Sync {
    fn mode(&self) -> FenceMode;

    /// Called after the epoch store admitted `epoch` for `disk` and before
    /// the first write at it: from its return on, no writer below `epoch`
    /// can put a write on the storage. May block (a lease held by a host
    /// that stopped renewing is free only after `host_dead_seconds`). An
    /// error means the new writer must not write.
    fn acquire(&self, disk: &str, epoch: Epoch) -> Result<(), FenceError>;

    /// After a clean hand-off (the record of `epoch` is published and none
    /// of its writes can reach the storage any more): give the right up so
    /// that the next writer need not wait for it.
    fn release(&self, disk: &str, epoch: Epoch) -> Result<(), FenceError>;
}

/// [`WriterFence`] by persistent reservations: register the epoch's key
/// through this host's path, then preempt every older blkshim key.
pub struct PrWriterFence {
    pr: PrFencing,
}

impl PrWriterFence {
    pub fn new(pr: PrFencing) -> PrWriterFence {
        PrWriterFence { pr }
    }

    pub fn fencing(&self) -> &PrFencing {
        &self.pr
    }
}

impl WriterFence for PrWriterFence {
    fn mode(&self) -> FenceMode {
        FenceMode::Pr
    }

    fn acquire(&self, disk: &str, epoch: Epoch) -> Result<(), FenceError> {
        let done = take_over(&self.pr, epoch)?;
        log::info!(
            "disk {disk:?}: reservation taken at epoch {epoch} through {} ({}); preempted {} older key(s){}",
            self.pr.path().display(),
            self.pr.options().preempt.name(),
            done.keys.len(),
            if done.keys.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    done.keys
                        .iter()
                        .map(|k| super::key::key_hex(*k))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        Ok(())
    }

    /// The next writer preempts this key; releasing first would only open
    /// a window in which nobody holds the reservation.
    fn release(&self, _disk: &str, _epoch: Epoch) -> Result<(), FenceError> {
        Ok(())
    }
}
