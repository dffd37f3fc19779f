//! An exhaustive, small-scope model of blkshim's hand-off protocol, checked
//! with `stateright` (breadth-first, every reachable state).
//!
//! The model is written by hand from `src/tracking/mod.rs` (the per-block
//! tracker with its fence floor), `src/handoff/mod.rs` (`Disk`: register,
//! submit, `advance_to`, `take_over`, suspend/resume, `fence_below`),
//! `src/epoch/mod.rs` (compare-and-advance) and `src/xen/backend.rs` (who
//! may be admitted when, and that a record is published only once the
//! source's writes have settled). It does not call the real code: it is a
//! check of the protocol, at a scope too small for bugs of size or timing
//! to hide in, over every interleaving of:
//!
//! - the guest: writes to a block (never two of its own to one block at
//!   once, as a file system does), sent on the ring of the backend its
//!   frontend is attached to;
//! - the frontend (blkfront): on migration, every write not acknowledged is
//!   re-queued on the next backend (`blkif_recover`); answers of the old
//!   backend are lost from then on;
//! - the backends: `Disk::submit` (gate, epoch check, automatic advance,
//!   tracker admission), the start of an admitted request at the storage
//!   (a separate step, as in `Disk::start`), `Disk::finish` (tracker
//!   completion, waking queued requests, the answer), suspend (drain or
//!   fence), finishing it (at or before a deadline), publishing the record,
//!   resume from the record, take-over, the gateway's fence timer, the
//!   crash of a host, and a stale backend re-submitting a write it had
//!   (a zombie);
//! - the storage of seeds/003: a write to a block that already has a write
//!   in flight is completed at once and ignored; otherwise it lands
//!   whenever the model says, and its completion comes back after that.
//!
//! Properties ("always"):
//! - `block holds acknowledged data`: every block holds the last write the
//!   guest was told completed (or a write that may have landed: one still
//!   outstanding, or one that failed), as in `src/sim/checker.rs`;
//! - `no stale landing`: no write lands on a block after a newer write to
//!   that block was acknowledged (the simulation's `StaleLanding`);
//! - `older epoch ordered before newer`: no write of epoch e lands on a
//!   block after a write of a newer epoch to that block reached the
//!   storage: a writer below the admitted epoch may still land only if it
//!   is ordered before every newer write to that block;
//! - `never two writes to one block at the storage`: the storage never has
//!   to ignore a write (README's second promise).
//!
//! With protection off (no tracker, no epochs: each backend hands its
//! writes straight to the storage, the destination takes the next epoch by
//! itself) the checker must find seeds/003.

use stateright::{Checker, Expectation, HasDiscoveries, Model, Path, Property};
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAX_WRITERS: usize = 3;
const MAX_BLOCKS: usize = 2;
/// Guest write ids are 1..=MAX_GUEST_WRITES; 0 is the disk's initial content.
const MAX_GUEST_WRITES: usize = 4;

/// How the writers share the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `blkshim serve`: one `Disk`, one tracker for every writer; a writer
    /// registered above the current epoch advances it with its first
    /// write (`auto_advance`), older writers' writes in flight drain and
    /// are fenced by the timer (`fence_timeout`).
    Gateway,
    /// The Xen back end with every vbd of the disk in one process
    /// (`DiskRegistry`): one `Disk`, `auto_advance` off; the source
    /// suspends (drain or fence) and publishes its record once its writes
    /// settled; the destination resumes from that record, or takes the
    /// disk over from a holder in this process.
    XenLocal,
    /// One `Disk` (one tracker) per host over shared storage and a shared
    /// epoch store: the destination is admitted only from a record the
    /// source published after its writes settled, or takes over from a
    /// crashed holder once none of its writes is at the storage any more.
    HostSide,
    /// Protection removed: every backend writes straight to the storage,
    /// the destination advances the epoch by itself at registration.
    Unprotected,
}

/// One protection taken out of a protected mode, to show the checker
/// catches its absence (the properties are not vacuous).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    None,
    /// The tracker orders a writer's requests only against its own.
    NoCrossWriterOrdering,
    /// A fence releases the blocks of what it marks at the storage.
    FenceReleasesBlocks,
    /// `Tracker::admit` does not refuse writes below the floor.
    NoFloorCheck,
    /// The record is published before the source's writes settled.
    PublishUnsettled,
}

#[derive(Clone, Debug)]
struct HandoffModel {
    mutation: Mutation,
    mode: Mode,
    writers: usize,
    blocks: usize,
    guest_writes: u8,
    /// Old backends may take requests off their ring after the migration.
    zombies: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Stage {
    /// In the tracker's queue behind a conflicting request.
    Queued,
    /// Admitted (active in the tracker), not yet handed to the storage.
    Ready,
    /// At the storage, not landed yet.
    AtStorage,
    /// The storage completed it (`ignored`: completed at once without
    /// landing); `Disk::finish` has not run yet.
    Done { ignored: bool },
}

/// A request in a backend: writer `w` writing guest write `g` (its data)
/// to block `b` at epoch `e`. (w, g) identifies it among live requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Req {
    w: u8,
    g: u8,
    e: u8,
    b: u8,
    stage: Stage,
    /// Marked by a fence while active (`Outcome::Fenced`).
    fenced: bool,
    /// Its host crashed: it lands if it is at the storage, nobody hears.
    orphan: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Suspension {
    epoch: u8,
    fenced: bool,
    /// `try_finish` returned the record (floor raised to epoch + 1).
    finished: bool,
}

/// `Disk` + `Tracker` state (requests live in `St::reqs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct DiskSt {
    /// `State::current`.
    current: u8,
    /// The tracker's fence floor.
    floor: u8,
    /// `State::gate`: writers at or below it are suspended.
    gate: Option<u8>,
    suspension: Option<Suspension>,
    /// A fence timer armed by `advance_to` (`schedule_fence`).
    fence_timer: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Wr {
    /// Registered (admitted, in the Xen modes) at this epoch.
    epoch: Option<u8>,
    /// Its ring is suspended: it takes no more requests from the frontend.
    suspended: bool,
    crashed: bool,
    /// Guest writes left on this backend's ring when the frontend moved
    /// on: a zombie backend may still take them off late.
    late: u8,
}

/// A guest write the frontend has not been answered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Outstanding {
    g: u8,
    b: u8,
    /// Sent (or to be sent) on this backend's ring.
    target: u8,
    /// The backend took it off the ring.
    submitted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct St {
    /// The epoch store (one value, compare-and-advance only).
    store: u8,
    /// One disk (shared modes) or one per writer (host-side).
    disks: [DiskSt; MAX_WRITERS],
    writers: [Wr; MAX_WRITERS],
    /// Tracker slots and storage I/O, in arrival order.
    reqs: Vec<Req>,
    /// Which block each guest write targets (index = write id).
    gblock: [u8; MAX_GUEST_WRITES + 1],
    /// The storage's blocks: the id of the write that landed last.
    content: [u8; MAX_BLOCKS],
    /// The last published hand-off record: its source epoch.
    record: Option<u8>,
    /// The backend the frontend is attached to.
    attached: u8,
    outstanding: Vec<Outstanding>,
    next_g: u8,
    /// Per block, the contents the guest may legitimately find (bit i:
    /// write i; bit 0: the initial zeroes), as `sim::checker::Checker`.
    allowed: [u8; MAX_BLOCKS],
    /// Ghosts for the properties.
    max_epoch_started: [u8; MAX_BLOCKS],
    stale_landing: bool,
    epoch_order_broken: bool,
    overlap_at_storage: bool,
    guest_error: bool,
    /// Ghosts for "sometimes" (non-vacuity) properties.
    old_epoch_landed_after_advance: bool,
    fenced_write_landed: bool,
    newer_writer_acked: bool,
    queued_behind_older: bool,
    zombie_refused: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The guest writes `g` (the next id) to `b`, on the attached backend's ring.
    GuestWrite { g: u8, b: u8 },
    /// Backend `w` takes `g` off its ring: `Disk::submit`.
    Consume { w: u8, g: u8 },
    /// A backend the frontend left takes a request off its old ring late
    /// (a zombie: `Disk::submit` must refuse it).
    LateConsume { w: u8, g: u8 },
    /// `Disk::start`: an admitted request goes to the storage.
    Start { w: u8, g: u8 },
    /// The storage writes it to the medium and completes it.
    Land { w: u8, g: u8 },
    /// `Disk::finish`: tracker completion, wake-ups, the answer.
    Complete { w: u8, g: u8 },
    /// Gateway: a new writer registers at `e` (>= the current epoch).
    Register { w: u8, e: u8 },
    /// Frontend migration to the next backend (blkfront re-queues).
    Migrate,
    /// `Disk::begin_suspend` of writer `w`'s epoch: its ring stops.
    Suspend { w: u8, fence: bool },
    /// `Suspension::try_finish(deadline_passed)`.
    FinishSuspend { w: u8, deadline: bool },
    /// The source publishes its record once its writes settled.
    Publish { w: u8 },
    /// Destination `w`: `Disk::resume(record)`, then register at its epoch.
    Resume { w: u8 },
    /// Destination `w`: `Disk::take_over(stored)`, then register.
    TakeOver { w: u8 },
    /// Gateway: the fence timer fires (`fence_below(floor)`).
    FenceTimer,
    /// Host-side: the host of `w` dies.
    Crash { w: u8 },
}

fn bit(g: u8) -> u8 {
    1 << g
}

const SETTLED: &str = "every settled block holds acknowledged data";
const READ: &str = "a read returns acknowledged data";
const STALE_LANDING: &str = "no write lands after a newer one was acknowledged";
const EPOCH_ORDER: &str = "an older epoch's write lands only before every newer one";
const OVERLAP: &str = "never two writes to one block at the storage";

/// Block `b` holds what the guest may find there: its last acknowledged
/// write (or one that failed), or a write the guest is still waiting for.
fn holds_allowed(s: &St, b: usize) -> bool {
    let c = s.content[b];
    s.allowed[b] & bit(c) != 0 || s.outstanding.iter().any(|o| o.b as usize == b && o.g == c)
}

impl HandoffModel {
    fn shared(&self) -> bool {
        matches!(self.mode, Mode::Gateway | Mode::XenLocal)
    }

    fn disk_of(&self, w: u8) -> usize {
        if self.shared() {
            0
        } else {
            w as usize
        }
    }

    fn max_epoch(&self) -> u8 {
        self.writers as u8
    }

    fn find(s: &St, w: u8, g: u8) -> Option<usize> {
        s.reqs.iter().position(|r| r.w == w && r.g == g)
    }

    fn same_disk(&self, a: u8, b: u8) -> bool {
        self.disk_of(a) == self.disk_of(b)
    }

    /// Does request `q` hold its block against requests of writer `w`?
    fn holds(&self, q: &Req, w: u8) -> bool {
        self.same_disk(q.w, w)
            && (self.mutation != Mutation::NoCrossWriterOrdering || q.w == w)
            && !(q.fenced && self.mutation == Mutation::FenceReleasesBlocks)
    }

    fn active(stage: Stage) -> bool {
        !matches!(stage, Stage::Queued)
    }

    /// The answer to `g` from backend `w` reaches the guest only if the
    /// frontend still waits for it there.
    fn deliver(&self, s: &mut St, w: u8, g: u8, ok: bool) {
        let Some(i) = s
            .outstanding
            .iter()
            .position(|o| o.g == g && o.target == w && o.submitted && s.attached == w)
        else {
            return;
        };
        let o = s.outstanding.remove(i);
        let b = o.b as usize;
        if ok {
            s.allowed[b] = bit(g);
            if s.writers[w as usize].epoch.unwrap_or(0) > 1 {
                s.newer_writer_acked = true;
            }
        } else {
            // A failed write may or may not have landed (`Checker::maybe`).
            s.allowed[b] |= bit(g);
            s.guest_error = true;
        }
    }

    /// `Inner::promote`: start every waiting request of disk `d` that no
    /// active and no earlier waiting request conflicts with; with `freed`,
    /// only waiters on that block are candidates.
    fn promote(&self, s: &mut St, d: usize, freed: Option<u8>) {
        for i in 0..s.reqs.len() {
            let r = s.reqs[i];
            if self.disk_of(r.w) != d || r.stage != Stage::Queued {
                continue;
            }
            if freed.is_some_and(|f| f != r.b) {
                continue;
            }
            let blocked = s.reqs.iter().enumerate().any(|(j, q)| {
                j != i && self.holds(q, r.w) && q.b == r.b && (Self::active(q.stage) || j < i)
            });
            if !blocked {
                s.reqs[i].stage = Stage::Ready;
            }
        }
    }

    /// `Tracker::fence_with` / `Disk::fence_below`: raise the floor,
    /// cancel stale waiting requests (answered EPERM), mark stale active
    /// ones fenced (they keep their block until the storage completes
    /// them), then wake what the cancellations freed.
    fn fence_below(&self, s: &mut St, d: usize, floor: u8) {
        s.disks[d].floor = s.disks[d].floor.max(floor);
        let mut cancelled = Vec::new();
        s.reqs.retain(|r| {
            let stale = self.disk_of(r.w) == d && r.e < floor;
            if stale && r.stage == Stage::Queued {
                cancelled.push(*r);
                false
            } else {
                true
            }
        });
        for r in s.reqs.iter_mut() {
            if self.disk_of(r.w) == d && r.e < floor && Self::active(r.stage) {
                r.fenced = true;
            }
        }
        self.promote(s, d, None);
        for r in cancelled {
            self.deliver(s, r.w, r.g, false);
        }
    }

    /// `Disk::advance_to(target)` on disk `d`: compare-and-advance the store
    /// one step at a time, raise the floor (no fence), arm the fence timer
    /// when older writes are still in flight. `false`: `StaleEpoch`.
    fn advance_to(&self, s: &mut St, d: usize, target: u8) -> bool {
        let mut cur = s.disks[d].current;
        while cur < target {
            if s.store == cur {
                s.store += 1;
                cur += 1;
            } else if s.store > cur {
                cur = s.store;
            } else {
                unreachable!("the store never goes back");
            }
        }
        s.disks[d].current = cur;
        if cur > target {
            return false;
        }
        let prev = s.disks[d].floor;
        s.disks[d].floor = prev.max(cur);
        if prev < cur {
            let stale = s.reqs.iter().any(|r| self.disk_of(r.w) == d && r.e < cur);
            if stale {
                s.disks[d].fence_timer = Some(s.disks[d].fence_timer.unwrap_or(0).max(cur));
            }
        }
        true
    }

    /// `Disk::submit` of guest write `g` by backend `w`.
    fn submit(&self, s: &mut St, w: u8, g: u8) {
        let wi = w as usize;
        let b = s.gblock[g as usize];
        let e = s.writers[wi].epoch.expect("only registered writers submit");
        let req = Req {
            w,
            g,
            e,
            b,
            stage: Stage::Queued,
            fenced: false,
            orphan: false,
        };
        if self.mode == Mode::Unprotected {
            s.reqs.push(Req {
                stage: Stage::Ready,
                ..req
            });
            return;
        }
        let d = self.disk_of(w);
        // check_writer: the gate, then the epoch (auto advance or EAGAIN).
        if s.disks[d].gate.is_some_and(|gate| e <= gate) {
            return self.deliver(s, w, g, false); // ESHUTDOWN
        }
        if e > s.disks[d].current && (self.mode != Mode::Gateway || !self.advance_to(s, d, e)) {
            return self.deliver(s, w, g, false); // EAGAIN / EPERM
        }
        // Tracker::admit.
        if e < s.disks[d].floor && self.mutation != Mutation::NoFloorCheck {
            return self.deliver(s, w, g, false); // Refused::Stale -> EPERM
        }
        let conflict = s.reqs.iter().any(|q| self.holds(q, w) && q.b == b);
        if conflict {
            if s.reqs
                .iter()
                .any(|q| self.same_disk(q.w, w) && q.b == b && q.e < e)
            {
                s.queued_behind_older = true;
            }
            s.reqs.push(req);
        } else {
            s.reqs.push(Req {
                stage: Stage::Ready,
                ..req
            });
        }
    }

    /// The holder of epoch `e`, if a writer was admitted at it.
    fn holder(s: &St, e: u8) -> Option<usize> {
        s.writers.iter().position(|w| w.epoch == Some(e))
    }

    fn writes_settled(&self, s: &St, w: u8, epoch: u8) -> bool {
        !s.reqs
            .iter()
            .any(|r| self.same_disk(r.w, w) && r.e <= epoch && (r.w == w || self.shared()))
    }

    /// A destination not admitted yet (writers after the source).
    fn candidate(&self, s: &St, w: usize) -> bool {
        w > 0 && s.writers[w].epoch.is_none() && !s.writers[w].crashed
    }

    fn admit_at(&self, s: &mut St, w: usize, e: u8) {
        s.writers[w].epoch = Some(e);
        if self.mode == Mode::HostSide {
            let d = &mut s.disks[w];
            d.current = d.current.max(e);
        }
    }
}

impl Model for HandoffModel {
    type State = St;
    type Action = Action;

    fn init_states(&self) -> Vec<St> {
        let mut writers = [Wr::default(); MAX_WRITERS];
        writers[0].epoch = Some(1);
        let disk = DiskSt {
            current: 1,
            floor: 1,
            ..DiskSt::default()
        };
        vec![St {
            store: 1,
            disks: [disk; MAX_WRITERS],
            writers,
            reqs: Vec::new(),
            gblock: [0; MAX_GUEST_WRITES + 1],
            content: [0; MAX_BLOCKS],
            record: None,
            attached: 0,
            outstanding: Vec::new(),
            next_g: 1,
            allowed: [bit(0); MAX_BLOCKS],
            max_epoch_started: [0; MAX_BLOCKS],
            stale_landing: false,
            epoch_order_broken: false,
            overlap_at_storage: false,
            guest_error: false,
            old_epoch_landed_after_advance: false,
            fenced_write_landed: false,
            newer_writer_acked: false,
            queued_behind_older: false,
            zombie_refused: false,
        }]
    }

    fn actions(&self, s: &St, out: &mut Vec<Action>) {
        let n = self.writers;
        // The guest.
        if s.next_g <= self.guest_writes {
            for b in 0..self.blocks as u8 {
                if !s.outstanding.iter().any(|o| o.b == b) {
                    out.push(Action::GuestWrite { g: s.next_g, b });
                }
            }
        }
        // The frontend's rings.
        for o in &s.outstanding {
            let w = &s.writers[o.target as usize];
            if !o.submitted && w.epoch.is_some() && !w.suspended && !w.crashed {
                out.push(Action::Consume {
                    w: o.target,
                    g: o.g,
                });
            }
        }
        if (s.attached as usize) + 1 < n {
            out.push(Action::Migrate);
        }
        // Requests in flight.
        for r in &s.reqs {
            let (w, g) = (r.w, r.g);
            match r.stage {
                Stage::Queued => {}
                Stage::Ready => out.push(Action::Start { w, g }),
                Stage::AtStorage => out.push(Action::Land { w, g }),
                Stage::Done { .. } => out.push(Action::Complete { w, g }),
            }
        }
        // A zombie backend takes a request off its old ring late.
        if self.zombies {
            for w in 0..n as u8 {
                let wr = &s.writers[w as usize];
                if wr.epoch.is_none() || wr.crashed {
                    continue;
                }
                for g in 1..s.next_g {
                    if wr.late & bit(g) != 0 && Self::find(s, w, g).is_none() {
                        out.push(Action::LateConsume { w, g });
                    }
                }
            }
        }
        match self.mode {
            Mode::Unprotected | Mode::Gateway => {
                for w in 1..n {
                    if self.candidate(s, w) {
                        // The README's recipe: each migration's destination
                        // is named one epoch above its source (vm1@5, then
                        // vm1@6, then vm1@7): writer w at w + 1. Refused at
                        // the handshake below the current epoch. (A writer
                        // joining at the current epoch is a co-writer, not a
                        // hand-off: the promise does not cover it.)
                        let e = w as u8 + 1;
                        if e >= s.disks[0].current.max(s.store) {
                            out.push(Action::Register { w: w as u8, e });
                        }
                    }
                }
                if self.mode == Mode::Gateway && s.disks[0].fence_timer.is_some() {
                    out.push(Action::FenceTimer);
                }
            }
            Mode::XenLocal | Mode::HostSide => {
                for w in 0..n {
                    let wr = &s.writers[w];
                    let d = &s.disks[self.disk_of(w as u8)];
                    let Some(e) = wr.epoch else { continue };
                    if wr.crashed {
                        continue;
                    }
                    if !wr.suspended && d.suspension.is_none() {
                        for fence in [false, true] {
                            out.push(Action::Suspend { w: w as u8, fence });
                        }
                    }
                    if let Some(sp) = d.suspension {
                        if sp.epoch == e && !sp.finished {
                            for deadline in [false, true] {
                                out.push(Action::FinishSuspend {
                                    w: w as u8,
                                    deadline,
                                });
                            }
                        }
                        if sp.epoch == e
                            && sp.finished
                            && s.record.is_none_or(|r| r < e)
                            && (self.writes_settled(s, w as u8, e)
                                || self.mutation == Mutation::PublishUnsettled)
                        {
                            out.push(Action::Publish { w: w as u8 });
                        }
                    }
                    if self.mode == Mode::HostSide && w as u8 != s.attached {
                        out.push(Action::Crash { w: w as u8 });
                    }
                }
                for w in 1..n {
                    if !self.candidate(s, w) {
                        continue;
                    }
                    if s.record.is_some() {
                        out.push(Action::Resume { w: w as u8 });
                    }
                    let take_over = match self.mode {
                        // Holder::Local: the shared tracker orders us behind it.
                        Mode::XenLocal => true,
                        // Holder::Dead: only once none of its writes can
                        // reach the storage any more (see the module docs).
                        _ => Self::holder(s, s.store).is_some_and(|h| {
                            s.writers[h].crashed && !s.reqs.iter().any(|r| r.w as usize == h)
                        }),
                    };
                    if take_over && s.record.is_none_or(|r| r < s.store) {
                        out.push(Action::TakeOver { w: w as u8 });
                    }
                }
            }
        }
    }

    fn next_state(&self, last: &St, action: Action) -> Option<St> {
        let mut s = last.clone();
        match action {
            Action::GuestWrite { g, b } => {
                s.gblock[g as usize] = b;
                s.next_g += 1;
                s.outstanding.push(Outstanding {
                    g,
                    b,
                    target: s.attached,
                    submitted: false,
                });
            }
            Action::Consume { w, g } => {
                let o = s
                    .outstanding
                    .iter_mut()
                    .find(|o| o.g == g && o.target == w)?;
                o.submitted = true;
                if Self::find(&s, w, g).is_some() {
                    // This backend still has its earlier copy of g in flight
                    // (re-sent to it again): not modelled, skip.
                    return None;
                }
                self.submit(&mut s, w, g);
            }
            Action::LateConsume { w, g } => {
                s.writers[w as usize].late &= !bit(g);
                self.submit(&mut s, w, g);
                if Self::find(&s, w, g).is_none() {
                    s.zombie_refused = true;
                }
            }
            Action::Start { w, g } => {
                let i = Self::find(&s, w, g)?;
                let b = s.reqs[i].b as usize;
                let busy = s
                    .reqs
                    .iter()
                    .any(|r| r.b as usize == b && r.stage == Stage::AtStorage);
                s.max_epoch_started[b] = s.max_epoch_started[b].max(s.reqs[i].e);
                if busy {
                    // seeds/003: completed at once, ignored.
                    s.overlap_at_storage = true;
                    s.reqs[i].stage = Stage::Done { ignored: true };
                } else {
                    s.reqs[i].stage = Stage::AtStorage;
                }
            }
            Action::Land { w, g } => {
                let i = Self::find(&s, w, g)?;
                let r = s.reqs[i];
                let b = r.b as usize;
                s.content[b] = g;
                // sim::checker::Checker::landed.
                let allowed = s.allowed[b];
                if allowed != 0 && (0..=g).all(|k| allowed & bit(k) == 0) {
                    s.stale_landing = true;
                }
                if s.max_epoch_started[b] > r.e {
                    s.epoch_order_broken = true;
                }
                if r.e < s.store {
                    s.old_epoch_landed_after_advance = true;
                }
                if r.fenced {
                    s.fenced_write_landed = true;
                }
                if r.orphan {
                    s.reqs.remove(i);
                } else {
                    s.reqs[i].stage = Stage::Done { ignored: false };
                }
            }
            Action::Complete { w, g } => {
                let i = Self::find(&s, w, g)?;
                let r = s.reqs.remove(i);
                if self.mode != Mode::Unprotected {
                    self.promote(&mut s, self.disk_of(w), Some(r.b));
                }
                // The storage said success (even when it ignored the write).
                self.deliver(&mut s, w, g, !r.fenced);
            }
            Action::Register { w, e } => {
                let cur = s.disks[0].current.max(s.store);
                s.disks[0].current = cur;
                if self.mode == Mode::Unprotected {
                    s.store = e;
                }
                s.writers[w as usize].epoch = Some(e);
            }
            Action::Migrate => {
                // Requests reach a backend's ring (or socket) only once it
                // is connected, i.e. registered or admitted.
                let from = s.attached as usize;
                let connected = s.writers[from].epoch.is_some();
                for o in &s.outstanding {
                    if o.target as usize == from && !o.submitted && connected {
                        s.writers[from].late |= bit(o.g);
                    }
                }
                s.attached += 1;
                let to = s.attached;
                for o in s.outstanding.iter_mut() {
                    o.target = to;
                    o.submitted = false;
                }
            }
            Action::Suspend { w, fence } => {
                let d = self.disk_of(w);
                let e = s.writers[w as usize].epoch?;
                s.writers[w as usize].suspended = true;
                let gate = s.disks[d].gate.map_or(e, |g| g.max(e));
                s.disks[d].gate = Some(gate);
                s.disks[d].suspension = Some(Suspension {
                    epoch: e,
                    fenced: fence,
                    finished: false,
                });
                if fence {
                    self.fence_below(&mut s, d, e + 1);
                }
            }
            Action::FinishSuspend { w, deadline } => {
                let d = self.disk_of(w);
                let sp = s.disks[d].suspension?;
                let busy = s
                    .reqs
                    .iter()
                    .any(|r| self.disk_of(r.w) == d && r.e <= sp.epoch);
                if busy && !deadline && !sp.fenced {
                    return None; // still draining
                }
                if busy || !sp.fenced {
                    self.fence_below(&mut s, d, sp.epoch + 1);
                }
                s.disks[d].suspension = Some(Suspension {
                    fenced: true,
                    finished: true,
                    ..sp
                });
            }
            Action::Publish { w } => {
                s.record = s.writers[w as usize].epoch;
            }
            Action::Resume { w } => {
                let wi = w as usize;
                let d = self.disk_of(w);
                let rec = s.record?;
                if self.mode == Mode::HostSide {
                    // Disk::open on this host: at the stored epoch.
                    s.disks[d] = DiskSt {
                        current: s.store,
                        floor: s.store,
                        ..DiskSt::default()
                    };
                }
                // Catch the store up (never needed here: writers are
                // admitted at the epochs the store gave them).
                while s.store < rec {
                    s.store += 1;
                }
                if s.store != rec {
                    // StaleRecord: the store moved on.
                    s.disks[d].current = s.store;
                    return None;
                }
                s.store += 1;
                let next = s.store;
                s.disks[d].current = next;
                self.fence_below(&mut s, d, next);
                self.admit_at(&mut s, wi, next);
            }
            Action::TakeOver { w } => {
                let wi = w as usize;
                let d = self.disk_of(w);
                if self.mode == Mode::HostSide {
                    s.disks[d] = DiskSt {
                        current: s.store,
                        floor: s.store,
                        ..DiskSt::default()
                    };
                }
                // stored_epoch(), then take_over(expected = stored).
                s.disks[d].current = s.disks[d].current.max(s.store);
                s.store += 1;
                let next = s.store;
                if next > self.max_epoch() {
                    return None;
                }
                s.disks[d].current = next;
                self.fence_below(&mut s, d, next);
                self.admit_at(&mut s, wi, next);
            }
            Action::FenceTimer => {
                let f = s.disks[0].fence_timer.take()?;
                self.fence_below(&mut s, 0, f);
            }
            Action::Crash { w } => {
                s.writers[w as usize].crashed = true;
                // The process is gone: what had not reached the storage
                // never will; what is there still lands; nobody answers.
                s.reqs.retain_mut(|r| {
                    if r.w != w {
                        return true;
                    }
                    if r.stage == Stage::AtStorage {
                        r.orphan = true;
                        true
                    } else {
                        false
                    }
                });
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut p = vec![
            Property::always(SETTLED, |_, s: &St| {
                (0..MAX_BLOCKS).all(|b| {
                    let at_storage = s
                        .reqs
                        .iter()
                        .any(|r| r.b as usize == b && r.stage == Stage::AtStorage);
                    at_storage || holds_allowed(s, b)
                })
            }),
            Property::always(READ, |_, s: &St| {
                (0..MAX_BLOCKS).all(|b| holds_allowed(s, b))
            }),
            Property::always(STALE_LANDING, |_, s: &St| !s.stale_landing),
            Property::always(EPOCH_ORDER, |_, s: &St| !s.epoch_order_broken),
            Property::always(OVERLAP, |_, s: &St| !s.overlap_at_storage),
            // Non-vacuity: the interesting paths are reachable.
            Property::sometimes("a newer writer's write is acknowledged", |_, s: &St| {
                s.newer_writer_acked
            }),
        ];
        match self.mode {
            Mode::Gateway | Mode::XenLocal => {
                p.push(Property::sometimes(
                    "an older epoch's write lands after the advance",
                    |_, s: &St| s.old_epoch_landed_after_advance,
                ));
                p.push(Property::sometimes(
                    "a newer write waits behind an older one",
                    |_, s: &St| s.queued_behind_older,
                ));
            }
            Mode::HostSide => p.push(Property::sometimes("a fenced write lands", |_, s: &St| {
                s.fenced_write_landed
            })),
            Mode::Unprotected => {}
        }
        if self.zombies {
            p.push(Property::sometimes(
                "a zombie's late request is refused",
                |_, s: &St| s.zombie_refused,
            ));
        }
        p
    }

    fn within_boundary(&self, s: &St) -> bool {
        s.store <= self.max_epoch()
    }
}

impl fmt::Display for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match self.stage {
            Stage::Queued => "queued",
            Stage::Ready => "ready",
            Stage::AtStorage => "at-storage",
            Stage::Done { ignored: true } => "ignored",
            Stage::Done { ignored: false } => "landed",
        };
        write!(
            f,
            "{}:W{}@e{}->b{} {stage}{}",
            writer_name(self.w),
            self.g,
            self.e,
            self.b,
            if self.fenced { " fenced" } else { "" }
        )
    }
}

fn writer_name(w: u8) -> &'static str {
    ["X(src)", "Y(dst)", "Z(3rd)"][w as usize]
}

fn describe(s: &St) -> String {
    let mut out = format!("store=e{} blocks=[", s.store);
    for b in 0..MAX_BLOCKS {
        let allowed: Vec<String> = (0..8)
            .filter(|k| s.allowed[b] & bit(*k) != 0)
            .map(|k| format!("W{k}"))
            .collect();
        let _ = write!(
            out,
            "{}b{b}=W{} (acked {})",
            if b > 0 { ", " } else { "" },
            s.content[b],
            allowed.join("|")
        );
    }
    out.push(']');
    if !s.reqs.is_empty() {
        let reqs: Vec<String> = s.reqs.iter().map(|r| r.to_string()).collect();
        let _ = write!(out, " in-flight=[{}]", reqs.join(", "));
    }
    out
}

fn describe_action(a: &Action) -> String {
    match *a {
        Action::GuestWrite { g, b } => format!("guest issues W{g} to block {b}"),
        Action::Consume { w, g } => format!("{} takes W{g} off its ring", writer_name(w)),
        Action::LateConsume { w, g } => {
            format!("{} (zombie) takes W{g} off its old ring", writer_name(w))
        }
        Action::Start { w, g } => format!("{} sends W{g} to the storage", writer_name(w)),
        Action::Land { w, g } => format!("storage: {}'s W{g} lands", writer_name(w)),
        Action::Complete { w, g } => format!("{} completes W{g}", writer_name(w)),
        Action::Register { w, e } => format!("{} registers at epoch {e}", writer_name(w)),
        Action::Migrate => "frontend migrates; unanswered writes re-queued".to_string(),
        Action::Suspend { w, fence } => format!(
            "{} suspends ({})",
            writer_name(w),
            if fence { "fence" } else { "drain" }
        ),
        Action::FinishSuspend { w, deadline } => format!(
            "{} finishes its suspend{}",
            writer_name(w),
            if deadline { " (deadline)" } else { "" }
        ),
        Action::Publish { w } => format!("{} publishes its record", writer_name(w)),
        Action::Resume { w } => format!("{} resumes from the record", writer_name(w)),
        Action::TakeOver { w } => format!("{} takes over", writer_name(w)),
        Action::FenceTimer => "fence timer fires".to_string(),
        Action::Crash { w } => format!("host of {} crashes", writer_name(w)),
    }
}

struct Outcome {
    states: usize,
    unique: usize,
    depth: usize,
    elapsed: Duration,
}

type Steps = Vec<(St, Option<Action>)>;

fn run(model: HandoffModel, protected: bool) -> Outcome {
    let label = format!("{model:?}");
    // stateright keeps the *last* path it saw violate an "always" property,
    // not the first: to print the shortest counterexamples the unprotected
    // run records, on one thread (strictly breadth-first), the first path
    // to each violation.
    let first: Arc<Mutex<BTreeMap<&'static str, Steps>>> = Arc::default();
    let builder = if protected {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(2);
        model.clone().checker().threads(threads)
    } else {
        let m = model.clone();
        let rec = Arc::clone(&first);
        model
            .clone()
            .checker()
            .threads(1)
            .visitor(move |path: Path<St, Action>| {
                let s = path.last_state();
                for p in m.properties() {
                    if p.expectation == Expectation::Always && !(p.condition)(&m, s) {
                        let mut first = rec.lock().unwrap();
                        if !first.contains_key(p.name) {
                            first.insert(p.name, path.clone().into_vec());
                        }
                    }
                }
            })
    };
    let t0 = Instant::now();
    let checker = builder.spawn_bfs().join();
    let elapsed = t0.elapsed();
    let outcome = Outcome {
        states: checker.state_count(),
        unique: checker.unique_state_count(),
        depth: checker.max_depth(),
        elapsed,
    };
    eprintln!(
        "{label}: {} states generated, {} unique, max depth {}, {:.2?}{}",
        outcome.states,
        outcome.unique,
        outcome.depth,
        outcome.elapsed,
        if checker.is_done() {
            ""
        } else {
            " (stopped early)"
        }
    );
    if protected {
        assert!(checker.is_done(), "the checker did not finish: {label}");
        checker.assert_properties();
        return outcome;
    }
    let first = first.lock().unwrap();
    for p in model.properties() {
        if p.expectation == Expectation::Always {
            let steps = first
                .get(p.name)
                .unwrap_or_else(|| panic!("unprotected: no counterexample to {:?}", p.name));
            eprintln!(
                "shortest counterexample to {:?} (unprotected), {} steps:",
                p.name,
                steps.len() - 1
            );
            for (i, (state, action)) in steps.iter().enumerate() {
                if let Some(a) = action {
                    let after = steps.get(i + 1).map_or(state, |(s, _)| s);
                    eprintln!(
                        "  {:>2}. {:<46} | {}",
                        i + 1,
                        describe_action(a),
                        describe(after)
                    );
                }
            }
        }
    }
    assert_seeds_003(&first[SETTLED]);
    assert_seeds_003(&first[STALE_LANDING]);
    outcome
}

/// The counterexample is seeds/003: X has A in flight when the VM
/// migrates; the frontend re-sends A to Y, where the storage ignores it
/// (X's A is still in flight) and it is acknowledged; the guest's A' from Y
/// is ignored and acknowledged the same way; X's A lands last.
fn assert_seeds_003(steps: &[(St, Option<Action>)]) {
    let actions: Vec<Action> = steps.iter().filter_map(|(_, a)| *a).collect();
    let pos = |want: &dyn Fn(&Action) -> bool| actions.iter().position(want);
    let x_takes_a = pos(&|a| matches!(a, Action::Consume { w: 0, .. })).expect("X takes A");
    let Action::Consume { g: a, .. } = actions[x_takes_a] else {
        unreachable!()
    };
    let x_sends_a = pos(&|x| *x == Action::Start { w: 0, g: a }).expect("X sends A");
    let migrate = pos(&|x| *x == Action::Migrate).expect("migration");
    let y_sends_a = pos(&|x| *x == Action::Start { w: 1, g: a }).expect("Y re-sends A");
    let y_acks_a = pos(&|x| *x == Action::Complete { w: 1, g: a }).expect("Y answers A");
    let a_prime = pos(&|x| matches!(x, Action::GuestWrite { g, .. } if *g > a)).expect("A'");
    let Action::GuestWrite { g: a2, .. } = actions[a_prime] else {
        unreachable!()
    };
    let y_sends_a2 = pos(&|x| *x == Action::Start { w: 1, g: a2 }).expect("Y sends A'");
    let y_acks_a2 = pos(&|x| *x == Action::Complete { w: 1, g: a2 }).expect("Y answers A'");
    let x_a_lands = pos(&|x| *x == Action::Land { w: 0, g: a }).expect("X's A lands");
    assert!(
        x_takes_a < migrate,
        "A is in flight on X when the VM migrates"
    );
    assert!(x_sends_a < y_sends_a && y_sends_a < y_acks_a && y_acks_a < a_prime);
    // A' reaches the storage while X's A is still there; X's A lands after
    // it (and after, or just before, the guest is told A' completed).
    assert!(a_prime < y_sends_a2 && y_sends_a2 < x_a_lands && y_sends_a2 < y_acks_a2);
    assert!(x_a_lands.max(y_acks_a2) == actions.len() - 1);
    // Both of Y's writes were completed at once and ignored by the storage.
    for at in [y_sends_a, y_sends_a2] {
        let after = &steps[at + 1].0;
        assert!(after
            .reqs
            .iter()
            .any(|r| r.w == 1 && r.stage == Stage::Done { ignored: true }));
    }
    let last = &steps.last().unwrap().0;
    let b = last.gblock[a as usize] as usize;
    assert_eq!(last.gblock[a2 as usize] as usize, b, "A' is to A's block");
    assert_eq!(last.content[b], a, "the block holds A");
    assert_eq!(last.allowed[b], bit(a2), "the guest was told A' completed");
}

fn model(mode: Mode, writers: usize, guest_writes: u8, zombies: bool) -> HandoffModel {
    HandoffModel {
        mutation: Mutation::None,
        mode,
        writers,
        blocks: 2,
        guest_writes,
        zombies,
    }
}

#[test]
fn unprotected_finds_seeds_003() {
    run(model(Mode::Unprotected, 2, 2, false), false);
}

#[test]
fn gateway_two_writers_exhaustive() {
    run(model(Mode::Gateway, 2, 3, true), true);
}

#[test]
fn xen_local_two_writers_exhaustive() {
    run(model(Mode::XenLocal, 2, 3, true), true);
}

#[test]
fn host_side_two_writers_exhaustive() {
    run(model(Mode::HostSide, 2, 3, true), true);
}

/// Each protection, taken out on its own, is caught: some "always"
/// property fails.
fn assert_caught(mode: Mode, mutation: Mutation) {
    let m = HandoffModel {
        mutation,
        ..model(mode, 2, 3, true)
    };
    let t0 = Instant::now();
    let checker = m
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let failed: Vec<&str> = m
        .properties()
        .iter()
        .filter(|p| p.expectation == Expectation::Always)
        .filter(|p| checker.discovery(p.name).is_some())
        .map(|p| p.name)
        .collect();
    eprintln!(
        "{mode:?} with {mutation:?}: caught after {} unique states, {:.2?}: {failed:?}",
        checker.unique_state_count(),
        t0.elapsed()
    );
    assert!(
        !failed.is_empty(),
        "{mode:?} with {mutation:?} was not caught"
    );
}

#[test]
fn each_protection_is_needed() {
    assert_caught(Mode::Gateway, Mutation::NoCrossWriterOrdering);
    assert_caught(Mode::Gateway, Mutation::FenceReleasesBlocks);
    assert_caught(Mode::Gateway, Mutation::NoFloorCheck);
    assert_caught(Mode::XenLocal, Mutation::NoCrossWriterOrdering);
    assert_caught(Mode::XenLocal, Mutation::FenceReleasesBlocks);
    assert_caught(Mode::XenLocal, Mutation::NoFloorCheck);
    assert_caught(Mode::HostSide, Mutation::PublishUnsettled);
}

/// Larger scopes, too slow for a debug `cargo test` on two cores:
/// `cargo test --release --test model_handoff -- --ignored --nocapture`.
#[test]
#[ignore]
fn three_writers_exhaustive() {
    // Ping-pong / failback: X -> Y -> Z, three epochs, three guest writes.
    run(model(Mode::Gateway, 3, 3, true), true);
    run(model(Mode::XenLocal, 3, 3, true), true);
    run(model(Mode::HostSide, 3, 3, true), true);
}

#[test]
#[ignore]
fn four_guest_writes_exhaustive() {
    run(model(Mode::Gateway, 2, 4, true), true);
    run(model(Mode::XenLocal, 2, 4, true), true);
    run(model(Mode::HostSide, 2, 4, true), true);
}
