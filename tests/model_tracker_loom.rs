//! The tracker's concurrent paths (admit / complete / fence from several
//! threads, waking queued requests, waiting for a drain) checked with
//! `loom`, which runs every interleaving of the threads' lock, condvar and
//! atomic operations (up to a preemption bound).
//!
//! `blkshim::tracking::Tracker` locks a `parking_lot::Mutex` and waits on a
//! `parking_lot::Condvar`, which loom cannot see into without swapping them
//! for `loom::sync` types under `#[cfg(loom)]` in `src/tracking`; `shuttle`
//! has the same need. So this file carries a **model** of the tracker's
//! queue-and-wake protocol written against loom's primitives, mirroring
//! `src/tracking/mod.rs` function by function (`admit`, `complete`,
//! `fence_with`, `raise_floor`, `promote`, `wait_until_none`; the notify after
//! every release, outside the lock) and the way `Disk` drives it
//! (`Disk::submit` starts a `Ready` request outside the lock;
//! `Disk::finish` completes, then starts what was woken; `fence_below`
//! starts what the fence's cancellations woke). Simplifications: every
//! request is a write of one tracked block (the block index, wide list and
//! grain are not modelled: `blocks.rs` has its own brute-force test); slots
//! are never reused (no generations); the storage completes a request on
//! the thread that started it.
//!
//! What is checked in every interleaving:
//! - two requests on one block are never at the storage together;
//! - on each block, requests reach the storage in admission order, and
//!   never one of an older epoch after one of a newer epoch;
//! - no request below the floor reaches the storage unless it was already
//!   admitted (active) when the floor was raised;
//! - every admitted request is started or cancelled exactly once (no lost
//!   wake-up: loom also fails on a thread blocked for ever);
//! - `wait_until_none` returns only when no matching request is left.

use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use std::collections::VecDeque;

const BLOCKS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SlotState {
    Free,
    Queued,
    Active,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    fenced: bool,
    block: usize,
    epoch: u64,
    /// The order of admission (for the ordering check).
    seq: u64,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Slot>,
    /// Active requests per block (the block index).
    active: [u32; BLOCKS],
    /// Waiting requests, in arrival order.
    queue: VecDeque<usize>,
    floor: u64,
    /// The highest floor a fence (not a plain raise) set: for the checks.
    fenced_floor: u64,
    next_seq: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Ready(usize),
    Queued(usize),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Completed,
    Fenced,
}

struct Tracker {
    inner: Mutex<Inner>,
    idle: Condvar,
}

impl Inner {
    fn activate(&mut self, s: usize) {
        self.slots[s].state = SlotState::Active;
        self.active[self.slots[s].block] += 1;
    }

    fn deactivate(&mut self, s: usize) {
        self.active[self.slots[s].block] -= 1;
    }

    /// `Inner::promote`: with `freed`, only waiters on that block are
    /// candidates; a waiter starts when no active and no earlier waiting
    /// request holds its block.
    fn promote(&mut self, woken: &mut Vec<usize>, freed: Option<usize>) {
        let mut i = 0;
        while i < self.queue.len() {
            let s = self.queue[i];
            let b = self.slots[s].block;
            if freed.is_some_and(|f| f != b) {
                i += 1;
                continue;
            }
            let blocked =
                self.active[b] > 0 || self.queue.iter().take(i).any(|&e| self.slots[e].block == b);
            if blocked {
                i += 1;
            } else {
                self.queue.remove(i);
                self.activate(s);
                woken.push(s);
            }
        }
    }
}

impl Tracker {
    fn new(floor: u64) -> Self {
        Tracker {
            inner: Mutex::new(Inner {
                floor,
                ..Inner::default()
            }),
            idle: Condvar::new(),
        }
    }

    /// `Tracker::admit`: refuse below the floor; queue behind an active or
    /// an earlier waiting request on the block; else ready.
    fn admit(&self, block: usize, epoch: u64) -> Result<Admission, u64> {
        let mut g = self.inner.lock().unwrap();
        if epoch < g.floor {
            return Err(g.floor);
        }
        let conflict = g.active[block] > 0 || g.queue.iter().any(|&s| g.slots[s].block == block);
        let seq = g.next_seq;
        g.next_seq += 1;
        g.slots.push(Slot {
            state: SlotState::Free,
            fenced: false,
            block,
            epoch,
            seq,
        });
        let s = g.slots.len() - 1;
        if conflict {
            g.slots[s].state = SlotState::Queued;
            g.queue.push_back(s);
            Ok(Admission::Queued(s))
        } else {
            g.activate(s);
            Ok(Admission::Ready(s))
        }
    }

    /// `Tracker::complete`: release, wake the waiters on the block, notify
    /// after dropping the lock.
    fn complete(&self, s: usize, woken: &mut Vec<usize>) -> Outcome {
        let mut g = self.inner.lock().unwrap();
        assert_eq!(g.slots[s].state, SlotState::Active, "completed twice");
        g.deactivate(s);
        g.slots[s].state = SlotState::Free;
        let outcome = if g.slots[s].fenced {
            Outcome::Fenced
        } else {
            Outcome::Completed
        };
        if !g.queue.is_empty() {
            let b = g.slots[s].block;
            g.promote(woken, Some(b));
        }
        drop(g);
        self.idle.notify_all();
        outcome
    }

    /// `Tracker::fence_with`: raise the floor, cancel stale waiters, mark
    /// stale active requests fenced (they keep their block), wake what the
    /// cancellations freed, notify. Returns the cancelled slots.
    fn fence_with(&self, floor: u64, woken: &mut Vec<usize>) -> Vec<usize> {
        let mut g = self.inner.lock().unwrap();
        g.floor = g.floor.max(floor);
        g.fenced_floor = g.fenced_floor.max(floor);
        let mut cancelled = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(s) = g.queue.pop_front() {
            if g.slots[s].epoch < floor {
                g.slots[s].state = SlotState::Free;
                cancelled.push(s);
            } else {
                kept.push_back(s);
            }
        }
        g.queue = kept;
        for slot in g.slots.iter_mut() {
            if slot.state == SlotState::Active && slot.epoch < floor {
                slot.fenced = true;
            }
        }
        if !g.queue.is_empty() {
            g.promote(woken, None);
        }
        drop(g);
        self.idle.notify_all();
        cancelled
    }

    /// `Tracker::raise_floor`: refuse new stale writes, leave the ones in
    /// flight alone (the drain half of `Disk::advance_to`).
    fn raise_floor(&self, floor: u64) {
        let mut g = self.inner.lock().unwrap();
        g.floor = g.floor.max(floor);
    }

    /// `Tracker::wait_until_none` without a deadline.
    fn wait_until_none(&self, pred: impl Fn(&Slot) -> bool) {
        let mut g = self.inner.lock().unwrap();
        loop {
            if !g
                .slots
                .iter()
                .any(|s| s.state != SlotState::Free && pred(s))
            {
                return;
            }
            g = self.idle.wait(g).unwrap();
        }
    }

    fn slot(&self, s: usize) -> Slot {
        self.inner.lock().unwrap().slots[s]
    }

    fn slot_and_fenced_floor(&self, s: usize) -> (Slot, u64) {
        let g = self.inner.lock().unwrap();
        (g.slots[s], g.fenced_floor)
    }
}

/// The storage, with the checks.
struct Storage {
    /// Requests at the storage, per block.
    at: [AtomicUsize; BLOCKS],
    /// Per block: the newest epoch and the latest admission order started.
    max_epoch: [AtomicU64; BLOCKS],
    last_seq: [AtomicU64; BLOCKS],
    /// Started (and completed) requests, and cancelled ones.
    started: AtomicUsize,
    cancelled: AtomicUsize,
    fenced: AtomicUsize,
}

impl Storage {
    fn new() -> Self {
        Storage {
            at: [AtomicUsize::new(0), AtomicUsize::new(0)],
            max_epoch: [AtomicU64::new(0), AtomicU64::new(0)],
            last_seq: [AtomicU64::new(0), AtomicU64::new(0)],
            started: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            fenced: AtomicUsize::new(0),
        }
    }
}

/// `Disk::start` + the storage + `Disk::finish`: run `s` at the storage,
/// complete it, and start whatever that woke, on this thread.
fn run(t: &Tracker, st: &Storage, s: usize) {
    let mut work = vec![s];
    while let Some(s) = work.pop() {
        let slot = t.slot(s);
        assert_eq!(slot.state, SlotState::Active, "started while not active");
        let b = slot.block;
        let before = st.at[b].fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "two writes to block {b} at the storage");
        let newest = st.max_epoch[b].fetch_max(slot.epoch, Ordering::SeqCst);
        assert!(
            slot.epoch >= newest,
            "epoch {} reached block {b} after epoch {newest}",
            slot.epoch
        );
        let prev_seq = st.last_seq[b].fetch_max(slot.seq + 1, Ordering::SeqCst);
        assert!(prev_seq <= slot.seq, "block {b}: out of admission order");
        // Below a fence's floor only if it was active when the fence came
        // (then the fence marked it, under the same lock): a fence cancels
        // every stale waiter and the floor refuses later ones. (Below a
        // floor raised by `advance_to` alone, admitted requests drain.)
        let (now, fenced_floor) = t.slot_and_fenced_floor(s);
        assert!(
            now.epoch >= fenced_floor || now.fenced,
            "stale request reached the storage after a fence, unfenced"
        );
        st.at[b].fetch_sub(1, Ordering::SeqCst);
        st.started.fetch_add(1, Ordering::SeqCst);
        let mut woken = Vec::new();
        if t.complete(s, &mut woken) == Outcome::Fenced {
            st.fenced.fetch_add(1, Ordering::SeqCst);
        }
        work.extend(woken);
    }
}

/// A writer thread: `Disk::submit` of writes (block, epoch).
fn writer(t: &Tracker, st: &Storage, writes: &[(usize, u64)]) -> usize {
    let mut admitted = 0;
    for &(block, epoch) in writes {
        match t.admit(block, epoch) {
            Ok(Admission::Ready(s)) => {
                admitted += 1;
                run(t, st, s);
            }
            Ok(Admission::Queued(_)) => admitted += 1,
            Err(_) => {}
        }
    }
    admitted
}

/// `Disk::fence_below(floor)`: fence, then start what the cancellations
/// woke (outside the lock, like `Disk`).
fn fence_below(t: &Tracker, st: &Storage, floor: u64) {
    let mut woken = Vec::new();
    let cancelled = t.fence_with(floor, &mut woken);
    st.cancelled.fetch_add(cancelled.len(), Ordering::SeqCst);
    for s in woken {
        run(t, st, s);
    }
}

const PREEMPTIONS: usize = 5;

/// Every interleaving with at most `PREEMPTIONS` preemptions
/// (`MODEL_LOOM_PREEMPTIONS` overrides it), with a time cap.
fn check(name: &str, f: impl Fn() + Sync + Send + 'static) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut b = loom::model::Builder::new();
    b.preemption_bound = std::env::var("MODEL_LOOM_PREEMPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .or(Some(PREEMPTIONS));
    b.max_duration = Some(std::time::Duration::from_secs(50));
    let t0 = std::time::Instant::now();
    let before = RUNS.load(std::sync::atomic::Ordering::SeqCst);
    b.check(move || {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f()
    });
    eprintln!(
        "{name}: {} interleavings, {:.2?}",
        RUNS.load(std::sync::atomic::Ordering::SeqCst) - before,
        t0.elapsed()
    );
}

/// seeds/003 at the tracker: the source's A (epoch 1) and the
/// destination's A' (epoch 2) to one block, from two threads (the
/// destination raising the floor first, as its first write does through
/// `advance_to`), while a third fences epoch 1 and waits for it to drain.
#[test]
fn handoff_fence_and_drain() {
    check("handoff_fence_and_drain", || {
        let t = Arc::new(Tracker::new(1));
        let st = Arc::new(Storage::new());
        let src = {
            let (t, st) = (t.clone(), st.clone());
            loom::thread::spawn(move || writer(&t, &st, &[(0, 1)]))
        };
        let dst = {
            let (t, st) = (t.clone(), st.clone());
            loom::thread::spawn(move || {
                // Disk::submit -> check_writer -> advance_to: the floor
                // goes up before the destination's first write is admitted.
                t.raise_floor(2);
                writer(&t, &st, &[(0, 2)])
            })
        };
        fence_below(&t, &st, 2);
        t.wait_until_none(|s| s.epoch < 2);
        // Nothing of epoch 1 is left once the wait returns.
        assert!(!t
            .inner
            .lock()
            .unwrap()
            .slots
            .iter()
            .any(|s| s.state != SlotState::Free && s.epoch < 2));
        let admitted = src.join().unwrap() + dst.join().unwrap();
        t.wait_until_none(|_| true);
        assert_eq!(
            st.started.load(Ordering::SeqCst) + st.cancelled.load(Ordering::SeqCst),
            admitted,
            "an admitted request was lost or run twice"
        );
        // The destination's write always lands, after the source's if that one did.
        assert_eq!(st.max_epoch[0].load(Ordering::SeqCst), 2);
    });
}

/// Several requests on two blocks from two writers: queued requests are
/// woken by completions on other threads, in order, none lost.
#[test]
fn queue_and_wake_two_blocks() {
    check("queue_and_wake_two_blocks", || {
        let t = Arc::new(Tracker::new(1));
        let st = Arc::new(Storage::new());
        let a = {
            let (t, st) = (t.clone(), st.clone());
            loom::thread::spawn(move || writer(&t, &st, &[(0, 1), (1, 1)]))
        };
        let admitted_b = writer(&t, &st, &[(1, 1), (0, 1)]);
        let admitted = a.join().unwrap() + admitted_b;
        t.wait_until_none(|_| true);
        assert_eq!(admitted, 4);
        assert_eq!(st.started.load(Ordering::SeqCst), 4, "a wake-up was lost");
    });
}

/// A fence races the completion that would wake a stale waiter: A, of
/// epoch 1, is at the storage on another thread; B (epoch 1) and C
/// (epoch 2) wait behind it. B is either woken and run before the fence or
/// cancelled by it; C is woken exactly once, by whichever of the
/// completion and the fence frees the block last, and never overtakes A.
#[test]
fn fence_races_completion_wake() {
    check("fence_races_completion_wake", || {
        let t = Arc::new(Tracker::new(1));
        let st = Arc::new(Storage::new());
        let Ok(Admission::Ready(a)) = t.admit(0, 1) else {
            panic!("A is ready")
        };
        assert!(matches!(t.admit(0, 1), Ok(Admission::Queued(_))));
        assert!(matches!(t.admit(0, 2), Ok(Admission::Queued(_))));
        let runner = {
            let (t, st) = (t.clone(), st.clone());
            loom::thread::spawn(move || run(&t, &st, a))
        };
        fence_below(&t, &st, 2);
        runner.join().unwrap();
        t.wait_until_none(|_| true);
        let ran = st.started.load(Ordering::SeqCst);
        let cancelled = st.cancelled.load(Ordering::SeqCst);
        assert_eq!(ran + cancelled, 3, "each request ran or was cancelled once");
        assert_eq!(st.max_epoch[0].load(Ordering::SeqCst), 2, "C ran");
    });
}
