//! One simulated run: the guest, its blkfront, the backends (real
//! [`Disk`]s over the storage model, or raw pass-through when protection
//! is off), the scenario's actions, and the checker.
//!
//! This file holds the run's state, its event loop and the entry points;
//! the rest is split by actor:
//! - `params`: what a seed decides up front ([`SeedParams::draw`]), printed
//!   at the start of a `--trace`;
//! - `backends`: endpoints (real `Disk`s or raw paths), hosts, booting;
//! - `guest`: the guest's requests, their submission and completion;
//! - `frontend`: blkfront's pause, re-send on resume, the VM crashing;
//! - `actions`: the scenario's migrations, takeovers, crashes, restarts;
//! - `rogue`: the stale node's takeover attempts and the rogue writes;
//! - `fence`: host-side fences other than PR (sanlock, none).

mod actions;
mod backends;
mod fence;
mod frontend;
mod guest;
mod params;
mod rogue;

use actions::ActState;
use backends::{errno_of, Done, Endpoint, EpKind, Host, Inbox};
use fence::{Holder, Starting};
use frontend::{wire_io, Front, Part, Wire};
use guest::{GKind, Guest};
use params::{SeedParams, SeedRngs};
use rogue::Rogue;

use super::checker::{Checker, Violation};
use super::payload::decode;
use super::rng::SimRng;
use super::scenario::{Action, Deployment, Scenario, HOST_X};
use super::sched::{Event, Sched, SharedSched, Time};
use super::storage_model::StorageModel;
use crate::epoch::MemEpochStore;
use crate::handoff::{Disk, Suspension};
use crate::storage::fencing::FenceMode;
use crate::storage::SECTOR_SIZE;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

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

impl World {
    /// Set a run up: everything below depends on `seed` only.
    pub fn new(seed: u64, scenario: Scenario, protection: Protection, fence: Fencing) -> World {
        let (params, rngs) = SeedParams::draw(seed, scenario.kind, &fence);
        World::with_params(scenario, protection, fence, params, rngs)
    }

    /// Set a run up from its seed's draws.
    fn with_params(
        scenario: Scenario,
        protection: Protection,
        fence: Fencing,
        params: SeedParams,
        rngs: SeedRngs,
    ) -> World {
        let SeedParams {
            storage: storage_params,
            guest: g,
            actions,
            monitor_phase,
        } = params;
        let sectors = storage_params.sectors;
        let sched = Sched::shared();
        let storage = StorageModel::new(storage_params, Arc::clone(&sched), rngs.storage);
        let guest = Guest {
            depth: g.depth,
            write_percent: g.write_percent,
            budget: g.budget,
            rng: rngs.guest,
            sectors,
            hot: g.hot,
            issued: 0,
            since_action: 0,
            running: false,
            tick_scheduled: false,
            reqs: BTreeMap::new(),
            next_id: 1,
        };
        let front = Front {
            rng: rngs.front,
            endpoint: None,
            paused: false,
            wires: BTreeMap::new(),
            next_wire: 1,
        };
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
            rng: rngs.world,
            rogue: None,
            stale_ep: None,
            retired: None,
            disks: Vec::new(),
            report: RunReport::default(),
            trace: None,
            fence,
            frng: rngs.fence,
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

    fn fail(&mut self, what: String) {
        self.checker.violation(Violation::HandoffFailed { what });
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
    let (params, rngs) = SeedParams::draw(seed, scenario.kind, &fence);
    let lines = params.describe();
    let mut w = World::with_params(scenario, protection, fence, params, rngs);
    w.trace = Some(lines);
    w.run_traced()
}
