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
//! A [`HostLiveness`] (etcd host leases with `--epoch-store etcd://`) only
//! shortens the wait: a holder whose host no longer renews its lease is
//! fenced at once instead of after `resume_wait`. It never replaces the
//! fence: a host cut off from etcd may still reach the storage.
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
    /// Which hosts still renew their liveness (etcd host leases), if known.
    pub liveness: Option<Arc<dyn HostLiveness>>,
}

/// Whether a host is alive by some authority other than the ledger (an
/// etcd lease it renews). Liveness, not fencing: a host that stopped
/// renewing may still have writes queued toward the storage.
pub trait HostLiveness: Send + Sync {
    /// `Ok(false)`: `host` no longer holds its liveness registration.
    fn alive(&self, host: &str) -> std::io::Result<bool>;
    /// What answers, for logs ("etcd host leases at ...").
    fn describe(&self) -> String;
}

impl fmt::Debug for dyn HostLiveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for HostSidePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostSidePolicy(fence {}, resume_wait {:?}, liveness {}, {:?})",
            self.fence_mode().name(),
            self.resume_wait,
            self.liveness
                .as_ref()
                .map_or_else(|| "none".to_string(), |l| l.describe()),
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
    let mut liveness_asked: Option<Instant> = None;
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
                } else if let Some(fence) = policy
                    .fence
                    .as_ref()
                    .filter(|_| holder_host_gone(policy, &c.host, &mut liveness_asked))
                {
                    log::warn!(
                        "{who}: disk {:?} epoch {current}: host {:?} of {} no longer holds its liveness lease ({}); taking over without waiting for its record, the {} fence keeps its writes off the storage",
                        disk.name(),
                        c.host,
                        c.label,
                        policy.liveness.as_ref().map_or_else(String::new, |l| l.describe()),
                        fence.mode().name()
                    );
                    (disk.take_over(current), AdmittedBy::Fenced)
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

/// Whether the policy's liveness says `host` is gone; asked at most every
/// 500 ms (a wait polls every 20 ms). An error counts as alive: the wait
/// and the fence decide then.
fn holder_host_gone(policy: &HostSidePolicy, host: &str, asked: &mut Option<Instant>) -> bool {
    let Some(liveness) = &policy.liveness else {
        return false;
    };
    if asked.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
        return false;
    }
    *asked = Some(Instant::now());
    match liveness.alive(host) {
        Ok(alive) => !alive,
        Err(e) => {
            log::warn!("host liveness of {host:?} ({}): {e}", liveness.describe());
            false
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

#[cfg(test)]
mod tests {
    //! Two hosts over one logical unit's model (two I_T nexuses), each
    //! with its own `Disk`, sharing the epoch store and the ledger.
    use super::*;
    use crate::epoch::{EpochStore, FileEpochStore};
    use crate::storage::fencing::model::{Lu, ModelPath};
    use crate::storage::fencing::{PrFencing, PrOptions, PrWriterFence};
    use crate::storage::{
        AlignedBuf, BlockStorage, Capabilities, IoDone, IoOutcome, MemStorage, StorageIo,
    };
    use std::path::Path;

    /// One host's path to the shared LU: writes land on the shared memory
    /// unless the LU's reservation refuses this nexus (EBADE, as `sd`
    /// returns a RESERVATION CONFLICT), checked when the write lands; a
    /// held path keeps its writes queued ("toward the storage") until
    /// released.
    struct LuPath {
        mem: Arc<MemStorage>,
        lu: Arc<Mutex<Lu>>,
        nexus: usize,
        held: Mutex<Option<Vec<(StorageIo, IoDone)>>>,
    }

    fn modifies(io: &StorageIo) -> bool {
        !matches!(io, StorageIo::Read { .. } | StorageIo::Flush)
    }

    impl LuPath {
        fn land(&self, io: StorageIo, done: IoDone) {
            if modifies(&io) && !self.lu.lock().may_write(self.nexus) {
                return done(IoOutcome {
                    result: Err(std::io::Error::from_raw_os_error(libc::EBADE)),
                    buf: None,
                });
            }
            self.mem.submit(io, done)
        }
        fn hold(&self) {
            *self.held.lock() = Some(Vec::new());
        }
        fn release(&self) {
            let queued = self.held.lock().take().unwrap_or_default();
            for (io, done) in queued {
                self.land(io, done);
            }
        }
    }

    impl BlockStorage for LuPath {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.mem.capabilities()
        }
        fn submit(&self, io: StorageIo, done: IoDone) {
            let mut held = self.held.lock();
            match held.as_mut() {
                Some(q) if modifies(&io) => q.push((io, done)),
                _ => {
                    drop(held);
                    self.land(io, done)
                }
            }
        }
    }

    struct Host {
        disk: Arc<Disk>,
        path: Arc<LuPath>,
    }

    fn host(
        name: &str,
        mem: &Arc<MemStorage>,
        lu: &Arc<Mutex<Lu>>,
        pr: ModelPath,
        dir: &Path,
        fenced: bool,
    ) -> Host {
        let path = Arc::new(LuPath {
            mem: Arc::clone(mem),
            lu: Arc::clone(lu),
            nexus: pr.nexus,
            held: Mutex::new(None),
        });
        let epochs: Arc<dyn EpochStore> = Arc::new(FileEpochStore::open(dir).unwrap());
        let disk = Disk::open(
            "shared",
            path.clone(),
            epochs,
            super::super::DiskOptions {
                auto_advance: false,
                fence_timeout: None,
            },
        )
        .unwrap();
        let fence: Option<Arc<dyn WriterFence>> = fenced.then(|| {
            let pr = PrFencing::with_device(Box::new(pr), Path::new(name), PrOptions::default())
                .unwrap();
            Arc::new(PrWriterFence::new(pr)) as Arc<dyn WriterFence>
        });
        let policy = HostSidePolicy {
            ledger: Arc::new(HandoffLedger::open(dir).unwrap().as_host(name)),
            fence,
            resume_wait: Duration::from_millis(100),
            liveness: None,
        };
        disk.attach_host_side(Arc::new(HostSide::new(policy, name)))
            .unwrap();
        Host { disk, path }
    }

    fn write(
        h: &Host,
        w: &super::super::Writer,
        byte: u8,
    ) -> std::sync::mpsc::Receiver<Option<i32>> {
        let (tx, rx) = std::sync::mpsc::channel();
        h.disk.submit(
            w,
            byte as u64,
            StorageIo::Write {
                offset: 0,
                buf: AlignedBuf::from_slice(&[byte; 4096]),
                fua: false,
            },
            Box::new(move |o| {
                let _ = tx.send(o.result.err().map(|e| e.raw_os_error().unwrap_or(-1)));
            }),
        );
        rx
    }

    fn first_byte(mem: &MemStorage) -> u8 {
        let (tx, rx) = std::sync::mpsc::channel();
        mem.submit(
            StorageIo::Read {
                offset: 0,
                buf: AlignedBuf::zeroed(4096),
            },
            Box::new(move |o| {
                let _ = tx.send(o.buf.map(|b| b.as_slice()[0]));
            }),
        );
        rx.recv().unwrap().unwrap()
    }

    /// Hosts A and B over one LU and shared memory, `fenced` or not, A
    /// admitted by its guest's first write (epoch 1).
    fn a_wrote_once(
        dir: &Path,
        fenced: bool,
    ) -> (Arc<MemStorage>, Host, Host, super::super::Writer) {
        let mem = Arc::new(MemStorage::new(1 << 20));
        let (lu, mut paths) = ModelPath::paths(2);
        let pb = paths.pop().unwrap();
        let pa = paths.pop().unwrap();
        let a = host("A", &mem, &lu, pa, dir, fenced);
        let b = host("B", &mem, &lu, pb, dir, fenced);
        let wa = a.disk.register(None, "guest on A").unwrap();
        assert_eq!(write(&a, &wa, 1).recv().unwrap(), None);
        (mem, a, b, wa)
    }

    /// A cut-off source (alive, its write queued toward the storage) and a
    /// destination that takes over: with `--fence pr` the queued write is
    /// refused at the storage and the source stops; with `--fence none`
    /// the takeover is refused until an operator confirms the source dead,
    /// and then (the confirmation being false) the stale write lands.
    fn cut_off_source(fenced: bool) -> (u8, Host) {
        let dir = tempfile::tempdir().unwrap();
        let (mem, a, b, wa) = a_wrote_once(dir.path(), fenced);
        assert!(matches!(
            a.disk.host_side().unwrap().tenure(),
            Tenure::Admitted { epoch: 1, .. }
        ));
        // A is cut off: its next write waits in its kernel.
        a.path.hold();
        let stale = write(&a, &wa, 2);
        let wb = b.disk.register(None, "guest on B").unwrap();
        if !fenced {
            assert_eq!(write(&b, &wb, 3).recv().unwrap(), Some(libc::EIO));
            let t = b.disk.host_side().unwrap().tenure();
            assert!(
                matches!(&t, Tenure::Refused { why } if why.contains("--source-dead")),
                "{t:?}"
            );
            HandoffLedger::open(dir.path())
                .unwrap()
                .confirm_source_dead("shared", 1, "test")
                .unwrap();
        }
        assert_eq!(write(&b, &wb, 3).recv().unwrap(), None);
        assert_eq!(b.disk.current_epoch(), 2);
        // A's queued write reaches the storage now.
        a.path.release();
        let got = stale.recv().unwrap();
        if fenced {
            assert_eq!(
                got,
                Some(libc::EIO),
                "the preempted write fails as an I/O error"
            );
            assert!(matches!(
                a.disk.host_side().unwrap().tenure(),
                Tenure::Lost { epoch: 1, .. }
            ));
            // And the source writes nothing more.
            assert_eq!(write(&a, &wa, 4).recv().unwrap(), Some(libc::EIO));
        }
        (first_byte(&mem), b)
    }

    #[test]
    fn pr_fences_a_cut_off_source() {
        let (byte, _b) = cut_off_source(true);
        assert_eq!(byte, 3, "the newer host's write stays");
    }

    #[test]
    fn none_refuses_then_a_false_confirmation_lets_the_stale_write_land() {
        let (byte, _b) = cut_off_source(false);
        assert_eq!(
            byte, 2,
            "negative control: the stale write landed over the newer one"
        );
    }

    /// Liveness as a test sets it: the hosts in `gone` stopped renewing.
    struct SetLiveness {
        gone: Mutex<Vec<String>>,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl HostLiveness for SetLiveness {
        fn alive(&self, host: &str) -> std::io::Result<bool> {
            self.asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(!self.gone.lock().iter().any(|h| h == host))
        }
        fn describe(&self) -> String {
            "test liveness".into()
        }
    }

    /// A (alive as far as the ledger knows) holds epoch 1 without a record;
    /// B decides with `fenced`, a liveness saying whether A's host is gone,
    /// and `wait`: what it decided and how long that took.
    fn decide_with_liveness(
        fenced: bool,
        a_gone: bool,
        wait: Duration,
    ) -> (Result<(Epoch, AdmittedBy), AdmitError>, Duration, usize) {
        let dir = tempfile::tempdir().unwrap();
        let (_mem, _a, b, _wa) = a_wrote_once(dir.path(), fenced);
        let liveness = Arc::new(SetLiveness {
            gone: Mutex::new(if a_gone { vec!["A".into()] } else { vec![] }),
            asked: Default::default(),
        });
        let mut policy = b.disk.host_side().unwrap().policy().clone();
        policy.resume_wait = wait;
        policy.liveness = Some(liveness.clone());
        let t = Instant::now();
        let r = decide(&b.disk, &policy, "B", &|| false, &|| false);
        let asked = liveness.asked.load(std::sync::atomic::Ordering::Relaxed);
        (r, t.elapsed(), asked)
    }

    #[test]
    fn a_holder_whose_liveness_lease_ended_is_fenced_without_the_wait() {
        let (r, took, _) = decide_with_liveness(true, true, Duration::from_secs(60));
        assert!(matches!(r, Ok((2, AdmittedBy::Fenced))), "{r:?}");
        assert!(took < Duration::from_secs(5), "waited {took:?}");
        // A live lease: the whole wait, then the fence; asked every 500 ms,
        // not every poll.
        let (r, took, asked) = decide_with_liveness(true, false, Duration::from_millis(1500));
        assert!(matches!(r, Ok((2, AdmittedBy::Fenced))), "{r:?}");
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        assert!((2..=5).contains(&asked), "asked {asked} times");
    }

    #[test]
    fn an_ended_lease_is_no_fence_without_one_refused() {
        let (r, took, _) = decide_with_liveness(false, true, Duration::from_millis(300));
        assert!(
            matches!(&r, Err(AdmitError::Refused(why)) if why.contains("--source-dead")),
            "{r:?}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
    }

    #[test]
    fn a_handed_over_disk_admits_the_next_host_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, a, b, wa) = a_wrote_once(dir.path(), false);
        a.path.hold();
        let inflight = write(&a, &wa, 2);
        let handed = std::thread::spawn({
            let (disk, hs) = (Arc::clone(&a.disk), Arc::clone(a.disk.host_side().unwrap()));
            move || hs.hand_over(&disk, Duration::from_millis(10))
        });
        // The record waits for the write held toward the storage.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!handed.is_finished());
        a.path.release();
        // Past the drain deadline it was fenced in the tracker: it lands,
        // unacknowledged (the frontend re-sends it to the destination).
        assert_eq!(inflight.recv().unwrap(), Some(libc::EPERM));
        let record = handed.join().unwrap().unwrap();
        assert_eq!(record.source_epoch, 1);
        let wb = b.disk.register(None, "guest on B").unwrap();
        assert_eq!(write(&b, &wb, 3).recv().unwrap(), None);
        assert!(matches!(
            b.disk.host_side().unwrap().tenure(),
            Tenure::Admitted {
                epoch: 2,
                by: AdmittedBy::Record
            }
        ));
        assert_eq!(first_byte(&mem), 3);
        // A's old writer is suspended; a host-side writer may not name an epoch.
        assert!(write(&a, &wa, 9).recv().unwrap().is_some());
        assert!(matches!(
            b.disk.register(Some(7), "x"),
            Err(DiskError::HostSideEpoch { requested: 7 })
        ));
    }
}
