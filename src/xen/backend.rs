//! The xenbus back-end state machine of one vbd (what Linux's
//! `xen-blkback/xenbus.c` does), over any [`XenStore`].
//!
//! InitWait: features and disk geometry published. Connected: the frontend
//! was Initialised, its rings are mapped and served, and this back end holds
//! a writer of the disk at a fresh epoch. Suspend (the frontend leaves
//! Connected, or the toolstack writes `blkshim-suspend` = `drain`|`fence`):
//! every ring stops consuming at once, the disk drains or fences, and the
//! hand-off record is published (`blkshim-handoff` node, and
//! `<handoff dir>/<disk>.handoff.json` on the shared storage). Closing and
//! Closed follow the frontend.
//!
//! Disks: every vbd of one disk in this process shares one [`Disk`] (from
//! the [`DiskRegistry`], by the storage's identity, or the vbd's `disk-id`
//! node), each writing through its own path. A same-host `xl restore` or
//! `xl migrate` destination is therefore ordered behind the source's
//! writes still in flight, as in the gateway.
//!
//! Admission, with no hook (plain `xl`): the [`HandoffLedger`] says who
//! holds the disk's current epoch. Released (its record is published), held
//! by this process, held by a process of this host that is gone, or nobody:
//! the vbd takes the next epoch. Held by a writer that may still write
//! (another process or host): it waits up to `resume_wait` for that
//! writer's record, and then refuses, with the reason in `blkshim-error`;
//! `blkshim-resume` = `takeover` is the operator saying that writer is dead.
//! With `blkshim-resume` = `wait` (a migration hook) it is admitted only by
//! the source's record; the node may also hold the record itself.
//!
//! A source publishes its record once none of its writes can reach the
//! storage any more, whatever the toolstack does meanwhile: libxl removes a
//! vbd that is slow to close after 10 s, and `xl destroy` removes it at once;
//! the back end keeps draining (or waiting for fenced writes) and publishes
//! all the same. Only the daemon's own shutdown stops it earlier, and then
//! its claim dies with the process.

use crate::epoch::EpochStore;
use crate::handoff::hostside::{self, AdmitError, HostSidePolicy};
use crate::handoff::{
    Disk, DiskError, DiskOptions, DiskRegistry, HandoffLedger, HandoffMethod, HandoffRecord,
    SuspendMode, Writer,
};
use crate::storage::fencing::{
    FenceMode, PrFencing, PrOptions, PrWriterFence, PreemptMode, SanlockFence, WriterFence,
};
use crate::storage::{BlockStorage, SECTOR_SIZE};
use crate::xen::abi::BlkifAbi;
use crate::xen::blkif::{Limits, MAX_INDIRECT_SEGMENTS};
use crate::xen::dataplane::{RingConfig, RingHandle, Target};
use crate::xen::grant::{DomId, GrantRef};
use crate::xen::platform::Platform;
use crate::xen::ring::MAX_RING_PAGE_ORDER;
use crate::xen::xenstore::{transact, XenStore, XsError, XBT_NULL};
use parking_lot::Mutex;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// `XenbusState*` values.
pub mod state {
    pub const INITIALISING: u32 = 1;
    pub const INIT_WAIT: u32 = 2;
    pub const INITIALISED: u32 = 3;
    pub const CONNECTED: u32 = 4;
    pub const CLOSING: u32 = 5;
    pub const CLOSED: u32 = 6;
}

/// How a back end serves its vbds.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Route I/O through the core and stop at suspend. `false` is Linux
    /// blkback's behaviour, for negative tests only: the field exists only
    /// with feature `test-utils`, so a production back end is always
    /// protected.
    #[cfg(feature = "test-utils")]
    pub protection: bool,
    /// Suspend mode when the frontend leaves Connected.
    pub suspend_mode: SuspendMode,
    pub max_ring_page_order: u32,
    pub max_queues: u32,
    pub max_indirect_segments: u32,
    pub persistent: bool,
    /// Claims and hand-off records (the shared storage, next to the
    /// epochs). Without one a vbd cannot tell who else holds its disk and
    /// takes it over: for single-process uses and tests only.
    pub ledger: Option<Arc<HandoffLedger>>,
    /// The disks open in this process, shared by its vbds.
    pub registry: Arc<DiskRegistry>,
    /// How long a destination waits for the record of a writer that may
    /// still write, before it fences it (or, with no fence, refuses).
    pub resume_wait: Duration,
    /// What keeps an older host's writes off the storage when it did not
    /// hand over ([`FenceMode`]).
    pub fence: FenceMode,
    /// `--fence pr`: PREEMPT or PREEMPT AND ABORT.
    pub pr_preempt: PreemptMode,
    /// `--fence sanlock`: the daemon's one lease fence, shared by its vbds.
    pub sanlock: Option<Arc<SanlockFence>>,
    /// Which hosts still renew their liveness (an etcd epoch store).
    pub liveness: Option<Arc<dyn crate::handoff::hostside::HostLiveness>>,
    /// `--metrics`: every disk's rings count their requests here.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            #[cfg(feature = "test-utils")]
            protection: true,
            suspend_mode: SuspendMode::Drain {
                timeout: Duration::from_secs(10),
            },
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent: true,
            ledger: None,
            registry: DiskRegistry::new(),
            resume_wait: DEFAULT_RESUME_WAIT,
            fence: FenceMode::None,
            pr_preempt: PreemptMode::default(),
            sanlock: None,
            liveness: None,
            metrics: None,
        }
    }
}

/// How long a destination waits by default for a live holder's record:
/// the drain deadline (10 s), then fenced writes still held at the storage.
/// libxl's own device timeouts are 10 s; a storage path that holds writes
/// for a minute must still hand over.
pub const DEFAULT_RESUME_WAIT: Duration = Duration::from_secs(180);

/// The disk a vbd's `params` names, opened.
pub struct OpenedDisk {
    /// Name in the epoch store: the disk's identity, the same for every
    /// path to it ([`disk_identity`](crate::storage::identity::disk_identity)).
    pub name: String,
    pub storage: Arc<dyn BlockStorage>,
    pub epochs: Arc<dyn EpochStore>,
}

/// Opens the disk for a vbd from its `params` node value.
pub type DiskOpener = Arc<dyn Fn(&str) -> io::Result<OpenedDisk> + Send + Sync>;

/// The path in a tapback-style `params` value (`aio:/p`, `raw:/p`, `/p`).
pub fn params_path(params: &str) -> PathBuf {
    let p = params.trim();
    for prefix in ["aio:", "raw:", "file:", "phy:", "tap:aio:", "vhd:"] {
        if let Some(rest) = p.strip_prefix(prefix) {
            return PathBuf::from(rest);
        }
    }
    PathBuf::from(p)
}

/// A disk name safe for the epoch store, from an image path.
pub fn disk_name_for(path: &Path) -> String {
    crate::storage::identity::sanitize(&path.to_string_lossy())
}

/// Where the vbd is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the toolstack's nodes.
    Starting,
    InitWait,
    Connected,
    /// Suspended: no ring consumes; the record is published.
    Suspended,
    Closing,
    Closed,
    /// Gave up (logged and in the `blkshim-error` node).
    Failed,
}

/// What tests and `status` see of a vbd.
#[derive(Clone, Debug)]
pub struct VbdStatus {
    pub phase: Phase,
    pub epoch: u64,
    pub queues: usize,
    pub record: Option<HandoffRecord>,
    pub error: Option<String>,
}

/// A running vbd back end (its own thread). Stops when dropped.
pub struct VbdHandle {
    pub path: String,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<VbdStatus>>,
    rings: Arc<Mutex<Vec<RingHandle>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for VbdHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VbdHandle({}, {:?})", self.path, self.status.lock())
    }
}

impl VbdHandle {
    pub fn status(&self) -> VbdStatus {
        self.status.lock().clone()
    }

    /// Waits until the phase is `want` (or `timeout`).
    pub fn wait_phase(&self, want: Phase, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.status.lock().phase == want {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        self.status.lock().phase == want
    }

    /// Runs `f` on the ring handles (stats, broken flags).
    pub fn with_rings<R>(&self, f: impl FnOnce(&[RingHandle]) -> R) -> R {
        f(&self.rings.lock())
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VbdHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts serving the vbd whose back-end directory is `be`.
pub fn spawn<S: XenStore + 'static>(
    xs: S,
    platform: Arc<dyn Platform>,
    be: &str,
    opener: DiskOpener,
    config: BackendConfig,
) -> io::Result<VbdHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Mutex::new(VbdStatus {
        phase: Phase::Starting,
        epoch: 0,
        queues: 0,
        record: None,
        error: None,
    }));
    let rings = Arc::new(Mutex::new(Vec::new()));
    let mut vbd = Vbd {
        xs,
        platform,
        be: be.to_string(),
        fe: String::new(),
        domid: 0,
        opener,
        config,
        stop: Arc::clone(&stop),
        status: Arc::clone(&status),
        rings: Arc::clone(&rings),
        disk: None,
        disk_name: String::new(),
        device: PathBuf::new(),
        epochs: None,
        storage: None,
        writer: None,
        read_only: false,
        last_record: None,
        publish_node: true,
    };
    let name = be.rsplit('/').take(2).collect::<Vec<_>>().join("-");
    let thread = thread::Builder::new()
        .name(format!("vbd-{name}"))
        .spawn(move || {
            if let Err(e) = vbd.run() {
                log::error!("vbd {}: {e}", vbd.be);
                let _ = vbd.xs.write_str(
                    XBT_NULL,
                    &format!("{}/blkshim-error", vbd.be),
                    &e.to_string(),
                );
                vbd.teardown();
                let mut st = vbd.status.lock();
                st.phase = Phase::Failed;
                st.error = Some(e.to_string());
            }
        })?;
    Ok(VbdHandle {
        path: be.to_string(),
        stop,
        status,
        rings,
        thread: Some(thread),
    })
}

#[derive(Debug)]
struct Fail(String);

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<XsError> for Fail {
    fn from(e: XsError) -> Self {
        Fail(format!("xenstore: {e}"))
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail(e.to_string())
    }
}

impl From<crate::handoff::DiskError> for Fail {
    fn from(e: crate::handoff::DiskError) -> Self {
        Fail(format!("disk: {e}"))
    }
}

struct Vbd<S: XenStore> {
    xs: S,
    platform: Arc<dyn Platform>,
    be: String,
    fe: String,
    domid: DomId,
    opener: DiskOpener,
    config: BackendConfig,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<VbdStatus>>,
    rings: Arc<Mutex<Vec<RingHandle>>>,
    disk: Option<Arc<Disk>>,
    /// The opener's name for the disk (`disk-id` overrides it).
    disk_name: String,
    /// The path in `params`: the device `--fence pr` registers through.
    device: PathBuf,
    epochs: Option<Arc<dyn EpochStore>>,
    storage: Option<Arc<dyn BlockStorage>>,
    writer: Option<Arc<Writer>>,
    read_only: bool,
    last_record: Option<HandoffRecord>,
    /// False once the device's node is gone (writing would recreate it).
    publish_node: bool,
}

/// How often a vbd thread looks at its stop flag while no watch fires. It
/// reads XenStore only when a watch fires, or every [`RESYNC`] as a safety
/// net: on a dom0 with many disks, polling XenStore is what would cost.
const POLL: Duration = Duration::from_millis(100);
/// How often a vbd re-evaluates its nodes with no watch event.
const RESYNC: Duration = Duration::from_secs(2);

impl<S: XenStore> Vbd<S> {
    fn node(&self, k: &str) -> Result<Option<String>, XsError> {
        self.xs.read_optional(XBT_NULL, &format!("{}/{k}", self.be))
    }

    fn fe_node(&self, k: &str) -> Result<Option<String>, XsError> {
        self.xs.read_optional(XBT_NULL, &format!("{}/{k}", self.fe))
    }

    /// Writes the back end's `state` (see [`Vbd::write_if_present`]).
    fn set_state(&self, st: u32) -> Result<(), XsError> {
        self.write_if_present("state", &st.to_string())
    }

    fn set_phase(&self, p: Phase) {
        self.status.lock().phase = p;
    }

    fn fe_state(&self) -> u32 {
        self.fe_node("state")
            .ok()
            .flatten()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(state::CLOSED)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run(&mut self) -> Result<(), Fail> {
        self.xs.watch(&self.be, "be")?;
        // The toolstack's nodes: params, mode, frontend, frontend-id.
        let (params, mode, fe, domid) = loop {
            if self.stopped() {
                return Ok(());
            }
            let got = (
                self.node("params")?,
                self.node("mode")?,
                self.node("frontend")?,
                self.node("frontend-id")?,
            );
            if let (Some(p), m, Some(f), Some(d)) = &got {
                if !p.trim().is_empty() {
                    break (
                        p.clone(),
                        m.clone().unwrap_or_else(|| "w".into()),
                        f.clone(),
                        d.clone(),
                    );
                }
            }
            // Removed before it was set up (a domain destroyed, or crashed,
            // while the toolstack wrote its disk): nothing was opened or
            // served; finish instead of waiting for nodes that never come.
            if got.0.is_none() && got.2.is_none() && self.node("state")?.is_none() {
                log::info!("vbd {}: removed before it was set up", self.be);
                self.publish_node = false;
                let _ = self.xs.unwatch(&self.be, "be");
                return Ok(());
            }
            self.wait_for_watch()?;
        };
        self.fe = fe.trim().to_string();
        self.domid = domid
            .trim()
            .parse()
            .map_err(|_| Fail(format!("bad frontend-id {domid:?}")))?;
        self.read_only = mode.trim().starts_with('r');
        self.device = params_path(&params);
        let opened = (self.opener)(&params)?;
        let size = opened.storage.size();
        let caps = opened.storage.capabilities();
        self.disk_name = opened.name;
        self.epochs = Some(opened.epochs);
        self.storage = Some(opened.storage);
        let c = &self.config;
        let be = self.be.clone();
        let ro = self.read_only;
        transact(&self.xs, 10, |tx| {
            let w = |k: &str, v: String| self.xs.write_str(tx, &format!("{be}/{k}"), &v);
            w("feature-flush-cache", "1".into())?;
            w("feature-barrier", "1".into())?;
            w("feature-discard", u8::from(caps.discard).to_string())?;
            if caps.discard {
                w("discard-granularity", "4096".into())?;
                w("discard-alignment", "0".into())?;
                w("discard-secure", "1".into())?;
            }
            w(
                "feature-max-indirect-segments",
                c.max_indirect_segments
                    .min(MAX_INDIRECT_SEGMENTS)
                    .to_string(),
            )?;
            w("feature-persistent", u8::from(c.persistent).to_string())?;
            w(
                "max-ring-page-order",
                c.max_ring_page_order.min(MAX_RING_PAGE_ORDER).to_string(),
            )?;
            w("multi-queue-max-queues", c.max_queues.max(1).to_string())?;
            w("sectors", (size / SECTOR_SIZE).to_string())?;
            w("sector-size", SECTOR_SIZE.to_string())?;
            w("physical-sector-size", SECTOR_SIZE.to_string())?;
            w("info", if ro { "4".into() } else { "0".into() })?;
            w("hotplug-status", "connected".into())?;
            w("state", state::INIT_WAIT.to_string())
        })?;
        self.set_phase(Phase::InitWait);
        self.xs.watch(&self.fe, "fe")?;
        log::info!("vbd {}: InitWait (frontend {})", self.be, self.fe);

        loop {
            if self.stopped() {
                self.teardown();
                return Ok(());
            }
            if self.node("state")?.is_none() && self.node("params")?.is_none() {
                // The toolstack removed the device — e.g. it destroyed the
                // migrated source domain without asking for a suspend. Give
                // up the disk properly all the same, so the destination's
                // record exists (in the hand-off directory; the node is gone).
                log::info!("vbd {}: removed", self.be);
                self.publish_node = false;
                if self.status.lock().phase == Phase::Connected {
                    if let Err(e) = self.suspend(SuspendMode::Fence, false) {
                        log::error!("vbd {}: suspend at removal failed: {e}", self.be);
                    }
                }
                self.teardown();
                return Ok(());
            }
            self.step()?;
            self.wait_for_watch()?;
        }
    }

    /// Returns when a watch of this vbd fired, the vbd is stopped, or
    /// [`RESYNC`] passed.
    fn wait_for_watch(&self) -> Result<(), Fail> {
        let end = Instant::now() + RESYNC;
        while !self.stopped() && Instant::now() < end {
            if self.xs.read_watch(Some(POLL))?.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// One evaluation of the state machine.
    fn step(&mut self) -> Result<(), Fail> {
        let fe_state = self.fe_state();
        let control = self.node("blkshim-suspend")?;
        let phase = self.status.lock().phase;
        match phase {
            Phase::InitWait => {
                if matches!(fe_state, state::INITIALISED | state::CONNECTED) {
                    self.connect()?;
                }
            }
            Phase::Connected => {
                let asked = control
                    .as_deref()
                    .map(str::trim)
                    .filter(|c| matches!(*c, "drain" | "fence"));
                let left = !matches!(fe_state, state::CONNECTED | state::INITIALISED);
                if let Some(mode) = asked {
                    let m = if mode == "fence" {
                        SuspendMode::Fence
                    } else {
                        self.config.suspend_mode
                    };
                    self.suspend(m, false)?;
                } else if self.fe_node("state")?.is_none() {
                    // The toolstack tore the frontend down (`xl save`,
                    // `xl destroy`, the end of `xl migrate`): no guest waits
                    // for these requests, and blkfront re-sends whatever was
                    // not answered. Fence at once and tell libxl Closed now;
                    // it waits only 10 s for that. The record still waits
                    // for the fenced writes to leave the storage.
                    self.suspend(SuspendMode::Fence, true)?;
                } else if left {
                    self.suspend(self.config.suspend_mode, false)?;
                }
            }
            Phase::Suspended | Phase::Closing => {
                match fe_state {
                    state::CLOSING if phase == Phase::Suspended => {
                        self.set_state(state::CLOSING)?;
                        self.set_phase(Phase::Closing);
                    }
                    state::CLOSED => {
                        self.stop_rings();
                        self.set_state(state::CLOSED)?;
                        self.set_phase(Phase::Closed);
                    }
                    state::INITIALISING | state::INIT_WAIT => {
                        // The same frontend reconnects here (a cancelled
                        // migration): serve it again from InitWait.
                        self.stop_rings();
                        self.set_state(state::INIT_WAIT)?;
                        self.set_phase(Phase::InitWait);
                    }
                    _ => {}
                }
            }
            Phase::Closed => {
                if matches!(fe_state, state::INITIALISING | state::INIT_WAIT) {
                    self.set_state(state::INIT_WAIT)?;
                    self.set_phase(Phase::InitWait);
                }
            }
            Phase::Starting | Phase::Failed => {}
        }
        Ok(())
    }

    /// The shared [`Disk`] of this vbd's disk: by its `disk-id` node when
    /// the toolstack (or a hotplug script) wrote one, else by the storage's
    /// identity.
    fn open_disk(&mut self) -> Result<Option<Arc<Disk>>, Fail> {
        #[cfg(feature = "test-utils")]
        if !self.config.protection {
            return Ok(None);
        }
        let name = match self.node("disk-id")? {
            Some(id) if !id.trim().is_empty() => {
                let id = id.trim().to_string();
                crate::epoch::validate_disk_name(&id).map_err(|e| Fail(format!("disk-id: {e}")))?;
                id
            }
            _ => self.disk_name.clone(),
        };
        let (Some(storage), Some(epochs)) = (self.storage.clone(), self.epochs.clone()) else {
            return Err(Fail("no storage".into()));
        };
        let disk = self.config.registry.open(
            &name,
            storage,
            epochs,
            DiskOptions {
                auto_advance: false,
                fence_timeout: None,
            },
        )?;
        self.disk = Some(Arc::clone(&disk));
        Ok(Some(disk))
    }

    /// Gets a writer at a fresh epoch: by a hand-off record when this is a
    /// migration destination with a hook, else as [`Vbd::admit_plain`]
    /// decides. A read-only vbd takes no epoch (it must not fence the
    /// writer) and reads at the current one.
    fn admit(&mut self) -> Result<(), Fail> {
        let Some(disk) = self.open_disk()? else {
            return Ok(());
        };
        self.writer = None;
        let storage = self
            .storage
            .clone()
            .ok_or_else(|| Fail("no storage".into()))?;
        let label = format!("xen {}", self.be);
        if self.read_only {
            let writer = disk.register_on(None, &label, storage)?;
            self.status.lock().epoch = writer.epoch();
            self.writer = Some(Arc::new(writer));
            return Ok(());
        }
        let resume = self.node("blkshim-resume")?;
        let epoch = match resume.as_deref().map(str::trim) {
            Some("wait") => self.resume_from_record(&disk)?,
            Some("takeover") => {
                let current = disk.stored_epoch()?;
                log::warn!(
                    "vbd {}: blkshim-resume=takeover: taking disk {:?} from epoch {current} without its record (the operator says its writer is dead)",
                    self.be,
                    disk.name()
                );
                disk.take_over(current)?
            }
            Some(v) if !v.is_empty() => {
                let record = HandoffRecord::from_json(v)
                    .map_err(|e| Fail(format!("blkshim-resume: bad record: {e}")))?;
                disk.resume(&record)?
            }
            _ => match self.last_record.take() {
                // The same frontend back after our own suspend.
                Some(record) => disk.resume(&record)?,
                None => self.admit_plain(&disk)?,
            },
        };
        if let Some(policy) = self.host_policy()? {
            // Claim the epoch, then (pr, sanlock) make sure no older host
            // can write before this vbd's first write.
            hostside::establish(&disk, &policy, epoch, &self.be)
                .map_err(|e| Fail(e.to_string()))?;
        }
        let writer = disk.register_on(Some(epoch), &label, storage)?;
        self.status.lock().epoch = epoch;
        self.writer = Some(Arc::new(writer));
        Ok(())
    }

    /// The host-side policy of this vbd's disk: the daemon's ledger and
    /// fence, the fence opened on this vbd's device. `None` without a
    /// ledger (single-process uses and tests).
    fn host_policy(&self) -> Result<Option<HostSidePolicy>, Fail> {
        let Some(ledger) = &self.config.ledger else {
            return Ok(None);
        };
        let fence: Option<Arc<dyn WriterFence>> = match self.config.fence {
            FenceMode::None => None,
            FenceMode::Pr => {
                let pr = PrFencing::open(
                    &self.device,
                    PrOptions {
                        preempt: self.config.pr_preempt,
                        ..PrOptions::default()
                    },
                )
                .map_err(|e| Fail(format!("--fence pr on {}: {e}", self.device.display())))?;
                Some(Arc::new(PrWriterFence::new(pr)))
            }
            FenceMode::Sanlock => match &self.config.sanlock {
                Some(f) => Some(Arc::clone(f) as Arc<dyn WriterFence>),
                None => return Err(Fail("--fence sanlock: no lease fence opened".into())),
            },
        };
        Ok(Some(HostSidePolicy {
            ledger: Arc::clone(ledger),
            fence,
            resume_wait: self.config.resume_wait,
            liveness: self.config.liveness.clone(),
        }))
    }

    /// Admission with no hook, as plain `xl restore`/`xl migrate` gives it
    /// ([`hostside::decide`]): take the next epoch when nothing that may
    /// still write holds the current one; wait `resume_wait` for a live
    /// holder's record; then fence it (`--fence pr|sanlock`) or refuse.
    fn admit_plain(&self, disk: &Arc<Disk>) -> Result<u64, Fail> {
        let Some(policy) = self.host_policy()? else {
            let current = disk.stored_epoch()?;
            return Ok(disk.take_over(current)?);
        };
        let (epoch, by) = hostside::decide(disk, &policy, &format!("vbd {}", self.be), &|| self.stopped(), &|| false)
            .map_err(|e| match e {
                AdmitError::Refused(why) => Fail(format!(
                    "{why}. Or, if that writer is dead, write blkshim-resume = takeover in this vbd's back-end directory"
                )),
                e => Fail(e.to_string()),
            })?;
        log::info!(
            "vbd {}: disk {:?} admitted at epoch {epoch} ({by:?})",
            self.be,
            disk.name()
        );
        Ok(epoch)
    }

    /// Waits for the source's record and resumes with it; older records
    /// (earlier hand-offs) are refused by the epoch store and waited past.
    fn resume_from_record(&self, disk: &Arc<Disk>) -> Result<u64, Fail> {
        let ledger = self
            .config
            .ledger
            .as_ref()
            .ok_or_else(|| Fail("blkshim-resume=wait needs a hand-off directory".into()))?;
        let end = Instant::now() + self.config.resume_wait;
        loop {
            if let Ok(Some(r)) = ledger.record(disk.name()) {
                match disk.resume(&r) {
                    Ok(e) => return Ok(e),
                    Err(DiskError::StaleRecord { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() > end || self.stopped() {
                return Err(Fail(format!(
                    "no current hand-off record for {} in {} after {:?}",
                    disk.name(),
                    ledger.record_path(disk.name()).display(),
                    self.config.resume_wait
                )));
            }
            // The record is a file the source writes once: 50 ms is soon
            // enough against a hand-off of seconds, and idle for dom0.
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&mut self) -> Result<(), Fail> {
        let protocol = self.fe_node("protocol")?;
        let abi = BlkifAbi::from_protocol(protocol.as_deref())
            .map_err(|e| Fail(format!("frontend protocol: {e}")))?;
        let order: u32 = match self.fe_node("ring-page-order")? {
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| Fail(format!("bad ring-page-order {s:?}")))?,
            None => 0,
        };
        if order > self.config.max_ring_page_order.min(MAX_RING_PAGE_ORDER) {
            return Err(Fail(format!("ring-page-order {order} not offered")));
        }
        let nq: u32 = match self.fe_node("multi-queue-num-queues")? {
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| Fail(format!("bad multi-queue-num-queues {s:?}")))?,
            None => 0,
        };
        if nq > self.config.max_queues.max(1) {
            return Err(Fail(format!("{nq} queues not offered")));
        }
        let persistent = self.config.persistent
            && self
                .fe_node("feature-persistent")?
                .as_deref()
                .map(str::trim)
                == Some("1");
        let prefixes: Vec<String> = if nq == 0 {
            vec![String::new()]
        } else {
            (0..nq).map(|i| format!("queue-{i}/")).collect()
        };
        let mut queues = Vec::new();
        for p in &prefixes {
            let refs: Vec<GrantRef> = if order == 0 {
                vec![self.parse_fe(&format!("{p}ring-ref"))?]
            } else {
                (0..1u32 << order)
                    .map(|i| self.parse_fe(&format!("{p}ring-ref{i}")))
                    .collect::<Result<_, _>>()?
            };
            let port: u32 = self.parse_fe(&format!("{p}event-channel"))?;
            queues.push((refs, port));
        }
        self.admit()?;
        let storage = self
            .storage
            .clone()
            .ok_or_else(|| Fail("no storage".into()))?;
        let target = match (&self.disk, &self.writer) {
            (Some(disk), Some(writer)) => Target::Protected {
                disk: Arc::clone(disk),
                writer: Arc::clone(writer),
            },
            #[cfg(feature = "test-utils")]
            _ if !self.config.protection => Target::Unprotected {
                storage: Arc::clone(&storage),
            },
            // A protected vbd that was admitted always has both.
            _ => return Err(Fail("no writer admitted for the disk".into())),
        };
        let caps = storage.capabilities();
        let limits = Limits {
            read_only: self.read_only,
            max_indirect_segments: self.config.max_indirect_segments,
            flush: true,
            barrier: true,
            discard: caps.discard,
            secure_discard: caps.discard,
            ..Limits::new(storage.size() / SECTOR_SIZE)
        };
        let mapper = self.platform.grant_mapper();
        let mut handles = Vec::new();
        for (i, (refs, port)) in queues.into_iter().enumerate() {
            let ring = mapper
                .map(self.domid, &refs, true)
                .map_err(|e| Fail(format!("ring {i}: {e}")))?;
            let evtchn = self.platform.bind_event_channel(self.domid, port)?;
            handles.push(RingHandle::start(RingConfig {
                domid: self.domid,
                abi,
                ring,
                evtchn,
                mapper: Arc::clone(&mapper),
                limits,
                persistent,
                target: target.clone(),
                metrics: match (&self.config.metrics, &target) {
                    (Some(m), Target::Protected { disk, .. }) => Some(m.add_disk(disk)),
                    _ => None,
                },
                name: format!("{}#{i}", self.be),
            })?);
        }
        let n = handles.len();
        *self.rings.lock() = handles;
        // A stale suspend request must not suspend the new connection.
        let _ = self
            .xs
            .rm(XBT_NULL, &format!("{}/blkshim-suspend", self.be));
        let _ = self
            .xs
            .rm(XBT_NULL, &format!("{}/blkshim-handoff", self.be));
        self.set_state(state::CONNECTED)?;
        {
            let mut st = self.status.lock();
            st.phase = Phase::Connected;
            st.queues = n;
        }
        log::info!(
            "vbd {}: Connected ({n} ring(s), order {order}, {abi:?}, persistent={persistent}, epoch {})",
            self.be,
            self.status.lock().epoch
        );
        Ok(())
    }

    fn parse_fe<T: std::str::FromStr>(&self, k: &str) -> Result<T, Fail> {
        let v = self
            .fe_node(k)?
            .ok_or_else(|| Fail(format!("frontend has no {k}")))?;
        v.trim()
            .parse()
            .map_err(|_| Fail(format!("frontend {k}: bad value {v:?}")))
    }

    /// Stop every ring at once, then drain or fence through the core, then
    /// publish the record once none of this writer's writes can still
    /// reach the storage. `close_early`: the toolstack is tearing the
    /// device down; answer Closed as soon as the record's contents are
    /// settled, before waiting for the storage.
    fn suspend(&mut self, mode: SuspendMode, close_early: bool) -> Result<(), Fail> {
        for r in self.rings.lock().iter() {
            r.suspend();
        }
        let record = match (&self.disk, &self.writer) {
            (Some(_), Some(_)) if self.read_only => {
                // A reader holds no epoch and hands nothing over.
                self.set_phase(Phase::Suspended);
                return Ok(());
            }
            (Some(disk), Some(writer)) => {
                let epoch = writer.epoch();
                log::info!("vbd {}: suspending epoch {epoch} ({mode:?})", self.be);
                let record = disk.suspend(epoch, mode)?;
                if close_early {
                    self.set_state(state::CLOSED)?;
                }
                // Fenced writes may still be at the storage, which other
                // paths and hosts share and this process cannot recall: the
                // record is published only once they are gone. Nothing the
                // toolstack does to the vbd's nodes stops this wait; only
                // the daemon's own shutdown does (its claim then dies with
                // the process).
                while !disk
                    .wait_writes_settled(epoch, Some(Instant::now() + Duration::from_secs(5)))
                {
                    if self.stopped() {
                        return Ok(());
                    }
                    log::warn!(
                        "vbd {}: {} write(s) of epoch {epoch} still at the storage; the hand-off record waits for them",
                        self.be,
                        disk.writes_in_flight_at_or_below(epoch)
                    );
                }
                record
            }
            _ => {
                // Linux blkback: nothing to wait for, rings keep going.
                HandoffRecord {
                    disk: "unprotected".into(),
                    source_epoch: 0,
                    destination_epoch: 1,
                    method: HandoffMethod::Fenced,
                    requests: Vec::new(),
                }
            }
        };
        if self.disk.is_some() {
            if let Some(ledger) = &self.config.ledger {
                ledger.publish(&record)?;
            }
        }
        if self.publish_node {
            let json = serde_json::to_string(&record).map_err(|e| Fail(e.to_string()))?;
            self.write_if_present("blkshim-handoff", &json)?;
        }
        {
            let mut st = self.status.lock();
            st.phase = Phase::Suspended;
            st.record = Some(record.clone());
        }
        log::info!(
            "vbd {}: suspended, hand-off record of epoch {} published ({:?})",
            self.be,
            record.source_epoch,
            record.method
        );
        self.last_record = Some(record);
        Ok(())
    }

    /// Writes a node of this vbd only while the vbd's directory exists, in
    /// one transaction: the toolstack may remove it at any moment, and a
    /// plain write would recreate it (the supervisor would then see a new
    /// vbd that never gets its nodes).
    fn write_if_present(&self, key: &str, value: &str) -> Result<(), XsError> {
        let be = &self.be;
        transact(&self.xs, 10, |tx| {
            if self.xs.read_optional(tx, &format!("{be}/state"))?.is_some() {
                self.xs.write_str(tx, &format!("{be}/{key}"), value)?;
            }
            Ok(())
        })
    }

    fn stop_rings(&mut self) {
        let mut rings = std::mem::take(&mut *self.rings.lock());
        for r in &mut rings {
            r.stop();
        }
    }

    fn teardown(&mut self) {
        self.stop_rings();
        self.writer = None;
        let _ = self.xs.unwatch(&self.be, "be");
        if !self.fe.is_empty() {
            let _ = self.xs.unwatch(&self.fe, "fe");
        }
        let _ = self.set_state(state::CLOSED);
        self.set_phase(Phase::Closed);
    }
}
