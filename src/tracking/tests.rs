use super::*;

fn w(start: u64, count: u64, epoch: Epoch) -> Request {
    Request::new(OpKind::Write, SectorRange::new(start, count), epoch)
}

fn r(start: u64, count: u64) -> Request {
    Request::new(OpKind::Read, SectorRange::new(start, count), 1)
}

fn ready(a: Result<Admission, (Refused, u32)>) -> Ticket {
    match a {
        Ok(Admission::Ready(t)) => t,
        other => panic!("expected ready, got {other:?}"),
    }
}

fn queued(a: Result<Admission, (Refused, u32)>) -> Ticket {
    match a {
        Ok(Admission::Queued(t)) => t,
        other => panic!("expected queued, got {other:?}"),
    }
}

#[test]
fn disjoint_writes_run_together() {
    let t = Tracker::new(1);
    ready(t.admit(w(0, 8, 1), 0));
    ready(t.admit(w(8, 8, 1), 1));
    ready(t.admit(w(100, 1, 1), 2));
    assert_eq!(t.len(), 3);
}

#[test]
fn overlapping_writes_wait_in_arrival_order() {
    let t = Tracker::new(1);
    let a = ready(t.admit(w(0, 8, 1), 0));
    let b = queued(t.admit(w(4, 8, 1), 1));
    // c does not overlap a, but overlaps the waiting b: it must not overtake b.
    let c = queued(t.admit(w(10, 4, 1), 2));
    let mut woken = Vec::new();
    assert_eq!(t.complete(a, &mut woken).unwrap().token, 0);
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].ticket, b);
    woken.clear();
    t.complete(b, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![c]);
}

#[test]
fn reads_share_but_wait_for_writes() {
    let t = Tracker::new(1);
    let r1 = ready(t.admit(r(0, 8), 0));
    ready(t.admit(r(0, 8), 1)); // reads share
    let wr = queued(t.admit(w(0, 1, 1), 2)); // a write waits for the reads
    let r3 = queued(t.admit(r(0, 8), 3)); // a later read waits for the write (sees completed data only)
    let mut woken = Vec::new();
    t.complete(r1, &mut woken).unwrap();
    assert!(woken.is_empty(), "one read still holds the range");
    let snapshot = t.snapshot(|_| true);
    let r2 = snapshot
        .iter()
        .find(|f| f.active && f.request.kind == OpKind::Read)
        .unwrap()
        .ticket;
    t.complete(r2, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![wr]);
    woken.clear();
    t.complete(wr, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![r3]);
}

#[test]
fn flush_never_waits_and_barrier_orders_everything() {
    let t = Tracker::new(1);
    let a = ready(t.admit(w(0, 8, 1), 0));
    ready(t.admit(Request::new(OpKind::Flush, SectorRange::new(0, 0), 1), 1));
    let b = queued(t.admit(Request::new(OpKind::Barrier, SectorRange::new(0, 0), 1), 2));
    let c = queued(t.admit(r(1000, 8), 3));
    let mut woken = Vec::new();
    t.complete(a, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![b]);
    woken.clear();
    t.complete(b, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![c]);
}

#[test]
fn stale_writes_refused_reads_allowed() {
    let t = Tracker::new(5);
    match t.admit(w(0, 8, 4), 7) {
        Err((Refused::Stale { epoch: 4, floor: 5 }, 7)) => {}
        other => panic!("{other:?}"),
    }
    ready(t.admit(Request::new(OpKind::Read, SectorRange::new(0, 8), 4), 0));
    ready(t.admit(Request::new(OpKind::Flush, SectorRange::new(0, 0), 4), 0));
    for k in [OpKind::Trim, OpKind::WriteZeroes, OpKind::Barrier] {
        assert!(
            t.admit(Request::new(k, SectorRange::new(50, 8), 4), 0)
                .is_err(),
            "{k:?}"
        );
    }
    ready(t.admit(w(200, 8, 6), 1)); // newer epochs are fine (the front end decides admission)
}

#[test]
fn bad_ranges_refused() {
    let t: Tracker<u32> = Tracker::new(0);
    assert!(matches!(
        t.admit(w(0, 0, 0), 0),
        Err((Refused::BadRange, 0))
    ));
    assert!(matches!(
        t.admit(w(u64::MAX, 2, 0), 0),
        Err((Refused::BadRange, 0))
    ));
}

#[test]
fn fence_cancels_waiting_and_marks_active() {
    let t = Tracker::new(1);
    let a = ready(t.admit(w(0, 8, 1), 10));
    let b = queued(t.admit(w(0, 8, 1), 11));
    let c = queued(t.admit(w(0, 8, 2), 12)); // the new writer's write waits behind both
    let mut woken = Vec::new();
    let rep = t.fence_with(2, &mut woken);
    assert_eq!(rep.previous_floor, 1);
    assert_eq!(rep.cancelled.len(), 1);
    assert_eq!(rep.cancelled[0].ticket, b);
    assert_eq!(rep.cancelled[0].outcome, Outcome::Cancelled);
    assert_eq!(rep.fenced.len(), 1);
    assert_eq!(rep.fenced[0].0, a);
    assert!(
        woken.is_empty(),
        "c must stay behind the fenced-but-active a"
    );
    let f = t.complete(a, &mut woken).unwrap();
    assert_eq!(f.outcome, Outcome::Fenced);
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![c]);
    assert!(t.admit(w(100, 8, 1), 13).is_err());
    assert_eq!(t.floor(), 2);
}

#[test]
fn raise_floor_lets_in_flight_drain() {
    let t = Tracker::new(1);
    let a = ready(t.admit(w(0, 8, 1), 0));
    let b = queued(t.admit(w(0, 8, 1), 1));
    assert_eq!(t.raise_floor(2), 1);
    assert!(t.admit(w(50, 8, 1), 2).is_err());
    let mut woken = Vec::new();
    assert_eq!(
        t.complete(a, &mut woken).unwrap().outcome,
        Outcome::Completed
    );
    assert_eq!(woken[0].ticket, b);
    assert_eq!(
        t.complete(b, &mut woken).unwrap().outcome,
        Outcome::Completed
    );
    assert_eq!(t.raise_floor(1), 2, "the floor never goes down");
}

#[test]
fn tickets_are_single_use() {
    let t = Tracker::new(0);
    let a = ready(t.admit(w(0, 8, 0), 0));
    let mut woken = Vec::new();
    t.complete(a, &mut woken).unwrap();
    assert_eq!(t.complete(a, &mut woken).unwrap_err(), UnknownTicket(a));
    // The slot is reused under a new generation; the old ticket stays dead.
    let b = ready(t.admit(w(0, 8, 0), 1));
    assert_ne!(a, b);
    assert!(t.complete(a, &mut woken).is_err());
    assert!(t.cancel(a, &mut woken).is_err());
    t.complete(b, &mut woken).unwrap();
}

#[test]
fn cancel_releases_and_wakes() {
    let t = Tracker::new(0);
    let a = ready(t.admit(w(0, 8, 0), 0));
    let b = queued(t.admit(w(0, 8, 0), 1));
    let c = queued(t.admit(w(4, 8, 0), 2));
    let mut woken = Vec::new();
    assert_eq!(t.cancel(b, &mut woken).unwrap().outcome, Outcome::Cancelled);
    assert!(woken.is_empty());
    assert_eq!(t.cancel(a, &mut woken).unwrap().outcome, Outcome::Cancelled);
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![c]);
}

#[test]
fn wait_until_none_times_out_and_wakes() {
    let t = std::sync::Arc::new(Tracker::new(0));
    let a = ready(t.admit(w(0, 8, 0), 0));
    let soon = Instant::now() + std::time::Duration::from_millis(20);
    assert!(!t.wait_until_none(|_| true, Some(soon)));
    let t2 = t.clone();
    let h = std::thread::spawn(move || t2.wait_until_none(|_| true, None));
    std::thread::sleep(std::time::Duration::from_millis(10));
    t.complete(a, &mut Vec::new()).unwrap();
    assert!(h.join().unwrap());
}

/// Randomised check against a brute-force model: at every moment, no two
/// active requests conflict, and every waiting request has an earlier
/// conflicting request in flight (nothing waits for no reason), and the
/// order in which conflicting requests start is their arrival order.
#[test]
fn random_against_model() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..50 {
        let t: Tracker<u64> = Tracker::new(0);
        // (ticket, request, arrival, active)
        let mut live: Vec<(Ticket, Request, u64, bool)> = Vec::new();
        let mut started_order: Vec<(u64, Request)> = Vec::new();
        let mut arrival = 0u64;
        let mut woken = Vec::new();
        for _ in 0..400 {
            if live.is_empty() || rnd(3) != 0 {
                let kind = match rnd(5) {
                    0 => OpKind::Read,
                    1 => OpKind::Trim,
                    2 => OpKind::Flush,
                    _ => OpKind::Write,
                };
                let req = Request::new(kind, SectorRange::new(rnd(64), 1 + rnd(16)), 0);
                arrival += 1;
                match t.admit(req, arrival).unwrap() {
                    Admission::Ready(tk) => {
                        live.push((tk, req, arrival, true));
                        started_order.push((arrival, req));
                    }
                    Admission::Queued(tk) => live.push((tk, req, arrival, false)),
                }
            } else {
                let actives: Vec<usize> = (0..live.len()).filter(|&i| live[i].3).collect();
                let i = actives[rnd(actives.len() as u64) as usize];
                let (tk, _, arr, _) = live.remove(i);
                woken.clear();
                assert_eq!(t.complete(tk, &mut woken).unwrap().token, arr);
                for wk in &woken {
                    let e = live
                        .iter_mut()
                        .find(|e| e.0 == wk.ticket)
                        .expect("woken is live");
                    assert!(!e.3, "woken twice");
                    e.3 = true;
                    started_order.push((e.2, e.1));
                }
            }
            let conflict = |a: &Request, b: &Request| {
                a.kind.has_range()
                    && b.kind.has_range()
                    && (a.kind.modifies() || b.kind.modifies())
                    && a.range.overlaps(&b.range)
            };
            for (i, a) in live.iter().enumerate() {
                for b in &live[i + 1..] {
                    assert!(
                        !(a.3 && b.3 && conflict(&a.1, &b.1)),
                        "round {round}: conflicting actives"
                    );
                }
                if !a.3 {
                    assert!(
                        live.iter().any(|b| b.2 < a.2 && conflict(&a.1, &b.1)),
                        "round {round}: request waits for nothing"
                    );
                }
            }
            assert_eq!(t.len(), live.len());
        }
        // Conflicting requests started in arrival order.
        for (i, (arr_a, a)) in started_order.iter().enumerate() {
            for (arr_b, b) in &started_order[i + 1..] {
                let conflict = a.kind.has_range()
                    && b.kind.has_range()
                    && (a.kind.modifies() || b.kind.modifies())
                    && a.range.overlaps(&b.range);
                if conflict {
                    assert!(
                        arr_a < arr_b,
                        "round {round}: {arr_b} started before {arr_a}"
                    );
                }
            }
        }
    }
}

#[test]
fn many_threads_never_overlap_at_storage() {
    many_threads_never_overlap(Tracker::new(0));
}

/// The same with stripes of 4 sectors over 4 shards: most requests span
/// several shards and share some with others.
#[test]
fn many_threads_never_overlap_across_shards() {
    many_threads_never_overlap(Tracker::with_shards(0, 1, 4, 4));
}

fn many_threads_never_overlap(t: Tracker<()>) {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    // One byte per sector counts writers "at the storage"; it must never exceed 1.
    let sectors: Arc<Vec<AtomicU8>> = Arc::new((0..256).map(|_| AtomicU8::new(0)).collect());
    let t: Arc<Tracker<()>> = Arc::new(t);
    let (tx, rx) = crossbeam_channel::unbounded::<(Ticket, Request)>();
    let threads: Vec<_> = (0..3)
        .map(|k| {
            let t = t.clone();
            let tx = tx.clone();
            let sectors = sectors.clone();
            std::thread::spawn(move || {
                let mut x = k as u64 + 1;
                let mut woken = Vec::new();
                for _ in 0..500 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let req = w((x >> 33) % 240, 1 + (x >> 20) % 16, 0);
                    match t.admit(req, ()).unwrap() {
                        Admission::Ready(tk) => {
                            for s in req.range.start..req.range.start + req.range.count {
                                assert_eq!(sectors[s as usize].fetch_add(1, Ordering::SeqCst), 0);
                            }
                            for s in req.range.start..req.range.start + req.range.count {
                                sectors[s as usize].fetch_sub(1, Ordering::SeqCst);
                            }
                            woken.clear();
                            t.complete(tk, &mut woken).unwrap();
                            for wk in woken.drain(..) {
                                tx.send((wk.ticket, wk.request)).unwrap();
                            }
                        }
                        Admission::Queued(_) => {}
                    }
                }
            })
        })
        .collect();
    drop(tx);
    // A "storage" thread runs woken requests.
    let mut woken = Vec::new();
    let mut pending: Vec<(Ticket, Request)> = Vec::new();
    let mut alive = threads;
    loop {
        while let Ok(x) = rx.try_recv() {
            pending.push(x);
        }
        if let Some((tk, req)) = pending.pop() {
            for s in req.range.start..req.range.start + req.range.count {
                assert_eq!(sectors[s as usize].fetch_add(1, Ordering::SeqCst), 0);
            }
            for s in req.range.start..req.range.start + req.range.count {
                sectors[s as usize].fetch_sub(1, Ordering::SeqCst);
            }
            woken.clear();
            t.complete(tk, &mut woken).unwrap();
            pending.extend(woken.drain(..).map(|w| (w.ticket, w.request)));
            continue;
        }
        alive.retain(|h| !h.is_finished());
        if alive.is_empty() && rx.is_empty() && pending.is_empty() {
            break;
        }
        std::thread::yield_now();
    }
    assert!(t.is_empty(), "{} left in flight", t.len());
}

#[test]
fn grain_orders_writes_within_one_block() {
    let t = Tracker::with_grain(0, 8);
    let a = ready(t.admit(w(0, 1, 0), 0));
    // Sector 7 shares a 4 KiB block with sector 0: it waits.
    let b = queued(t.admit(w(7, 1, 0), 1));
    // Sector 8 starts the next block: free to go.
    ready(t.admit(w(8, 1, 0), 2));
    // Reads of the same block still share with reads.
    let mut woken = Vec::new();
    t.complete(a, &mut woken).unwrap();
    assert_eq!(woken.iter().map(|x| x.ticket).collect::<Vec<_>>(), vec![b]);
    // A range near the end of the sector space rounds without overflow.
    ready(t.admit(w(u64::MAX - 3, 2, 0), 3));
}

/// The sharded tracker against the single-lock one it replaced
/// (`reference.rs`), in lockstep on random sequences of every operation
/// Disk uses, over layouts from one shard to stripes of one block: the same
/// admissions (ready, queued or refused), the same wake-ups in the same
/// order, the same cancellations and fenced requests, the same snapshot.
#[test]
fn sharded_matches_single_lock_reference() {
    use super::reference::RefTracker;
    use std::collections::HashMap;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // (grain sectors, stripe blocks, shards)
    let layouts = [
        (1, 1024, 16),
        (1, 1, 2),
        (1, 2, 3), // rounded up to 4 shards
        (1, 4, 4),
        (8, 1, 5), // 8 shards
        (8, 2, 64),
        (1, 8, 1),
    ];
    for round in 0..600 {
        let (grain, stripe, shards) = layouts[round % layouts.len()];
        let new: Tracker<u64> = Tracker::with_shards(1, grain, stripe, shards);
        let old: RefTracker<u64> = RefTracker::with_grain(1, grain);
        // id -> (new ticket, old ticket, active)
        let mut live: HashMap<u64, (Ticket, Ticket, bool)> = HashMap::new();
        let mut new_ids: HashMap<Ticket, u64> = HashMap::new();
        let mut old_ids: HashMap<Ticket, u64> = HashMap::new();
        let (mut wn, mut wo) = (Vec::new(), Vec::new());
        let mut floor = 1;
        let mut next = 0u64;
        let ctx =
            |step: usize| format!("round {round} layout {grain}/{stripe}/{shards} step {step}");
        for step in 0..300 {
            let op = rnd(20);
            wn.clear();
            wo.clear();
            if live.is_empty() || op < 9 {
                let kind = match rnd(12) {
                    0 | 1 => OpKind::Read,
                    2 => OpKind::Trim,
                    3 => OpKind::WriteZeroes,
                    4 => OpKind::Flush,
                    5 if rnd(4) == 0 => OpKind::Barrier,
                    _ => OpKind::Write,
                };
                let count = match rnd(10) {
                    0 => 0,
                    1 => 200 + rnd(800),
                    _ => 1 + rnd(24),
                };
                let count = if kind == OpKind::Barrier { 0 } else { count };
                let epoch = floor - rnd(2).min(floor);
                let req = Request::new(kind, SectorRange::new(rnd(96), count), epoch);
                next += 1;
                let a = new.admit(req, next);
                let b = old.admit(req, next);
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        let ra = matches!(a, Admission::Ready(_));
                        assert_eq!(
                            ra,
                            matches!(b, Admission::Ready(_)),
                            "{} {req:?}",
                            ctx(step)
                        );
                        live.insert(next, (a.ticket(), b.ticket(), ra));
                        new_ids.insert(a.ticket(), next);
                        old_ids.insert(b.ticket(), next);
                    }
                    (Err((ra, _)), Err((rb, _))) => assert_eq!(ra, rb, "{}", ctx(step)),
                    (a, b) => panic!("{}: {a:?} vs {b:?}", ctx(step)),
                }
            } else if op < 16 || op == 19 {
                // Complete an active request, or (op 19) cancel one the
                // caller still owns: a queued one or a ready one.
                let mut ids: Vec<u64> = live.keys().copied().collect();
                ids.sort_unstable();
                let cancel = op == 19;
                ids.retain(|id| cancel || live[id].2);
                if ids.is_empty() {
                    continue;
                }
                let id = ids[rnd(ids.len() as u64) as usize];
                let (tn, to, _) = live[&id];
                let (fa, fb) = if cancel {
                    (new.cancel(tn, &mut wn), old.cancel(to, &mut wo))
                } else {
                    (new.complete(tn, &mut wn), old.complete(to, &mut wo))
                };
                let (fa, fb) = (fa.unwrap(), fb.unwrap());
                assert_eq!(
                    (fa.token, fa.outcome),
                    (fb.token, fb.outcome),
                    "{}",
                    ctx(step)
                );
                live.remove(&id);
                // Using a released ticket again is refused by both.
                assert!(new.complete(tn, &mut wn).is_err());
            } else if op < 18 {
                floor += rnd(2);
                let (ra, rb) = (
                    new.fence_with(floor, &mut wn),
                    old.fence_with(floor, &mut wo),
                );
                assert_eq!(ra.previous_floor, rb.previous_floor);
                let ca: Vec<_> = ra.cancelled.iter().map(|f| (f.token, f.outcome)).collect();
                let cb: Vec<_> = rb.cancelled.iter().map(|f| (f.token, f.outcome)).collect();
                assert_eq!(ca, cb, "{}: cancelled", ctx(step));
                let mut fa: Vec<u64> = ra.fenced.iter().map(|(t, _)| new_ids[t]).collect();
                let mut fb: Vec<u64> = rb.fenced.iter().map(|(t, _)| old_ids[t]).collect();
                fa.sort_unstable();
                fb.sort_unstable();
                assert_eq!(fa, fb, "{}: fenced", ctx(step));
                for (id, _) in &ca {
                    live.remove(id);
                }
            } else {
                floor += rnd(2);
                assert_eq!(new.raise_floor(floor), old.raise_floor(floor));
            }
            let woken_a: Vec<u64> = wn.iter().map(|w| new_ids[&w.ticket]).collect();
            let woken_b: Vec<u64> = wo.iter().map(|w| old_ids[&w.ticket]).collect();
            assert_eq!(woken_a, woken_b, "{}: woken", ctx(step));
            for id in woken_a {
                let e = live.get_mut(&id).expect("woken is live");
                assert!(!e.2, "woken twice");
                e.2 = true;
            }
            assert_eq!(new.len(), old.len(), "{}", ctx(step));
            assert_eq!(new.floor(), old.floor());
            let snap = |v: Vec<InFlight>, ids: &HashMap<Ticket, u64>| {
                let mut v: Vec<_> = v
                    .iter()
                    .map(|f| (ids[&f.ticket], f.active, f.fenced))
                    .collect();
                v.sort_unstable();
                v
            };
            assert_eq!(
                snap(new.snapshot(|_| true), &new_ids),
                snap(old.snapshot(|_| true), &old_ids),
                "{}: snapshot",
                ctx(step)
            );
        }
    }
}
