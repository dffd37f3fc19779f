//! The adversarial storage model really does what seeds/003's storage did
//! (and what the simulation relies on): it ignores a write overlapping one
//! in flight, reorders completions, hangs a path, and fences with
//! persistent reservations.

use blkshim::sim::rng::SimRng;
use blkshim::sim::sched::{Event, Sched, SharedSched};
use blkshim::sim::storage_model::{StorageModel, StorageParams};
use blkshim::storage::fencing::{take_over, FenceError, StorageFencing};
use blkshim::storage::{AlignedBuf, BlockStorage, IoOutcome, StorageIo};
use parking_lot::Mutex;
use std::sync::Arc;

type Log = Arc<Mutex<Vec<(u32, u64, Result<(), i32>)>>>;

fn model(seed: u64, min: u64, max: u64) -> (SharedSched, Arc<StorageModel>) {
    let sched = Sched::shared();
    let params = StorageParams {
        sectors: 64,
        min_delay: min,
        max_delay: max,
        tail_percent: 0,
        tail: 0,
        ignore_overlapping: true,
    };
    let m = StorageModel::new(params, Arc::clone(&sched), SimRng::new(seed));
    (sched, m)
}

fn write(sector: u64, byte: u8) -> StorageIo {
    StorageIo::Write {
        offset: sector * 512,
        buf: AlignedBuf::from_slice(&[byte; 512]),
        fua: false,
    }
}

/// Submit `io` on `path`, logging (name, completion time, result).
fn submit(path: &dyn BlockStorage, sched: &SharedSched, log: &Log, name: u32, io: StorageIo) {
    let (log, sched) = (Arc::clone(log), Arc::clone(sched));
    path.submit(
        io,
        Box::new(move |o: IoOutcome| {
            let now = sched.lock().now();
            let r = o.result.map_err(|e| e.raw_os_error().unwrap_or(-1));
            log.lock().push((name, now, r));
        }),
    );
}

fn run(sched: &SharedSched, m: &StorageModel) {
    loop {
        let ev = sched.lock().pop();
        match ev {
            Some((_, Event::Storage(id))) => m.deliver(id),
            Some(_) => {}
            None => break,
        }
    }
}

#[test]
fn overlapping_write_is_completed_at_once_and_ignored() {
    let (sched, m) = model(1, 50, 50);
    let p = m.path();
    let log: Log = Arc::default();
    submit(&*p, &sched, &log, 1, write(3, 0xAA));
    // Same sector while the first is in flight: done at once, ignored.
    submit(&*p, &sched, &log, 2, write(3, 0xBB));
    // A neighbour that does not overlap is a normal write.
    submit(&*p, &sched, &log, 3, write(4, 0xCC));
    run(&sched, &m);
    let log = log.lock().clone();
    assert_eq!(log[0].0, 2, "the ignored write completes first: {log:?}");
    assert!(log[0].1 <= 1 && log[0].2.is_ok());
    assert!(log
        .iter()
        .all(|(_, t, r)| r.is_ok() && (*t <= 1 || *t == 50)));
    let disk = m.snapshot();
    assert!(
        disk[3 * 512..4 * 512].iter().all(|&b| b == 0xAA),
        "A, not A'"
    );
    assert!(disk[4 * 512..5 * 512].iter().all(|&b| b == 0xCC));
    let st = m.stats();
    assert_eq!(st.ignored_overlapping, 1);
    assert_eq!(st.landed, 2);
}

#[test]
fn a_write_after_the_first_completed_is_not_ignored() {
    let (sched, m) = model(2, 5, 5);
    let p = m.path();
    let log: Log = Arc::default();
    submit(&*p, &sched, &log, 1, write(0, 1));
    run(&sched, &m);
    submit(&*p, &sched, &log, 2, write(0, 2));
    run(&sched, &m);
    assert!(m.snapshot()[..512].iter().all(|&b| b == 2));
    assert_eq!(m.stats().ignored_overlapping, 0);
}

fn completion_order(seed: u64) -> Vec<u32> {
    let (sched, m) = model(seed, 1, 100);
    let p = m.path();
    let log: Log = Arc::default();
    for i in 0..40u32 {
        submit(&*p, &sched, &log, i, write(u64::from(i), i as u8));
    }
    run(&sched, &m);
    let order: Vec<u32> = log.lock().iter().map(|e| e.0).collect();
    order
}

#[test]
fn completions_are_reordered_and_the_order_is_seeded() {
    let a = completion_order(7);
    assert_eq!(a.len(), 40);
    let sorted: Vec<u32> = (0..40).collect();
    assert_ne!(a, sorted, "completions must not come back in submit order");
    assert_eq!(a, completion_order(7), "same seed, same order");
    assert_ne!(a, completion_order(8), "another seed, another order");
}

#[test]
fn a_hung_path_lands_late_and_others_do_not_wait() {
    let (sched, m) = model(3, 1, 10);
    let (x, y) = (m.path(), m.path());
    let log: Log = Arc::default();
    m.hang_path(x.id(), 1000);
    submit(&*x, &sched, &log, 1, write(1, 1));
    submit(&*y, &sched, &log, 2, write(2, 2));
    run(&sched, &m);
    let log = log.lock().clone();
    assert_eq!(log[0].0, 2);
    assert!(log[0].1 <= 10);
    assert_eq!(log[1].0, 1);
    assert!(log[1].1 >= 1000, "hung write finished at {}", log[1].1);
    assert!(
        m.snapshot()[512..1024].iter().all(|&b| b == 1),
        "it still lands"
    );
}

#[test]
fn hang_in_flight_only_holds_what_is_in_flight() {
    let (sched, m) = model(4, 5, 5);
    let p = m.path();
    let log: Log = Arc::default();
    submit(&*p, &sched, &log, 1, write(1, 1));
    m.hang_in_flight(p.id(), 500);
    submit(&*p, &sched, &log, 2, write(2, 2));
    run(&sched, &m);
    let log = log.lock().clone();
    assert_eq!((log[0].0, log[0].1), (2, 5));
    assert_eq!(log[1].0, 1);
    assert!(log[1].1 >= 500);
}

#[test]
fn preempt_and_abort_fences_the_older_key() {
    let (sched, m) = model(5, 100, 100);
    let (x, y) = (m.path(), m.path());
    let log: Log = Arc::default();
    take_over(&*x, 1).unwrap();
    assert_eq!(x.reservation(), Some(1));
    submit(&*x, &sched, &log, 1, write(0, 0x11)); // in flight at the preempt
    let p = take_over(&*y, 2).unwrap();
    assert_eq!(p.keys, vec![1]);
    assert_eq!(p.aborted, 1);
    submit(&*x, &sched, &log, 2, write(1, 0x22)); // after: refused
    submit(&*y, &sched, &log, 3, write(0, 0x33)); // not ignored: X's was aborted
    submit(
        &*x,
        &sched,
        &log,
        4,
        StorageIo::Read {
            offset: 0,
            buf: AlignedBuf::zeroed(512),
        },
    ); // reads stay allowed (Write Exclusive)
    run(&sched, &m);
    let mut log = log.lock().clone();
    log.sort_by_key(|e| e.0);
    assert_eq!(log[0].2, Err(libc::ECANCELED));
    assert_eq!(log[1].2, Err(libc::EACCES));
    assert_eq!(log[2].2, Ok(()));
    assert_eq!(log[3].2, Ok(()));
    let disk = m.snapshot();
    assert!(disk[..512].iter().all(|&b| b == 0x33));
    assert!(disk[512..1024].iter().all(|&b| b == 0));
    let st = m.stats();
    assert_eq!(
        (st.aborted, st.refused_reservation, st.ignored_overlapping),
        (1, 1, 0)
    );
    assert_eq!(st.landed_after_preempt, 0);
}

#[test]
fn a_stale_key_cannot_take_the_reservation_back() {
    let (_sched, m) = model(6, 1, 1);
    let (x, y) = (m.path(), m.path());
    take_over(&*x, 1).unwrap();
    take_over(&*y, 2).unwrap();
    match take_over(&*x, 1) {
        Err(FenceError::HeldByNewer { key: 1, holder: 2 }) => {}
        other => panic!("stale preempt must be refused: {other:?}"),
    }
    assert!(matches!(
        x.preempt_and_abort(3),
        Err(FenceError::NotRegistered { key: 3 })
    ));
    assert_eq!(y.reservation(), Some(2));
}

#[test]
fn a_dead_path_loses_completions_but_its_writes_land() {
    let (sched, m) = model(9, 20, 20);
    let p = m.path();
    let log: Log = Arc::default();
    submit(&*p, &sched, &log, 1, write(5, 0x55));
    m.kill_path(p.id());
    run(&sched, &m);
    assert!(log.lock().is_empty());
    assert!(m.snapshot()[5 * 512..6 * 512].iter().all(|&b| b == 0x55));
    assert_eq!(m.in_flight(), 0);
}

/// sanlock's assumption and none's power-off: a host reset or powered off
/// has none of its I/O land afterwards. `drop_in_flight` drops exactly that
/// host's I/O; another path's lands.
#[test]
fn a_dropped_paths_io_never_lands_and_others_do() {
    let (sched, m) = model(5, 5, 20);
    let (a, b) = (m.path(), m.path());
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    m.hang_path(a.id(), 1_000);
    submit(&*a, &sched, &log, 1, write(3, 0xaa));
    submit(&*b, &sched, &log, 2, write(9, 0xbb));
    assert!(m.path_hung(a.id(), 0) && !m.path_hung(b.id(), 0));
    assert_eq!((m.in_flight_on(a.id()), m.in_flight_on(b.id())), (1, 1));
    assert_eq!(m.drop_in_flight(a.id()), 1);
    assert_eq!(m.in_flight_on(a.id()), 0);
    run(&sched, &m);
    assert_eq!(m.read_sectors(3, 1), vec![0u8; 512]);
    assert_eq!(m.read_sectors(9, 1), vec![0xbbu8; 512]);
    // Only b's completion came back; a's was lost with its host.
    let names: Vec<u32> = log.lock().iter().map(|e| e.0).collect();
    assert_eq!(names, vec![2]);
    assert_eq!(m.stats().dropped, 1);
}
