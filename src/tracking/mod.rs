//! Per-sector in-flight tracking.
//!
//! Every request is admitted with its sector range and its writer's epoch and
//! holds a [`Ticket`] until the storage completed it. The [`Tracker`] keeps
//! three rules:
//!
//! 1. Two requests whose ranges overlap and of which at least one modifies
//!    the disk (write, trim, write-zeroes, barrier) are never in flight
//!    together: the later one waits, in arrival order, behind every earlier
//!    conflicting one. So reads see completed data only, and a stale write
//!    can never land after a newer one to the same sectors.
//! 2. A modifying request whose epoch is below the fence floor is refused
//!    ([`Refused::Stale`]) and never reaches the storage.
//! 3. Raising the floor ([`Tracker::fence`]) cancels the stale requests that
//!    are still waiting and marks the ones already at the storage as fenced;
//!    those keep their ranges until the storage completes them, so a newer
//!    writer's overlapping request is ordered after them.
//!
//! Sharding (issue #16). The tracked blocks are cut into stripes of
//! `2^stripe_shift` blocks; stripe `s` belongs to shard `s % shards`. Each
//! shard has its own lock, its own slab of request slots and its own hash
//! index of the active requests touching it; a request's *shard set* is a
//! bit mask. One queue of waiting requests, in arrival order, is shared by
//! all shards behind its own lock. Locks are taken in one global order:
//! queue first, then shards in ascending index, so nothing deadlocks.
//!
//! - Fast path (no conflict, nothing waiting on any of its shards): lock
//!   the request's shards in ascending order, check and insert, unlock. Two
//!   requests on different shards never share a lock; a request spanning
//!   several shards holds all of them at once (two-phase), so any two
//!   requests that share a shard are serialized in the same order on every
//!   shard they share.
//! - Slow path (a conflict, or a waiter on one of its shards): take the
//!   queue lock, then the shards. The single queue gives every waiter one
//!   global arrival position, so A (shards 1-2) and B (shards 2-3) are
//!   ordered the same on every shard; a later request is never admitted
//!   ahead of an earlier overlapping waiter because any overlap puts both
//!   on a common shard, whose waiting count then sends it to the slow path.
//! - Completion holds only the completed request's shards; when one of them
//!   has waiters it releases them and wakes what it freed under the queue
//!   lock plus the shards of the candidates.
//! - Fences, snapshots and drains lock every shard: they are rare.
//!
//! Memory is proportional to what is in flight: per shard a slab of request
//! slots and a hash index of the tracked blocks active requests hold (one
//! probe per block for a small request; requests spanning many blocks sit
//! in a short list), plus the queue of the waiting ones. Once these reached
//! their high-water mark the fast path does not allocate.

mod blocks;
#[cfg(any(test, feature = "reference-tracker"))]
#[doc(hidden)]
pub mod reference;
mod types;

use blocks::BlockIndex;

pub use types::{Epoch, OpKind, Request, SectorRange};

use parking_lot::lock_api::RawMutex as _;
use parking_lot::{Condvar, Mutex, RawMutex};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Proof of admission; hand it back to [`Tracker::complete`] (or
/// [`Tracker::cancel`]) exactly once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    slot: u32,
    gen: u32,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({}#{})", self.slot, self.gen)
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The writer's epoch is below the fence floor: a newer writer owns the disk.
    Stale { epoch: Epoch, floor: Epoch },
    /// The range is empty or overflows.
    BadRange,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Stale { epoch, floor } => {
                write!(
                    f,
                    "write from stale epoch {epoch} refused (disk fenced at {floor})"
                )
            }
            Refused::BadRange => write!(f, "empty or overflowing sector range"),
        }
    }
}

impl std::error::Error for Refused {}

/// Result of a successful admission.
#[derive(Debug)]
pub enum Admission {
    /// Nothing conflicts: submit to the storage now.
    Ready(Ticket),
    /// An earlier conflicting request is in flight; the ticket is handed out
    /// through [`Tracker::complete`]'s `woken` list when it may start.
    Queued(Ticket),
}

impl Admission {
    pub fn ticket(&self) -> Ticket {
        match self {
            Admission::Ready(t) | Admission::Queued(t) => *t,
        }
    }
}

/// How a finished request ended, from the tracker's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Reached the storage and completed; the writer was not fenced meanwhile.
    Completed,
    /// Reached the storage, but the writer was fenced while it was in flight:
    /// it must not be acknowledged as current data.
    Fenced,
    /// Never reached the storage: cancelled by a fence while waiting.
    Cancelled,
}

/// A request that left the tracker, with the caller's token.
#[derive(Debug)]
pub struct Finished<T> {
    pub ticket: Ticket,
    pub request: Request,
    pub outcome: Outcome,
    pub token: T,
}

/// A request that has just been allowed to start (it was queued).
#[derive(Debug)]
pub struct Woken {
    pub ticket: Ticket,
    pub request: Request,
}

/// Misuse of a ticket (double completion, a ticket of another tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownTicket(pub Ticket);

impl fmt::Display for UnknownTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown or already released {:?}", self.0)
    }
}

impl std::error::Error for UnknownTicket {}

/// What a fence did.
#[derive(Debug, Default)]
pub struct FenceReport<T> {
    /// The floor before the fence.
    pub previous_floor: Epoch,
    /// Stale requests that were waiting and are now cancelled (never reached storage).
    pub cancelled: Vec<Finished<T>>,
    /// Stale requests already at the storage, now marked fenced.
    pub fenced: Vec<(Ticket, Request)>,
}

/// A snapshot of one request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub ticket: Ticket,
    pub request: Request,
    /// At the storage (true) or waiting behind a conflict (false).
    pub active: bool,
    pub fenced: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SlotState {
    Free,
    Queued,
    Active,
}

struct Slot<T> {
    gen: u32,
    state: SlotState,
    fenced: bool,
    req: Request,
    /// The request's shard set (0 for a flush, which holds no range).
    mask: u64,
    token: Option<T>,
}

/// One shard: the requests whose lowest shard it is (their "home"), and
/// the index of every active request that touches one of its stripes.
struct Shard<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    index: BlockIndex,
    /// Queued requests whose shard set includes this shard: while it is not
    /// zero, admissions and completions here take the slow path.
    waiting: u32,
    /// Slots in use (queued or active) homed here.
    live: usize,
}

/// A shard behind its own raw lock, on its own cache lines so that two
/// threads on two shards do not share one.
#[repr(align(128))]
struct ShardCell<T> {
    lock: RawMutex,
    data: UnsafeCell<Shard<T>>,
}

/// A waiting request, in the global arrival-ordered queue.
struct Waiter {
    ticket: Ticket,
    req: Request,
    mask: u64,
}

/// The in-flight tracker. `T` is the caller's per-request token (a request
/// id, a completion callback...), handed back when the request finishes.
///
/// ```
/// use blkshim::tracking::{Admission, OpKind, Request, SectorRange, Tracker};
///
/// let t: Tracker<&str> = Tracker::new(5);
/// let a = t.admit(Request::new(OpKind::Write, SectorRange::new(0, 8), 5), "A").unwrap();
/// // An overlapping write waits behind A.
/// let b = t.admit(Request::new(OpKind::Write, SectorRange::new(4, 8), 5), "B").unwrap();
/// assert!(matches!(a, Admission::Ready(_)));
/// assert!(matches!(b, Admission::Queued(_)));
/// let mut woken = Vec::new();
/// let done = t.complete(a.ticket(), &mut woken).unwrap();
/// assert_eq!(done.token, "A");
/// assert_eq!(woken[0].ticket, b.ticket()); // B may start now
/// // Epoch 6 fences epoch 5: its next write is refused.
/// t.fence(6);
/// assert!(t.admit(Request::new(OpKind::Write, SectorRange::new(100, 8), 5), "C").is_err());
/// ```
pub struct Tracker<T> {
    shards: Box<[ShardCell<T>]>,
    /// Waiting requests of every shard, in arrival order. Lock it before
    /// any shard.
    queue: Mutex<VecDeque<Waiter>>,
    /// Written only with every shard locked, so a reader holding any shard
    /// lock sees a floor no fence is changing.
    floor: AtomicU64,
    /// Ranges are tracked in blocks of `2^grain_shift` sectors.
    grain_shift: u32,
    /// Stripes are `2^stripe_shift` tracked blocks.
    stripe_shift: u32,
    /// Spreads flushes (which hold no range) over the shards' slabs.
    next_flush_home: AtomicUsize,
    idle_lock: Mutex<()>,
    idle: Condvar,
    /// Threads in `wait_until_none`: completions skip the notify when zero.
    /// Read by releases under their shard locks, which the waiter's check
    /// takes after incrementing it.
    idle_waiters: AtomicUsize,
}

// SAFETY: a shard's data is only reached through `Locked`, which holds that
// shard's raw lock (a mutex, as `Mutex<Shard<T>>` would be: Sync for T:
// Send); the rest of the tracker is Sync on its own.
unsafe impl<T: Send> Sync for Tracker<T> {}

/// Initial slots per shard (the slabs and indexes grow on demand).
const SHARD_CAPACITY: usize = 32;
/// 1024 tracked blocks a stripe: 4 MiB with 4 KiB blocks, so requests
/// rarely span two stripes, while neighbouring regions land on different
/// shards.
const DEFAULT_STRIPE_BLOCKS: u64 = 1024;
const DEFAULT_SHARDS: usize = 16;
/// A shard set is a `u64` bit mask.
const MAX_SHARDS: usize = 64;
/// A ticket's slot is `home shard << LOCAL_BITS | slot in that shard`.
const LOCAL_BITS: u32 = 26;
const LOCAL_MASK: u32 = (1 << LOCAL_BITS) - 1;

/// Shards held by one operation; unlocks them when dropped.
struct Locked<'a, T> {
    shards: &'a [ShardCell<T>],
    mask: u64,
}

impl<'a, T> Locked<'a, T> {
    /// Lock the shards in `more`, which must all be above the ones held
    /// (the global ascending order).
    fn lock_more(&mut self, more: u64) {
        debug_assert!(self.mask == 0 || more.trailing_zeros() > 63 - self.mask.leading_zeros());
        for i in bits(more) {
            self.shards[i].lock.lock();
            self.mask |= 1 << i;
        }
    }

    #[inline]
    fn shard(&mut self, i: usize) -> &mut Shard<T> {
        assert!(self.mask & (1 << i) != 0, "shard {i} not locked");
        // SAFETY: we hold shard i's lock (checked above) and `&mut self`
        // hands out one shard at a time.
        unsafe { &mut *self.shards[i].data.get() }
    }
}

impl<T> Drop for Locked<'_, T> {
    fn drop(&mut self) {
        for i in bits(self.mask) {
            // SAFETY: this guard locked shard i.
            unsafe { self.shards[i].lock.unlock() };
        }
    }
}

/// The set bits of `mask`, lowest first.
#[inline]
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

impl<T> Tracker<T> {
    /// A tracker whose fence floor is `floor` (the disk's current epoch),
    /// tracking single sectors.
    pub fn new(floor: Epoch) -> Self {
        Self::with_grain(floor, 1)
    }

    /// A tracker that orders requests by blocks of `grain_sectors` sectors
    /// (rounded up to a power of two): two writes that touch the same
    /// storage block are never in flight together even when their sectors
    /// do not overlap — a storage that works in 4 KiB blocks would
    /// otherwise still see seeds/003's overlap.
    pub fn with_grain(floor: Epoch, grain_sectors: u64) -> Self {
        Self::with_shards(floor, grain_sectors, DEFAULT_STRIPE_BLOCKS, DEFAULT_SHARDS)
    }

    /// [`Tracker::with_grain`] with an explicit layout: stripes of
    /// `stripe_blocks` tracked blocks spread over `shards` shards (1 to 64),
    /// both rounded up to a power of two (a mask, not a division, per request). Small stripes make ordinary requests
    /// span several shards, which the tests use.
    pub fn with_shards(
        floor: Epoch,
        grain_sectors: u64,
        stripe_blocks: u64,
        shards: usize,
    ) -> Self {
        let grain_shift = grain_sectors.max(1).next_power_of_two().trailing_zeros();
        let stripe_shift = stripe_blocks.max(1).next_power_of_two().trailing_zeros();
        let n = shards.clamp(1, MAX_SHARDS).next_power_of_two();
        let shards = (0..n)
            .map(|_| ShardCell {
                lock: RawMutex::INIT,
                data: UnsafeCell::new(Shard {
                    slots: Vec::with_capacity(SHARD_CAPACITY),
                    free: Vec::with_capacity(SHARD_CAPACITY),
                    index: BlockIndex::with_capacity(SHARD_CAPACITY),
                    waiting: 0,
                    live: 0,
                }),
            })
            .collect();
        Tracker {
            shards,
            queue: Mutex::new(VecDeque::with_capacity(16)),
            floor: AtomicU64::new(floor),
            grain_shift,
            stripe_shift,
            next_flush_home: AtomicUsize::new(0),
            idle_lock: Mutex::new(()),
            idle: Condvar::new(),
            idle_waiters: AtomicUsize::new(0),
        }
    }

    /// The fence floor: modifying requests below it are refused.
    pub fn floor(&self) -> Epoch {
        self.floor.load(Ordering::Acquire)
    }

    fn all_shards(&self) -> u64 {
        u64::MAX >> (64 - self.shards.len())
    }

    fn lock(&self, mask: u64) -> Locked<'_, T> {
        let mut l = Locked {
            shards: &self.shards,
            mask: 0,
        };
        l.lock_more(mask);
        l
    }

    /// The shards whose stripes a ranged request's blocks touch.
    fn shard_mask(&self, first: u64, last: u64) -> u64 {
        let n = self.shards.len() as u64;
        let s0 = first >> self.stripe_shift;
        let s1 = (last - 1) >> self.stripe_shift;
        if s1 - s0 >= n - 1 {
            return self.all_shards();
        }
        (s0..=s1).fold(0, |m, s| m | 1 << (s & (n - 1)))
    }

    /// Tracked blocks `[first, last)` a ranged request holds.
    #[inline]
    fn req_blocks(&self, req: &Request) -> (u64, u64) {
        let (start, end) = req.span(self.grain_shift);
        blocks(start, end, self.grain_shift)
    }

    fn stale(&self, req: &Request) -> Option<Refused> {
        let floor = self.floor.load(Ordering::Acquire);
        (req.kind.modifies() && req.epoch < floor).then_some(Refused::Stale {
            epoch: req.epoch,
            floor,
        })
    }

    /// Split a ticket into its home shard and slot there.
    fn decode(&self, t: Ticket) -> Result<(usize, u32), UnknownTicket> {
        let home = (t.slot >> LOCAL_BITS) as usize;
        if home < self.shards.len() {
            Ok((home, t.slot & LOCAL_MASK))
        } else {
            Err(UnknownTicket(t))
        }
    }

    /// Admit a request. Stale modifying requests are refused (the token
    /// comes back with the reason); conflicting ones are queued in arrival
    /// order.
    pub fn admit(&self, req: Request, token: T) -> Result<Admission, (Refused, T)> {
        if req.range.end().is_none() || (req.range.count == 0 && req.kind.needs_range()) {
            return Err((Refused::BadRange, token));
        }
        if !req.kind.has_range() {
            // A flush never waits and is never stale: any shard may hold it.
            let home = self.next_flush_home.fetch_add(1, Ordering::Relaxed) % self.shards.len();
            let mut l = self.lock(1 << home);
            let ticket = alloc(l.shard(home), home, req, 0, token, SlotState::Active);
            return Ok(Admission::Ready(ticket));
        }
        let (first, last) = self.req_blocks(&req);
        let is_mod = req.kind.modifies();
        let mask = self.shard_mask(first, last);
        let home = mask.trailing_zeros() as usize;
        {
            let mut l = self.lock(mask);
            if let Some(r) = self.stale(&req) {
                return Err((r, token));
            }
            let free = bits(mask).all(|i| {
                let s = l.shard(i);
                s.waiting == 0 && !s.index.conflicts(first, last, is_mod)
            });
            if free {
                let ticket = alloc(l.shard(home), home, req, mask, token, SlotState::Active);
                activate(&mut l, ticket, &req, mask, first, last);
                return Ok(Admission::Ready(ticket));
            }
        }
        // Slow path: the queue's lock first, then the shards again (the
        // state may have moved meanwhile; decide afresh).
        let mut q = self.queue.lock();
        let mut l = self.lock(mask);
        if let Some(r) = self.stale(&req) {
            return Err((r, token));
        }
        let g = self.grain_shift;
        let (start, end) = req.span(g);
        let conflict = bits(mask).any(|i| l.shard(i).index.conflicts(first, last, is_mod))
            || q.iter().any(|w| conflicts(&w.req, g, start, end, is_mod));
        if conflict {
            let ticket = alloc(l.shard(home), home, req, mask, token, SlotState::Queued);
            for i in bits(mask) {
                l.shard(i).waiting += 1;
            }
            q.push_back(Waiter { ticket, req, mask });
            Ok(Admission::Queued(ticket))
        } else {
            let ticket = alloc(l.shard(home), home, req, mask, token, SlotState::Active);
            activate(&mut l, ticket, &req, mask, first, last);
            Ok(Admission::Ready(ticket))
        }
    }

    /// The storage finished the request behind `ticket`. Requests that may
    /// start now are appended to `woken` in arrival order (reuse the vector
    /// to keep this path allocation-free).
    pub fn complete(
        &self,
        ticket: Ticket,
        woken: &mut Vec<Woken>,
    ) -> Result<Finished<T>, UnknownTicket> {
        let (home, local) = self.decode(ticket)?;
        let mut l = self.lock(1 << home);
        let mask = l
            .shard(home)
            .check(local, ticket, Some(SlotState::Active))?;
        // The home shard is the lowest of the set: the rest come after it.
        l.lock_more(mask & !(1 << home));
        let req = l.shard(home).slots[local as usize].req;
        self.deactivate(&mut l, ticket, &req, mask);
        let finished = release(l.shard(home), local, ticket);
        let waiting = bits(mask).any(|i| l.shard(i).waiting > 0);
        let notify = self.idle_waiters.load(Ordering::Relaxed) > 0;
        drop(l);
        if waiting {
            // Only waiters that conflicted with this request can be freed
            // by it, and every such waiter counts on one of these shards.
            self.promote(Some(&finished.request), woken);
        }
        self.notify_idle(notify);
        Ok(finished)
    }

    /// Withdraw a request that never reached the storage (queued, or ready
    /// but not yet submitted). Its outcome is [`Outcome::Cancelled`].
    ///
    /// The tracker cannot tell "ready" from "submitted": only the owner of
    /// the ticket may cancel it, and only before handing it to the storage.
    /// A queued ticket another thread's completion has woken is that
    /// thread's to start; cancelling it then would free its block while its
    /// I/O is at the storage. (The model in tests/model_tracker_loom.rs
    /// found the race; nothing in blkshim cancels outside that rule.)
    pub fn cancel(
        &self,
        ticket: Ticket,
        woken: &mut Vec<Woken>,
    ) -> Result<Finished<T>, UnknownTicket> {
        let (home, local) = self.decode(ticket)?;
        let mut q = self.queue.lock();
        let mut l = self.lock(1 << home);
        let mask = l.shard(home).check(local, ticket, None)?;
        l.lock_more(mask & !(1 << home));
        let slot = &l.shard(home).slots[local as usize];
        let (state, req) = (slot.state, slot.req);
        match state {
            SlotState::Active => self.deactivate(&mut l, ticket, &req, mask),
            SlotState::Queued => {
                q.retain(|w| w.ticket != ticket);
                for i in bits(mask) {
                    l.shard(i).waiting -= 1;
                }
            }
            SlotState::Free => return Err(UnknownTicket(ticket)),
        }
        let mut finished = release(l.shard(home), local, ticket);
        finished.outcome = Outcome::Cancelled;
        let notify = self.idle_waiters.load(Ordering::Relaxed) > 0;
        drop(l);
        self.promote_queue(&mut q, Some(&finished.request), woken);
        drop(q);
        self.notify_idle(notify);
        Ok(finished)
    }

    /// Raise the floor to `floor` (it never goes down): from now on
    /// modifying requests below it are refused. Waiting stale requests are cancelled and returned;
    /// stale requests at the storage are marked fenced (their completion
    /// reports [`Outcome::Fenced`]) and keep holding their ranges.
    /// Requests freed by the cancellations are appended to `woken`.
    pub fn fence_with(&self, floor: Epoch, woken: &mut Vec<Woken>) -> FenceReport<T> {
        let mut q = self.queue.lock();
        let mut l = self.lock(self.all_shards());
        let previous_floor = self.floor.load(Ordering::Relaxed);
        self.floor
            .store(previous_floor.max(floor), Ordering::Release);
        let mut report = FenceReport {
            previous_floor,
            cancelled: Vec::new(),
            fenced: Vec::new(),
        };
        let stale = |r: &Request| r.kind.modifies() && r.epoch < floor;
        let mut kept = VecDeque::with_capacity(q.len());
        while let Some(w) = q.pop_front() {
            if stale(&w.req) {
                for i in bits(w.mask) {
                    l.shard(i).waiting -= 1;
                }
                let (home, local) = (
                    (w.ticket.slot >> LOCAL_BITS) as usize,
                    w.ticket.slot & LOCAL_MASK,
                );
                let mut f = release(l.shard(home), local, w.ticket);
                f.outcome = Outcome::Cancelled;
                report.cancelled.push(f);
            } else {
                kept.push_back(w);
            }
        }
        *q = kept;
        for home in 0..self.shards.len() {
            for (s, slot) in l.shard(home).slots.iter_mut().enumerate() {
                if slot.state == SlotState::Active && stale(&slot.req) {
                    slot.fenced = true;
                    report.fenced.push((
                        Ticket {
                            slot: encode(home, s),
                            gen: slot.gen,
                        },
                        slot.req,
                    ));
                }
            }
        }
        self.promote_locked(&mut q, &mut l, None, woken);
        let notify = self.idle_waiters.load(Ordering::Relaxed) > 0;
        drop(l);
        drop(q);
        self.notify_idle(notify);
        report
    }

    /// [`Tracker::fence_with`] for callers that track no queued requests of
    /// their own; requests it wakes are dropped from the report, so use it
    /// only when nothing else is waiting (tests, examples).
    pub fn fence(&self, floor: Epoch) -> FenceReport<T> {
        let mut woken = Vec::new();
        self.fence_with(floor, &mut woken)
    }

    /// Raise the floor without touching what is in flight: new stale
    /// modifying requests are refused, admitted ones may still finish (the
    /// drain half of a hand-off). Returns the previous floor.
    pub fn raise_floor(&self, floor: Epoch) -> Epoch {
        // Every shard locked: no admission is between its floor check and
        // its insertion while the floor moves.
        let _l = self.lock(self.all_shards());
        let prev = self.floor.load(Ordering::Relaxed);
        self.floor.store(prev.max(floor), Ordering::Release);
        prev
    }

    /// Run `f` on the token of a request in flight (for instance to take
    /// out the I/O it parked while queued). `None` for an unknown ticket.
    pub fn with_token<R>(&self, ticket: Ticket, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let (home, local) = self.decode(ticket).ok()?;
        let mut l = self.lock(1 << home);
        let shard = l.shard(home);
        shard.check(local, ticket, None).ok()?;
        shard.slots[local as usize].token.as_mut().map(f)
    }

    /// Number of requests in flight (waiting or at the storage).
    pub fn len(&self) -> usize {
        let mut l = self.lock(self.all_shards());
        (0..self.shards.len()).map(|i| l.shard(i).live).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests in flight that match `pred`, in no particular order.
    pub fn snapshot(&self, mut pred: impl FnMut(&Request) -> bool) -> Vec<InFlight> {
        let mut l = self.lock(self.all_shards());
        let mut out = Vec::new();
        for home in 0..self.shards.len() {
            for (i, s) in l.shard(home).slots.iter().enumerate() {
                if s.state != SlotState::Free && pred(&s.req) {
                    out.push(InFlight {
                        ticket: Ticket {
                            slot: encode(home, i),
                            gen: s.gen,
                        },
                        request: s.req,
                        active: s.state == SlotState::Active,
                        fenced: s.fenced,
                    });
                }
            }
        }
        out
    }

    fn any_live(&self, pred: &mut impl FnMut(&Request) -> bool) -> bool {
        let mut l = self.lock(self.all_shards());
        (0..self.shards.len()).any(|i| {
            l.shard(i)
                .slots
                .iter()
                .any(|s| s.state != SlotState::Free && pred(&s.req))
        })
    }

    /// Wait until no request matching `pred` is in flight, or `deadline`
    /// passes. Returns true when none is left.
    pub fn wait_until_none(
        &self,
        mut pred: impl FnMut(&Request) -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        // Announce the waiter before looking: a release reads the count
        // under the shard lock this check takes next, so it either sees the
        // waiter or is seen by it.
        self.idle_waiters.fetch_add(1, Ordering::Relaxed);
        let mut g = self.idle_lock.lock();
        let none = loop {
            if !self.any_live(&mut pred) {
                break true;
            }
            match deadline {
                Some(d) => {
                    if self.idle.wait_until(&mut g, d).timed_out() {
                        break !self.any_live(&mut pred);
                    }
                }
                None => self.idle.wait(&mut g),
            }
        };
        drop(g);
        self.idle_waiters.fetch_sub(1, Ordering::Relaxed);
        none
    }

    /// Wake `wait_until_none` callers after a release, when the release
    /// saw one (`notify`, read while it still held its shards: no fence on
    /// the fast path). Taking `idle_lock` before notifying means a waiter
    /// is either still before its check (and will see the release) or
    /// already waiting.
    fn notify_idle(&self, notify: bool) {
        if notify {
            drop(self.idle_lock.lock());
            self.idle.notify_all();
        }
    }

    fn deactivate(&self, l: &mut Locked<'_, T>, ticket: Ticket, req: &Request, mask: u64) {
        if mask == 0 {
            return; // a flush holds no range
        }
        let (first, last) = self.req_blocks(req);
        for i in bits(mask) {
            l.shard(i)
                .index
                .remove(first, last, req.kind.modifies(), ticket.slot);
        }
    }

    /// Wake what a release may have freed: take the queue lock, then the
    /// shards of the candidates.
    fn promote(&self, freed: Option<&Request>, woken: &mut Vec<Woken>) {
        let mut q = self.queue.lock();
        self.promote_queue(&mut q, freed, woken);
    }

    /// With the queue locked and no shard held: lock the candidates' shards
    /// and promote.
    fn promote_queue(
        &self,
        q: &mut VecDeque<Waiter>,
        freed: Option<&Request>,
        woken: &mut Vec<Woken>,
    ) {
        let g = self.grain_shift;
        let need = q
            .iter()
            .filter(|w| {
                freed.is_none_or(|f| {
                    let (start, end) = w.req.span(g);
                    conflicts(f, g, start, end, w.req.kind.modifies())
                })
            })
            .fold(0, |m, w| m | w.mask);
        if need != 0 {
            let mut l = self.lock(need);
            self.promote_locked(q, &mut l, freed, woken);
        }
    }

    /// Start every waiting request that no active and no earlier waiting
    /// request conflicts with. With `freed`, only waiters that conflicted
    /// with that (just released) request are candidates: the others are
    /// still blocked by whatever blocked them. `l` holds every candidate's
    /// shards.
    fn promote_locked(
        &self,
        q: &mut VecDeque<Waiter>,
        l: &mut Locked<'_, T>,
        freed: Option<&Request>,
        woken: &mut Vec<Woken>,
    ) {
        let g = self.grain_shift;
        let mut i = 0;
        while i < q.len() {
            let (req, mask) = (q[i].req, q[i].mask);
            let (start, end) = req.span(g);
            let is_mod = req.kind.modifies();
            if let Some(f) = freed {
                if !conflicts(f, g, start, end, is_mod) {
                    i += 1;
                    continue;
                }
            }
            let (first, last) = blocks(start, end, g);
            let blocked = bits(mask).any(|s| l.shard(s).index.conflicts(first, last, is_mod))
                || q.iter()
                    .take(i)
                    .any(|e| conflicts(&e.req, g, start, end, is_mod));
            if blocked {
                i += 1;
                continue;
            }
            let Some(w) = q.remove(i) else { break };
            for s in bits(mask) {
                l.shard(s).waiting -= 1;
            }
            let home = (w.ticket.slot >> LOCAL_BITS) as usize;
            l.shard(home).slots[(w.ticket.slot & LOCAL_MASK) as usize].state = SlotState::Active;
            activate(l, w.ticket, &req, mask, first, last);
            woken.push(Woken {
                ticket: w.ticket,
                request: req,
            });
        }
    }
}

#[inline]
fn encode(home: usize, local: usize) -> u32 {
    ((home as u32) << LOCAL_BITS) | local as u32
}

/// Take a slot in the home shard.
fn alloc<T>(
    sh: &mut Shard<T>,
    home: usize,
    req: Request,
    mask: u64,
    token: T,
    state: SlotState,
) -> Ticket {
    sh.live += 1;
    let local = if let Some(s) = sh.free.pop() {
        let slot = &mut sh.slots[s as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.state = state;
        slot.fenced = false;
        slot.req = req;
        slot.mask = mask;
        slot.token = Some(token);
        s
    } else {
        debug_assert!(sh.slots.len() < LOCAL_MASK as usize);
        sh.slots.push(Slot {
            gen: 0,
            state,
            fenced: false,
            req,
            mask,
            token: Some(token),
        });
        (sh.slots.len() - 1) as u32
    };
    Ticket {
        slot: encode(home, local as usize),
        gen: sh.slots[local as usize].gen,
    }
}

/// Insert an active request's blocks into the index of each of its shards
/// (the whole range in each: a shard's index may list blocks of other
/// stripes, which only costs a probe, never a wrong answer).
fn activate<T>(
    l: &mut Locked<'_, T>,
    ticket: Ticket,
    req: &Request,
    mask: u64,
    first: u64,
    last: u64,
) {
    for i in bits(mask) {
        l.shard(i)
            .index
            .insert(first, last, req.kind.modifies(), ticket.slot);
    }
}

/// Free the slot and hand back what it held.
fn release<T>(sh: &mut Shard<T>, local: u32, ticket: Ticket) -> Finished<T> {
    sh.live -= 1;
    let s = &mut sh.slots[local as usize];
    s.state = SlotState::Free;
    let outcome = if s.fenced {
        Outcome::Fenced
    } else {
        Outcome::Completed
    };
    let token = s.token.take();
    sh.free.push(local);
    Finished {
        ticket,
        request: s.req,
        outcome,
        // A live slot always holds its token (set by `alloc`, taken here).
        token: token.expect("live slot holds a token"),
    }
}

impl<T> Shard<T> {
    /// The slot's shard set if `t` names a live slot (in state `want`).
    fn check(&self, local: u32, t: Ticket, want: Option<SlotState>) -> Result<u64, UnknownTicket> {
        match self.slots.get(local as usize) {
            Some(s)
                if s.gen == t.gen
                    && s.state != SlotState::Free
                    && want.is_none_or(|w| w == s.state) =>
            {
                Ok(s.mask)
            }
            _ => Err(UnknownTicket(t)),
        }
    }
}

/// The tracked blocks `[first, end)` of a grain-aligned sector span.
#[inline]
fn blocks(start: u64, end: u64, grain_shift: u32) -> (u64, u64) {
    (start >> grain_shift, ((end - 1) >> grain_shift) + 1)
}

#[inline]
fn conflicts(other: &Request, grain_shift: u32, start: u64, end: u64, is_mod: bool) -> bool {
    if !other.kind.has_range() || !(is_mod || other.kind.modifies()) {
        return false;
    }
    let (s, e) = other.span(grain_shift);
    s < end && start < e
}

#[cfg(test)]
mod tests;
