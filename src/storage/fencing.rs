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
        }
    }
}

impl std::error::Error for FenceError {}

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
