//! Epochs: the fencing tokens of a disk's writers, kept in one crash-safe place.
//!
//! Each disk has one epoch that only grows, and only by compare-and-advance
//! (`expected -> expected + 1`): two hosts racing to take over a disk cannot
//! both win, and a host that read an old value cannot move the epoch
//! backwards. Never a wall-clock time (seeds/004: a newer clock on an older
//! copy is exactly how a stale image wins).

pub mod etcd;
mod file;
mod url;

pub use etcd::EtcdEpochStore;
pub(crate) use file::lock_file;
pub use file::FileEpochStore;
pub use url::{open_store, StoreUrl, DEFAULT_ETCD_PREFIX};

use crate::tracking::Epoch;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::io;

/// Why an advance did not happen.
#[derive(Debug)]
pub enum EpochError {
    /// Someone else advanced first: the epoch is not the one expected.
    Conflict {
        disk: String,
        expected: Epoch,
        current: Epoch,
    },
    /// The disk name cannot be stored (empty, too long, odd characters).
    BadName(String),
    /// The store could not be read or written.
    Io(io::Error),
    /// The advance may or may not have happened: the store could not be
    /// asked (a replicated store that lost quorum or could not be reached
    /// after the request left). Never a success: read the epoch again.
    Unknown {
        disk: String,
        expected: Epoch,
        why: String,
    },
}

impl fmt::Display for EpochError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EpochError::Conflict {
                disk,
                expected,
                current,
            } => write!(
                f,
                "epoch of disk {disk:?} is {current}, not the expected {expected}: another writer advanced it"
            ),
            EpochError::BadName(n) => write!(f, "invalid disk name {n:?}"),
            EpochError::Io(e) => write!(f, "epoch store: {e}"),
            EpochError::Unknown {
                disk,
                expected,
                why,
            } => write!(
                f,
                "advancing the epoch of disk {disk:?} from {expected}: outcome unknown ({why})"
            ),
        }
    }
}

impl std::error::Error for EpochError {}

impl From<io::Error> for EpochError {
    fn from(e: io::Error) -> Self {
        EpochError::Io(e)
    }
}

/// Where the epochs live. Shared by every writer of the disks it holds:
/// in one gateway process, or on the storage every host shares.
pub trait EpochStore: Send + Sync {
    /// The disk's current epoch (0 for a disk never advanced).
    fn current(&self, disk: &str) -> Result<Epoch, EpochError>;
    /// Advance the disk's epoch from `expected` to `expected + 1`, durably,
    /// and return the new epoch. Fails with [`EpochError::Conflict`] when the
    /// epoch is not `expected`.
    fn compare_and_advance(&self, disk: &str, expected: Epoch) -> Result<Epoch, EpochError>;
}

/// Disk names that are safe as keys and file names everywhere.
pub fn validate_disk_name(name: &str) -> Result<(), EpochError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(EpochError::BadName(name.to_string()))
    }
}

/// An in-memory store: for tests, the simulation, and a gateway that
/// explicitly opts out of persistence.
///
/// ```
/// use blkshim::epoch::{EpochStore, MemEpochStore};
/// let s = MemEpochStore::default();
/// assert_eq!(s.current("vm1").unwrap(), 0);
/// assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
/// assert!(s.compare_and_advance("vm1", 0).is_err()); // a stale contender loses
/// ```
#[derive(Default)]
pub struct MemEpochStore {
    epochs: Mutex<HashMap<String, Epoch>>,
}

impl EpochStore for MemEpochStore {
    fn current(&self, disk: &str) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        Ok(self.epochs.lock().get(disk).copied().unwrap_or(0))
    }

    fn compare_and_advance(&self, disk: &str, expected: Epoch) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        let mut g = self.epochs.lock();
        let cur = g.entry(disk.to_string()).or_insert(0);
        if *cur != expected {
            return Err(EpochError::Conflict {
                disk: disk.to_string(),
                expected,
                current: *cur,
            });
        }
        *cur = expected + 1;
        Ok(*cur)
    }
}

#[cfg(test)]
mod tests;
