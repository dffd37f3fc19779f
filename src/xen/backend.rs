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
//! Admission: with `blkshim-resume` the back end is a migration destination
//! and is admitted only by a hand-off record ([`Disk::resume`]) — the node
//! holds the record itself, or `wait` to wait for the record file. Without
//! it the back end advances the epoch itself (a fresh start fences every
//! older writer).

use crate::epoch::EpochStore;
use crate::handoff::{Disk, DiskOptions, HandoffMethod, HandoffRecord, SuspendMode, Writer};
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
    /// blkback's behaviour, for negative tests only.
    pub protection: bool,
    /// Suspend mode when the frontend leaves Connected.
    pub suspend_mode: SuspendMode,
    pub max_ring_page_order: u32,
    pub max_queues: u32,
    pub max_indirect_segments: u32,
    pub persistent: bool,
    /// Where hand-off records go (the shared storage, next to the epochs).
    pub handoff_dir: Option<PathBuf>,
    /// How long a destination waits for the source's record.
    pub resume_wait: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            protection: true,
            suspend_mode: SuspendMode::Drain {
                timeout: Duration::from_secs(10),
            },
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent: true,
            handoff_dir: None,
            resume_wait: Duration::from_secs(30),
        }
    }
}

/// The disk a vbd's `params` names, opened.
pub struct OpenedDisk {
    /// Name in the epoch store.
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
    let raw = path.to_string_lossy();
    let s: String = raw
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    let s = if s.is_empty() { "disk".to_string() } else { s };
    s.chars()
        .rev()
        .take(128)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
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
    storage: Option<Arc<dyn BlockStorage>>,
    writer: Option<Arc<Writer>>,
    read_only: bool,
    last_record: Option<HandoffRecord>,
    /// False once the device's node is gone (writing would recreate it).
    publish_node: bool,
}

const POLL: Duration = Duration::from_millis(20);

impl<S: XenStore> Vbd<S> {
    fn node(&self, k: &str) -> Result<Option<String>, XsError> {
        self.xs.read_optional(XBT_NULL, &format!("{}/{k}", self.be))
    }

    fn fe_node(&self, k: &str) -> Result<Option<String>, XsError> {
        self.xs.read_optional(XBT_NULL, &format!("{}/{k}", self.fe))
    }

    fn set_state(&self, st: u32) -> Result<(), XsError> {
        self.xs
            .write_str(XBT_NULL, &format!("{}/state", self.be), &st.to_string())
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
            if let (Some(p), m, Some(f), Some(d)) = got {
                if !p.trim().is_empty() {
                    break (p, m.unwrap_or_else(|| "w".into()), f, d);
                }
            }
            let _ = self.xs.read_watch(Some(POLL))?;
        };
        self.fe = fe.trim().to_string();
        self.domid = domid
            .trim()
            .parse()
            .map_err(|_| Fail(format!("bad frontend-id {domid:?}")))?;
        self.read_only = mode.trim().starts_with('r');
        let opened = (self.opener)(&params)?;
        let size = opened.storage.size();
        let caps = opened.storage.capabilities();
        if self.config.protection {
            let disk = Disk::open(
                &opened.name,
                Arc::clone(&opened.storage),
                opened.epochs,
                DiskOptions {
                    auto_advance: false,
                    fence_timeout: None,
                },
            )?;
            self.disk = Some(disk);
        }
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
                if self.status.lock().phase == Phase::Connected {
                    self.publish_node = false;
                    if let Err(e) = self.suspend(self.config.suspend_mode) {
                        log::error!("vbd {}: suspend at removal failed: {e}", self.be);
                    }
                }
                self.teardown();
                return Ok(());
            }
            self.step()?;
            let _ = self.xs.read_watch(Some(POLL))?;
        }
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
                    self.suspend(m)?;
                } else if left {
                    self.suspend(self.config.suspend_mode)?;
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

    /// Gets a writer at a fresh epoch: by a hand-off record when this is a
    /// migration destination, else by advancing the epoch.
    fn admit(&mut self) -> Result<(), Fail> {
        let Some(disk) = self.disk.clone() else {
            return Ok(());
        };
        self.writer = None;
        let resume = self.node("blkshim-resume")?;
        let epoch = match resume.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => {
                if v == "wait" {
                    self.resume_from_file(&disk)?
                } else {
                    let record = HandoffRecord::from_json(v)
                        .map_err(|e| Fail(format!("blkshim-resume: bad record: {e}")))?;
                    disk.resume(&record)?
                }
            }
            _ => match self.last_record.take() {
                // The same frontend back after our own suspend.
                Some(record) => disk.resume(&record)?,
                None => {
                    let next = disk.current_epoch() + 1;
                    disk.advance_to(next)?.to
                }
            },
        };
        let writer = disk.register(Some(epoch), &format!("xen {}", self.be))?;
        self.status.lock().epoch = epoch;
        self.writer = Some(Arc::new(writer));
        Ok(())
    }

    fn record_path(&self, disk: &Disk) -> Option<PathBuf> {
        self.config
            .handoff_dir
            .as_ref()
            .map(|d| d.join(format!("{}.handoff.json", disk.name())))
    }

    /// Waits for the source's record on the shared storage and resumes
    /// with it; older records (earlier hand-offs) are refused by the epoch
    /// store and waited past.
    fn resume_from_file(&self, disk: &Arc<Disk>) -> Result<u64, Fail> {
        let path = self
            .record_path(disk)
            .ok_or_else(|| Fail("blkshim-resume=wait needs a hand-off directory".into()))?;
        let end = Instant::now() + self.config.resume_wait;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(r) = HandoffRecord::from_json(&text) {
                    match disk.resume(&r) {
                        Ok(e) => return Ok(e),
                        Err(crate::handoff::DiskError::StaleRecord { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if Instant::now() > end || self.stopped() {
                return Err(Fail(format!(
                    "no current hand-off record for {} in {} after {:?}",
                    disk.name(),
                    path.display(),
                    self.config.resume_wait
                )));
            }
            thread::sleep(Duration::from_millis(5));
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
            _ => Target::Unprotected {
                storage: Arc::clone(&storage),
            },
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
    /// publish the record.
    fn suspend(&mut self, mode: SuspendMode) -> Result<(), Fail> {
        let record = match (&self.disk, &self.writer) {
            (Some(disk), Some(writer)) => {
                for r in self.rings.lock().iter() {
                    r.suspend();
                }
                let epoch = writer.epoch();
                log::info!("vbd {}: suspending epoch {epoch} ({mode:?})", self.be);
                let record = disk.suspend(epoch, mode)?;
                // Fenced requests may still be at the storage, which other
                // hosts share and this process cannot recall: the record is
                // only published once they are gone.
                let mut warned = Instant::now();
                while disk.in_flight() > 0 {
                    if self.stopped() {
                        return Ok(());
                    }
                    if warned.elapsed() > Duration::from_secs(5) {
                        log::warn!(
                            "vbd {}: {} fenced request(s) still at the storage; hand-off waits",
                            self.be,
                            disk.in_flight()
                        );
                        warned = Instant::now();
                    }
                    thread::sleep(Duration::from_millis(1));
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
        if let Some(disk) = &self.disk {
            if let Some(path) = self.record_path(disk) {
                write_atomically(&path, record.to_json().as_bytes())?;
            }
        }
        if self.publish_node {
            self.xs.write_str(
                XBT_NULL,
                &format!("{}/blkshim-handoff", self.be),
                &serde_json::to_string(&record).map_err(|e| Fail(e.to_string()))?,
            )?;
        }
        {
            let mut st = self.status.lock();
            st.phase = Phase::Suspended;
            st.record = Some(record.clone());
        }
        self.last_record = Some(record);
        log::info!("vbd {}: suspended, hand-off record published", self.be);
        Ok(())
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
        if self.node("state").ok().flatten().is_some() {
            let _ = self.set_state(state::CLOSED);
        }
        self.set_phase(Phase::Closed);
    }
}

/// Write-to-temp, fsync, rename, fsync dir: the record survives a crash
/// whole or not at all.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or("record".into(), |n| n.to_string_lossy())
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
