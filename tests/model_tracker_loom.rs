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
//! The top-level model is the single-lock tracker (now
//! `src/tracking/reference.rs`); `mod sharded` at the end models the
//! sharded one (`src/tracking/mod.rs`, issue #16) with requests spanning
//! shards.
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
/// (`MODEL_LOOM_PREEMPTIONS` overrides it), with a time cap: 50 s in
/// release builds (exhaustive for all but the hand-off across shards), 20 s
/// in debug builds, where CI's plain `cargo test` runs it next to the rest
/// (`MODEL_LOOM_SECONDS` overrides both).
fn check(name: &str, f: impl Fn() + Sync + Send + 'static) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut b = loom::model::Builder::new();
    b.preemption_bound = std::env::var("MODEL_LOOM_PREEMPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .or(Some(PREEMPTIONS));
    let cap = std::env::var("MODEL_LOOM_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 20 } else { 50 });
    b.max_duration = Some(std::time::Duration::from_secs(cap));
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

/// The sharded tracker (`src/tracking/mod.rs` since issue #16) on loom's
/// primitives: one lock per shard plus the shared arrival-ordered queue,
/// with the real lock order (queue, then shards ascending), the real fast
/// path (only the request's shards, when none has a waiter), slow path,
/// completion (home shard, then the others, then a wake under the queue
/// lock) and the waiter count `wait_until_none` announces, which releases
/// read under their shard locks.
///
/// Three blocks in stripes of one block over three shards (block `b` is
/// shard `b`), so a two-block request spans two shards: A = blocks 0-1
/// (shards 0, 1) and B = blocks 1-2 (shards 1, 2) is the case of two
/// requests sharing one shard each with another. Checked in every
/// interleaving, as for the single-lock model: no two requests on a block
/// at the storage together, each block sees requests in admission order
/// (the order of their sequence numbers, taken while holding all their
/// shards) and never an older epoch after a newer one, nothing stale
/// reaches the storage unfenced after a fence, no wake-up lost.
mod sharded {
    use super::{check, Outcome, SlotState};
    use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::collections::VecDeque;

    const SHARDS: usize = 3;
    const BLOCKS: usize = 3;

    /// (home shard, slot there)
    type Id = (usize, usize);

    #[derive(Clone, Copy, Debug)]
    struct Slot {
        state: SlotState,
        fenced: bool,
        first: usize,
        end: usize,
        epoch: u64,
        seq: u64,
        mask: u8,
    }

    #[derive(Default)]
    struct Shard {
        /// Requests homed here (their lowest shard).
        slots: Vec<Slot>,
        /// Active requests per block, for requests touching this shard
        /// (whole ranges, as the real index).
        active: [u32; BLOCKS],
        waiting: u32,
    }

    #[derive(Clone, Copy)]
    struct Waiter {
        id: Id,
        first: usize,
        end: usize,
        mask: u8,
    }

    enum Admission {
        Ready(Id),
        Queued,
    }

    struct Tracker {
        shards: Vec<Mutex<Shard>>,
        queue: Mutex<VecDeque<Waiter>>,
        floor: AtomicU64,
        /// The highest floor a fence set (for the checks); written with
        /// every shard locked.
        fenced_floor: AtomicU64,
        next_seq: AtomicU64,
        idle_lock: Mutex<()>,
        idle: Condvar,
        idle_waiters: AtomicUsize,
    }

    struct Locked<'a> {
        g: Vec<Option<MutexGuard<'a, Shard>>>,
    }

    impl Locked<'_> {
        fn sh(&mut self, i: usize) -> &mut Shard {
            self.g[i].as_mut().expect("shard locked")
        }
    }

    fn bits(m: u8) -> impl Iterator<Item = usize> {
        (0..SHARDS).filter(move |i| m & (1 << i) != 0)
    }

    fn mask(first: usize, end: usize) -> u8 {
        (first..end).fold(0, |m, b| m | 1 << (b % SHARDS))
    }

    fn overlap(a: (usize, usize), b: (usize, usize)) -> bool {
        a.0 < b.1 && b.0 < a.1
    }

    impl Tracker {
        fn new(floor: u64) -> Self {
            Tracker {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                queue: Mutex::new(VecDeque::new()),
                floor: AtomicU64::new(floor),
                fenced_floor: AtomicU64::new(0),
                next_seq: AtomicU64::new(0),
                idle_lock: Mutex::new(()),
                idle: Condvar::new(),
                idle_waiters: AtomicUsize::new(0),
            }
        }

        fn lock(&self, m: u8) -> Locked<'_> {
            let mut l = Locked {
                g: (0..SHARDS).map(|_| None).collect(),
            };
            self.lock_more(&mut l, m);
            l
        }

        /// Ascending order only: `m` is above every shard held.
        fn lock_more<'a>(&'a self, l: &mut Locked<'a>, m: u8) {
            for i in bits(m) {
                assert!(l.g[i + 1..].iter().all(|g| g.is_none()), "lock order");
                l.g[i] = Some(self.shards[i].lock().unwrap());
            }
        }

        fn alloc(
            l: &mut Locked<'_>,
            first: usize,
            end: usize,
            epoch: u64,
            seq: u64,
            state: SlotState,
        ) -> Id {
            let m = mask(first, end);
            let home = m.trailing_zeros() as usize;
            let sh = l.sh(home);
            sh.slots.push(Slot {
                state,
                fenced: false,
                first,
                end,
                epoch,
                seq,
                mask: m,
            });
            (home, sh.slots.len() - 1)
        }

        fn activate(l: &mut Locked<'_>, first: usize, end: usize) {
            for i in bits(mask(first, end)) {
                for b in first..end {
                    l.sh(i).active[b] += 1;
                }
            }
        }

        fn busy(l: &mut Locked<'_>, first: usize, end: usize) -> bool {
            bits(mask(first, end)).any(|i| (first..end).any(|b| l.sh(i).active[b] > 0))
        }

        /// `Tracker::admit`.
        fn admit(&self, first: usize, end: usize, epoch: u64) -> Result<Admission, u64> {
            let m = mask(first, end);
            {
                let mut l = self.lock(m);
                let floor = self.floor.load(Ordering::Acquire);
                if epoch < floor {
                    return Err(floor);
                }
                if bits(m).all(|i| l.sh(i).waiting == 0) && !Self::busy(&mut l, first, end) {
                    let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
                    let id = Self::alloc(&mut l, first, end, epoch, seq, SlotState::Active);
                    Self::activate(&mut l, first, end);
                    return Ok(Admission::Ready(id));
                }
            }
            let mut q = self.queue.lock().unwrap();
            let mut l = self.lock(m);
            let floor = self.floor.load(Ordering::Acquire);
            if epoch < floor {
                return Err(floor);
            }
            let conflict = Self::busy(&mut l, first, end)
                || q.iter().any(|w| overlap((w.first, w.end), (first, end)));
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
            if conflict {
                let id = Self::alloc(&mut l, first, end, epoch, seq, SlotState::Queued);
                for i in bits(m) {
                    l.sh(i).waiting += 1;
                }
                q.push_back(Waiter {
                    id,
                    first,
                    end,
                    mask: m,
                });
                Ok(Admission::Queued)
            } else {
                let id = Self::alloc(&mut l, first, end, epoch, seq, SlotState::Active);
                Self::activate(&mut l, first, end);
                Ok(Admission::Ready(id))
            }
        }

        /// `Tracker::complete`.
        fn complete(&self, (home, s): Id, woken: &mut Vec<Id>) -> Outcome {
            let mut l = self.lock(1 << home);
            let slot = l.sh(home).slots[s];
            assert_eq!(slot.state, SlotState::Active, "completed twice");
            self.lock_more(&mut l, slot.mask & !(1 << home));
            for i in bits(slot.mask) {
                for b in slot.first..slot.end {
                    l.sh(i).active[b] -= 1;
                }
            }
            l.sh(home).slots[s].state = SlotState::Free;
            let waiting = bits(slot.mask).any(|i| l.sh(i).waiting > 0);
            let notify = self.idle_waiters.load(Ordering::Relaxed) > 0;
            drop(l);
            if waiting {
                let mut q = self.queue.lock().unwrap();
                let need = q
                    .iter()
                    .filter(|w| overlap((w.first, w.end), (slot.first, slot.end)))
                    .fold(0, |m, w| m | w.mask);
                if need != 0 {
                    let mut l = self.lock(need);
                    Self::promote(&mut q, &mut l, Some((slot.first, slot.end)), woken);
                }
            }
            self.notify_idle(notify);
            if slot.fenced {
                Outcome::Fenced
            } else {
                Outcome::Completed
            }
        }

        /// `Tracker::promote_locked`: `l` holds every candidate's shards.
        fn promote(
            q: &mut VecDeque<Waiter>,
            l: &mut Locked<'_>,
            freed: Option<(usize, usize)>,
            woken: &mut Vec<Id>,
        ) {
            let mut i = 0;
            while i < q.len() {
                let w = q[i];
                let r = (w.first, w.end);
                if freed.is_some_and(|f| !overlap(f, r)) {
                    i += 1;
                    continue;
                }
                let blocked = Self::busy(l, w.first, w.end)
                    || q.iter().take(i).any(|e| overlap((e.first, e.end), r));
                if blocked {
                    i += 1;
                    continue;
                }
                q.remove(i);
                for s in bits(w.mask) {
                    l.sh(s).waiting -= 1;
                }
                l.sh(w.id.0).slots[w.id.1].state = SlotState::Active;
                Self::activate(l, w.first, w.end);
                woken.push(w.id);
            }
        }

        /// `Tracker::fence_with`: the queue and every shard.
        fn fence_with(&self, floor: u64, woken: &mut Vec<Id>) -> usize {
            let mut q = self.queue.lock().unwrap();
            let mut l = self.lock((1 << SHARDS) - 1);
            self.floor.fetch_max(floor, Ordering::Release);
            self.fenced_floor.fetch_max(floor, Ordering::Release);
            let mut cancelled = 0;
            let mut kept = VecDeque::new();
            while let Some(w) = q.pop_front() {
                if l.sh(w.id.0).slots[w.id.1].epoch < floor {
                    for s in bits(w.mask) {
                        l.sh(s).waiting -= 1;
                    }
                    l.sh(w.id.0).slots[w.id.1].state = SlotState::Free;
                    cancelled += 1;
                } else {
                    kept.push_back(w);
                }
            }
            *q = kept;
            for i in 0..SHARDS {
                for slot in l.sh(i).slots.iter_mut() {
                    if slot.state == SlotState::Active && slot.epoch < floor {
                        slot.fenced = true;
                    }
                }
            }
            Self::promote(&mut q, &mut l, None, woken);
            let notify = self.idle_waiters.load(Ordering::Relaxed) > 0;
            drop(l);
            drop(q);
            self.notify_idle(notify);
            cancelled
        }

        fn any_live(&self, pred: &impl Fn(&Slot) -> bool) -> bool {
            let mut l = self.lock((1 << SHARDS) - 1);
            (0..SHARDS).any(|i| {
                l.sh(i)
                    .slots
                    .iter()
                    .any(|s| s.state != SlotState::Free && pred(s))
            })
        }

        /// `Tracker::wait_until_none` without a deadline.
        fn wait_until_none(&self, pred: impl Fn(&Slot) -> bool) {
            self.idle_waiters.fetch_add(1, Ordering::Relaxed);
            let mut g = self.idle_lock.lock().unwrap();
            while self.any_live(&pred) {
                g = self.idle.wait(g).unwrap();
            }
            drop(g);
            self.idle_waiters.fetch_sub(1, Ordering::Relaxed);
        }

        /// `Tracker::notify_idle`: `notify` was read under the shard locks.
        fn notify_idle(&self, notify: bool) {
            if notify {
                drop(self.idle_lock.lock().unwrap());
                self.idle.notify_all();
            }
        }

        fn slot_and_fenced_floor(&self, (home, s): Id) -> (Slot, u64) {
            let g = self.shards[home].lock().unwrap();
            (g.slots[s], self.fenced_floor.load(Ordering::Acquire))
        }
    }

    struct Storage {
        at: [AtomicUsize; BLOCKS],
        max_epoch: [AtomicU64; BLOCKS],
        last_seq: [AtomicU64; BLOCKS],
        started: AtomicUsize,
        cancelled: AtomicUsize,
    }

    impl Storage {
        fn new() -> Self {
            Storage {
                at: std::array::from_fn(|_| AtomicUsize::new(0)),
                max_epoch: std::array::from_fn(|_| AtomicU64::new(0)),
                last_seq: std::array::from_fn(|_| AtomicU64::new(0)),
                started: AtomicUsize::new(0),
                cancelled: AtomicUsize::new(0),
            }
        }
    }

    /// Start `id` at the storage, complete it, run what it woke.
    fn run(t: &Tracker, st: &Storage, id: Id) {
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let (slot, fenced_floor) = t.slot_and_fenced_floor(id);
            assert_eq!(slot.state, SlotState::Active, "started while not active");
            assert!(
                slot.epoch >= fenced_floor || slot.fenced,
                "stale request reached the storage after a fence, unfenced"
            );
            for b in slot.first..slot.end {
                assert_eq!(
                    st.at[b].fetch_add(1, Ordering::SeqCst),
                    0,
                    "two at block {b}"
                );
                let newest = st.max_epoch[b].fetch_max(slot.epoch, Ordering::SeqCst);
                assert!(slot.epoch >= newest, "older epoch after newer at block {b}");
                let prev = st.last_seq[b].fetch_max(slot.seq + 1, Ordering::SeqCst);
                assert!(prev <= slot.seq, "block {b}: out of admission order");
            }
            for b in slot.first..slot.end {
                st.at[b].fetch_sub(1, Ordering::SeqCst);
            }
            st.started.fetch_add(1, Ordering::SeqCst);
            let mut woken = Vec::new();
            t.complete(id, &mut woken);
            work.extend(woken);
        }
    }

    /// Writes `(first, end, epoch)`; returns how many were admitted.
    fn writer(t: &Tracker, st: &Storage, writes: &[(usize, usize, u64)]) -> usize {
        let mut admitted = 0;
        for &(first, end, epoch) in writes {
            match t.admit(first, end, epoch) {
                Ok(Admission::Ready(id)) => {
                    admitted += 1;
                    run(t, st, id);
                }
                Ok(Admission::Queued) => admitted += 1,
                Err(_) => {}
            }
        }
        admitted
    }

    /// A (blocks 0-1) and B (blocks 1-2) from two threads while the main
    /// thread writes block 2 then block 0 and waits for the drain: the
    /// requests sharing a shard meet in one order on every shard, none is
    /// lost, and the drain returns only when all are done.
    #[test]
    fn sharded_overlapping_spans() {
        check("sharded_overlapping_spans", || {
            let t = Arc::new(Tracker::new(1));
            let st = Arc::new(Storage::new());
            let a = {
                let (t, st) = (t.clone(), st.clone());
                loom::thread::spawn(move || writer(&t, &st, &[(0, 2, 1)]))
            };
            let b = {
                let (t, st) = (t.clone(), st.clone());
                loom::thread::spawn(move || writer(&t, &st, &[(1, 3, 1)]))
            };
            let mine = writer(&t, &st, &[(2, 3, 1), (0, 1, 1)]);
            let admitted = a.join().unwrap() + b.join().unwrap() + mine;
            t.wait_until_none(|_| true);
            assert_eq!(admitted, 4);
            assert_eq!(st.started.load(Ordering::SeqCst), 4, "a wake-up was lost");
        });
    }

    /// A (blocks 0-1, epoch 1) is at the storage on another thread; B
    /// (blocks 1-2, epoch 1) waits behind it and C (block 2, epoch 2)
    /// waits behind B, on a shard A does not hold. A fence below 2 races
    /// A's completion: B runs before it or is cancelled, C is woken exactly
    /// once (by A's completion via B, or by the fence), never before B.
    #[test]
    fn sharded_fence_races_multi_shard_wake() {
        check("sharded_fence_races_multi_shard_wake", || {
            let t = Arc::new(Tracker::new(1));
            let st = Arc::new(Storage::new());
            let Ok(Admission::Ready(a)) = t.admit(0, 2, 1) else {
                panic!("A is ready")
            };
            assert!(matches!(t.admit(1, 3, 1), Ok(Admission::Queued)));
            assert!(matches!(t.admit(2, 3, 2), Ok(Admission::Queued)));
            let runner = {
                let (t, st) = (t.clone(), st.clone());
                loom::thread::spawn(move || run(&t, &st, a))
            };
            let mut woken = Vec::new();
            let cancelled = t.fence_with(2, &mut woken);
            st.cancelled.fetch_add(cancelled, Ordering::SeqCst);
            for id in woken {
                run(&t, &st, id);
            }
            runner.join().unwrap();
            t.wait_until_none(|_| true);
            let ran = st.started.load(Ordering::SeqCst);
            assert_eq!(ran + st.cancelled.load(Ordering::SeqCst), 3);
            assert_eq!(st.max_epoch[2].load(Ordering::SeqCst), 2, "C ran");
        });
    }

    /// The hand-off across shards: the source writes blocks 0-1 at epoch
    /// 1, the destination raises the floor and writes blocks 1-2 at epoch
    /// 2, the main thread fences epoch 1 and waits for it to drain.
    #[test]
    fn sharded_handoff_fence_and_drain() {
        check("sharded_handoff_fence_and_drain", || {
            let t = Arc::new(Tracker::new(1));
            let st = Arc::new(Storage::new());
            let src = {
                let (t, st) = (t.clone(), st.clone());
                loom::thread::spawn(move || writer(&t, &st, &[(0, 2, 1)]))
            };
            let dst = {
                let (t, st) = (t.clone(), st.clone());
                loom::thread::spawn(move || {
                    {
                        // `Tracker::raise_floor`: every shard locked.
                        let _l = t.lock((1 << SHARDS) - 1);
                        t.floor.fetch_max(2, Ordering::Release);
                    }
                    writer(&t, &st, &[(1, 3, 2)])
                })
            };
            let mut woken = Vec::new();
            let cancelled = t.fence_with(2, &mut woken);
            st.cancelled.fetch_add(cancelled, Ordering::SeqCst);
            for id in woken {
                run(&t, &st, id);
            }
            t.wait_until_none(|s| s.epoch < 2);
            assert!(!t.any_live(&|s: &Slot| s.epoch < 2), "drain returned early");
            let admitted = src.join().unwrap() + dst.join().unwrap();
            t.wait_until_none(|_| true);
            assert_eq!(
                st.started.load(Ordering::SeqCst) + st.cancelled.load(Ordering::SeqCst),
                admitted
            );
            assert_eq!(st.max_epoch[1].load(Ordering::SeqCst), 2);
        });
    }
}
