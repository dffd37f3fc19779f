//! Admission of a host-side writer: one blkshim per host over shared
//! storage (a Xen dom0 on a SAN, `blkshim serve --fence ...` on each qemu
//! host), the epoch store and the [`HandoffLedger`] on storage every host
//! shares.
//!
//! A new writer may write only once (1) the epoch store gave it the next
//! epoch and (2) no older writer can still put a write on the storage. What
//! settles (2) is, in order of preference:
//!
//! - the holder's hand-off record ([`Holder::Released`]), published only
//!   after its writes left the storage; or a holder this host knows is gone
//!   or is itself ([`Holder::Dead`], [`Holder::Local`]);
//! - else, after waiting [`HostSidePolicy::resume_wait`] for that record, the
//!   [`WriterFence`] (`--fence pr`: preempt its key; `--fence sanlock`:
//!   acquire its lease, which waits out a holder that stopped renewing);
//! - else (`--fence none`) nothing can stop the holder's queued writes, so
//!   the takeover is **refused**, unless an operator confirmed that host
//!   dead ([`HandoffLedger::confirm_source_dead`], `blkshim ctl takeover
//!   DISK --source-dead`).
//!
//! Whatever settled it, the new writer then claims the disk in the ledger
//! and acquires the fence before its first write ([`establish`]).
//!
//! [`HostSide`] is that admission done lazily, at a connection's first write
//! (the NBD gateway in host-side mode: a migration destination's qemu
//! connects long before it writes), and what follows it: a write the
//! storage refuses as fenced (EBADE: a newer host preempted this one) ends
//! this host's tenure, and every later request fails with EIO.

use super::ledger::{HandoffLedger, Holder};
use super::{Disk, DiskError, SuspendMode};
use crate::storage::fencing::{FenceError, FenceMode, WriterFence};
use crate::tracking::Epoch;
use parking_lot::Mutex;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a host admits itself as a disk's writer.
#[derive(Clone)]
pub struct HostSidePolicy {
    /// Claims, records and confirmations, on the shared state directory.
    pub ledger: Arc<HandoffLedger>,
    /// `None` is `--fence none`.
    pub fence: Option<Arc<dyn WriterFence>>,
    /// How long to wait for a live holder's record before fencing it (or,
    /// with no fence, refusing).
    pub resume_wait: Duration,
}

impl fmt::Debug for HostSidePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostSidePolicy(fence {}, resume_wait {:?}, {:?})",
            self.fence_mode().name(),
            self.resume_wait,
            self.ledger
        )
    }
}

impl HostSidePolicy {
    pub fn fence_mode(&self) -> FenceMode {
        self.fence.as_ref().map_or(FenceMode::None, |f| f.mode())
    }
}

/// Why a host was not admitted.
#[derive(Debug)]
pub enum AdmitError {
    /// A holder that may still write did not hand the disk over, and
    /// nothing can stop its writes: refused, with what to do about it.
    Refused(String),
    /// The fence could not be acquired: this host must not write.
    Fence(FenceError),
    Disk(DiskError),
    /// The ledger on the shared directory could not be read or written.
    Ledger(String),
    /// The caller gave up (the device is being removed).
    Stopped,
}

impl fmt::Display for AdmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmitError::Refused(why) => write!(f, "{why}"),
            AdmitError::Fence(e) => write!(f, "fence: {e}"),
            AdmitError::Disk(e) => write!(f, "{e}"),
            AdmitError::Ledger(e) => write!(f, "hand-off ledger: {e}"),
            AdmitError::Stopped => write!(f, "stopped while waiting for admission"),
        }
    }
}

impl std::error::Error for AdmitError {}

impl From<DiskError> for AdmitError {
    fn from(e: DiskError) -> Self {
        AdmitError::Disk(e)
    }
}

/// How the epoch was obtained, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmittedBy {
    /// Nobody held the disk.
    Free,
    /// The holder's hand-off record.
    Record,
    /// The holder was this process, or a process of this host that is gone.
    LocalHolder,
    /// The holder did not hand over; the fence stops it.
    Fenced,
    /// The holder did not hand over; an operator confirmed it dead.
    ConfirmedDead,
    /// The caller's own override (a Xen vbd's `blkshim-resume = takeover`).
    Override,
}

/// Decide whether this host may take `disk`'s next epoch, and take it.
/// `stop` ends a wait early; `override_takeover` is a caller's own
/// operator override, polled while waiting. Does not claim or fence: call
/// [`establish`] with the epoch before writing.
pub fn decide(
    disk: &Arc<Disk>,
    policy: &HostSidePolicy,
    who: &str,
    stop: &dyn Fn() -> bool,
    override_takeover: &dyn Fn() -> bool,
) -> Result<(Epoch, AdmittedBy), AdmitError> {
    let end = Instant::now() + policy.resume_wait;
    let mut waiting_logged = false;
    loop {
        let current = disk.stored_epoch()?;
        let holder = policy
            .ledger
            .holder(disk.name(), current)
            .map_err(|e| AdmitError::Ledger(e.to_string()))?;
        let (admitted, by) = match &holder {
            Holder::Released(record) => (disk.resume(record), AdmittedBy::Record),
            Holder::Free => (disk.take_over(current), AdmittedBy::Free),
            Holder::Local(c) | Holder::Dead(c) => {
                log::info!(
                    "{who}: disk {:?} epoch {current} was held by pid {} of this host ({}), {}; taking over",
                    disk.name(),
                    c.pid,
                    c.label,
                    if matches!(holder, Holder::Local(_)) {
                        "this process: its writes in flight stay ordered first"
                    } else {
                        "which is gone"
                    }
                );
                (disk.take_over(current), AdmittedBy::LocalHolder)
            }
            Holder::Live(c) => {
                let confirmed = policy
                    .ledger
                    .source_dead(disk.name(), current)
                    .map_err(|e| AdmitError::Ledger(e.to_string()))?;
                if let Some(conf) = confirmed {
                    log::warn!(
                        "{who}: disk {:?} epoch {current}: {} confirmed host {:?} dead; taking over without its record",
                        disk.name(),
                        conf.confirmed_by,
                        c.host
                    );
                    (disk.take_over(current), AdmittedBy::ConfirmedDead)
                } else if override_takeover() {
                    log::warn!(
                        "{who}: disk {:?} epoch {current}: operator override, taking over from {} on host {:?} without its record",
                        disk.name(),
                        c.label,
                        c.host
                    );
                    (disk.take_over(current), AdmittedBy::Override)
                } else if stop() {
                    return Err(AdmitError::Stopped);
                } else if Instant::now() < end {
                    if !waiting_logged {
                        log::warn!(
                            "{who}: disk {:?} epoch {current} is held by {} on host {:?} (pid {}); waiting up to {:?} for its hand-off record",
                            disk.name(),
                            c.label,
                            c.host,
                            c.pid,
                            policy.resume_wait
                        );
                        waiting_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                } else if let Some(fence) = &policy.fence {
                    log::warn!(
                        "{who}: disk {:?} epoch {current}: {} on host {:?} did not hand over within {:?}; taking over, the {} fence keeps its writes off the storage",
                        disk.name(),
                        c.label,
                        c.host,
                        policy.resume_wait,
                        fence.mode().name()
                    );
                    (disk.take_over(current), AdmittedBy::Fenced)
                } else {
                    return Err(AdmitError::Refused(format!(
                        "disk {:?} is held at epoch {current} by {} on host {:?} (pid {}), which has not handed it over after {:?} and may still have writes queued toward the storage; with --fence none nothing can stop them, so the takeover is refused. Configure --fence pr (storage with persistent reservations) or --fence sanlock, or, if that host is powered off, confirm it: blkshim ctl takeover {} --source-dead --state-dir {}",
                        disk.name(),
                        c.label,
                        c.host,
                        c.pid,
                        policy.resume_wait,
                        disk.name(),
                        policy.ledger.dir().display()
                    )));
                }
            }
        };
        match admitted {
            Ok(epoch) => return Ok((epoch, by)),
            // Someone else moved the epoch meanwhile: look again.
            Err(DiskError::StaleEpoch { .. } | DiskError::StaleRecord { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Make `epoch` this host's: claim it in the ledger (others now wait for
/// its record) and acquire the fence (no older writer can write from
/// here on). Only then may the first write go out.
pub fn establish(
    disk: &Disk,
    policy: &HostSidePolicy,
    epoch: Epoch,
    label: &str,
) -> Result<(), AdmitError> {
    policy
        .ledger
        .claim(disk.name(), epoch, label)
        .map_err(|e| AdmitError::Ledger(format!("claiming disk {:?}: {e}", disk.name())))?;
    if let Some(fence) = &policy.fence {
        let t = Instant::now();
        fence
            .acquire(disk.name(), epoch)
            .map_err(AdmitError::Fence)?;
        log::info!(
            "disk {:?}: {} fence acquired at epoch {epoch} in {:?}",
            disk.name(),
            fence.mode().name(),
            t.elapsed()
        );
    }
    Ok(())
}

/// Where a host-side disk stands, as `blkshim ctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Tenure {
    /// Not admitted yet: reads go to the storage, the first write admits.
    Pending,
    /// The last admission was refused (the next write tries again).
    Refused { why: String },
    /// This host writes at `epoch`.
    Admitted { epoch: Epoch, by: AdmittedBy },
    /// This host handed the disk over (`blkshim ctl suspend`).
    HandedOver { epoch: Epoch },
    /// A write of `epoch` was refused by the storage as fenced: a newer
    /// writer took the disk; nothing of this host is written any more.
    Lost { epoch: Epoch, why: String },
}

/// A disk's host-side admission, done at the first write (see the module
/// documentation).
pub struct HostSide {
    policy: HostSidePolicy,
    tenure: Mutex<Tenure>,
    /// Held across one admission, so concurrent first writes admit once.
    admitting: Mutex<()>,
    label: String,
}

impl fmt::Debug for HostSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostSide({:?}, {:?})", self.policy, *self.tenure.lock())
    }
}

impl HostSide {
    pub fn new(policy: HostSidePolicy, label: &str) -> HostSide {
        HostSide {
            policy,
            tenure: Mutex::new(Tenure::Pending),
            admitting: Mutex::new(()),
            label: label.to_string(),
        }
    }

    pub fn policy(&self) -> &HostSidePolicy {
        &self.policy
    }

    pub fn tenure(&self) -> Tenure {
        self.tenure.lock().clone()
    }

    /// The epoch this host writes at, admitting it first if needed.
    pub(super) fn ensure_admitted(&self, disk: &Arc<Disk>) -> Result<Epoch, AdmitError> {
        if let Some(e) = self.admitted_epoch()? {
            return Ok(e);
        }
        let _one = self.admitting.lock();
        if let Some(e) = self.admitted_epoch()? {
            return Ok(e);
        }
        let who = format!(
            "{} (host-side, fence {})",
            self.label,
            self.policy.fence_mode().name()
        );
        let result =
            decide(disk, &self.policy, &who, &|| false, &|| false).and_then(|(epoch, by)| {
                establish(disk, &self.policy, epoch, &self.label)?;
                Ok((epoch, by))
            });
        let mut t = self.tenure.lock();
        match result {
            Ok((epoch, by)) => {
                log::info!("disk {:?}: admitted at epoch {epoch} ({by:?})", disk.name());
                *t = Tenure::Admitted { epoch, by };
                Ok(epoch)
            }
            Err(e) => {
                log::error!("disk {:?}: not admitted: {e}", disk.name());
                *t = Tenure::Refused { why: e.to_string() };
                Err(e)
            }
        }
    }

    fn admitted_epoch(&self) -> Result<Option<Epoch>, AdmitError> {
        match &*self.tenure.lock() {
            Tenure::Admitted { epoch, .. } => Ok(Some(*epoch)),
            // Handed over: a new writer here (the guest migrating back)
            // is admitted anew, behind whoever holds the disk now; the old
            // writers stay suspended.
            Tenure::Pending | Tenure::Refused { .. } | Tenure::HandedOver { .. } => Ok(None),
            // Preempted: a newer host holds the disk and may not have
            // handed it over; taking it back is for a restarted server.
            Tenure::Lost { why, .. } => Err(AdmitError::Refused(format!(
                "{why}; restart this server to take the disk back"
            ))),
        }
    }

    /// A write of `epoch` came back fenced by the storage. Returns whether
    /// this is news (the first such write).
    pub(super) fn lose(&self, epoch: Epoch, why: String) -> bool {
        let mut t = self.tenure.lock();
        if matches!(&*t, Tenure::Lost { epoch: e, .. } if *e >= epoch) {
            return false;
        }
        *t = Tenure::Lost { epoch, why };
        true
    }

    /// Hand the disk over: drain this host's writes (fencing them in the
    /// tracker at `deadline`), wait until none of them can still reach the
    /// storage, publish the record, release the fence. The record is
    /// published only when the writes settled whatever the fence: a
    /// destination that resumes from it need not trust a preempt to recall
    /// them.
    pub fn hand_over(
        &self,
        disk: &Arc<Disk>,
        deadline: Duration,
    ) -> Result<super::HandoffRecord, AdmitError> {
        let _one = self.admitting.lock();
        let epoch = match &*self.tenure.lock() {
            Tenure::Admitted { epoch, .. } => *epoch,
            t => {
                return Err(AdmitError::Refused(format!(
                    "nothing to hand over: this host does not hold the disk ({t:?})"
                )))
            }
        };
        let record = disk.suspend(epoch, SuspendMode::Drain { timeout: deadline })?;
        if !disk.wait_writes_settled(epoch, None) {
            return Err(AdmitError::Refused(
                "writes still in flight at the storage".into(),
            ));
        }
        let published = self
            .policy
            .ledger
            .publish(&record)
            .map_err(|e| AdmitError::Ledger(e.to_string()))?;
        if !published {
            log::warn!(
                "disk {:?}: a newer hand-off record is published already; ours of epoch {epoch} is moot",
                disk.name()
            );
        }
        if let Some(fence) = &self.policy.fence {
            if let Err(e) = fence.release(disk.name(), epoch) {
                log::warn!("disk {:?}: releasing the fence: {e}", disk.name());
            }
        }
        *self.tenure.lock() = Tenure::HandedOver { epoch };
        log::info!(
            "disk {:?}: handed over at epoch {epoch} ({:?}, {} request(s) in the record)",
            disk.name(),
            record.method,
            record.requests.len()
        );
        Ok(record)
    }
}
