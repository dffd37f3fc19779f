//! One simulated run: the guest, its blkfront, the backends (real
//! [`Disk`]s over the storage model, or raw pass-through when protection
//! is off), the scenario's actions, and the checker.

use super::checker::{Checker, Violation};
use super::payload::{decode, encode, Content, ROGUE_BASE};
use super::rng::SimRng;
use super::scenario::{
    plan, Action, ActionKind, Deployment, MigrationMode, Scenario, HOST_X, HOST_Z,
};
use super::sched::{Event, Sched, SharedSched, Time};
use super::storage_model::{StorageModel, StorageParams, StoragePath};
use crate::epoch::{EpochStore, MemEpochStore};
use crate::handoff::{
    Disk, DiskError, DiskOptions, HandoffMethod, HandoffRecord, RequestFate, SuspendMode,
    Suspension, Writer,
};
use crate::storage::fencing::{take_over, FenceMode, StorageFencing};
use crate::storage::{AlignedBuf, BlockStorage, IoOutcome, StorageIo, SECTOR_SIZE};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const DISK_NAME: &str = "vm1";
const SECTOR: usize = SECTOR_SIZE as usize;
/// Tags of the stale node's (or zombie's) writes; the frontend's are small.
const ROGUE_TAG: u64 = 1 << 62;
/// A run that needs more events than this is reported as stuck.
const MAX_EVENTS: u64 = 2_000_000;

/// How much of blkshim is switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Tracker, epochs, drain/fence hand-off and (host-side) storage fencing.
    On,
    /// Backends pass requests straight to the storage (Xen blkback in seeds/003).
    Off,
    /// Everything but the storage's persistent reservations (shows that a
    /// host-side deployment needs them).
    NoStorageFencing,
}

/// What host-side deployments keep older writers off the storage with, as
/// the product does ([`FenceMode`]), and sanlock's timing on the
/// simulation's clock. Gateway runs ignore it (one process owns all I/O).
///
/// sanlock's clock is compressed: `io_timeout` ticks stand for sanlock's
/// default io_timeout of 10 s, and every other timeout keeps its ratio to
/// it (renewal every 2 × io_timeout = 20 s; the holder's writer killed 8 ×
/// = 80 s after its last renewal; host_dead 8 × + the watchdog's 60 s =
/// 14 × = 140 s). With the default 50 ticks that is renewal 100, kill 400,
/// host_dead 700 ticks, so that the storage's hangs (200-3000 ticks) end
/// before, between and after those points. Absolute times are not
/// meaningful (a tick of storage latency is ~10 µs); the order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fencing {
    pub mode: FenceMode,
    /// sanlock's io_timeout in ticks (stands for 10 s).
    pub io_timeout: Time,
}

impl Fencing {
    pub const DEFAULT_IO_TIMEOUT: Time = 50;

    pub fn new(mode: FenceMode) -> Fencing {
        Fencing {
            mode,
            io_timeout: Fencing::DEFAULT_IO_TIMEOUT,
        }
    }

    /// sanlock renews its lease every 2 × io_timeout (20 s).
    pub fn renewal(&self) -> Time {
        2 * self.io_timeout.max(1)
    }

    /// 8 × io_timeout (80 s) after its last renewal a holder that could not
    /// renew has lost the lease: sanlock kills its writer.
    pub fn recovery(&self) -> Time {
        8 * self.io_timeout.max(1)
    }

    /// 14 × io_timeout (140 s: recovery plus the watchdog's 60 s) after
    /// its last renewal the holder is dead or reset by its watchdog; only
    /// then may another host take a lease it did not release.
    pub fn host_dead(&self) -> Time {
        14 * self.io_timeout.max(1)
    }

    /// `t` ticks as seconds of a sanlock with io_timeout 10 s.
    pub fn seconds(&self, t: Time) -> f64 {
        t as f64 * 10.0 / self.io_timeout.max(1) as f64
    }
}

impl Default for Fencing {
    fn default() -> Fencing {
        Fencing::new(FenceMode::Pr)
    }
}

/// Who has the disk when the host-side fence is sanlock or none (with PR
/// the storage model's reservation says it).
#[derive(Debug, Clone)]
struct Holder {
    host: usize,
    /// Its writer's epoch.
    epoch: u64,
    /// The path its writer's I/O went through (kept after the host dies).
    path: u32,
    /// sanlock: its last successful lease renewal.
    renewed: Time,
    /// The host crashed or lost power (it renews nothing any more).
    crashed: bool,
    /// Its epoch was handed over (a record, or its own fence after a
    /// takeover): it gives the disk up once none of its I/O can still
    /// reach the storage.
    handed_over: bool,
    /// sanlock: it released the lease (clean hand-off).
    released: bool,
    /// sanlock: its writer was killed (the lease was lost).
    killed: bool,
    /// sanlock: dead or reset by its watchdog; nothing of it lands any more.
    reset: bool,
    /// sanlock: killing its writer fails (drawn per holder), so the
    /// watchdog resets the host at host_dead.
    kill_fails: bool,
}

/// A destination admitted at its epoch that may not write before its fence
/// lets it (sanlock's acquire, or none's record / confirmation).
#[derive(Debug, Clone)]
struct Starting {
    to: usize,
    epoch: u64,
    ep: usize,
    decided: Time,
    /// A restart after a crash (the VM boots) rather than a migration.
    boot: bool,
    waiting_noted: bool,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Hand-offs completed (migrations and failover restarts).
    pub migrations: u64,
    /// Guest requests completed.
    pub requests: u64,
    /// Requests the frontend re-sent after a resume.
    pub replays: u64,
    /// Writes of older writers that blkshim or the storage stopped (refused,
    /// cancelled, fenced, aborted).
    pub stale_refused: u64,
    /// Takeovers by a stale node that were refused.
    pub takeovers_refused: u64,
    /// Drains whose deadline passed (the rest was fenced).
    pub drains_timed_out: u64,
    /// Writes the storage completed at once and ignored.
    pub storage_ignored: u64,
    /// Writes of the stale node that reached the medium.
    pub rogue_landed: u64,
    /// Older writers' data landing after newer data (the checker's count).
    pub stale_landings: u64,
    /// Host-side takeovers the fence refused (`--fence none`: the holder is
    /// alive and handed over no record, and nobody can confirm it dead).
    pub fence_refused: u64,
    /// Host-side takeovers: ticks from the decision to the destination's
    /// permission to write (0 with PR; sanlock may wait out host_dead).
    pub failover_times: Vec<Time>,
    /// sanlock: acquires that waited out host_dead (the holder did not
    /// release).
    pub host_dead_waits: u64,
    /// sanlock: writers killed because their host lost the lease.
    pub writers_killed: u64,
    /// sanlock: hosts reset by the watchdog (or found dead) at host_dead,
    /// their I/O not yet landed dropped.
    pub hosts_reset: u64,
    pub events: u64,
    pub end_time: Time,
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl GKind {
    fn modifies(self) -> bool {
        matches!(self, GKind::Write | GKind::Discard | GKind::WriteZeroes)
    }
}

/// A request as the guest issued it.
struct GReq {
    kind: GKind,
    start: u64,
    count: u64,
    /// Wire pieces still outstanding.
    parts_left: u32,
    read: Vec<Content>,
    failed: Option<i32>,
}

/// The guest: writes, reads, flushes and discards with verifiable
/// contents. Like a page cache, it never has two requests in flight that
/// overlap when one of them modifies the disk.
struct Guest {
    rng: SimRng,
    sectors: u64,
    hot: Vec<u64>,
    depth: usize,
    /// Percent of requests that are writes (the rest mostly reads).
    write_percent: u64,
    budget: u64,
    issued: u64,
    since_action: u64,
    running: bool,
    tick_scheduled: bool,
    reqs: BTreeMap<u64, GReq>,
    next_id: u64,
}

/// A piece of a guest request inside a wire request.
#[derive(Debug, Clone, Copy)]
struct Part {
    greq: u64,
    start: u64,
    count: u64,
}

/// A request on the ring (blkif), as the backend sees it.
struct Wire {
    kind: GKind,
    start: u64,
    count: u64,
    parts: Vec<Part>,
}

/// Linux blkfront: on resume it re-sends every unfinished request under a
/// new id, possibly split or merged differently; flush and discard whole.
struct Front {
    rng: SimRng,
    endpoint: Option<usize>,
    paused: bool,
    wires: BTreeMap<u64, Wire>,
    next_wire: u64,
}

/// A backend connection the frontend (or the stale node) talks to.
struct Endpoint {
    kind: EpKind,
}

enum EpKind {
    /// Through blkshim: a writer of a real `Disk`.
    Disk {
        disk: Arc<Disk>,
        writer: Option<Writer>,
    },
    /// Straight to the storage (protection off), as a writer of `epoch`:
    /// the order in which the unprotected hosts took the disk.
    Raw { path: Arc<dyn BlockStorage> },
}

/// A completion handed back by a backend, delivered by the loop.
struct Done {
    ep: usize,
    tag: u64,
    result: Result<(), i32>,
    buf: Option<AlignedBuf>,
}

type Inbox = Arc<Mutex<Vec<Done>>>;

struct Host {
    path: Arc<StoragePath>,
    /// Host-side deployment: this host's backend.
    disk: Option<Arc<Disk>>,
    /// The host's wall clock (only the unprotected stale-promote looks at it).
    wall_clock: u64,
}

enum ActState {
    Idle,
    Draining {
        deadline: Time,
        to: usize,
        dies_at: Option<Time>,
    },
    Restarting {
        to: usize,
    },
    /// The destination waits for its fence (see [`Starting`]).
    Acquiring,
    Done,
}

struct Rogue {
    ep: usize,
    left: u32,
    next_id: u64,
}

/// One run.
pub struct World {
    scenario: Scenario,
    protection: Protection,
    sched: SharedSched,
    storage: Arc<StorageModel>,
    epochs: Arc<MemEpochStore>,
    /// Epochs handed to unprotected writers so far (boot is 1).
    raw_epochs: u64,
    gateway: Option<Arc<Disk>>,
    hosts: Vec<Host>,
    /// The host the VM runs on.
    vm_host: usize,
    endpoints: Vec<Endpoint>,
    inbox: Inbox,
    guest: Guest,
    front: Front,
    checker: Checker,
    actions: Vec<Action>,
    states: Vec<ActState>,
    suspension: Option<Suspension>,
    /// Gateway: suspends whose source died; the gateway still finishes them
    /// at their deadline.
    orphans: Vec<(Time, Suspension)>,
    /// Fences of older epochs waiting for their time: (epoch, host), taken when run.
    fences: Vec<Option<(u64, usize)>>,
    /// The frontend's requests outstanding on the source when it suspended.
    suspended_tags: Vec<(u64, bool)>,
    /// The endpoint each wire request (by tag) was sent to.
    wire_ep: Vec<usize>,
    rng: SimRng,
    rogue: Option<Rogue>,
    /// The VM's previous connection, kept open after a hand-off (the
    /// split-brain scenario writes through it).
    retired: Option<usize>,
    /// The stale node's old writer (protected runs): endpoint index.
    stale_ep: Option<usize>,
    disks: Vec<Arc<Disk>>,
    report: RunReport,
    /// What happened, step by step (single-seed replays only).
    trace: Option<Vec<String>>,
    fence: Fencing,
    /// Draws of the fence model (kill failures, monitor phases): its own
    /// generator, so PR runs draw exactly what they did before it existed.
    frng: SimRng,
    /// sanlock: when each host's lockspace monitor reads the other hosts'
    /// renewals (offset within a renewal period).
    monitor_phase: Vec<Time>,
    holder: Option<Holder>,
    starting: Option<Starting>,
    lease_ticking: bool,
}

fn errno_of(r: &std::io::Result<()>) -> Result<(), i32> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl World {
    /// Set a run up: everything below depends on `seed` only.
    pub fn new(seed: u64, scenario: Scenario, protection: Protection, fence: Fencing) -> World {
        let mut frng = SimRng::new(seed ^ 0x5A4E_4C4F_434B_F00D);
        let monitor_phase = (0..3).map(|_| frng.below(fence.renewal())).collect();
        let mut rng = SimRng::new(seed);
        let mut prng = rng.fork();
        let params = StorageParams {
            sectors: prng.range(24, 96),
            min_delay: 1,
            max_delay: prng.range(5, 60),
            tail_percent: prng.range(0, 20),
            tail: prng.range(50, 500),
            ignore_overlapping: true,
        };
        let sectors = params.sectors;
        let sched = Sched::shared();
        let storage = StorageModel::new(params, Arc::clone(&sched), rng.fork());
        let mut grng = rng.fork();
        let hot = (0..grng.range(1, 6)).map(|_| grng.below(sectors)).collect();
        let guest = Guest {
            depth: grng.range(1, 8) as usize,
            write_percent: grng.range(5, 70),
            budget: grng.range(60, 200),
            rng: grng,
            sectors,
            hot,
            issued: 0,
            since_action: 0,
            running: false,
            tick_scheduled: false,
            reqs: BTreeMap::new(),
            next_id: 1,
        };
        let front = Front {
            rng: rng.fork(),
            endpoint: None,
            paused: false,
            wires: BTreeMap::new(),
            next_wire: 1,
        };
        let actions = plan(scenario.kind, &mut rng.fork());
        let hosts = (0..3)
            .map(|i| Host {
                path: storage.path(),
                disk: None,
                // Z's clock runs ahead: with timestamps it would "win".
                wall_clock: 1_000 + i as u64 * 3_600,
            })
            .collect();
        let states = actions.iter().map(|_| ActState::Idle).collect();
        World {
            scenario,
            protection,
            sched,
            storage,
            epochs: Arc::new(MemEpochStore::default()),
            raw_epochs: 0,
            gateway: None,
            hosts,
            vm_host: HOST_X,
            endpoints: Vec::new(),
            inbox: Arc::new(Mutex::new(Vec::new())),
            guest,
            front,
            checker: Checker::new(sectors),
            actions,
            states,
            suspension: None,
            suspended_tags: Vec::new(),
            orphans: Vec::new(),
            fences: Vec::new(),
            wire_ep: vec![usize::MAX],
            rng,
            rogue: None,
            stale_ep: None,
            retired: None,
            disks: Vec::new(),
            report: RunReport::default(),
            trace: None,
            fence,
            frng,
            monitor_phase,
            holder: None,
            starting: None,
            lease_ticking: false,
        }
    }

    /// Record a step of the run when tracing.
    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.trace.is_some() {
            let line = format!("t={:>6}  {}", self.now(), what());
            if let Some(t) = self.trace.as_mut() {
                t.push(line);
            }
        }
    }

    fn now(&self) -> Time {
        self.sched.lock().now()
    }

    fn after(&self, delay: Time, ev: Event) {
        self.sched.lock().after(delay, ev);
    }

    fn protected(&self) -> bool {
        self.protection != Protection::Off
    }

    fn host_side(&self) -> bool {
        self.scenario.deployment == Deployment::HostSide
    }

    /// Host-side with the fence sanlock or none: a destination may write
    /// only when [`World::poll_start`] says so.
    fn gated(&self) -> bool {
        self.host_side() && self.protection == Protection::On && self.fence.mode != FenceMode::Pr
    }

    /// A host-side takeover that writes at once (PR, or no fencing at all).
    fn started_at_once(&mut self) {
        if self.host_side() && self.protection == Protection::On {
            self.report.failover_times.push(0);
        }
    }

    /// The path a host's I/O takes (the gateway has one for everybody).
    fn path_of(&self, host: usize) -> Arc<StoragePath> {
        match self.scenario.deployment {
            Deployment::Gateway => Arc::clone(&self.hosts[HOST_X].path),
            Deployment::HostSide => Arc::clone(&self.hosts[host].path),
        }
    }

    fn options(&self) -> DiskOptions {
        match self.scenario.deployment {
            // The NBD gateway: a newer writer's first write advances the
            // epoch; the fence timer runs on the simulation's clock.
            Deployment::Gateway => DiskOptions {
                auto_advance: true,
                fence_timeout: None,
            },
            Deployment::HostSide => DiskOptions {
                auto_advance: false,
                fence_timeout: None,
            },
        }
    }

    fn open_disk(&mut self, host: usize) -> Result<Arc<Disk>, DiskError> {
        let storage: Arc<dyn BlockStorage> = self.path_of(host);
        let epochs: Arc<dyn EpochStore> = self.epochs.clone();
        let disk = Disk::open(DISK_NAME, storage, epochs, self.options())?;
        self.disks.push(Arc::clone(&disk));
        Ok(disk)
    }

    /// The `Disk` a host's writers use (the gateway's, or the host's own).
    fn disk_of(&mut self, host: usize) -> Result<Arc<Disk>, DiskError> {
        if let Some(d) = match self.scenario.deployment {
            Deployment::Gateway => self.gateway.clone(),
            Deployment::HostSide => self.hosts[host].disk.clone(),
        } {
            return Ok(d);
        }
        let d = self.open_disk(host)?;
        match self.scenario.deployment {
            Deployment::Gateway => self.gateway = Some(Arc::clone(&d)),
            Deployment::HostSide => self.hosts[host].disk = Some(Arc::clone(&d)),
        }
        Ok(d)
    }

    fn add_endpoint(&mut self, kind: EpKind) -> usize {
        self.endpoints.push(Endpoint { kind });
        self.endpoints.len() - 1
    }

    /// Host-side with `--fence pr`: fence the storage for `epoch` (sanlock
    /// and none leave the reservations unused).
    fn fence_storage(&mut self, host: usize, epoch: u64) -> Result<(), String> {
        if !self.host_side()
            || self.protection != Protection::On
            || self.fence.mode != FenceMode::Pr
        {
            return Ok(());
        }
        let path = self.path_of(host);
        take_over(&*path, epoch)
            .map(|_| ())
            .map_err(|e| format!("storage take-over at epoch {epoch}: {e}"))
    }

    /// Admit a writer at `epoch` on `host` and return its endpoint.
    fn disk_endpoint(&mut self, host: usize, epoch: u64, label: &str) -> Result<usize, String> {
        let disk = self.disk_of(host).map_err(|e| e.to_string())?;
        // Each writer reaches the storage through its own tagged path, so
        // the checker knows whose data lands.
        let path = self.path_of(host).tagged(epoch);
        let writer = disk
            .register_on(Some(epoch), label, path)
            .map_err(|e| format!("register {label} at epoch {epoch}: {e}"))?;
        Ok(self.add_endpoint(EpKind::Disk {
            disk,
            writer: Some(writer),
        }))
    }

    /// An unprotected writer on `host`, at the next epoch in the order
    /// the hosts took the disk (what blkshim would have given it).
    fn raw_endpoint(&mut self, host: usize) -> usize {
        self.raw_epochs += 1;
        let epoch = self.raw_epochs;
        self.raw_endpoint_at(host, epoch)
    }

    fn raw_endpoint_at(&mut self, host: usize, epoch: u64) -> usize {
        let path = self.path_of(host).tagged(epoch);
        self.add_endpoint(EpKind::Raw { path })
    }

    fn fail(&mut self, what: String) {
        self.checker.violation(Violation::HandoffFailed { what });
    }

    /// Start the VM on X at epoch 1 (and, for stale-promote, give Z the
    /// stale view it will act on later).
    fn boot(&mut self) {
        let ep = if self.protected() {
            match self.boot_protected() {
                Ok(ep) => ep,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        } else {
            self.raw_endpoint(HOST_X)
        };
        self.front.endpoint = Some(ep);
        self.guest.running = true;
        self.schedule_tick(0);
        if let Some(a) = self.actions.first() {
            let gap = a.gap;
            self.after(gap, Event::Control(0));
        }
    }

    fn boot_protected(&mut self) -> Result<usize, String> {
        let disk = self.disk_of(HOST_X).map_err(|e| e.to_string())?;
        disk.advance_to(1).map_err(|e| e.to_string())?;
        self.fence_storage(HOST_X, 1)?;
        let ep = self.disk_endpoint(HOST_X, 1, "X")?;
        let stale = self
            .actions
            .iter()
            .any(|a| matches!(a.kind, ActionKind::StalePromote { .. }));
        if stale {
            // Z once had the disk at epoch 1 too (its registration and its
            // writer survive in its memory), then went quiet.
            if self.host_side() {
                let zpath = self.path_of(HOST_Z);
                zpath.register(1).map_err(|e| e.to_string())?;
            }
            let zep = self.disk_endpoint(HOST_Z, 1, "Z")?;
            self.stale_ep = Some(zep);
            if self.gated() {
                // Without reservations Z's old writer cannot have outlived
                // its epoch: X could take the disk only after Z handed it
                // over (none) or released its lease (sanlock), and both
                // close Z's writer. Its later writes fail at Z's blkshim;
                // its takeover attempts still run (and must be refused).
                self.close_endpoint(zep);
                self.note(|| {
                    "host 2 (Z) handed the disk over at epoch 1; its writer is closed".into()
                });
            }
        }
        if self.gated() {
            let now = self.now();
            self.holder = Some(self.new_holder(HOST_X, 1, now));
            let mode = self.fence.mode.name();
            self.note(|| format!("fence {mode}: host 0 takes the free disk at epoch 1"));
            if self.fence.mode == FenceMode::Sanlock {
                self.start_lease_ticks();
            }
        }
        Ok(ep)
    }

    /// Run to the end and check.
    pub fn run(self) -> RunReport {
        self.run_traced().0
    }

    /// Run to the end and check; also return the trace when tracing.
    fn run_traced(mut self) -> (RunReport, Vec<String>) {
        self.boot();
        loop {
            let next = self.sched.lock().pop();
            let Some((_, ev)) = next else { break };
            self.report.events += 1;
            if self.report.events > MAX_EVENTS {
                self.checker.violation(Violation::Stuck { request: 0 });
                break;
            }
            match ev {
                Event::Storage(id) => {
                    self.storage.deliver(id);
                    self.check_landed();
                }
                Event::GuestTick => self.guest_tick(),
                Event::Control(i) => self.control(i),
                Event::RogueTick => self.rogue_tick(),
                Event::OrphanDeadline => self.finish_orphans(),
                Event::Fence(k) => self.run_fence(k),
                Event::LeaseTick => self.lease_tick(),
            }
            self.drain_inbox();
        }
        let trace = self.trace.take().unwrap_or_default();
        (self.finish(), trace)
    }

    fn finish(mut self) -> RunReport {
        self.report.end_time = self.now();
        let stuck: Vec<u64> = self.guest.reqs.keys().copied().collect();
        for request in stuck {
            self.checker.violation(Violation::Stuck { request });
        }
        let medium = self.storage.snapshot();
        self.checker.final_check(&medium);
        let st = self.storage.stats();
        let mut refused = st.refused_reservation + st.aborted;
        for d in &self.disks {
            let s = d.status();
            refused += s.refused_stale + s.refused_suspended + s.cancelled + s.fenced;
        }
        self.report.stale_refused = refused;
        self.report.storage_ignored = st.ignored_overlapping;
        self.report.stale_landings = self.checker.stale_landings;
        self.report.violations = std::mem::take(&mut self.checker.violations);
        self.report
    }

    /// Check every sector whose data just landed.
    fn check_landed(&mut self) {
        let now = self.now();
        for l in self.storage.take_landed() {
            let data = self.storage.read_sectors(l.start, l.count);
            for (k, chunk) in data.chunks_exact(SECTOR).enumerate() {
                let s = l.start + k as u64;
                self.checker.landed(now, s, decode(chunk, s), l.epoch);
            }
        }
    }

    fn drain_inbox(&mut self) {
        loop {
            let batch = std::mem::take(&mut *self.inbox.lock());
            if batch.is_empty() {
                return;
            }
            for d in batch {
                self.on_done(d);
            }
        }
    }

    // ---- guest -------------------------------------------------------

    fn schedule_tick(&mut self, delay: Time) {
        if !self.guest.tick_scheduled {
            self.guest.tick_scheduled = true;
            self.after(delay, Event::GuestTick);
        }
    }

    fn guest_finished(&self) -> bool {
        let g = &self.guest;
        g.issued >= g.budget
            && self.states.iter().all(|s| matches!(s, ActState::Done))
            && self.fences.iter().all(Option::is_none)
            && g.since_action >= 40
    }

    fn guest_tick(&mut self) {
        self.guest.tick_scheduled = false;
        if !self.guest.running || self.guest_finished() {
            return;
        }
        if self.guest.reqs.len() < self.guest.depth {
            if let Some(id) = self.pick() {
                self.send_new(id);
            }
        }
        let d = self.guest.rng.range(1, 4);
        self.schedule_tick(d);
    }

    /// Choose the guest's next request, avoiding overlap with its own
    /// conflicting requests in flight.
    fn pick(&mut self) -> Option<u64> {
        let g = &mut self.guest;
        let r = g.rng.below(100);
        let w = g.write_percent;
        let kind = if r < w {
            GKind::Write
        } else if r < 80 {
            GKind::Read
        } else {
            match r {
                80..=89 => GKind::Flush,
                90..=94 => GKind::Discard,
                _ => GKind::WriteZeroes,
            }
        };
        let (mut start, mut count) = (0, 0);
        if kind != GKind::Flush {
            let mut found = false;
            for _ in 0..4 {
                count = g.rng.range(1, 4).min(g.sectors);
                let s = if g.rng.chance(60) {
                    g.hot[g.rng.below(g.hot.len() as u64) as usize]
                } else {
                    g.rng.below(g.sectors)
                };
                start = s.min(g.sectors - count);
                let end = start + count;
                let clash = g.reqs.values().any(|q| {
                    q.kind != GKind::Flush
                        && (kind.modifies() || q.kind.modifies())
                        && q.start < end
                        && start < q.start + q.count
                });
                if !clash {
                    found = true;
                    break;
                }
            }
            if !found {
                return None;
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        g.issued += 1;
        g.since_action += 1;
        g.reqs.insert(
            id,
            GReq {
                kind,
                start,
                count,
                parts_left: 1,
                read: vec![Content::Garbage; count as usize],
                failed: None,
            },
        );
        Some(id)
    }

    fn send_new(&mut self, id: u64) {
        let Some(q) = self.guest.reqs.get(&id) else {
            return;
        };
        let wire = Wire {
            kind: q.kind,
            start: q.start,
            count: q.count,
            parts: vec![Part {
                greq: id,
                start: q.start,
                count: q.count,
            }],
        };
        self.send_wire(wire);
    }

    /// Put a request on the ring of the connected backend.
    fn send_wire(&mut self, wire: Wire) {
        let Some(ep) = self.front.endpoint else {
            return;
        };
        let tag = self.front.next_wire;
        self.front.next_wire += 1;
        self.wire_ep.push(ep);
        let io = wire_io(&wire);
        self.front.wires.insert(tag, wire);
        self.submit(ep, tag, io);
    }

    fn submit(&mut self, ep: usize, tag: u64, io: StorageIo) {
        let inbox = Arc::clone(&self.inbox);
        let done = Box::new(move |o: IoOutcome| {
            inbox.lock().push(Done {
                ep,
                tag,
                result: errno_of(&o.result),
                buf: o.buf,
            })
        });
        match &self.endpoints[ep].kind {
            EpKind::Disk {
                disk,
                writer: Some(w),
            } => disk.submit(w, tag, io, done),
            EpKind::Disk { writer: None, .. } => done(IoOutcome {
                result: Err(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)),
                buf: None,
            }),
            EpKind::Raw { path } => path.submit(io, done),
        }
    }

    fn on_done(&mut self, d: Done) {
        if d.tag >= ROGUE_TAG {
            if d.result.is_ok() {
                self.report.rogue_landed += 1;
            }
            return;
        }
        if self.front.paused || self.front.endpoint != Some(d.ep) {
            // The ring this answer was meant for is gone (suspended or dead).
            return;
        }
        let Some(w) = self.front.wires.remove(&d.tag) else {
            return;
        };
        let now = self.now();
        for p in &w.parts {
            let Some(q) = self.guest.reqs.get_mut(&p.greq) else {
                continue;
            };
            match d.result {
                Err(errno) => {
                    if q.failed.is_none() {
                        q.failed = Some(errno);
                        self.checker.violation(Violation::GuestIoError {
                            time: now,
                            request: p.greq,
                            errno,
                        });
                    }
                }
                Ok(()) => {
                    if let (GKind::Read, Some(buf)) = (w.kind, &d.buf) {
                        let data = buf.as_slice();
                        for s in p.start..p.start + p.count {
                            let o = ((s - w.start) as usize) * SECTOR;
                            if let Some(chunk) = data.get(o..o + SECTOR) {
                                q.read[(s - q.start) as usize] = decode(chunk, s);
                            }
                        }
                    }
                }
            }
            q.parts_left -= 1;
            if q.parts_left == 0 {
                self.guest_complete(p.greq);
            }
        }
    }

    fn guest_complete(&mut self, id: u64) {
        let Some(q) = self.guest.reqs.remove(&id) else {
            return;
        };
        self.report.requests += 1;
        let now = self.now();
        let content = match q.kind {
            GKind::Write => Content::Write(id),
            _ => Content::Zero,
        };
        for s in q.start..q.start + q.count {
            match (q.kind, q.failed) {
                (_, None) if q.kind.modifies() => self.checker.completed(s, content),
                (_, Some(_)) if q.kind.modifies() => self.checker.maybe(s, content),
                (GKind::Read, None) => self.checker.read(now, s, q.read[(s - q.start) as usize]),
                _ => {}
            }
        }
    }

    // ---- frontend ----------------------------------------------------

    fn pause(&mut self) {
        self.front.paused = true;
        self.guest.running = false;
    }

    /// blkfront's recovery on the new backend: re-send every unfinished
    /// request under a new id, reads and writes possibly split or merged.
    fn recover(&mut self, ep: usize) {
        let n = self.front.wires.len();
        self.note(|| format!("blkfront reconnects to endpoint {ep}, re-sending {n} requests"));
        self.front.paused = false;
        self.front.endpoint = Some(ep);
        let old = std::mem::take(&mut self.front.wires);
        let mut pieces: Vec<(GKind, Vec<Part>)> = Vec::new();
        for (_, w) in old {
            let splittable = matches!(w.kind, GKind::Read | GKind::Write);
            if splittable && w.count > 1 && self.front.rng.chance(30) {
                let at = w.start + self.front.rng.range(1, w.count - 1);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for p in w.parts {
                    let end = p.start + p.count;
                    if end <= at {
                        a.push(p);
                    } else if p.start >= at {
                        b.push(p);
                    } else {
                        a.push(Part {
                            count: at - p.start,
                            ..p
                        });
                        b.push(Part {
                            start: at,
                            count: end - at,
                            ..p
                        });
                        if let Some(q) = self.guest.reqs.get_mut(&p.greq) {
                            q.parts_left += 1;
                        }
                    }
                }
                pieces.push((w.kind, a));
                pieces.push((w.kind, b));
            } else {
                pieces.push((w.kind, w.parts));
            }
        }
        if self.front.rng.chance(50) {
            // The block layer's elevator sorts before merging.
            pieces.sort_by_key(|(_, parts)| parts.first().map_or(0, |p| p.start));
        }
        let mut merged: Vec<(GKind, Vec<Part>)> = Vec::new();
        for (kind, parts) in pieces {
            if let Some((pk, pp)) = merged.last_mut() {
                let mergeable = *pk == kind && matches!(kind, GKind::Read | GKind::Write);
                let contiguous = match (pp.last(), parts.first()) {
                    (Some(a), Some(b)) => a.start + a.count == b.start,
                    _ => false,
                };
                if mergeable && contiguous && self.front.rng.chance(60) {
                    pp.extend(parts);
                    continue;
                }
            }
            merged.push((kind, parts));
        }
        for (kind, parts) in merged {
            let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
                continue;
            };
            let (start, count) = match kind {
                GKind::Flush => (0, 0),
                _ => (first.start, last.start + last.count - first.start),
            };
            self.report.replays += 1;
            self.send_wire(Wire {
                kind,
                start,
                count,
                parts,
            });
        }
        self.guest.running = true;
        self.schedule_tick(1);
    }

    /// The VM dies with its host: whatever it had in flight may or may not
    /// land.
    fn crash_vm(&mut self) {
        let n = self.guest.reqs.len();
        self.note(|| format!("VM dies with {n} requests in flight"));
        let reqs = std::mem::take(&mut self.guest.reqs);
        for (id, q) in reqs {
            let content = match q.kind {
                GKind::Write => Content::Write(id),
                GKind::Discard | GKind::WriteZeroes => Content::Zero,
                _ => continue,
            };
            for s in q.start..q.start + q.count {
                self.checker.maybe(s, content);
            }
        }
        self.front.wires.clear();
        self.front.endpoint = None;
        self.front.paused = false;
        self.guest.running = false;
    }

    // ---- scenario actions -------------------------------------------

    fn action_done(&mut self, i: usize) {
        self.states[i] = ActState::Done;
        self.guest.since_action = 0;
        if let Some(a) = self.actions.get(i + 1) {
            let gap = a.gap;
            self.after(gap, Event::Control(i + 1));
        }
    }

    fn source_ep(&self) -> Option<usize> {
        self.front.endpoint
    }

    /// The VM's current writer's epoch is the disk's epoch (always true
    /// without protection: nothing to wait for).
    fn destination_admitted(&self) -> bool {
        let Some(ep) = self.front.endpoint else {
            return true;
        };
        match self.endpoints.get(ep).map(|e| &e.kind) {
            Some(EpKind::Disk {
                writer: Some(w), ..
            }) => self
                .epochs
                .current(DISK_NAME)
                .is_ok_and(|cur| cur >= w.epoch()),
            _ => true,
        }
    }

    fn close_endpoint(&mut self, ep: usize) {
        if let Some(Endpoint {
            kind: EpKind::Disk { writer, .. },
        }) = self.endpoints.get_mut(ep)
        {
            *writer = None;
        }
    }

    fn control(&mut self, i: usize) {
        let Some(action) = self.actions.get(i).copied() else {
            return;
        };
        let state = std::mem::replace(&mut self.states[i], ActState::Done);
        if matches!(state, ActState::Idle) {
            let host = self.vm_host;
            self.note(|| format!("action {i}: {:?} (VM on host {host})", action.kind));
        }
        if let (ActState::Idle, ActionKind::Migrate { to, .. } | ActionKind::Takeover { to, .. }) =
            (&state, action.kind)
        {
            if to == self.vm_host {
                // Only after a refused takeover: the VM never left.
                self.note(|| format!("action {i}: the VM is already on host {to}: nothing to do"));
                self.action_done(i);
                return;
            }
        }
        match (state, action.kind) {
            (ActState::Acquiring, _) => self.poll_start(i),
            (
                ActState::Idle,
                ActionKind::Migrate {
                    to,
                    mode,
                    cut_off,
                    source_dies,
                },
            ) => {
                let dies_at = source_dies.map(|d| self.now() + d);
                self.migrate_start(i, to, mode, cut_off, dies_at)
            }
            (
                ActState::Draining {
                    deadline,
                    to,
                    dies_at,
                },
                ActionKind::Migrate { .. },
            ) => self.migrate_poll(i, deadline, to, dies_at),
            (
                ActState::Idle,
                ActionKind::Crash {
                    restart_on,
                    downtime,
                    hang,
                },
            ) => {
                self.crash_host(hang);
                self.states[i] = ActState::Restarting { to: restart_on };
                self.after(downtime, Event::Control(i));
            }
            (ActState::Restarting { to }, ActionKind::Crash { .. }) => self.restart(i, to),
            (
                ActState::Idle,
                ActionKind::Takeover {
                    to,
                    fence_after,
                    cut_off,
                },
            ) => self.takeover(i, to, fence_after, cut_off),
            (ActState::Idle, ActionKind::Zombie { .. }) if !self.destination_admitted() => {
                // The promise starts when the destination is admitted (its
                // epoch is current; with the gateway's auto-advance, at its
                // first write or flush): wait for that.
                self.states[i] = ActState::Idle;
                self.after(5, Event::Control(i));
            }
            (ActState::Idle, ActionKind::Zombie { .. })
                if self.retired.is_none() && self.report.fence_refused > 0 =>
            {
                self.note(|| {
                    "the VM never moved (its takeover was refused): no old copy to write".into()
                });
                self.action_done(i);
            }
            (ActState::Idle, ActionKind::Zombie { writes }) => {
                if let Some(ep) = self.retired {
                    self.rogue = Some(Rogue {
                        ep,
                        left: writes,
                        next_id: ROGUE_BASE,
                    });
                    self.after(1, Event::RogueTick);
                } else {
                    self.fail("no previous connection to write through".into());
                }
                self.action_done(i);
            }
            (ActState::Idle, ActionKind::StalePromote { host, writes }) => {
                self.stale_promote(host, writes);
                self.action_done(i);
            }
            (s, _) => self.states[i] = s,
        }
    }

    fn migrate_start(
        &mut self,
        i: usize,
        to: usize,
        mode: MigrationMode,
        cut_off: Option<Time>,
        dies_at: Option<Time>,
    ) {
        let now = self.now();
        let from = self.vm_host;
        self.pause();
        if let Some(h) = cut_off {
            let path = self.path_of(from).id();
            if self.host_side() {
                self.storage.hang_path(path, now + h);
            } else {
                self.storage.hang_in_flight(path, now + h);
            }
        }
        if !self.protected() {
            // blkback just disconnects; the frontend reconnects to Y.
            let downtime = self.rng.range(1, 20);
            self.states[i] = ActState::Draining {
                deadline: now,
                to,
                dies_at: None,
            };
            self.after(downtime, Event::Control(i));
            return;
        }
        let Some(src) = self.source_ep() else {
            self.fail("no source to migrate from".into());
            self.action_done(i);
            return;
        };
        let (disk, epoch) = match &self.endpoints[src].kind {
            EpKind::Disk {
                disk,
                writer: Some(w),
            } => (Arc::clone(disk), w.epoch()),
            _ => {
                self.fail("source has no writer".into());
                self.action_done(i);
                return;
            }
        };
        let (smode, deadline) = match mode {
            MigrationMode::Drain { deadline } => (
                SuspendMode::Drain {
                    timeout: Duration::from_micros(deadline * 10),
                },
                now + deadline,
            ),
            MigrationMode::Fence => (SuspendMode::Fence, now),
        };
        self.suspended_tags = self
            .front
            .wires
            .iter()
            .map(|(&t, w)| (t, w.kind.modifies()))
            .collect();
        self.suspension = Some(disk.begin_suspend(epoch, smode));
        self.migrate_poll(i, deadline, to, dies_at);
    }

    fn migrate_poll(&mut self, i: usize, deadline: Time, to: usize, dies_at: Option<Time>) {
        let now = self.now();
        if self.protected() && dies_at.is_some_and(|t| now >= t) {
            return self.source_died_mid_migration(i, to, deadline);
        }
        if !self.protected() {
            // The source's connection stays behind, as blkback's does: a
            // zombie can still write through it.
            self.retired = self.source_ep();
            let ep = self.raw_endpoint(to);
            self.vm_host = to;
            self.report.migrations += 1;
            self.recover(ep);
            self.action_done(i);
            return;
        }
        let record = match self.suspension.as_mut() {
            Some(s) => s.try_finish(now >= deadline),
            None => {
                self.fail("no suspension in progress".into());
                self.action_done(i);
                return;
            }
        };
        let Some(record) = record else {
            self.states[i] = ActState::Draining {
                deadline,
                to,
                dies_at,
            };
            self.after(5, Event::Control(i));
            return;
        };
        self.suspension = None;
        self.check_record(&record);
        self.note(|| {
            let fates: Vec<String> = record
                .requests
                .iter()
                .map(|e| format!("{}:{:?}{}={:?}", e.tag, e.kind, e.range, e.fate))
                .collect();
            format!(
                "source (epoch {}) suspended: {:?}; record [{}]",
                record.source_epoch,
                record.method,
                fates.join(", ")
            )
        });
        if record.method == HandoffMethod::DrainTimedOutThenFenced {
            self.report.drains_timed_out += 1;
        }
        self.retired = self.source_ep();
        if self.gated() {
            let from = self.vm_host;
            if let Some(h) = self.holder.as_mut().filter(|h| h.host == from) {
                h.handed_over = true;
            }
            match self.resume_on(to, &record) {
                Ok((ep, epoch)) => self.start_writer(i, to, epoch, ep, false),
                Err(e) => {
                    self.fail(e);
                    self.action_done(i);
                }
            }
            return;
        }
        match self.resume_on(to, &record) {
            Ok((ep, _)) => {
                self.vm_host = to;
                self.report.migrations += 1;
                self.started_at_once();
                self.recover(ep);
            }
            Err(e) => self.fail(e),
        }
        self.action_done(i);
    }

    /// Move the VM without a suspend: the destination takes the next epoch
    /// while the source's requests are in flight.
    fn takeover(&mut self, i: usize, to: usize, fence_after: Time, cut_off: Option<Time>) {
        let now = self.now();
        let from = self.vm_host;
        self.pause();
        if let Some(h) = cut_off {
            let path = self.path_of(from).id();
            self.storage.hang_in_flight(path, now + h);
        }
        if self.gated() && self.fence.mode == FenceMode::None {
            // No record, a holder that is alive (only cut off, if at all),
            // and nobody may confirm a live host dead: refused. The disk
            // stays with the source and the VM goes on there.
            self.report.fence_refused += 1;
            self.note(|| {
                format!(
                    "fence none: takeover by host {to} REFUSED: holder host {from} is alive and \
                     handed over no record (not confirmed dead); the VM stays on host {from}"
                )
            });
            self.front.paused = false;
            self.guest.running = true;
            self.schedule_tick(1);
            self.action_done(i);
            return;
        }
        let src = self.source_ep();
        let next = if self.protected() {
            self.takeover_protected(from, to)
        } else {
            Ok((self.raw_endpoint(to), 0))
        };
        let (ep, epoch) = match next {
            Ok(x) => x,
            Err(e) => {
                self.fail(e);
                self.action_done(i);
                return;
            }
        };
        self.retired = src;
        if self.gated() {
            // The source's own backend fences its requests in flight
            // `fence_after` from now; sanlock: then, once its I/O has
            // finished, it releases the lease the destination waits for.
            self.fences.push(Some((epoch, from)));
            self.after(fence_after, Event::Fence(self.fences.len() - 1));
            self.start_writer(i, to, epoch, ep, false);
            return;
        }
        self.vm_host = to;
        self.report.migrations += 1;
        self.started_at_once();
        self.recover(ep);
        if self.protected() {
            // The old epoch's requests drain until the fence, on the clock;
            // the source's own backend fences them too (host-side).
            let host = if self.host_side() { from } else { to };
            self.defer_fence(i, epoch, host, fence_after);
        } else {
            self.action_done(i);
        }
    }

    /// The source died while draining: its suspension never finishes and
    /// there is no record. The VM's state already reached the destination,
    /// which takes the next epoch; blkfront re-sends there.
    fn source_died_mid_migration(&mut self, i: usize, to: usize, deadline: Time) {
        let from = self.vm_host;
        let orphan = self.suspension.take();
        if let (Some(s), false) = (orphan, self.host_side()) {
            // Only the source's connection died: the gateway's suspend
            // runs on and is finished at its deadline.
            self.orphans.push((deadline, s));
            let now = self.now();
            self.after(deadline.saturating_sub(now), Event::OrphanDeadline);
        }
        // Host-side: dropped unfinished, as a dead process would.
        let path = self.path_of(from).id();
        if let Some(src) = self.source_ep() {
            self.close_endpoint(src);
        }
        if self.host_side() {
            self.storage.kill_path(path);
            self.hosts[from].disk = None;
            self.hosts[from].path = self.storage.path();
        }
        self.holder_crashed(from);
        let (ep, epoch) = match self.takeover_protected(from, to) {
            Ok(x) => x,
            Err(e) => {
                self.fail(e);
                self.action_done(i);
                return;
            }
        };
        if self.gated() {
            self.start_writer(i, to, epoch, ep, false);
            return;
        }
        self.started_at_once();
        self.vm_host = to;
        self.report.migrations += 1;
        self.recover(ep);
        if self.host_side() {
            self.action_done(i);
        } else {
            let delay = self.rng.range(0, 400);
            self.defer_fence(i, epoch, to, delay);
        }
    }

    fn takeover_protected(&mut self, from: usize, to: usize) -> Result<(usize, u64), String> {
        let epoch = self.epochs.current(DISK_NAME).map_err(|e| e.to_string())? + 1;
        if self.host_side() {
            // `blkshim ctl handoff` on the destination host.
            let disk = self.disk_of(to).map_err(|e| e.to_string())?;
            disk.advance_to(epoch)
                .map_err(|e| format!("advance to {epoch} on host {to}: {e}"))?;
            self.fence_storage(to, epoch)?;
        }
        // Gateway: the destination's first write advances the epoch.
        let ep = self.disk_endpoint(to, epoch, "destination")?;
        let _ = from;
        Ok((ep, epoch))
    }

    /// The hand-off record must list exactly the requests the frontend had
    /// outstanding on the source, with fates that fit the method.
    fn check_record(&mut self, record: &HandoffRecord) {
        // Older writers' leftovers (fenced at an earlier hand-off, still at
        // the storage) are listed too: the suspend covers every epoch up to
        // the source's. Those must have gone to another endpoint.
        let src = self.source_ep();
        let mut listed: Vec<u64> = record
            .requests
            .iter()
            .map(|e| e.tag)
            .filter(|&t| self.wire_ep.get(t as usize).copied() == src)
            .collect();
        listed.sort_unstable();
        let outstanding: Vec<u64> = self.suspended_tags.iter().map(|&(t, _)| t).collect();
        let unknown = record
            .requests
            .iter()
            .any(|e| self.wire_ep.get(e.tag as usize).is_none());
        if listed != outstanding || unknown {
            self.fail(format!(
                "record lists requests {listed:?}, the frontend had {outstanding:?} outstanding"
            ));
        }
        for e in &record.requests {
            if !e.kind.modifies() || self.wire_ep.get(e.tag as usize).copied() != src {
                continue;
            }
            let ok = match record.method {
                HandoffMethod::Drained => e.fate == RequestFate::CompletedNotAcknowledged,
                HandoffMethod::Fenced => {
                    matches!(e.fate, RequestFate::Cancelled | RequestFate::Fenced)
                }
                HandoffMethod::DrainTimedOutThenFenced => true,
            };
            if !ok {
                self.fail(format!(
                    "record of a {:?} hand-off says {:?} {} (tag {}) was {:?}",
                    record.method, e.kind, e.range, e.tag, e.fate
                ));
            }
        }
    }

    /// The hand-off is done; the older epoch's requests still in flight are
    /// fenced `delay` ticks later, while the next action may already run.
    fn defer_fence(&mut self, i: usize, epoch: u64, host: usize, delay: Time) {
        self.fences.push(Some((epoch, host)));
        self.after(delay, Event::Fence(self.fences.len() - 1));
        self.action_done(i);
    }

    fn run_fence(&mut self, k: usize) {
        let Some((epoch, host)) = self.fences.get_mut(k).and_then(Option::take) else {
            return;
        };
        let disk = match self.scenario.deployment {
            Deployment::Gateway => self.gateway.clone(),
            Deployment::HostSide => self.hosts[host].disk.clone(),
        };
        if let Some(d) = disk {
            let (c, f) = d.fence_below(epoch);
            self.note(|| {
                format!("fence below epoch {epoch}: {c} cancelled, {f} fenced at the storage")
            });
        }
        if self.gated() {
            // The holder's own fence after a takeover hands its epoch over.
            if let Some(h) = self
                .holder
                .as_mut()
                .filter(|h| h.host == host && h.epoch < epoch)
            {
                h.handed_over = true;
            }
        }
    }

    fn finish_orphans(&mut self) {
        let now = self.now();
        let mut kept = Vec::new();
        for (deadline, mut s) in std::mem::take(&mut self.orphans) {
            let record = if deadline > now {
                None
            } else {
                s.try_finish(true)
            };
            match record {
                Some(r) => self.note(|| {
                    format!(
                        "orphaned suspend of epoch {} finished: {:?}",
                        r.source_epoch, r.method
                    )
                }),
                None => kept.push((deadline, s)),
            }
        }
        self.orphans = kept;
    }

    /// The destination's side: resume from the record, fence the storage,
    /// admit the writer.
    fn resume_on(&mut self, to: usize, record: &HandoffRecord) -> Result<(usize, u64), String> {
        let disk = self.disk_of(to).map_err(|e| e.to_string())?;
        let epoch = disk
            .resume(record)
            .map_err(|e| format!("resume on host {to}: {e}"))?;
        self.fence_storage(to, epoch)?;
        let ep = self.disk_endpoint(to, epoch, "destination")?;
        Ok((ep, epoch))
    }

    fn crash_host(&mut self, hang: Option<Time>) {
        let now = self.now();
        let dead = self.vm_host;
        let path = self.path_of(dead).id();
        if let Some(h) = hang {
            self.storage.hang_in_flight(path, now + h);
        }
        if let Some(ep) = self.source_ep() {
            self.close_endpoint(ep);
        }
        if self.host_side() {
            // The host and its backend are gone; its writes in flight are not.
            self.storage.kill_path(path);
            self.hosts[dead].disk = None;
            // When the host comes back it has a new connection.
            self.hosts[dead].path = self.storage.path();
        }
        self.holder_crashed(dead);
        self.crash_vm();
    }

    /// Failover: the VM restarts on `to` at the next epoch.
    fn restart(&mut self, i: usize, to: usize) {
        self.vm_host = to;
        if !self.protected() {
            let ep = self.raw_endpoint(to);
            self.boot_on(ep);
            self.action_done(i);
            return;
        }
        match self.take_over_after_crash(to) {
            Ok((ep, epoch)) if self.gated() => self.start_writer(i, to, epoch, ep, true),
            Ok((ep, epoch)) => {
                self.started_at_once();
                self.boot_on(ep);
                if self.host_side() {
                    self.action_done(i);
                } else {
                    // The gateway lets the dead writer's requests drain, and
                    // fences them on its own clock.
                    let delay = if self.rng.chance(50) {
                        0
                    } else {
                        self.rng.range(10, 400)
                    };
                    self.defer_fence(i, epoch, to, delay);
                }
            }
            Err(e) => {
                self.fail(e);
                self.action_done(i);
            }
        }
    }

    fn take_over_after_crash(&mut self, to: usize) -> Result<(usize, u64), String> {
        let disk = self.disk_of(to).map_err(|e| e.to_string())?;
        let epoch = self.epochs.current(DISK_NAME).map_err(|e| e.to_string())? + 1;
        disk.advance_to(epoch)
            .map_err(|e| format!("advance to {epoch} on host {to}: {e}"))?;
        self.fence_storage(to, epoch)?;
        let ep = self.disk_endpoint(to, epoch, "restarted")?;
        Ok((ep, epoch))
    }

    fn boot_on(&mut self, ep: usize) {
        self.note(|| format!("VM restarts on endpoint {ep}"));
        self.report.migrations += 1;
        self.front.endpoint = Some(ep);
        self.front.paused = false;
        self.guest.running = true;
        self.schedule_tick(1);
    }

    /// seeds/004: node `host` last had the disk at epoch 1; its wall clock
    /// is the newest, and it promotes itself.
    fn stale_promote(&mut self, host: usize, writes: u32) {
        let ep = if self.protected() {
            let Some(ep) = self.stale_ep else {
                self.fail("stale node was not set up".into());
                return;
            };
            self.try_stale_takeovers(host);
            ep
        } else {
            // "Last writer wins": the newest wall clock takes the disk.
            let newest = (0..self.hosts.len())
                .max_by_key(|&h| self.hosts[h].wall_clock)
                .unwrap_or(host);
            if newest != host {
                return;
            }
            // The node last had the disk at epoch 1.
            self.raw_endpoint_at(host, 1)
        };
        self.rogue = Some(Rogue {
            ep,
            left: writes,
            next_id: ROGUE_BASE,
        });
        self.after(1, Event::RogueTick);
    }

    fn try_stale_takeovers(&mut self, host: usize) {
        let stale = HandoffRecord {
            disk: DISK_NAME.to_string(),
            source_epoch: 1,
            destination_epoch: 2,
            method: HandoffMethod::Drained,
            requests: Vec::new(),
        };
        let disk = match self.disk_of(host) {
            Ok(d) => d,
            Err(e) => return self.fail(e.to_string()),
        };
        let attempt = |ok: bool, what: &str, w: &mut World| {
            if ok {
                w.checker
                    .violation(Violation::StaleTakeoverAdmitted { what: what.into() });
            } else {
                w.report.takeovers_refused += 1;
            }
            let verdict = if ok { "ADMITTED" } else { "refused" };
            w.note(|| format!("stale node: {what}: {verdict}"));
        };
        let r = disk.resume(&stale).is_ok();
        attempt(r, "resume from an epoch-1 hand-off record", self);
        let r = self.epochs.compare_and_advance(DISK_NAME, 1).is_ok();
        attempt(r, "epoch store advanced from 1", self);
        let r = disk.register(Some(1), "stale").is_ok();
        attempt(r, "writer registered at epoch 1", self);
        if self.host_side() && self.protection == Protection::On {
            match self.fence.mode {
                FenceMode::Pr => {
                    let path = self.path_of(host);
                    let r = take_over(&*path, 1).is_ok();
                    attempt(r, "storage reservation taken with key 1", self);
                }
                FenceMode::Sanlock => {
                    let r = self.lease_free_for(host);
                    attempt(r, "sanlock lease acquired from its live holder", self);
                }
                FenceMode::None => {
                    // Nobody confirms it (the holder is alive), and the
                    // holder handed no current record to it.
                    let r = self.holder.as_ref().is_none_or(|h| {
                        h.crashed || (h.handed_over && self.storage.in_flight_on(h.path) == 0)
                    });
                    attempt(r, "fence none: takeover without a current record", self);
                }
            }
        }
    }

    fn rogue_tick(&mut self) {
        let sectors = self.guest.sectors;
        let Some(r) = self.rogue.as_mut() else {
            return;
        };
        if r.left == 0 {
            return;
        }
        r.left -= 1;
        let id = r.next_id;
        r.next_id += 1;
        let ep = r.ep;
        let g = &mut self.guest;
        let count = g.rng.range(1, 2).min(sectors);
        let s = if g.rng.chance(50) {
            g.hot[g.rng.below(g.hot.len() as u64) as usize]
        } else {
            g.rng.below(sectors)
        };
        let start = s.min(sectors - count);
        let mut buf = AlignedBuf::zeroed(count as usize * SECTOR);
        for (k, chunk) in buf.as_mut_slice().chunks_exact_mut(SECTOR).enumerate() {
            encode(chunk, start + k as u64, id);
        }
        let tag = ROGUE_TAG + u64::from(r.left);
        self.submit(
            ep,
            tag,
            StorageIo::Write {
                offset: start * SECTOR_SIZE,
                buf,
                fua: false,
            },
        );
        let d = self.rng.range(5, 40);
        self.after(d, Event::RogueTick);
    }
}

// ---- host-side fences other than PR: sanlock and none -----------------
//
// PR lives in the storage model (register, preempt-and-abort). The other
// two decide *when* a destination admitted at its epoch may write, which is
// all they can do: neither stops a write the storage has accepted.
//
// sanlock (a paxos lease per disk, [`Fencing`] for the timing):
// - the holder renews every renewal period while it reaches the storage
//   (a hung path blocks its lease I/O as it blocks its writes);
// - a holder whose epoch is handed over releases the lease once none of
//   its I/O is left at the storage and it can write the lease; the taker
//   acquires at once;
// - otherwise the taker acquires only host_dead after the holder's last
//   renewal, as its lockspace monitor saw it (monitors read every renewal
//   period, at their own phase, so up to a period later);
// - recovery: 8 × io_timeout after its last renewal a cut-off holder's
//   writer is killed: requests not yet submitted to the storage never are
//   (its completions are lost, its writers closed). A kill that fails
//   (drawn per holder), or a writer still waiting on I/O at the storage
//   (stuck in the kernel, it cannot exit), leaves it to the watchdog,
//   which resets the host by host_dead;
// - a crashed host stops renewing at its crash.
// **The assumption sanlock's safety rests on, modelled exactly:** a host
// that is reset (or dead) at host_dead has no I/O landing afterwards; every
// I/O of it the storage model still holds then is dropped. Real storage
// that completes a dead initiator's accepted write later breaks sanlock;
// PR aborts such a write at the target instead.
//
// none: a destination may write only after a holder that handed over a
// record that is current (none of the holder's I/O can reach the storage
// any more: the ledger publishes the record only then), or after an
// operator confirmed the holder's host dead (`blkshim ctl takeover DISK
// --source-dead`). The confirmation is modelled as a true statement: it is
// made only for a host that crashed or lost power (its requests not yet at
// the storage die with it), and it takes effect only once the storage
// model holds none of that host's I/O (everything it had accepted landed
// or failed), so nothing of the dead host lands after the new writer's
// data. A takeover from a live holder without a record (a cut-off source,
// a takeover without a suspend) is refused and counted, never allowed: the
// VM stays where it is.
impl World {
    fn new_holder(&mut self, host: usize, epoch: u64, now: Time) -> Holder {
        Holder {
            host,
            epoch,
            path: self.hosts[host].path.id(),
            renewed: now,
            crashed: false,
            handed_over: false,
            released: false,
            killed: false,
            reset: false,
            kill_fails: self.frng.chance(25),
        }
    }

    /// The holder's host crashed or lost power: it renews nothing more.
    fn holder_crashed(&mut self, host: usize) {
        if !self.gated() {
            return;
        }
        let now = self.now();
        if let Some(h) = self.holder.as_mut().filter(|h| h.host == host) {
            h.crashed = true;
            let renewed = h.renewed;
            self.note(|| {
                format!(
                    "holder host {host} is down (last lease renewal t={renewed}, crash t={now})"
                )
            });
        }
    }

    fn start_lease_ticks(&mut self) {
        if !self.lease_ticking {
            self.lease_ticking = true;
            let r = self.fence.renewal();
            self.after(r, Event::LeaseTick);
        }
    }

    /// sanlock's renewal period: the holder renews if it can, then
    /// recovery and the watchdog are checked.
    fn lease_tick(&mut self) {
        let now = self.now();
        if let Some(h) = self.holder.as_mut() {
            let alive = !h.crashed && !h.killed && !h.released && !h.reset;
            if alive && !self.storage.path_hung(h.path, now) {
                h.renewed = now;
            }
        }
        self.lease_update(now);
        // Tick while anything else may still happen (an event other than
        // this one, or a destination waiting for the lease).
        if self.starting.is_some() || !self.sched.lock().is_empty() {
            let r = self.fence.renewal();
            self.after(r, Event::LeaseTick);
        } else {
            self.lease_ticking = false;
        }
    }

    /// sanlock: bring the holder's lease up to `now`: release, kill,
    /// watchdog reset.
    fn lease_update(&mut self, now: Time) {
        if self.fence.mode != FenceMode::Sanlock {
            return;
        }
        let Some(h) = self.holder.clone() else {
            return;
        };
        if h.released || h.reset {
            return;
        }
        let (rec, dead) = (self.fence.recovery(), self.fence.host_dead());
        let host = h.host;
        if h.crashed {
            if now >= h.renewed + dead {
                let n = self.storage.drop_in_flight(h.path);
                self.report.hosts_reset += 1;
                self.set_holder(|h| h.reset = true);
                self.note(|| {
                    format!(
                        "sanlock: host {host} (down) is dead by host_dead (t={}): its {n} I/O \
                         still at the storage never land",
                        h.renewed + dead
                    )
                });
            }
            return;
        }
        if !h.killed && now >= h.renewed + rec {
            self.kill_writer(host, h.path);
            self.report.writers_killed += 1;
            self.set_holder(|h| h.killed = true);
            let left = self.storage.in_flight_on(h.path);
            let fails = h.kill_fails;
            self.note(|| {
                format!(
                    "sanlock: host {host} could not renew since t={} (cut off): lease lost, its \
                     writer KILLED ({left} I/O still at the storage{})",
                    h.renewed,
                    if fails { "; the kill fails" } else { "" }
                )
            });
        }
        if h.killed || now >= h.renewed + rec {
            let left = self.storage.in_flight_on(h.path);
            if now >= h.renewed + dead && (h.kill_fails || left > 0) {
                let n = self.storage.drop_in_flight(h.path);
                self.report.hosts_reset += 1;
                self.set_holder(|h| h.reset = true);
                self.note(|| {
                    format!(
                        "sanlock: the watchdog RESETS host {host} at host_dead (t={}): {n} of its \
                         I/O never land",
                        h.renewed + dead
                    )
                });
            }
            return;
        }
        if h.handed_over
            && !self.storage.path_hung(h.path, now)
            && self.storage.in_flight_on(h.path) == 0
        {
            self.set_holder(|h| h.released = true);
            self.note(|| format!("sanlock: host {host} releases the lease (its epoch is handed over, its I/O done)"));
        }
    }

    fn set_holder(&mut self, f: impl FnOnce(&mut Holder)) {
        if let Some(h) = self.holder.as_mut() {
            f(h);
        }
    }

    /// sanlock's recovery: the writer process of `host` is killed. Its
    /// completions are lost (so its backend submits nothing more) and its
    /// writers are closed; what it already put on the storage is not
    /// called back.
    fn kill_writer(&mut self, host: usize, path: u32) {
        self.storage.kill_path(path);
        if let Some(d) = self.hosts[host].disk.take() {
            for e in &mut self.endpoints {
                if let EpKind::Disk { disk, writer } = &mut e.kind {
                    if Arc::ptr_eq(disk, &d) {
                        *writer = None;
                    }
                }
            }
        }
        if self.hosts[host].path.id() == path {
            self.hosts[host].path = self.storage.path();
        }
    }

    /// When `host`'s lockspace monitor saw a renewal made at `renewed`.
    fn seen_at(&self, host: usize, renewed: Time) -> Time {
        let r = self.fence.renewal();
        let phase = self.monitor_phase.get(host).copied().unwrap_or(0) % r;
        renewed + (phase + r - renewed % r) % r
    }

    /// sanlock: may `host` acquire the lease now?
    fn lease_free_for(&mut self, host: usize) -> bool {
        let now = self.now();
        self.lease_update(now);
        let Some(h) = self.holder.as_ref() else {
            return true;
        };
        h.released || now >= self.seen_at(host, h.renewed) + self.fence.host_dead()
    }

    /// The destination at `epoch` (endpoint `ep`) is admitted; it writes
    /// when its fence lets it.
    fn start_writer(&mut self, i: usize, to: usize, epoch: u64, ep: usize, boot: bool) {
        let now = self.now();
        self.starting = Some(Starting {
            to,
            epoch,
            ep,
            decided: now,
            boot,
            waiting_noted: false,
        });
        self.poll_start(i);
    }

    fn poll_start(&mut self, i: usize) {
        let Some(s) = self.starting.clone() else {
            return;
        };
        let to = s.to;
        let ready = match self.fence.mode {
            FenceMode::Pr => true,
            FenceMode::Sanlock => {
                let free = self.lease_free_for(to);
                if let (true, Some(h)) = (free, self.holder.clone()) {
                    let from = h.host;
                    if h.released {
                        self.note(|| {
                            format!("sanlock: host {to} ACQUIRES the lease host {from} released")
                        });
                    } else {
                        let seen = self.seen_at(to, h.renewed);
                        let dead = self.fence.host_dead();
                        self.report.host_dead_waits += 1;
                        self.note(|| {
                            format!(
                                "sanlock: host {to} ACQUIRES the lease after host_dead: host \
                                 {from} last renewed at t={} (seen t={seen}), +{dead}",
                                h.renewed
                            )
                        });
                    }
                } else if !free && !s.waiting_noted {
                    let from = self.holder.as_ref().map_or(usize::MAX, |h| h.host);
                    self.note(|| {
                        format!("sanlock: host {to} waits for the lease held by host {from}")
                    });
                }
                free
            }
            FenceMode::None => match self.holder.clone() {
                None => true,
                Some(h) => {
                    let left = self.storage.in_flight_on(h.path);
                    let from = h.host;
                    if h.crashed {
                        if left == 0 {
                            self.note(|| {
                                format!(
                                    "fence none: the operator's CONFIRMATION that host {from} is \
                                     dead (powered off) takes effect: none of its I/O is left at the storage"
                                )
                            });
                        } else if !s.waiting_noted {
                            self.note(|| {
                                format!(
                                    "fence none: operator confirms host {from} dead (powered off); \
                                     {left} I/O it had put on the storage must finish first"
                                )
                            });
                        }
                        left == 0
                    } else if h.handed_over {
                        if left == 0 {
                            self.note(|| format!("fence none: host {from}'s record is current (none of its I/O can reach the storage)"));
                        } else if !s.waiting_noted {
                            self.note(|| format!("fence none: host {from}'s record waits for {left} of its I/O at the storage"));
                        }
                        left == 0
                    } else {
                        // Refused up front (takeover()); reaching here is a
                        // bug of the simulation.
                        self.fail(format!(
                            "fence none: host {to} started from live holder {from} without a record"
                        ));
                        true
                    }
                }
            },
        };
        if ready {
            self.finish_start(i);
        } else {
            if let Some(st) = self.starting.as_mut() {
                st.waiting_noted = true;
            }
            self.states[i] = ActState::Acquiring;
            self.after(5, Event::Control(i));
        }
    }

    /// The fence let the destination write: the VM goes on there.
    fn finish_start(&mut self, i: usize) {
        let Some(s) = self.starting.take() else {
            return;
        };
        let now = self.now();
        let waited = now - s.decided;
        self.report.failover_times.push(waited);
        let h = self.new_holder(s.to, s.epoch, now);
        self.holder = Some(h);
        if self.fence.mode == FenceMode::Sanlock {
            self.start_lease_ticks();
        }
        let to = s.to;
        self.note(|| {
            format!(
                "host {to} may write at epoch {} ({waited} ticks after the decision)",
                s.epoch
            )
        });
        self.vm_host = s.to;
        if s.boot {
            self.boot_on(s.ep);
        } else {
            self.report.migrations += 1;
            self.recover(s.ep);
        }
        self.action_done(i);
    }
}

/// The storage I/O of a wire request.
fn wire_io(w: &Wire) -> StorageIo {
    let offset = w.start * SECTOR_SIZE;
    match w.kind {
        GKind::Write => {
            let mut buf = AlignedBuf::zeroed(w.count as usize * SECTOR);
            let data = buf.as_mut_slice();
            for p in &w.parts {
                for s in p.start..p.start + p.count {
                    let o = ((s - w.start) as usize) * SECTOR;
                    encode(&mut data[o..o + SECTOR], s, p.greq);
                }
            }
            StorageIo::Write {
                offset,
                buf,
                fua: false,
            }
        }
        GKind::Read => StorageIo::Read {
            offset,
            buf: AlignedBuf::zeroed(w.count as usize * SECTOR),
        },
        GKind::Flush => StorageIo::Flush,
        GKind::WriteZeroes => StorageIo::WriteZeroes {
            offset,
            len: w.count * SECTOR_SIZE,
            may_unmap: w.start % 2 == 0,
        },
        GKind::Discard => StorageIo::Discard {
            offset,
            len: w.count * SECTOR_SIZE,
        },
    }
}

/// Run one seed of one scenario.
///
/// ```
/// use blkshim::sim::{run_one, Deployment, Kind, Protection, Scenario};
/// let s = Scenario { kind: Kind::PingPong, deployment: Deployment::Gateway };
/// let on = run_one(7, s, Protection::On);
/// assert!(on.violations.is_empty() && on.migrations > 0);
/// // Deterministic: the same seed gives the same run.
/// assert_eq!(run_one(7, s, Protection::On).requests, on.requests);
/// ```
pub fn run_one(seed: u64, scenario: Scenario, protection: Protection) -> RunReport {
    run_one_with(seed, scenario, protection, Fencing::default())
}

/// [`run_one`] with host-side deployments fenced by `fence`.
pub fn run_one_with(
    seed: u64,
    scenario: Scenario,
    protection: Protection,
    fence: Fencing,
) -> RunReport {
    World::new(seed, scenario, protection, fence).run()
}

/// Run one seed and also return a step-by-step trace of the scenario's
/// actions (what `blkshim sim --seed N --trace` prints).
pub fn run_traced(
    seed: u64,
    scenario: Scenario,
    protection: Protection,
) -> (RunReport, Vec<String>) {
    run_traced_with(seed, scenario, protection, Fencing::default())
}

/// [`run_traced`] with host-side deployments fenced by `fence`.
pub fn run_traced_with(
    seed: u64,
    scenario: Scenario,
    protection: Protection,
    fence: Fencing,
) -> (RunReport, Vec<String>) {
    let mut w = World::new(seed, scenario, protection, fence);
    w.trace = Some(Vec::new());
    w.run_traced()
}
