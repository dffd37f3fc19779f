//! Fencing at the storage: what a host-side deployment needs on top of the
//! core (seeds/002). Each host's path to the shared storage registers a key
//! (the writer's epoch); the destination of a hand-off takes the reservation
//! with a *preempt and abort*, which aborts every older registrant's
//! commands in flight and refuses its later writes. A gateway owns all I/O
//! and does not need this.
//!
//! The contract is SCSI-3 persistent reservations of type *Write Exclusive*
//! with the keys set to epochs; a real backend implements it with
//! PERSISTENT RESERVE OUT (REGISTER, then PREEMPT AND ABORT of every key
//! READ KEYS lists below its own). The simulation's storage model
//! implements it too.
//!
//! - [`PrFencing`] ([`pr`]) is that backend over a Linux block device
//!   (SCSI `sd`, NVMe, device-mapper multipath): the `linux/pr.h` ioctls for
//!   PERSISTENT RESERVE OUT, SG_IO (SCSI) or the NVMe passthrough for
//!   reading keys and the reservation.
//! - [`key`]: how an epoch becomes a 64-bit PR key with a blkshim marker,
//!   so keys of other cluster software are recognised and left alone.
//! - [`parse`]: the parsers of what the device answers (untrusted bytes;
//!   fuzzed by `fuzz/fuzz_targets/pr_response.rs`).
//! - [`status`]: what a PR ioctl's return value means (a failed one returns
//!   a *positive* SCSI/NVMe status, not -errno).
//! - [`WriterFence`] ([`writer`]): what a host-side writer uses before its
//!   first write (PR, sanlock leases, or nothing), chosen with `--fence`.
//! - [`WriteFailure`]: a write refused because its path was fenced (EBADE)
//!   is its own kind of failure, never a transient one.

pub mod cli;
mod device;
mod ioctl;
pub mod key;
#[cfg(test)]
pub(crate) mod model;
pub mod parse;
pub mod pr;
pub mod status;
pub mod writer;

pub use key::{decode_key, encode_key, KeyOwner, BLKSHIM_KEY_MARKER, MAX_KEY_EPOCH};
pub use parse::{ReservationType, ScsiReservation};
pub use pr::{PrFencing, PrOptions, PreemptMode};
pub use status::{PrStatus, Transport};
pub use writer::{FenceMode, PrWriterFence, WriterFence};

use std::fmt;
use std::io;

/// A reservation key: the epoch of the writer that registered it.
pub type ReservationKey = u64;

/// Why a fencing command failed.
#[derive(Debug)]
pub enum FenceError {
    /// The path has not registered this key.
    NotRegistered { key: ReservationKey },
    /// A newer writer holds the reservation: this one is stale and must not write.
    HeldByNewer {
        key: ReservationKey,
        holder: ReservationKey,
    },
    /// The command did not reach the storage.
    Io(io::Error),
    /// The storage refused a persistent-reservation command with
    /// RESERVATION CONFLICT (SCSI status 0x18, `0x118` as `sd` returns it on
    /// Linux 6.1; NVMe status 0x83): this path is not registered with the key
    /// the command named, or another path holds the reservation.
    Conflict {
        /// The command: `register`, `reserve`, `release`, `preempt`, ...
        command: &'static str,
        /// The raw value the ioctl returned.
        status: u32,
    },
    /// The reservation (or this path's registration) belongs to software
    /// other than blkshim (a key without blkshim's marker, e.g. Pacemaker's
    /// `fence_scsi`): blkshim does not preempt or replace it.
    Foreign { key: u64 },
    /// The storage answered a reservation command with another error.
    Device {
        command: &'static str,
        status: PrStatus,
    },
    /// The device sent a reservation report blkshim cannot trust (too
    /// short, inconsistent lengths); nothing was decided from it.
    BadResponse(String),
}

impl fmt::Display for FenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceError::NotRegistered { key } => write!(f, "key {key} is not registered"),
            FenceError::HeldByNewer { key, holder } => write!(
                f,
                "reservation held by newer key {holder}: key {key} is stale"
            ),
            FenceError::Io(e) => write!(f, "reservation command failed: {e}"),
            FenceError::Conflict { command, status } => write!(
                f,
                "reservation conflict: the storage refused {command} from this path \
                 (status {status:#x}): not registered with that key, or another path \
                 holds the reservation"
            ),
            FenceError::Foreign { key } => write!(
                f,
                "key {key:#018x} was not made by blkshim (another cluster manager's?): \
                 left alone"
            ),
            FenceError::Device { command, status } => {
                write!(f, "{command} failed at the storage: {status}")
            }
            FenceError::BadResponse(why) => write!(f, "untrusted reservation report: {why}"),
        }
    }
}

impl std::error::Error for FenceError {}

impl FenceError {
    /// A short machine-readable name of the variant (the `kind` of
    /// `blkshim pr`'s JSON errors).
    pub fn kind(&self) -> &'static str {
        match self {
            FenceError::NotRegistered { .. } => "not-registered",
            FenceError::HeldByNewer { .. } => "held-by-newer",
            FenceError::Io(_) => "io",
            FenceError::Conflict { .. } => "reservation-conflict",
            FenceError::Foreign { .. } => "foreign",
            FenceError::Device { .. } => "device",
            FenceError::BadResponse(_) => "bad-response",
        }
    }
}

impl From<io::Error> for FenceError {
    fn from(e: io::Error) -> Self {
        FenceError::Io(e)
    }
}

/// What a preempt did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preempted {
    /// Keys whose registrations were removed.
    pub keys: Vec<ReservationKey>,
    /// Commands in flight that the storage aborted (they will never land).
    pub aborted: usize,
}

/// Persistent-reservation style fencing, seen from one host's path.
pub trait StorageFencing: Send + Sync {
    /// Register `key` for this path. Grants no write access by itself.
    fn register(&self, key: ReservationKey) -> Result<(), FenceError>;
    /// Take the reservation with `key` (registered before): remove every
    /// registration with a lower key and abort their commands in flight;
    /// from then on only this path may write. Refused when a higher key
    /// holds the reservation.
    fn preempt_and_abort(&self, key: ReservationKey) -> Result<Preempted, FenceError>;
    /// The key holding the reservation, if any.
    fn reservation(&self) -> Option<ReservationKey>;
}

/// A new writer at `epoch` takes the storage over: register, then preempt
/// and abort everything older. Call after the epoch store admitted `epoch`
/// and before the writer's first I/O.
pub fn take_over(
    fencing: &dyn StorageFencing,
    epoch: ReservationKey,
) -> Result<Preempted, FenceError> {
    fencing.register(epoch)?;
    fencing.preempt_and_abort(epoch)
}

/// Why an I/O failed, as far as retrying it is concerned.
///
/// A write refused because its path lost the reservation fails with EBADE
/// (the block layer's `BLK_STS_NEXUS`, from a SCSI RESERVATION CONFLICT or
/// an NVMe Reservation Conflict). That writer is stale: a newer one owns the
/// disk. Retrying the write, on this path or another of the same host,
/// could at best fail again and at worst land after the newer writer's
/// data, so it is a kind of its own, never [`WriteFailure::Transient`].
///
/// ```
/// use blkshim::storage::fencing::WriteFailure;
/// let e = std::io::Error::from_raw_os_error(libc::EBADE);
/// assert_eq!(WriteFailure::of(&e), WriteFailure::Fenced);
/// assert!(!WriteFailure::of(&e).may_retry());
/// let e = std::io::Error::from_raw_os_error(libc::EAGAIN);
/// assert!(WriteFailure::of(&e).may_retry());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// EBADE: this path has been fenced (reservation conflict). Stop
    /// writing; never retry.
    Fenced,
    /// EINTR/EAGAIN: nothing happened; resubmitting is safe.
    Transient,
    /// Any other error (EIO, ENOSPC...): fail the request.
    Failed,
}

impl WriteFailure {
    /// Classify an I/O error.
    pub fn of(e: &io::Error) -> WriteFailure {
        match e.raw_os_error() {
            Some(libc::EBADE) => WriteFailure::Fenced,
            Some(libc::EINTR) | Some(libc::EAGAIN) => WriteFailure::Transient,
            _ => WriteFailure::Failed,
        }
    }

    /// Classify a negative errno (an io_uring completion's `res`).
    pub fn of_errno(res: i32) -> WriteFailure {
        WriteFailure::of(&io::Error::from_raw_os_error(res.saturating_abs()))
    }

    /// Whether resubmitting the same I/O is allowed.
    pub fn may_retry(self) -> bool {
        self == WriteFailure::Transient
    }
}

/// Whether `e` says the path was fenced (EBADE, a reservation conflict).
pub fn is_fenced(e: &io::Error) -> bool {
    WriteFailure::of(e) == WriteFailure::Fenced
}
