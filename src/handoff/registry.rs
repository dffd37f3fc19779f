//! One [`Disk`] per disk in a process, however many paths or vbds reach it.
//!
//! A same-host migration or `xl save`/`xl restore` has the source's and the
//! destination's back end in one process, often on two different paths to
//! the disk. If each opened its own `Disk`, the destination's tracker would
//! not see the source's writes still in flight and seeds/003 would be back.
//! Sharing one `Disk` orders the destination's writes behind them, as the
//! gateway does.

use super::{Disk, DiskError, DiskOptions};
use crate::epoch::EpochStore;
use crate::storage::BlockStorage;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// The disks open in this process, by identity
/// ([`disk_identity`](crate::storage::identity::disk_identity)). A disk
/// stays while anything holds it: a writer, or a request in flight.
#[derive(Default)]
pub struct DiskRegistry {
    disks: Mutex<HashMap<String, Weak<Disk>>>,
}

impl std::fmt::Debug for DiskRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.disks.lock().keys().cloned().collect();
        write!(f, "DiskRegistry({names:?})")
    }
}

impl DiskRegistry {
    pub fn new() -> Arc<DiskRegistry> {
        Arc::new(DiskRegistry::default())
    }

    /// The open disk named `name`, or a new one over `storage`.
    pub fn open(
        &self,
        name: &str,
        storage: Arc<dyn BlockStorage>,
        epochs: Arc<dyn EpochStore>,
        options: DiskOptions,
    ) -> Result<Arc<Disk>, DiskError> {
        let mut disks = self.disks.lock();
        disks.retain(|_, d| d.strong_count() > 0);
        if let Some(d) = disks.get(name).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let d = Disk::open(name, storage, epochs, options)?;
        disks.insert(name.to_string(), Arc::downgrade(&d));
        Ok(d)
    }

    /// The disk named `name`, if open.
    pub fn get(&self, name: &str) -> Option<Arc<Disk>> {
        self.disks.lock().get(name).and_then(Weak::upgrade)
    }
}
