//! The single-lock tracker, unchanged from before sharding: one mutex, one
//! block index, one arrival-ordered queue. Test-only (and behind the
//! `reference-tracker` feature for the bench): the randomized test in
//! `tests.rs` checks the sharded tracker admits and wakes exactly as this one
//! does.
#![allow(dead_code)]

use super::blocks::BlockIndex;
use super::{
    Admission, Epoch, FenceReport, Finished, InFlight, Outcome, Refused, Request, Ticket,
    UnknownTicket, Woken,
};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::time::Instant;

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
    token: Option<T>,
}

struct Inner<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    /// Which tracked blocks active requests hold.
    index: BlockIndex,
    /// All active requests, flushes included.
    active_count: usize,
    /// Waiting requests, in arrival order.
    queue: VecDeque<u32>,
    floor: Epoch,
    /// Ranges are tracked in blocks of `2^grain_shift` sectors.
    grain_shift: u32,
}

/// The single-lock tracker blkshim used before sharding (issue #16), kept
/// as the reference the sharded [`super::Tracker`] is compared against.
pub struct RefTracker<T> {
    inner: Mutex<Inner<T>>,
    idle: Condvar,
}

const INITIAL_CAPACITY: usize = 256;

impl<T> RefTracker<T> {
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
        let grain_shift = grain_sectors.max(1).next_power_of_two().trailing_zeros();
        RefTracker {
            inner: Mutex::new(Inner {
                slots: Vec::with_capacity(INITIAL_CAPACITY),
                free: Vec::with_capacity(INITIAL_CAPACITY),
                index: BlockIndex::with_capacity(INITIAL_CAPACITY),
                active_count: 0,
                queue: VecDeque::with_capacity(16),
                floor,
                grain_shift,
            }),
            idle: Condvar::new(),
        }
    }

    /// The fence floor: modifying requests below it are refused.
    pub fn floor(&self) -> Epoch {
        self.inner.lock().floor
    }

    /// Admit a request. Stale modifying requests are refused (the token
    /// comes back with the reason); conflicting ones are queued in arrival
    /// order.
    pub fn admit(&self, req: Request, token: T) -> Result<Admission, (Refused, T)> {
        if req.range.end().is_none() || (req.range.count == 0 && req.kind.needs_range()) {
            return Err((Refused::BadRange, token));
        }
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if req.kind.modifies() && req.epoch < inner.floor {
            let floor = inner.floor;
            return Err((
                Refused::Stale {
                    epoch: req.epoch,
                    floor,
                },
                token,
            ));
        }
        let g = inner.grain_shift;
        let (start, end) = req.span(g);
        let is_mod = req.kind.modifies();
        let conflict = req.kind.has_range()
            && (inner.active_conflict(start, end, is_mod)
                || inner.queue.iter().any(|&s| {
                    let q = &inner.slots[s as usize].req;
                    conflicts(q, g, start, end, is_mod)
                }));
        let slot = inner.alloc(req, token);
        let ticket = Ticket {
            slot,
            gen: inner.slots[slot as usize].gen,
        };
        if conflict {
            inner.slots[slot as usize].state = SlotState::Queued;
            inner.queue.push_back(slot);
            Ok(Admission::Queued(ticket))
        } else {
            inner.activate(slot);
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
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let slot = inner.check(ticket, SlotState::Active)?;
        inner.deactivate(slot);
        let finished = inner.release(ticket);
        if !inner.queue.is_empty() {
            // Only waiters that conflicted with this request can be freed by it.
            inner.promote(woken, Some(&finished.request));
        }
        drop(g);
        self.idle.notify_all();
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
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let slot = inner.check_live(ticket)?;
        match inner.slots[slot as usize].state {
            SlotState::Active => inner.deactivate(slot),
            SlotState::Queued => inner.queue.retain(|&s| s != slot),
            SlotState::Free => return Err(UnknownTicket(ticket)),
        }
        let mut finished = inner.release(ticket);
        finished.outcome = Outcome::Cancelled;
        if !inner.queue.is_empty() {
            inner.promote(woken, Some(&finished.request));
        }
        drop(g);
        self.idle.notify_all();
        Ok(finished)
    }

    /// Raise the floor to `floor` (it never goes down): from now on
    /// modifying requests below it are refused. Waiting stale requests are cancelled and returned;
    /// stale requests at the storage are marked fenced (their completion
    /// reports [`Outcome::Fenced`]) and keep holding their ranges.
    /// Requests freed by the cancellations are appended to `woken`.
    pub fn fence_with(&self, floor: Epoch, woken: &mut Vec<Woken>) -> FenceReport<T> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let previous_floor = inner.floor;
        let mut report = FenceReport {
            previous_floor,
            cancelled: Vec::new(),
            fenced: Vec::new(),
        };
        inner.floor = inner.floor.max(floor);
        let stale = |r: &Request| r.kind.modifies() && r.epoch < floor;
        let mut kept = VecDeque::with_capacity(inner.queue.len());
        while let Some(s) = inner.queue.pop_front() {
            if stale(&inner.slots[s as usize].req) {
                let ticket = Ticket {
                    slot: s,
                    gen: inner.slots[s as usize].gen,
                };
                let mut f = inner.release(ticket);
                f.outcome = Outcome::Cancelled;
                report.cancelled.push(f);
            } else {
                kept.push_back(s);
            }
        }
        inner.queue = kept;
        for (s, slot) in inner.slots.iter_mut().enumerate() {
            let s = s as u32;
            if slot.state == SlotState::Active && stale(&slot.req) {
                slot.fenced = true;
                report.fenced.push((
                    Ticket {
                        slot: s,
                        gen: slot.gen,
                    },
                    slot.req,
                ));
            }
        }
        if !inner.queue.is_empty() {
            inner.promote(woken, None);
        }
        drop(g);
        self.idle.notify_all();
        report
    }

    /// [`RefTracker::fence_with`] for callers that track no queued requests of
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
        let mut g = self.inner.lock();
        let prev = g.floor;
        g.floor = prev.max(floor);
        prev
    }

    /// Run `f` on the token of a request in flight (for instance to take
    /// out the I/O it parked while queued). `None` for an unknown ticket.
    pub fn with_token<R>(&self, ticket: Ticket, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let mut g = self.inner.lock();
        let slot = g.check_live(ticket).ok()?;
        g.slots[slot as usize].token.as_mut().map(f)
    }

    /// Number of requests in flight (waiting or at the storage).
    pub fn len(&self) -> usize {
        let g = self.inner.lock();
        g.active_count + g.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests in flight that match `pred`, in no particular order.
    pub fn snapshot(&self, mut pred: impl FnMut(&Request) -> bool) -> Vec<InFlight> {
        let g = self.inner.lock();
        g.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != SlotState::Free && pred(&s.req))
            .map(|(i, s)| InFlight {
                ticket: Ticket {
                    slot: i as u32,
                    gen: s.gen,
                },
                request: s.req,
                active: s.state == SlotState::Active,
                fenced: s.fenced,
            })
            .collect()
    }

    /// Wait until no request matching `pred` is in flight, or `deadline`
    /// passes. Returns true when none is left.
    pub fn wait_until_none(
        &self,
        mut pred: impl FnMut(&Request) -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        let mut g = self.inner.lock();
        loop {
            let any = g
                .slots
                .iter()
                .any(|s| s.state != SlotState::Free && pred(&s.req));
            if !any {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.idle.wait_until(&mut g, d).timed_out() {
                        return !g
                            .slots
                            .iter()
                            .any(|s| s.state != SlotState::Free && pred(&s.req));
                    }
                }
                None => self.idle.wait(&mut g),
            }
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

impl<T> Inner<T> {
    /// Does any active request conflict with sectors `[start, end)`?
    #[inline]
    fn active_conflict(&self, start: u64, end: u64, is_mod: bool) -> bool {
        let (first, last) = blocks(start, end, self.grain_shift);
        self.index.conflicts(first, last, is_mod)
    }

    fn alloc(&mut self, req: Request, token: T) -> u32 {
        if let Some(s) = self.free.pop() {
            let slot = &mut self.slots[s as usize];
            slot.gen = slot.gen.wrapping_add(1);
            slot.fenced = false;
            slot.req = req;
            slot.token = Some(token);
            s
        } else {
            self.slots.push(Slot {
                gen: 0,
                state: SlotState::Free,
                fenced: false,
                req,
                token: Some(token),
            });
            (self.slots.len() - 1) as u32
        }
    }

    fn activate(&mut self, slot: u32) {
        let req = self.slots[slot as usize].req;
        self.slots[slot as usize].state = SlotState::Active;
        self.active_count += 1;
        if req.kind.has_range() {
            // A flush holds no range and takes no place in the index.
            let (start, end) = req.span(self.grain_shift);
            let (first, last) = blocks(start, end, self.grain_shift);
            self.index.insert(first, last, req.kind.modifies(), slot);
        }
    }

    fn deactivate(&mut self, slot: u32) {
        let req = self.slots[slot as usize].req;
        self.active_count -= 1;
        if req.kind.has_range() {
            let (start, end) = req.span(self.grain_shift);
            let (first, last) = blocks(start, end, self.grain_shift);
            self.index.remove(first, last, req.kind.modifies(), slot);
        }
    }

    fn check_live(&self, t: Ticket) -> Result<u32, UnknownTicket> {
        match self.slots.get(t.slot as usize) {
            Some(s) if s.gen == t.gen && s.state != SlotState::Free => Ok(t.slot),
            _ => Err(UnknownTicket(t)),
        }
    }

    fn check(&self, t: Ticket, want: SlotState) -> Result<u32, UnknownTicket> {
        let slot = self.check_live(t)?;
        if self.slots[slot as usize].state == want {
            Ok(slot)
        } else {
            Err(UnknownTicket(t))
        }
    }

    /// Free the slot and hand back what it held.
    fn release(&mut self, ticket: Ticket) -> Finished<T> {
        let s = &mut self.slots[ticket.slot as usize];
        s.state = SlotState::Free;
        let outcome = if s.fenced {
            Outcome::Fenced
        } else {
            Outcome::Completed
        };
        let token = s.token.take().expect("live slot holds a token");
        self.free.push(ticket.slot);
        Finished {
            ticket,
            request: s.req,
            outcome,
            token,
        }
    }

    /// Start every waiting request that no active and no earlier waiting
    /// request conflicts with. With `freed`, only waiters that conflicted
    /// with that (just released) request are candidates: the others are
    /// still blocked by whatever blocked them.
    fn promote(&mut self, woken: &mut Vec<Woken>, freed: Option<&Request>) {
        let mut i = 0;
        while i < self.queue.len() {
            let s = self.queue[i];
            let req = self.slots[s as usize].req;
            let (start, end) = req.span(self.grain_shift);
            let is_mod = req.kind.modifies();
            if let Some(f) = freed {
                if !conflicts(f, self.grain_shift, start, end, is_mod) {
                    i += 1;
                    continue;
                }
            }
            let blocked = req.kind.has_range()
                && (self.active_conflict(start, end, is_mod)
                    || self.queue.iter().take(i).any(|&e| {
                        conflicts(
                            &self.slots[e as usize].req,
                            self.grain_shift,
                            start,
                            end,
                            is_mod,
                        )
                    }));
            if blocked {
                i += 1;
            } else {
                self.queue.remove(i);
                self.activate(s);
                woken.push(Woken {
                    ticket: Ticket {
                        slot: s,
                        gen: self.slots[s as usize].gen,
                    },
                    request: req,
                });
            }
        }
    }
}
