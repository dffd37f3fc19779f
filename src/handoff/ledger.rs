//! Who holds a disk, and what its last holder handed over: two small files
//! per disk next to the epochs, on the storage every host shares.
//!
//! A back end that is admitted at epoch E writes a **claim** (`<disk>.writer.json`:
//! epoch, host, boot, process). When it gives the disk up — suspend,
//! removal, close, `xl destroy` — it publishes the **record** of epoch E
//! (`<disk>.handoff.json`) once none of its writes can still reach the
//! storage. A new writer that arrives with no hook (a plain `xl restore` or
//! `xl migrate`) reads both and learns whether it may write ([`Holder`]):
//! the disk was released, or its holder is this process (whose tracker
//! orders the new writes behind the old), or a process of this host that
//! is gone (its I/O ended with it); otherwise a writer that may still write
//! holds it, and the newcomer must wait for the record, fence, or refuse.
//! Never a guess, never a clock.

use super::HandoffRecord;
use crate::epoch::lock_file;
use crate::tracking::Epoch;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Who wrote a claim: enough to tell this process, a dead process of this
/// host, and anything else apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterClaim {
    pub disk: String,
    pub epoch: Epoch,
    /// `hostname`, for people reading the file.
    pub host: String,
    /// `/etc/machine-id`: with the boot id, tells an earlier boot of this
    /// host (dead) from another host (maybe alive).
    #[serde(default)]
    pub machine_id: String,
    /// The kernel's boot id.
    pub boot_id: String,
    pub pid: u32,
    /// The process's start time (clock ticks after boot): a reused pid is
    /// not the same process.
    pub pid_start: u64,
    /// The ledger instance (one per daemon; tests run several in one process).
    pub instance: u64,
    /// Who: a vbd path, a connection.
    pub label: String,
}

/// What a new writer finds at the disk's current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody claimed the current epoch (a fresh disk, or an epoch moved by
    /// something that keeps no claims).
    Free,
    /// The holder of the current epoch handed it over with this record.
    Released(HandoffRecord),
    /// Held by this process: its `Disk` orders a newer writer's writes
    /// behind the holder's in flight.
    Local(WriterClaim),
    /// Held by a process of this host that no longer exists: whatever it
    /// had in flight finished when it exited.
    Dead(WriterClaim),
    /// Held by a writer that may still write: another live process, or
    /// another host.
    Live(WriterClaim),
}

/// This process as a claim names it.
#[derive(Debug, Clone)]
struct Me {
    host: String,
    machine_id: String,
    boot_id: String,
    pid: u32,
    pid_start: u64,
}

fn me() -> Me {
    let pid = std::process::id();
    Me {
        host: fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        machine_id: ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .find_map(|p| fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        boot_id: boot_id(),
        pid,
        pid_start: process_start(pid).unwrap_or(0),
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat`, the start time; `None` when the process
/// does not exist.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The claims and records of the disks under one directory.
pub struct HandoffLedger {
    dir: PathBuf,
    instance: u64,
    me: Me,
}

impl std::fmt::Debug for HandoffLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HandoffLedger({}, #{:x})",
            self.dir.display(),
            self.instance
        )
    }
}

impl HandoffLedger {
    /// The ledger under `dir` (created if missing), as a new instance: its
    /// claims are [`Holder::Local`] only to itself.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<HandoffLedger> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Ok(HandoffLedger {
            dir,
            instance: h.finish(),
            me: me(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn record_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.handoff.json"))
    }

    pub fn claim_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.writer.json"))
    }

    /// The newest record published for `disk`. A file that does not parse
    /// is an error, never "no record".
    pub fn record(&self, disk: &str) -> io::Result<Option<HandoffRecord>> {
        read_json(&self.record_path(disk))
    }

    pub fn claim_of(&self, disk: &str) -> io::Result<Option<WriterClaim>> {
        read_json(&self.claim_path(disk))
    }

    /// Publishes `record` unless a record of a newer epoch is there already
    /// (a slow source finishing after its successor handed over must not
    /// bury the successor's record). Returns whether it was written.
    pub fn publish(&self, record: &HandoffRecord) -> io::Result<bool> {
        let _lock = lock_file(&self.dir.join("handoff.lock"), true)?;
        if let Ok(Some(old)) = self.record(&record.disk) {
            if old.source_epoch > record.source_epoch {
                log::warn!(
                    "disk {:?}: record of epoch {} not published: epoch {} handed over already",
                    record.disk,
                    record.source_epoch,
                    old.source_epoch
                );
                return Ok(false);
            }
        }
        write_atomically(&self.record_path(&record.disk), record.to_json().as_bytes())?;
        Ok(true)
    }

    /// Claims `disk` at `epoch` for this process (after the epoch store
    /// admitted it, before its first write).
    pub fn claim(&self, disk: &str, epoch: Epoch, label: &str) -> io::Result<WriterClaim> {
        let claim = WriterClaim {
            disk: disk.to_string(),
            epoch,
            host: self.me.host.clone(),
            machine_id: self.me.machine_id.clone(),
            boot_id: self.me.boot_id.clone(),
            pid: self.me.pid,
            pid_start: self.me.pid_start,
            instance: self.instance,
            label: label.to_string(),
        };
        let _lock = lock_file(&self.dir.join("handoff.lock"), true)?;
        if let Ok(Some(old)) = self.claim_of(disk) {
            if old.epoch > epoch {
                return Err(io::Error::other(format!(
                    "disk {disk:?} is claimed at epoch {} already, above {epoch}",
                    old.epoch
                )));
            }
        }
        let json = serde_json::to_vec_pretty(&claim).map_err(io::Error::other)?;
        write_atomically(&self.claim_path(disk), &json)?;
        Ok(claim)
    }

    /// Who holds `disk` at its `current` epoch.
    pub fn holder(&self, disk: &str, current: Epoch) -> io::Result<Holder> {
        if current == 0 {
            return Ok(Holder::Free);
        }
        if let Some(r) = self.record(disk)? {
            if r.source_epoch == current {
                return Ok(Holder::Released(r));
            }
        }
        let Some(claim) = self.claim_of(disk)? else {
            return Ok(Holder::Free);
        };
        if claim.epoch != current {
            return Ok(Holder::Free);
        }
        let same_boot = !claim.boot_id.is_empty() && claim.boot_id == self.me.boot_id;
        let same_machine = !claim.machine_id.is_empty() && claim.machine_id == self.me.machine_id;
        Ok(if same_machine && !same_boot {
            // This host rebooted since: nothing of that boot is in flight.
            Holder::Dead(claim)
        } else if same_boot && claim.pid == self.me.pid && claim.pid_start == self.me.pid_start {
            if claim.instance == self.instance {
                Holder::Local(claim)
            } else {
                Holder::Live(claim)
            }
        } else if same_boot && process_start(claim.pid) != Some(claim.pid_start) {
            Holder::Dead(claim)
        } else {
            Holder::Live(claim)
        })
    }
}

/// An operator's statement that the host holding a disk at `epoch` is dead
/// (powered off, fenced by hand): its writes can no longer reach the
/// storage. With `--fence none` it is the only way to take a disk from a
/// holder that did not hand it over, in the manner of Pacemaker's manual
/// fencing confirmation (`stonith_admin --confirm`). It names the epoch, so
/// it never carries over to a later holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDeadConfirmation {
    pub disk: String,
    /// The holder's epoch the statement is about.
    pub epoch: Epoch,
    /// The claim of that holder, as the operator saw it (if any).
    pub holder: Option<WriterClaim>,
    /// Who confirmed (`user@host`).
    pub confirmed_by: String,
    /// Seconds since the Unix epoch, for people reading the file.
    pub confirmed_at: u64,
}

impl HandoffLedger {
    pub fn confirmation_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.source-dead.json"))
    }

    /// Records that the holder of `disk` at `epoch` is dead.
    pub fn confirm_source_dead(
        &self,
        disk: &str,
        epoch: Epoch,
        confirmed_by: &str,
    ) -> io::Result<SourceDeadConfirmation> {
        let c = SourceDeadConfirmation {
            disk: disk.to_string(),
            epoch,
            holder: self.claim_of(disk)?.filter(|c| c.epoch == epoch),
            confirmed_by: confirmed_by.to_string(),
            confirmed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let _lock = lock_file(&self.dir.join("handoff.lock"), true)?;
        let json = serde_json::to_vec_pretty(&c).map_err(io::Error::other)?;
        write_atomically(&self.confirmation_path(disk), &json)?;
        Ok(c)
    }

    /// The operator's confirmation that the holder at `epoch` is dead, if
    /// one names exactly that epoch.
    pub fn source_dead(
        &self,
        disk: &str,
        epoch: Epoch,
    ) -> io::Result<Option<SourceDeadConfirmation>> {
        let c: Option<SourceDeadConfirmation> = read_json(&self.confirmation_path(disk))?;
        Ok(c.filter(|c| c.epoch == epoch))
    }

    /// The host name this ledger's claims carry.
    pub fn host(&self) -> &str {
        &self.me.host
    }

    /// This ledger as the host `id`: claims carry `id` as host and
    /// machine, and a boot id of their own, so two daemons on one machine
    /// (a test of two hosts, or containers sharing a kernel) see each other
    /// as other hosts, whose liveness they cannot probe.
    pub fn as_host(mut self, id: &str) -> HandoffLedger {
        self.me.host = id.to_string();
        self.me.machine_id = format!("host-id:{id}");
        self.me.boot_id = format!("host-id:{id}:{}", self.me.boot_id);
        self
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write-to-temp, fsync, rename, fsync dir: the file survives a crash whole
/// or not at all.
pub(crate) fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or("record".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::HandoffMethod;

    fn record(disk: &str, source: Epoch) -> HandoffRecord {
        HandoffRecord {
            disk: disk.into(),
            source_epoch: source,
            destination_epoch: source + 1,
            method: HandoffMethod::Drained,
            requests: Vec::new(),
        }
    }

    #[test]
    fn holder_follows_claims_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let a = HandoffLedger::open(dir.path()).unwrap();
        let b = HandoffLedger::open(dir.path()).unwrap();
        assert_eq!(a.holder("d", 0).unwrap(), Holder::Free);
        assert_eq!(a.holder("d", 3).unwrap(), Holder::Free);
        a.claim("d", 3, "vbd 1").unwrap();
        assert!(matches!(a.holder("d", 3).unwrap(), Holder::Local(c) if c.epoch == 3));
        // Another instance (another daemon) sees a live holder.
        assert!(matches!(b.holder("d", 3).unwrap(), Holder::Live(_)));
        // A claim of an older epoch says nothing about the current one.
        assert_eq!(b.holder("d", 4).unwrap(), Holder::Free);
        assert!(a.publish(&record("d", 3)).unwrap());
        assert_eq!(b.holder("d", 3).unwrap(), Holder::Released(record("d", 3)));
        // A slow older source never buries a newer record.
        assert!(a.publish(&record("d", 4)).unwrap());
        assert!(!a.publish(&record("d", 3)).unwrap());
        assert_eq!(a.record("d").unwrap().unwrap().source_epoch, 4);
        // Claims only move forward.
        assert!(a.claim("d", 2, "late").is_err());
    }

    #[test]
    fn a_claim_of_a_process_that_exited_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let a = HandoffLedger::open(dir.path()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let mut c = a.claim("d", 5, "gone").unwrap();
        c.pid = pid;
        c.pid_start = 1;
        write_atomically(&a.claim_path("d"), &serde_json::to_vec(&c).unwrap()).unwrap();
        assert!(matches!(a.holder("d", 5).unwrap(), Holder::Dead(_)));
        // An earlier boot of this machine: dead, whatever its pid.
        c.pid = std::process::id();
        c.boot_id = "an-earlier-boot".into();
        c.machine_id = "m1".into();
        let mut mine = HandoffLedger::open(dir.path()).unwrap();
        mine.me.machine_id = "m1".into();
        write_atomically(&a.claim_path("d"), &serde_json::to_vec(&c).unwrap()).unwrap();
        assert!(matches!(mine.holder("d", 5).unwrap(), Holder::Dead(_)));
        // Another host may still write: only a fence or its record settles it.
        c.machine_id = "m2".into();
        write_atomically(&a.claim_path("d"), &serde_json::to_vec(&c).unwrap()).unwrap();
        assert!(matches!(mine.holder("d", 5).unwrap(), Holder::Live(_)));
    }

    #[test]
    fn a_torn_record_is_an_error_not_a_release() {
        let dir = tempfile::tempdir().unwrap();
        let a = HandoffLedger::open(dir.path()).unwrap();
        fs::write(a.record_path("d"), b"{\"disk\":").unwrap();
        assert!(a.holder("d", 2).is_err());
    }
}
