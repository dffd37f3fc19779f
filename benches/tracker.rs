//! Cost of tracking: admit + complete of one write with 256 in flight per
//! thread, disjoint and overlapping, on 1, 2 and 4 threads; and the cost of
//! a fence and of a drain of 256 requests.
//!
//! With `--features reference-tracker` every case also runs against the
//! single-lock tracker from before sharding (`reference`), in the same run:
//! `cargo bench --bench tracker --features reference-tracker`.

use blkshim::tracking::{Admission, OpKind, Request, SectorRange, Ticket, Tracker, Woken};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const IN_FLIGHT: u64 = 256;
/// Sectors per tracked block, as `Disk` uses (4 KiB).
const GRAIN: u64 = 8;

fn write(start: u64, epoch: u64) -> Request {
    Request::new(OpKind::Write, SectorRange::new(start, 8), epoch)
}

/// The calls the benches make, for the sharded tracker and the reference.
trait Track: Send + Sync + 'static {
    const NAME: &'static str;
    fn make() -> Self;
    fn admit(&self, r: Request, token: u64) -> Admission;
    fn complete(&self, t: Ticket, woken: &mut Vec<Woken>);
    fn fence(&self, floor: u64, woken: &mut Vec<Woken>);
    fn drained(&self) -> bool;
}

macro_rules! track {
    ($t:ty, $name:expr) => {
        impl Track for $t {
            const NAME: &'static str = $name;
            fn make() -> Self {
                <$t>::with_grain(1, GRAIN)
            }
            fn admit(&self, r: Request, token: u64) -> Admission {
                self.admit(r, token).expect("admitted")
            }
            fn complete(&self, t: Ticket, woken: &mut Vec<Woken>) {
                black_box(self.complete(t, woken).expect("live ticket"));
            }
            fn fence(&self, floor: u64, woken: &mut Vec<Woken>) {
                black_box(self.fence_with(floor, woken));
            }
            fn drained(&self) -> bool {
                self.wait_until_none(|_| true, None)
            }
        }
    };
}

track!(Tracker<u64>, "sharded");
#[cfg(feature = "reference-tracker")]
track!(blkshim::tracking::reference::RefTracker<u64>, "single_lock");

/// Keep `IN_FLIGHT` disjoint writes in flight in this thread's region; each
/// op completes the oldest and admits a new one. Regions are 1,000,000
/// sectors apart: with the default stripes (1024 blocks) and 16 shards,
/// threads 0-3 land on shards 0, 10, 4 and 14.
fn run_disjoint<T: Track>(t: &T, region: u64, iters: u64) -> Duration {
    let base = region * 1_000_000;
    let mut ring: VecDeque<Ticket> = VecDeque::with_capacity(IN_FLIGHT as usize);
    let mut woken = Vec::with_capacity(4);
    for i in 0..IN_FLIGHT {
        ring.push_back(t.admit(write(base + i * 8, 1), i).ticket());
    }
    let start = Instant::now();
    for next in IN_FLIGHT..IN_FLIGHT + iters {
        if let Some(old) = ring.pop_front() {
            t.complete(old, &mut woken);
        }
        // Positions cycle through a window twice the in-flight depth: never overlapping.
        let pos = base + (next % (2 * IN_FLIGHT)) * 8;
        ring.push_back(t.admit(write(pos, 1), next).ticket());
    }
    let el = start.elapsed();
    for tk in ring {
        t.complete(tk, &mut woken);
    }
    el
}

/// 128 blocks, each with one write at the storage and one waiting behind
/// it: each op admits a write that must queue, then completes the active
/// write of that block, which starts the waiting one.
fn run_overlapping<T: Track>(t: &T, region: u64, iters: u64) -> Duration {
    let base = region * 1_000_000;
    let blocks = IN_FLIGHT / 2;
    let mut active: Vec<Ticket> = Vec::new();
    let mut waiting: Vec<Ticket> = Vec::new();
    let mut woken = Vec::with_capacity(4);
    for b in 0..blocks {
        active.push(t.admit(write(base + b * 8, 1), 0).ticket());
        waiting.push(t.admit(write(base + b * 8, 1), 0).ticket());
    }
    let start = Instant::now();
    for i in 0..iters {
        let b = (i % blocks) as usize;
        let queued = match t.admit(write(base + b as u64 * 8, 1), i) {
            Admission::Queued(q) => q,
            Admission::Ready(_) => panic!("must queue"),
        };
        woken.clear();
        t.complete(active[b], &mut woken);
        active[b] = woken[0].ticket;
        debug_assert_eq!(active[b], waiting[b]);
        waiting[b] = queued;
    }
    let el = start.elapsed();
    for a in active {
        woken.clear();
        t.complete(a, &mut woken);
        t.complete(woken[0].ticket, &mut woken);
    }
    el
}

fn threaded<T: Track>(threads: u64, iters: u64, f: fn(&T, u64, u64) -> Duration) -> Duration {
    let t = Arc::new(T::make());
    let hs: Vec<_> = (0..threads)
        .map(|k| {
            let t = t.clone();
            std::thread::spawn(move || f(&t, k, iters))
        })
        .collect();
    // Wall time of the slowest thread over all threads' ops: per-op cost as
    // the tracker sees it under contention (perfect scaling on 2 cores
    // halves it with 2 threads).
    let max = hs
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .max()
        .unwrap_or_default();
    max / threads as u32
}

fn admit_complete_of<T: Track>(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracked_write_admit_complete_256_in_flight");
    for threads in [1u64, 2, 4] {
        g.bench_with_input(
            BenchmarkId::new(format!("disjoint_{}", T::NAME), threads),
            &threads,
            |b, &n| b.iter_custom(|iters| threaded::<T>(n, iters, run_disjoint::<T>)),
        );
        g.bench_with_input(
            BenchmarkId::new(format!("overlapping_{}", T::NAME), threads),
            &threads,
            |b, &n| b.iter_custom(|iters| threaded::<T>(n, iters, run_overlapping::<T>)),
        );
    }
    g.finish();
}

fn fence_and_drain_of<T: Track>(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff_256_in_flight");
    // Fence: 128 stale writes at the storage are marked, 128 waiting are cancelled.
    g.bench_function(format!("fence_{}", T::NAME), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut woken = Vec::new();
            for _ in 0..iters {
                let t = T::make();
                for i in 0..IN_FLIGHT / 2 {
                    t.admit(write(i * 8, 1), i);
                    t.admit(write(i * 8, 1), i);
                }
                let s = Instant::now();
                t.fence(2, &mut woken);
                total += s.elapsed();
            }
            total
        })
    });
    // Drain: complete 256 disjoint in-flight writes until the tracker is empty.
    g.bench_function(format!("drain_{}", T::NAME), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut woken = Vec::new();
            for _ in 0..iters {
                let t = T::make();
                let tickets: Vec<_> = (0..IN_FLIGHT)
                    .map(|i| t.admit(write(i * 8, 1), i).ticket())
                    .collect();
                let s = Instant::now();
                for tk in tickets {
                    t.complete(tk, &mut woken);
                }
                assert!(t.drained());
                total += s.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn admit_complete(c: &mut Criterion) {
    admit_complete_of::<Tracker<u64>>(c);
    #[cfg(feature = "reference-tracker")]
    admit_complete_of::<blkshim::tracking::reference::RefTracker<u64>>(c);
}

fn fence_and_drain(c: &mut Criterion) {
    fence_and_drain_of::<Tracker<u64>>(c);
    #[cfg(feature = "reference-tracker")]
    fence_and_drain_of::<blkshim::tracking::reference::RefTracker<u64>>(c);
}

criterion_group!(benches, admit_complete, fence_and_drain);
criterion_main!(benches);
