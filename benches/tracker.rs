//! Cost of tracking: admit + complete of one write with 256 in flight,
//! disjoint and overlapping, on 1 and 2 threads; and the cost of a fence
//! and of a drain of 256 requests.

use blkshim::tracking::{Admission, OpKind, Request, SectorRange, Ticket, Tracker};
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

/// Keep `IN_FLIGHT` disjoint writes in flight in this thread's region; each
/// op completes the oldest and admits a new one.
fn run_disjoint(t: &Tracker<u64>, region: u64, iters: u64) -> Duration {
    let base = region * 1_000_000;
    let mut ring: VecDeque<Ticket> = VecDeque::with_capacity(IN_FLIGHT as usize);
    let mut woken = Vec::with_capacity(4);
    for i in 0..IN_FLIGHT {
        ring.push_back(t.admit(write(base + i * 8, 1), i).unwrap().ticket());
    }
    let start = Instant::now();
    for next in IN_FLIGHT..IN_FLIGHT + iters {
        let old = ring.pop_front().unwrap();
        black_box(t.complete(old, &mut woken).unwrap());
        // Positions cycle through a window twice the in-flight depth: never overlapping.
        let pos = base + (next % (2 * IN_FLIGHT)) * 8;
        ring.push_back(t.admit(write(pos, 1), next).unwrap().ticket());
    }
    let el = start.elapsed();
    for tk in ring {
        t.complete(tk, &mut woken).unwrap();
    }
    el
}

/// 128 blocks, each with one write at the storage and one waiting behind
/// it: each op admits a write that must queue, then completes the active
/// write of that block, which starts the waiting one.
fn run_overlapping(t: &Tracker<u64>, region: u64, iters: u64) -> Duration {
    let base = region * 1_000_000;
    let blocks = IN_FLIGHT / 2;
    let mut active: Vec<Ticket> = Vec::new();
    let mut waiting: Vec<Ticket> = Vec::new();
    let mut woken = Vec::with_capacity(4);
    for b in 0..blocks {
        active.push(t.admit(write(base + b * 8, 1), 0).unwrap().ticket());
        waiting.push(t.admit(write(base + b * 8, 1), 0).unwrap().ticket());
    }
    let start = Instant::now();
    for i in 0..iters {
        let b = (i % blocks) as usize;
        let queued = match t.admit(write(base + b as u64 * 8, 1), i).unwrap() {
            Admission::Queued(q) => q,
            Admission::Ready(_) => panic!("must queue"),
        };
        woken.clear();
        t.complete(active[b], &mut woken).unwrap();
        active[b] = woken[0].ticket;
        debug_assert_eq!(active[b], waiting[b]);
        waiting[b] = queued;
    }
    let el = start.elapsed();
    for a in active {
        woken.clear();
        t.complete(a, &mut woken).unwrap();
        t.complete(woken[0].ticket, &mut woken).unwrap();
    }
    el
}

fn threaded(threads: u64, iters: u64, f: fn(&Tracker<u64>, u64, u64) -> Duration) -> Duration {
    let t = Arc::new(Tracker::with_grain(1, GRAIN));
    let hs: Vec<_> = (0..threads)
        .map(|k| {
            let t = t.clone();
            std::thread::spawn(move || f(&t, k, iters))
        })
        .collect();
    // Wall time of the slowest thread over all threads' ops: per-op cost as
    // the tracker sees it under contention.
    let max = hs
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap_or_default();
    max / threads as u32
}

fn admit_complete(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracked_write_admit_complete_256_in_flight");
    for threads in [1u64, 2] {
        g.bench_with_input(BenchmarkId::new("disjoint", threads), &threads, |b, &n| {
            b.iter_custom(|iters| threaded(n, iters, run_disjoint))
        });
        g.bench_with_input(
            BenchmarkId::new("overlapping", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| threaded(n, iters, run_overlapping)),
        );
    }
    g.finish();
}

fn fence_and_drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff_256_in_flight");
    // Fence: 128 stale writes at the storage are marked, 128 waiting are cancelled.
    g.bench_function("fence", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut woken = Vec::new();
            for _ in 0..iters {
                let t: Tracker<u64> = Tracker::with_grain(1, GRAIN);
                for i in 0..IN_FLIGHT / 2 {
                    t.admit(write(i * 8, 1), i).unwrap();
                    t.admit(write(i * 8, 1), i).unwrap();
                }
                let s = Instant::now();
                black_box(t.fence_with(2, &mut woken));
                total += s.elapsed();
            }
            total
        })
    });
    // Drain: complete 256 disjoint in-flight writes until the tracker is empty.
    g.bench_function("drain", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut woken = Vec::new();
            for _ in 0..iters {
                let t: Tracker<u64> = Tracker::with_grain(1, GRAIN);
                let tickets: Vec<_> = (0..IN_FLIGHT)
                    .map(|i| t.admit(write(i * 8, 1), i).unwrap().ticket())
                    .collect();
                let s = Instant::now();
                for tk in tickets {
                    t.complete(tk, &mut woken).unwrap();
                }
                assert!(t.wait_until_none(|_| true, None));
                total += s.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, admit_complete, fence_and_drain);
criterion_main!(benches);
