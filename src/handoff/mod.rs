//! A disk shared by writers of successive epochs, with drain-or-fence
//! hand-off between them.
//!
//! [`Disk`] glues the three mechanisms together: every request goes through
//! the [`Tracker`] (so overlapping writes never meet at the storage), is
//! stamped with its writer's epoch (so a fenced writer's writes are refused),
//! and the epoch only moves through the [`EpochStore`].
//!
//! Two ways to move a disk to a new writer:
//! - **Gateway** (one process owns all I/O, e.g. the NBD server): the new
//!   writer's first modifying request advances the epoch
//!   ([`DiskOptions::auto_advance`]). Older writers' new writes are refused at
//!   once; what they already had in flight drains, and after
//!   [`DiskOptions::fence_timeout`] is fenced. The new writer's requests that
//!   overlap those are ordered after them by the tracker, so they cannot be
//!   overtaken — there is no need to stall its unrelated sectors.
//! - **Suspend / resume** (Xen blkback, host-side backends): the source calls
//!   [`Disk::suspend`] (drain with a deadline, or fence), hands the
//!   [`HandoffRecord`] over, and the destination calls [`Disk::resume`], which
//!   advances the epoch only if the record is current.

pub mod hostside;
pub mod ledger;
mod record;
mod registry;

pub use hostside::{AdmitError, AdmittedBy, HostSide, HostSidePolicy, Tenure};
pub use ledger::{HandoffLedger, Holder, SourceDeadConfirmation, WriterClaim};
pub use record::{HandoffEntry, HandoffMethod, HandoffRecord, RequestFate};
pub use registry::DiskRegistry;

use crate::epoch::{EpochError, EpochStore};
use crate::storage::{
    BlockStorage, Capabilities, IoDone, IoOutcome, LocalQueue, StorageIo, SECTOR_SIZE,
};
use crate::tracking::{
    Admission, Epoch, OpKind, Outcome, Refused, Request, SectorRange, Ticket, Tracker,
};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Errors of disk-level operations (not of single I/Os: those go to the
/// I/O's completion as an errno).
#[derive(Debug)]
pub enum DiskError {
    /// A writer asked for an epoch below the disk's current one.
    StaleEpoch {
        requested: Epoch,
        current: Epoch,
    },
    /// A hand-off record that no longer matches the epoch store (replayed,
    /// or someone else took the disk meanwhile).
    StaleRecord {
        record_source: Epoch,
        current: Epoch,
    },
    /// A record of another disk.
    WrongDisk {
        record: String,
        disk: String,
    },
    /// A path to the disk whose size is not the disk's (not the same disk).
    PathMismatch {
        disk: String,
        disk_size: u64,
        path_size: u64,
    },
    Epoch(EpochError),
    /// A host-side disk's writers take the host's admitted epoch; none may
    /// name one of its own.
    HostSideEpoch {
        requested: Epoch,
    },
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::StaleEpoch { requested, current } => {
                write!(f, "epoch {requested} is stale: the disk is at epoch {current}")
            }
            DiskError::StaleRecord { record_source, current } => write!(
                f,
                "hand-off record from epoch {record_source} is stale: the disk is at epoch {current}"
            ),
            DiskError::WrongDisk { record, disk } => {
                write!(f, "hand-off record is for disk {record:?}, not {disk:?}")
            }
            DiskError::PathMismatch {
                disk,
                disk_size,
                path_size,
            } => write!(
                f,
                "a path of {path_size} bytes cannot reach disk {disk:?} of {disk_size} bytes: not the same disk"
            ),
            DiskError::Epoch(e) => write!(f, "{e}"),
            DiskError::HostSideEpoch { requested } => write!(
                f,
                "epoch {requested} asked of a host-side disk: its writers take the epoch their host is admitted at (connect without @EPOCH)"
            ),
        }
    }
}

impl std::error::Error for DiskError {}

impl From<EpochError> for DiskError {
    fn from(e: EpochError) -> Self {
        DiskError::Epoch(e)
    }
}

/// How a disk behaves; the defaults suit the NBD gateway.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// A writer registered above the current epoch advances the epoch with
    /// its first write, trim, write-zeroes or flush. Off for suspend/resume
    /// back ends, whose destination is admitted by [`Disk::resume`] only.
    pub auto_advance: bool,
    /// After an automatic advance, how long older writers' in-flight
    /// requests may drain before the rest is fenced. `None`: never fenced
    /// by a timer; the caller calls [`Disk::fence_below`] (the simulation
    /// does, on its own clock).
    pub fence_timeout: Option<Duration>,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            auto_advance: true,
            fence_timeout: Some(Duration::from_secs(5)),
        }
    }
}

/// How a source gives up the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendMode {
    /// Wait for everything in flight; fence what is left at the deadline.
    Drain { timeout: Duration },
    /// Cancel what has not reached the storage and fence what has, now.
    Fence,
}

/// Per-request state the tracker holds for the disk.
struct Pending {
    tag: u64,
    /// The I/O, parked here while the request waits behind a conflict.
    io: Option<StorageIo>,
    /// The writer's own path to the storage, when it is not the disk's.
    path: Option<Arc<dyn BlockStorage>>,
    done: IoDone,
}

/// Counters shown by `blkshim ctl status`.
#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    refused_stale: AtomicU64,
    refused_suspended: AtomicU64,
    fenced: AtomicU64,
    cancelled: AtomicU64,
    /// Requests the storage completed with an error (what a frontend sees
    /// as EIO and an operator should hear about).
    storage_errors: AtomicU64,
    /// Writers refused at registration: their epoch was below the
    /// disk's (a stale `vm1@N` at the NBD handshake).
    refused_stale_writers: AtomicU64,
}

/// Told of every hand-off a disk makes, so metrics can count them and time
/// them without the core knowing about any metrics library.
pub trait HandoffObserver: Send + Sync {
    /// `method`: `advance` (a newer writer's first write, `ctl handoff`),
    /// `suspend`, `resume` or `take_over`; `outcome`: for `suspend` the
    /// record's method (`drained`, `fenced`, `drain_timed_out_then_fenced`),
    /// else `ok`, `stale` or `error`. `took`: from the call (or the
    /// suspend's start) to its end.
    fn handoff(&self, disk: &str, method: &'static str, outcome: &'static str, took: Duration);
}

struct WriterInfo {
    epoch: Epoch,
    label: String,
}

struct State {
    /// The epoch store's value as this disk last saw or set it.
    current: Epoch,
    /// Writers at or below this epoch are suspended: every request refused.
    gate: Option<Epoch>,
    writers: BTreeMap<u64, WriterInfo>,
    next_writer: u64,
    /// Writers at or below this epoch lost the disk: the storage refused
    /// one of their writes as fenced (EBADE, a newer host preempted this
    /// one). Every request of theirs fails with EIO.
    lost: Option<Epoch>,
}

/// Fates of the requests in flight when a suspend began.
struct SuspensionLog {
    epoch: Epoch,
    entries: Mutex<HashMap<Ticket, (HandoffEntry, bool)>>,
}

/// A disk image and the writers that take turns on it.
///
/// ```
/// use blkshim::epoch::MemEpochStore;
/// use blkshim::handoff::{Disk, DiskOptions, SuspendMode};
/// use blkshim::storage::{AlignedBuf, StorageIo};
/// use blkshim::storage::MemStorage;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// let epochs = Arc::new(MemEpochStore::default());
/// let disk = Disk::open("vm1", Arc::new(MemStorage::new(1 << 20)), epochs, DiskOptions::default()).unwrap();
/// let src = disk.register(Some(1), "source").unwrap();
/// let (tx, rx) = std::sync::mpsc::channel();
/// disk.submit(&src, 1, StorageIo::Write { offset: 0, buf: AlignedBuf::from_slice(&[7; 512]), fua: false },
///             Box::new(move |o| tx.send(o.result.is_ok()).unwrap()));
/// assert!(rx.recv().unwrap());
/// let record = disk.suspend(src.epoch(), SuspendMode::Drain { timeout: Duration::from_secs(1) }).unwrap();
/// assert_eq!(record.destination_epoch, 2);
/// disk.resume(&record).unwrap();
/// let dst = disk.register(Some(2), "destination").unwrap();
/// assert_eq!(disk.current_epoch(), 2);
/// # drop(dst);
/// ```
pub struct Disk {
    name: String,
    storage: Arc<dyn BlockStorage>,
    epochs: Arc<dyn EpochStore>,
    tracker: Tracker<Pending>,
    options: DiskOptions,
    state: Mutex<State>,
    /// Serialises epoch advances (held across the store's fsyncs, so not
    /// the state lock, which the I/O path takes).
    advancing: Mutex<()>,
    suspension: Mutex<Option<Arc<SuspensionLog>>>,
    suspending: AtomicBool,
    counters: Counters,
    /// Host-side admission at the first write ([`Disk::attach_host_side`]).
    host_side: OnceLock<Arc<HostSide>>,
    /// Metrics of hand-offs ([`Disk::set_handoff_observer`]).
    observer: OnceLock<Arc<dyn HandoffObserver>>,
}

/// A writer of a disk at one epoch. Unregisters itself when dropped.
pub struct Writer {
    disk: Arc<Disk>,
    id: u64,
    /// Set once at registration, or at the first write of a host-side
    /// writer registered before its host was admitted.
    epoch: AtomicU64,
    /// Registered on a host-side disk before admission: the first write
    /// admits the host and moves this writer to its epoch.
    admit_on_write: AtomicBool,
    /// This writer's path to the storage ([`Disk::register_on`]); `None`
    /// for the disk's own.
    path: Option<Arc<dyn BlockStorage>>,
}

impl Writer {
    pub fn epoch(&self) -> Epoch {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.disk.state.lock().writers.remove(&self.id);
    }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Writer({} of {:?} at epoch {})",
            self.id,
            self.disk.name,
            self.epoch()
        )
    }
}

/// A writer as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WriterStatus {
    pub id: u64,
    pub label: String,
    pub epoch: Epoch,
    /// Below the current epoch: its writes are refused.
    pub fenced: bool,
    /// Suspended by a hand-off: all its requests are refused.
    pub suspended: bool,
}

/// A disk as `blkshim ctl status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    pub current_epoch: Epoch,
    pub fence_floor: Epoch,
    pub writers: Vec<WriterStatus>,
    pub in_flight: usize,
    pub submitted: u64,
    pub completed: u64,
    pub refused_stale: u64,
    pub refused_suspended: u64,
    pub fenced: u64,
    pub cancelled: u64,
    pub storage_errors: u64,
    pub refused_stale_writers: u64,
}

/// What an advance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    pub from: Epoch,
    pub to: Epoch,
}

/// The smallest block the tracker orders writes by, in bytes.
pub const TRACKING_BLOCK: u64 = 4096;

/// A failed hand-off as the metrics label it.
fn outcome_of(e: &DiskError) -> &'static str {
    match e {
        DiskError::StaleEpoch { .. } | DiskError::StaleRecord { .. } => "stale",
        _ => "error",
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Disk {
    /// Open a disk over `storage`, at the epoch `epochs` holds for `name`.
    pub fn open(
        name: &str,
        storage: Arc<dyn BlockStorage>,
        epochs: Arc<dyn EpochStore>,
        options: DiskOptions,
    ) -> Result<Arc<Disk>, DiskError> {
        let current = epochs.current(name)?;
        let grain = storage.capabilities().alignment.max(TRACKING_BLOCK) / SECTOR_SIZE;
        Ok(Arc::new(Disk {
            name: name.to_string(),
            storage,
            epochs,
            // Track in storage blocks, never finer than a 4 KiB page: a
            // storage that works in blocks would otherwise see two writes
            // to one block in flight together although their sectors differ.
            tracker: Tracker::with_grain(current, grain),
            options,
            state: Mutex::new(State {
                current,
                gate: None,
                writers: BTreeMap::new(),
                next_writer: 1,
                lost: None,
            }),
            host_side: OnceLock::new(),
            observer: OnceLock::new(),
            advancing: Mutex::new(()),
            suspension: Mutex::new(None),
            suspending: AtomicBool::new(false),
            counters: Counters::default(),
        }))
    }

    /// Make this a host-side disk: writers registered without an epoch
    /// admit the host at their first write ([`HostSide`]). Once per disk.
    pub fn attach_host_side(&self, hs: Arc<HostSide>) -> Result<(), Arc<HostSide>> {
        self.host_side.set(hs)
    }

    pub fn host_side(&self) -> Option<&Arc<HostSide>> {
        self.host_side.get()
    }

    /// Report every hand-off of this disk to `o` (metrics). Once per disk.
    pub fn set_handoff_observer(
        &self,
        o: Arc<dyn HandoffObserver>,
    ) -> Result<(), Arc<dyn HandoffObserver>> {
        self.observer.set(o)
    }

    fn observe_handoff(&self, method: &'static str, outcome: &'static str, since: Instant) {
        if let Some(o) = self.observer.get() {
            o.handoff(&self.name, method, outcome, since.elapsed());
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.storage.size()
    }

    pub fn capabilities(&self) -> Capabilities {
        self.storage.capabilities()
    }

    /// A queue the calling thread drives itself, when the storage offers
    /// one (see [`LocalQueue`]): this thread's submissions then complete
    /// on this thread.
    pub fn local_queue(&self) -> io::Result<Option<Box<dyn LocalQueue>>> {
        self.storage.local_queue()
    }

    /// The epoch the disk is at: writers below it are fenced.
    pub fn current_epoch(&self) -> Epoch {
        self.state.lock().current
    }

    /// Requests in flight (waiting or at the storage).
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Register a writer at `epoch` (`None`: the current epoch). An epoch
    /// below the current one is refused; one above it is only registered,
    /// and becomes current with its first write (gateway) or [`Disk::resume`].
    pub fn register(
        self: &Arc<Self>,
        epoch: Option<Epoch>,
        label: &str,
    ) -> Result<Writer, DiskError> {
        self.register_path(epoch, label, None)
    }

    /// [`Disk::register`] for a writer that reaches the same disk through a
    /// path of its own (another device node, another multipath map: a Xen
    /// vbd names the disk by its own `params`). Its I/O goes to `path`; the
    /// tracker and the epochs stay the disk's, so its writes are ordered
    /// against every other writer's exactly as on one path. A path whose
    /// size differs is not the same disk and is refused.
    pub fn register_on(
        self: &Arc<Self>,
        epoch: Option<Epoch>,
        label: &str,
        path: Arc<dyn BlockStorage>,
    ) -> Result<Writer, DiskError> {
        if path.size() != self.size() {
            return Err(DiskError::PathMismatch {
                disk: self.name.clone(),
                disk_size: self.size(),
                path_size: path.size(),
            });
        }
        self.register_path(epoch, label, Some(path))
    }

    fn register_path(
        self: &Arc<Self>,
        epoch: Option<Epoch>,
        label: &str,
        path: Option<Arc<dyn BlockStorage>>,
    ) -> Result<Writer, DiskError> {
        let stored = self.epochs.current(&self.name)?;
        // A host-side writer with no epoch of its own writes at its host's:
        // the one admitted, or (not admitted yet) the first write admits.
        if let (Some(requested), Some(hs)) = (epoch, self.host_side.get()) {
            if !matches!(hs.tenure(), Tenure::Admitted { epoch, .. } if epoch == requested) {
                return Err(DiskError::HostSideEpoch { requested });
            }
        }
        let admitted = match (epoch, self.host_side.get()) {
            (None, Some(hs)) => match hs.tenure() {
                Tenure::Admitted { epoch, .. } => Some(Some(epoch)),
                _ => Some(None),
            },
            _ => None,
        };
        let mut st = self.state.lock();
        st.current = st.current.max(stored);
        let admit_on_write = admitted == Some(None);
        let epoch = match admitted {
            Some(Some(e)) => e,
            _ => epoch.unwrap_or(st.current),
        };
        if epoch < st.current {
            self.counters
                .refused_stale_writers
                .fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::StaleEpoch {
                requested: epoch,
                current: st.current,
            });
        }
        let id = st.next_writer;
        st.next_writer += 1;
        st.writers.insert(
            id,
            WriterInfo {
                epoch,
                label: label.to_string(),
            },
        );
        log::info!(
            "disk {:?}: writer {id} ({label}) registered at epoch {epoch}",
            self.name
        );
        Ok(Writer {
            disk: Arc::clone(self),
            id,
            epoch: AtomicU64::new(epoch),
            admit_on_write: AtomicBool::new(admit_on_write),
            path,
        })
    }

    /// Count a writer refused for a stale epoch by a front end that checks
    /// before registering (the NBD handshake), as [`Disk::register`] counts
    /// its own refusals: `status().refused_stale_writers`.
    pub fn note_refused_stale_writer(&self) {
        self.counters
            .refused_stale_writers
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Writers registered in this process at `epoch` or above: the holders
    /// a newer writer would take the disk from.
    pub fn writers_at_or_above(&self, epoch: Epoch) -> usize {
        self.state
            .lock()
            .writers
            .values()
            .filter(|w| w.epoch >= epoch)
            .count()
    }

    /// Waits until no write, trim or write-zeroes of epoch `epoch` or below
    /// is in flight (queued, at the storage, or fenced but still at the
    /// storage), or `deadline` passes. True when none is left: only then may
    /// a writer on another path or host be told that `epoch` is over.
    pub fn wait_writes_settled(&self, epoch: Epoch, deadline: Option<Instant>) -> bool {
        self.tracker
            .wait_until_none(|r| r.epoch <= epoch && r.kind.modifies(), deadline)
    }

    /// Writes, trims and write-zeroes of epoch `epoch` or below in flight.
    pub fn writes_in_flight_at_or_below(&self, epoch: Epoch) -> usize {
        self.tracker
            .snapshot(|r| r.epoch <= epoch && r.kind.modifies())
            .len()
    }

    /// Submit an I/O from `writer`. `done` runs exactly once with the result:
    /// `EPERM` when the writer is fenced, `ESHUTDOWN` when it is suspended,
    /// `EINVAL` for a misaligned or out-of-range request.
    pub fn submit(self: &Arc<Self>, writer: &Writer, tag: u64, io: StorageIo, done: IoDone) {
        let (kind, range) = match self.classify(&io) {
            Ok(x) => x,
            Err(e) => return fail(done, io, e),
        };
        if let Err(e) = self.check_writer(writer, kind) {
            return fail(done, io, e);
        }
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let req = Request::new(kind, range, writer.epoch());
        let pending = Pending {
            tag,
            io: Some(io),
            path: writer.path.clone(),
            done,
        };
        match self.tracker.admit(req, pending) {
            Ok(Admission::Ready(t)) => self.start(t),
            Ok(Admission::Queued(_)) => {}
            Err((refused, p)) => {
                if let Refused::Stale { .. } = refused {
                    self.counters.refused_stale.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "disk {:?}: {:?} {} from writer {} refused: {refused}",
                        self.name,
                        kind,
                        range,
                        writer.id
                    );
                    p.fail(errno(libc::EPERM));
                } else {
                    p.fail(errno(libc::EINVAL));
                }
            }
        }
    }

    /// Move the disk to epoch `target`: advance the epoch store (one durable
    /// step at a time), refuse new writes from older epochs, and let their
    /// in-flight requests drain — fenced after `fence_timeout` when one is
    /// set. Used by the gateway's first write of a new writer and by
    /// `blkshim ctl handoff`.
    pub fn advance_to(self: &Arc<Self>, target: Epoch) -> Result<Advance, DiskError> {
        let t0 = Instant::now();
        let r = self.advance_to_inner(target);
        match &r {
            Ok(a) if a.from == a.to => {}
            Ok(_) => self.observe_handoff("advance", "ok", t0),
            Err(e) => self.observe_handoff("advance", outcome_of(e), t0),
        }
        r
    }

    fn advance_to_inner(self: &Arc<Self>, target: Epoch) -> Result<Advance, DiskError> {
        let _adv = self.advancing.lock();
        let mut cur = self.state.lock().current;
        let from = cur;
        // The newest epoch some other Disk (another host or process)
        // created in between: its writer may have written already.
        let mut foreign = 0;
        while cur < target {
            match self.epochs.compare_and_advance(&self.name, cur) {
                Ok(next) => cur = next,
                Err(EpochError::Conflict { current, .. }) if current > cur => {
                    cur = current;
                    foreign = current;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.state.lock().current = cur;
        if cur > target {
            return Err(DiskError::StaleEpoch {
                requested: target,
                current: cur,
            });
        }
        if foreign > 0 {
            // Requests of ours older than that writer must not reach the
            // storage after its writes: this tracker never saw them to
            // order behind. Cancel what waits, mark what is at the storage
            // (which only the storage's fencing can recall).
            log::warn!(
                "disk {:?}: epoch {foreign} was taken elsewhere since {from}; fencing what is older",
                self.name
            );
            self.fence_below(foreign);
        }
        let prev = self.tracker.raise_floor(cur);
        if prev < cur {
            log::info!(
                "disk {:?}: epoch {from} -> {cur}; writers below {cur} fenced",
                self.name
            );
            self.schedule_fence(cur);
        }
        Ok(Advance { from, to: cur })
    }

    /// Fence now everything below `floor` that is still in flight: waiting
    /// requests are cancelled (their writers get `EPERM`), requests at the
    /// storage are marked fenced. Returns how many of each.
    pub fn fence_below(self: &Arc<Self>, floor: Epoch) -> (usize, usize) {
        let mut woken = Vec::new();
        let report = self.tracker.fence_with(floor, &mut woken);
        let (cancelled, fenced) = (report.cancelled.len(), report.fenced.len());
        if cancelled + fenced > 0 {
            log::warn!(
                "disk {:?}: fenced below epoch {floor}: {cancelled} cancelled before reaching storage, {fenced} fenced at storage",
                self.name
            );
        }
        self.counters
            .cancelled
            .fetch_add(cancelled as u64, Ordering::Relaxed);
        if self.suspending.load(Ordering::Acquire) {
            self.note_fates(
                report
                    .cancelled
                    .iter()
                    .map(|f| (f.ticket, RequestFate::Cancelled))
                    .chain(report.fenced.iter().map(|(t, _)| (*t, RequestFate::Fenced))),
            );
        }
        for f in report.cancelled {
            let code = self.refusal_errno(f.request.epoch);
            f.token.fail(errno(code));
        }
        for w in woken {
            self.start(w.ticket);
        }
        (cancelled, fenced)
    }

    /// Begin a suspend of the writers at or below `epoch`: from now on every
    /// request of theirs is refused (`ESHUTDOWN`). With [`SuspendMode::Fence`]
    /// their in-flight requests are fenced at once. Poll the result with
    /// [`Suspension::try_finish`], or use [`Disk::suspend`] to block.
    pub fn begin_suspend(self: &Arc<Self>, epoch: Epoch, mode: SuspendMode) -> Suspension {
        let began = Instant::now();
        {
            let mut st = self.state.lock();
            st.gate = Some(st.gate.map_or(epoch, |g| g.max(epoch)));
        }
        let log = Arc::new(SuspensionLog {
            epoch,
            entries: Mutex::new(HashMap::new()),
        });
        {
            // Snapshot while holding the log: a completion racing with the
            // snapshot waits for the log and then records its fate.
            let mut entries = log.entries.lock();
            *self.suspension.lock() = Some(Arc::clone(&log));
            self.suspending.store(true, Ordering::Release);
            for f in self.tracker.snapshot(|r| r.epoch <= epoch) {
                let tag = self.tracker.with_token(f.ticket, |p| p.tag).unwrap_or(0);
                let entry = HandoffEntry {
                    tag,
                    epoch: f.request.epoch,
                    kind: f.request.kind,
                    range: f.request.range,
                    fate: RequestFate::Cancelled,
                };
                entries.insert(f.ticket, (entry, false));
            }
        }
        log::info!(
            "disk {:?}: suspending writers at or below epoch {epoch} ({:?}), {} requests in flight",
            self.name,
            mode,
            log.entries.lock().len()
        );
        let fenced_now = mode == SuspendMode::Fence;
        if fenced_now {
            self.fence_below(epoch + 1);
        }
        Suspension {
            disk: Arc::clone(self),
            log,
            fenced: fenced_now,
            began,
        }
    }

    /// Suspend and block until the hand-off record is ready.
    pub fn suspend(
        self: &Arc<Self>,
        epoch: Epoch,
        mode: SuspendMode,
    ) -> Result<HandoffRecord, DiskError> {
        let mut s = self.begin_suspend(epoch, mode);
        let drained = match mode {
            SuspendMode::Drain { timeout } => self.tracker.wait_until_none(
                |r| r.epoch <= epoch && r.kind.modifies(),
                Some(Instant::now() + timeout),
            ),
            // Fenced already: what is still at the storage can never be
            // acknowledged, so there is nothing to wait for (a hung storage
            // is the reason to fence).
            SuspendMode::Fence => true,
        };
        Ok(s.finish(!drained))
    }

    /// The destination's side of a hand-off: advance the epoch from the
    /// record's source epoch to its destination epoch — refused if the
    /// store moved on meanwhile (a replayed or stale record) — fence
    /// everything older, and from then on admit the destination's writers.
    pub fn resume(self: &Arc<Self>, record: &HandoffRecord) -> Result<Epoch, DiskError> {
        let t0 = Instant::now();
        let r = self.resume_inner(record);
        self.observe_handoff("resume", r.as_ref().map_or_else(outcome_of, |_| "ok"), t0);
        r
    }

    fn resume_inner(self: &Arc<Self>, record: &HandoffRecord) -> Result<Epoch, DiskError> {
        if record.disk != self.name {
            return Err(DiskError::WrongDisk {
                record: record.disk.clone(),
                disk: self.name.clone(),
            });
        }
        let _adv = self.advancing.lock();
        let stale = |current| DiskError::StaleRecord {
            record_source: record.source_epoch,
            current,
        };
        if record.destination_epoch != record.source_epoch + 1 {
            return Err(stale(self.current_epoch()));
        }
        // A writer registered above the stored epoch (gateway) makes its
        // epoch current only with its first write; suspended before that,
        // its record is ahead of the store. No writer at or above the
        // record's source epoch was admitted yet, so catching the store up
        // is safe; a record behind the store still fails below.
        let mut cur = self.epochs.current(&self.name)?;
        while cur < record.source_epoch {
            match self.epochs.compare_and_advance(&self.name, cur) {
                Ok(n) => cur = n,
                Err(EpochError::Conflict { current, .. }) if current > cur => cur = current,
                Err(e) => return Err(e.into()),
            }
        }
        let next = match self
            .epochs
            .compare_and_advance(&self.name, record.source_epoch)
        {
            Ok(n) => n,
            Err(EpochError::Conflict { current, .. }) => {
                self.state.lock().current = current;
                return Err(stale(current));
            }
            Err(e) => return Err(e.into()),
        };
        self.state.lock().current = next;
        self.fence_below(next);
        log::info!(
            "disk {:?}: resumed at epoch {next} after {:?} of epoch {} ({} requests in the record)",
            self.name,
            record.method,
            record.source_epoch,
            record.requests.len()
        );
        Ok(next)
    }

    /// The epoch in the store now (another process or host may have moved
    /// it since this disk last looked).
    pub fn stored_epoch(&self) -> Result<Epoch, DiskError> {
        let stored = self.epochs.current(&self.name)?;
        let mut st = self.state.lock();
        st.current = st.current.max(stored);
        Ok(stored)
    }

    /// A new writer takes the disk over from epoch exactly `expected`: the
    /// store advances `expected -> expected + 1` (refused with
    /// [`DiskError::StaleEpoch`] if it is elsewhere by now: never two
    /// writers at one epoch), every older writer is fenced, and what they
    /// still have at the storage keeps its sectors, so the new writer's
    /// overlapping writes land after it. Only for a holder that cannot
    /// write any more, or that is in this process (see
    /// [`HandoffLedger::holder`]).
    pub fn take_over(self: &Arc<Self>, expected: Epoch) -> Result<Epoch, DiskError> {
        let t0 = Instant::now();
        let r = self.take_over_inner(expected);
        self.observe_handoff(
            "take_over",
            r.as_ref().map_or_else(outcome_of, |_| "ok"),
            t0,
        );
        r
    }

    fn take_over_inner(self: &Arc<Self>, expected: Epoch) -> Result<Epoch, DiskError> {
        let _adv = self.advancing.lock();
        let next = match self.epochs.compare_and_advance(&self.name, expected) {
            Ok(n) => n,
            Err(EpochError::Conflict { current, .. }) => {
                let mut st = self.state.lock();
                st.current = st.current.max(current);
                return Err(DiskError::StaleEpoch {
                    requested: expected + 1,
                    current,
                });
            }
            Err(e) => return Err(e.into()),
        };
        self.state.lock().current = next;
        self.fence_below(next);
        log::info!(
            "disk {:?}: taken over at epoch {next}; writers below it fenced",
            self.name
        );
        Ok(next)
    }

    /// Per-disk state for `blkshim ctl status`.
    pub fn status(&self) -> DiskStatus {
        let st = self.state.lock();
        let c = &self.counters;
        DiskStatus {
            name: self.name.clone(),
            size: self.size(),
            current_epoch: st.current,
            fence_floor: self.tracker.floor(),
            writers: st
                .writers
                .iter()
                .map(|(&id, w)| WriterStatus {
                    id,
                    label: w.label.clone(),
                    epoch: w.epoch,
                    fenced: w.epoch < st.current,
                    suspended: st.gate.is_some_and(|g| w.epoch <= g),
                })
                .collect(),
            in_flight: self.tracker.len(),
            submitted: c.submitted.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            refused_stale: c.refused_stale.load(Ordering::Relaxed),
            refused_suspended: c.refused_suspended.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            storage_errors: c.storage_errors.load(Ordering::Relaxed),
            refused_stale_writers: c.refused_stale_writers.load(Ordering::Relaxed),
        }
    }

    /// Kind and sector range of an I/O, checked against alignment and size.
    fn classify(&self, io: &StorageIo) -> Result<(OpKind, SectorRange), io::Error> {
        let kind = match io {
            StorageIo::Read { .. } => OpKind::Read,
            StorageIo::Write { .. } => OpKind::Write,
            StorageIo::Flush => OpKind::Flush,
            StorageIo::Discard { .. } => OpKind::Trim,
            StorageIo::WriteZeroes { .. } => OpKind::WriteZeroes,
        };
        let Some((offset, len)) = io.byte_range() else {
            return Ok((kind, SectorRange::new(0, 0)));
        };
        let end = offset.checked_add(len).ok_or_else(|| errno(libc::EINVAL))?;
        if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 || len == 0 || end > self.size() {
            return Err(errno(libc::EINVAL));
        }
        Ok((
            kind,
            SectorRange::new(offset / SECTOR_SIZE, len / SECTOR_SIZE),
        ))
    }

    /// Gate and epoch checks before admission; advances the epoch for a
    /// registered newer writer's first modifying request.
    fn check_writer(self: &Arc<Self>, w: &Writer, kind: OpKind) -> Result<(), io::Error> {
        if w.admit_on_write.load(Ordering::Acquire) && (kind.modifies() || kind == OpKind::Flush) {
            self.admit_writer(w)?;
        }
        let (gate, current, lost) = {
            let st = self.state.lock();
            (st.gate, st.current, st.lost)
        };
        let w_epoch = w.epoch();
        if let Some(lost) = lost.filter(|&l| w_epoch <= l) {
            log::debug!(
                "disk {:?}: {kind:?} from writer {} (epoch {w_epoch}) failed: this host lost the disk at epoch {lost}",
                self.name,
                w.id
            );
            return Err(errno(libc::EIO));
        }
        if gate.is_some_and(|g| w_epoch <= g) {
            self.counters
                .refused_suspended
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "disk {:?}: {kind:?} from suspended writer {} (epoch {}) refused",
                self.name,
                w.id,
                w_epoch
            );
            return Err(errno(libc::ESHUTDOWN));
        }
        if (kind.modifies() || kind == OpKind::Flush) && w_epoch > current {
            if !self.options.auto_advance {
                log::warn!(
                    "disk {:?}: writer {} at epoch {} not admitted yet (disk at {current})",
                    self.name,
                    w.id,
                    w_epoch
                );
                return Err(errno(libc::EAGAIN));
            }
            if let Err(e) = self.advance_to(w_epoch) {
                log::error!(
                    "disk {:?}: advancing to epoch {} failed: {e}",
                    self.name,
                    w_epoch
                );
                return Err(match e {
                    DiskError::StaleEpoch { .. } => errno(libc::EPERM),
                    _ => errno(libc::EIO),
                });
            }
        }
        Ok(())
    }

    /// The first write of a writer registered before its host was
    /// admitted: admit the host (this may wait for the holder's record),
    /// then move the writer to the admitted epoch.
    fn admit_writer(self: &Arc<Self>, w: &Writer) -> Result<(), io::Error> {
        let Some(hs) = self.host_side.get() else {
            return Ok(());
        };
        match hs.ensure_admitted(self) {
            Ok(epoch) => {
                w.epoch.store(epoch, Ordering::Release);
                w.admit_on_write.store(false, Ordering::Release);
                if let Some(info) = self.state.lock().writers.get_mut(&w.id) {
                    info.epoch = epoch;
                }
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "disk {:?}: write from writer {} refused: {e}",
                    self.name,
                    w.id
                );
                Err(errno(libc::EIO))
            }
        }
    }

    /// What a request of `epoch` that will not be acknowledged fails
    /// with: EIO once this host lost the disk to a fence (it stops
    /// writing it), else EPERM (a newer writer of this process took over).
    fn refusal_errno(&self, epoch: Epoch) -> i32 {
        if self.state.lock().lost.is_some_and(|l| epoch <= l) {
            libc::EIO
        } else {
            libc::EPERM
        }
    }

    /// The storage refused a write of `epoch` as fenced (EBADE): a newer
    /// writer preempted this host's path. Every request of `epoch` and
    /// older fails from now on, and what still waits is cancelled.
    fn lost_to_fence(self: &Arc<Self>, epoch: Epoch) {
        let news = {
            let mut st = self.state.lock();
            let news = st.lost.is_none_or(|l| l < epoch);
            st.lost = Some(st.lost.map_or(epoch, |l| l.max(epoch)));
            news
        };
        if !news {
            return;
        }
        let why = format!(
            "the storage refused a write of epoch {epoch} as fenced (reservation conflict): a newer writer took the disk; this host stops writing it"
        );
        log::error!("disk {:?}: {why}", self.name);
        if let Some(hs) = self.host_side.get() {
            hs.lose(epoch, why);
        }
        self.fence_below(epoch + 1);
    }

    /// Hand an admitted request to the storage.
    fn start(self: &Arc<Self>, t: Ticket) {
        let Some((Some(io), path)) = self.tracker.with_token(t, |p| (p.io.take(), p.path.take()))
        else {
            log::error!("disk {:?}: admitted {t:?} has no I/O to start", self.name);
            return;
        };
        let disk = Arc::clone(self);
        let done: IoDone = Box::new(move |out| disk.finish(t, out));
        match path {
            Some(path) => path.submit(io, done),
            None => self.storage.submit(io, done),
        }
    }

    /// The storage completed `t`.
    fn finish(self: &Arc<Self>, t: Ticket, out: IoOutcome) {
        let mut woken = Vec::new();
        let f = match self.tracker.complete(t, &mut woken) {
            Ok(f) => f,
            Err(e) => {
                log::error!("disk {:?}: completion of {e}", self.name);
                return;
            }
        };
        for w in woken {
            self.start(w.ticket);
        }
        let result = match f.outcome {
            Outcome::Completed => {
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                if out.result.is_err() {
                    self.counters.storage_errors.fetch_add(1, Ordering::Relaxed);
                }
                match out.result {
                    Err(e)
                        if f.request.kind.modifies() && crate::storage::fencing::is_fenced(&e) =>
                    {
                        self.lost_to_fence(f.request.epoch);
                        // The frontend sees an I/O error: never retried as transient.
                        Err(errno(libc::EIO))
                    }
                    r => r,
                }
            }
            Outcome::Fenced | Outcome::Cancelled => {
                self.counters.fenced.fetch_add(1, Ordering::Relaxed);
                let at_storage = match &out.result {
                    Ok(()) => "completed at storage".to_string(),
                    Err(e) if crate::storage::fencing::is_fenced(e) => {
                        self.lost_to_fence(f.request.epoch);
                        "refused by the storage's fence (not written)".to_string()
                    }
                    Err(e) => format!("failed at storage ({e})"),
                };
                log::warn!(
                    "disk {:?}: fenced {:?} {} of epoch {} {at_storage}; not acknowledged",
                    self.name,
                    f.request.kind,
                    f.request.range,
                    f.request.epoch
                );
                Err(errno(self.refusal_errno(f.request.epoch)))
            }
        };
        if self.suspending.load(Ordering::Acquire) {
            let fate = match f.outcome {
                Outcome::Completed => RequestFate::CompletedNotAcknowledged,
                Outcome::Fenced => RequestFate::Fenced,
                Outcome::Cancelled => RequestFate::Cancelled,
            };
            self.note_fates(std::iter::once((t, fate)));
        }
        (f.token.done)(IoOutcome {
            result,
            buf: out.buf,
        });
    }

    fn note_fates(&self, fates: impl Iterator<Item = (Ticket, RequestFate)>) {
        let log = self.suspension.lock().clone();
        if let Some(log) = log {
            let mut entries = log.entries.lock();
            for (t, fate) in fates {
                if let Some((e, settled)) = entries.get_mut(&t) {
                    // The first fate sticks: fenced at storage, then completed, stays fenced.
                    if !*settled {
                        e.fate = fate;
                        *settled = true;
                    }
                }
            }
        }
    }

    /// After an automatic advance: fence what is still in flight below
    /// `floor` once the timeout passes (or leave it to the caller).
    fn schedule_fence(self: &Arc<Self>, floor: Epoch) {
        let Some(timeout) = self.options.fence_timeout else {
            return;
        };
        let stale = move |r: &Request| r.kind.modifies() && r.epoch < floor;
        if self.tracker.snapshot(stale).is_empty() {
            return;
        }
        let disk = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("fence-{}", self.name))
            .spawn(move || {
                if !disk
                    .tracker
                    .wait_until_none(stale, Some(Instant::now() + timeout))
                {
                    disk.fence_below(floor);
                }
            });
        if let Err(e) = spawned {
            log::error!("disk {:?}: no fence timer ({e}); fencing now", self.name);
            self.fence_below(floor);
        }
    }
}

impl Pending {
    fn fail(self, e: io::Error) {
        let buf = match self.io {
            Some(StorageIo::Read { buf, .. }) | Some(StorageIo::Write { buf, .. }) => Some(buf),
            _ => None,
        };
        (self.done)(IoOutcome {
            result: Err(e),
            buf,
        });
    }
}

fn fail(done: IoDone, io: StorageIo, e: io::Error) {
    Pending {
        tag: 0,
        io: Some(io),
        path: None,
        done,
    }
    .fail(e)
}

/// A suspend in progress.
pub struct Suspension {
    disk: Arc<Disk>,
    log: Arc<SuspensionLog>,
    fenced: bool,
    /// For the hand-off's duration in the metrics.
    began: Instant,
}

impl Suspension {
    /// The record, once nothing modifying of the suspended writers is in
    /// flight; with `deadline_passed` whatever is left is fenced first.
    /// `None` while the drain goes on.
    pub fn try_finish(&mut self, deadline_passed: bool) -> Option<HandoffRecord> {
        let epoch = self.log.epoch;
        let busy = !self
            .disk
            .tracker
            .snapshot(|r| r.epoch <= epoch && r.kind.modifies())
            .is_empty();
        // A fence finishes at once: what is still at the storage is marked
        // fenced, and newer writes to its sectors are ordered after it.
        if busy && !deadline_passed && !self.fenced {
            return None;
        }
        Some(self.finish(busy))
    }

    fn finish(&mut self, fence_rest: bool) -> HandoffRecord {
        let epoch = self.log.epoch;
        let method = if self.fenced {
            HandoffMethod::Fenced
        } else if fence_rest {
            HandoffMethod::DrainTimedOutThenFenced
        } else {
            HandoffMethod::Drained
        };
        if fence_rest || !self.fenced {
            // Raise the floor even after a clean drain: the source epoch
            // must never write again.
            self.disk.fence_below(epoch + 1);
            self.fenced = true;
        }
        let mut requests: Vec<HandoffEntry> = self
            .log
            .entries
            .lock()
            .values()
            .map(|(e, settled)| {
                let mut e = e.clone();
                // Every write, trim and write-zeroes has settled by now
                // (drained or fenced); what has not is a read or a flush.
                if !settled && !e.kind.modifies() {
                    e.fate = RequestFate::StillInFlight;
                }
                e
            })
            .collect();
        requests.sort_by_key(|e| (e.range.start, e.epoch, e.tag));
        // Only if no newer suspend replaced this one meanwhile (an orphaned
        // suspend finished at its deadline must not end the newer's log).
        let mut current = self.disk.suspension.lock();
        if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, &self.log)) {
            *current = None;
            self.disk.suspending.store(false, Ordering::Release);
        }
        drop(current);
        let outcome = match method {
            HandoffMethod::Drained => "drained",
            HandoffMethod::Fenced => "fenced",
            HandoffMethod::DrainTimedOutThenFenced => "drain_timed_out_then_fenced",
        };
        self.disk.observe_handoff("suspend", outcome, self.began);
        HandoffRecord {
            disk: self.disk.name.clone(),
            source_epoch: epoch,
            destination_epoch: epoch + 1,
            method,
            requests,
        }
    }
}

#[cfg(test)]
mod tests;
