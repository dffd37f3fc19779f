//! The file-backed epoch store: one JSON file per store directory, replaced
//! atomically, under an OFD lock so several processes (and threads) can
//! share it.
//!
//! Crash safety: the new contents go to a temporary file that is fsynced,
//! renamed over the old one, and then the directory is fsynced, so after a
//! crash the store holds either the old or the new epoch, never a torn file
//! and never an epoch that was reported as advanced but is lost.

use super::{validate_disk_name, EpochError, EpochStore};
use crate::tracking::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "epochs.json";
const LOCK_FILE: &str = "epochs.lock";

#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    /// Format version, so a future layout can be told apart.
    version: u32,
    disks: BTreeMap<String, Epoch>,
}

/// Epochs persisted under a directory.
///
/// ```
/// use blkshim::epoch::{EpochStore, FileEpochStore};
/// let dir = tempfile::tempdir().unwrap();
/// let s = FileEpochStore::open(dir.path()).unwrap();
/// assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
/// // A second handle (another process, say) sees the same epoch.
/// let t = FileEpochStore::open(dir.path()).unwrap();
/// assert_eq!(t.current("vm1").unwrap(), 1);
/// ```
pub struct FileEpochStore {
    dir: PathBuf,
}

/// An exclusive OFD lock on the store's lock file, released on drop (when
/// the file closes). OFD locks belong to the open file description, so each
/// operation opens its own: that excludes other threads as well as other
/// processes, which classic POSIX locks would not.
struct StoreLock {
    _file: File,
}

impl StoreLock {
    fn acquire(dir: &Path, exclusive: bool) -> io::Result<StoreLock> {
        Ok(StoreLock {
            _file: lock_file(&dir.join(LOCK_FILE), exclusive)?,
        })
    }
}

/// Opens (creating) `path` and takes an OFD lock on it, shared or
/// exclusive, waiting for it; the lock goes when the returned file closes.
pub(crate) fn lock_file(path: &Path, exclusive: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // SAFETY: zeroed flock is a valid value; we set the fields we need.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    loop {
        // SAFETY: valid fd and a valid flock pointer.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        if r == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl FileEpochStore {
    /// Open (creating the directory if needed) the store under `dir`.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        Ok(FileEpochStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_state(&self) -> Result<StateFile, EpochError> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                // A corrupt store must never silently reset epochs to 0.
                EpochError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateFile {
                version: 1,
                disks: BTreeMap::new(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn write_state(&self, state: &StateFile) -> io::Result<()> {
        let tmp = self
            .dir
            .join(format!("{STATE_FILE}.tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(STATE_FILE))?;
        File::open(&self.dir)?.sync_all()
    }
}

impl EpochStore for FileEpochStore {
    fn current(&self, disk: &str) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        let _lock = StoreLock::acquire(&self.dir, false)?;
        Ok(self.read_state()?.disks.get(disk).copied().unwrap_or(0))
    }

    fn compare_and_advance(&self, disk: &str, expected: Epoch) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        let _lock = StoreLock::acquire(&self.dir, true)?;
        let mut state = self.read_state()?;
        state.version = 1;
        let current = state.disks.get(disk).copied().unwrap_or(0);
        if current != expected {
            return Err(EpochError::Conflict {
                disk: disk.to_string(),
                expected,
                current,
            });
        }
        let next = expected.checked_add(1).ok_or_else(|| {
            EpochError::Io(io::Error::new(io::ErrorKind::InvalidData, "epoch overflow"))
        })?;
        state.disks.insert(disk.to_string(), next);
        self.write_state(&state)?;
        log::info!(
            "epoch of disk {disk:?} advanced {expected} -> {next} ({})",
            self.dir.display()
        );
        Ok(next)
    }
}
