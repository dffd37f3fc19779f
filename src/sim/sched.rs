//! The logical clock and the event queue, ordered by (time, sequence): two
//! events at the same time run in the order they were scheduled, so a run
//! depends on nothing but its seed.

use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// Logical time, in ticks (think of one tick as ~10 µs of storage time).
pub type Time = u64;

/// Something that happens at a point in logical time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// The storage model finishes I/O number `.0`.
    Storage(u64),
    /// The guest may issue its next request.
    GuestTick,
    /// The next step of the scenario's action number `.0`.
    Control(usize),
    /// The stale node of the stale-promote scenario writes again.
    RogueTick,
    /// The gateway's deadline for a suspend whose source connection died.
    OrphanDeadline,
    /// A deferred fence (number `.0`) of an older epoch's requests.
    Fence(usize),
    /// sanlock: the lease holder renews (when it can reach the storage);
    /// recovery (kill) and the watchdog's reset are checked too.
    LeaseTick,
}

/// Clock plus queue.
#[derive(Debug, Default)]
pub struct Sched {
    now: Time,
    seq: u64,
    heap: BinaryHeap<Reverse<(Time, u64, Event)>>,
}

/// The scheduler is shared with the storage model (which implements the
/// `Send + Sync` `BlockStorage` trait), hence the mutex; the simulation is
/// single-threaded and never holds it across a call into other actors.
pub type SharedSched = Arc<Mutex<Sched>>;

impl Sched {
    pub fn shared() -> SharedSched {
        Arc::new(Mutex::new(Sched::default()))
    }

    pub fn now(&self) -> Time {
        self.now
    }

    /// Schedule `ev` at `time` (never in the past).
    pub fn at(&mut self, time: Time, ev: Event) {
        let t = time.max(self.now);
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    /// Schedule `ev` `delay` ticks from now.
    pub fn after(&mut self, delay: Time, ev: Event) {
        let t = self.now.saturating_add(delay);
        self.at(t, ev);
    }

    /// The next event; advances the clock to its time.
    pub fn pop(&mut self) -> Option<(Time, Event)> {
        let Reverse((t, _, ev)) = self.heap.pop()?;
        self.now = t;
        Some((t, ev))
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
