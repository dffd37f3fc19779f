//! Live migration under load, source -> destination -> source, through the
//! emulated blkfront's blkif_recover re-send. Storage is the adversarial
//! model of seeds/003 (ignores a write to a block that has one in flight) or
//! a real file both "hosts" open. With blkshim's protection no block is ever
//! stale; with it off (Linux blkback behaviour) seeds/003's corruption
//! reproduces.

mod support;

use blkshim::epoch::{EpochStore, FileEpochStore, MemEpochStore};
use blkshim::storage::{open_storage, BlockStorage, EngineKind, OpenOptions};
use blkshim::xen::backend::{BackendConfig, Phase};
use blkshim::xen::blkif::Status;
use blkshim::xen::frontend_emu::{Bio, BioOp, Completion, EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::testing::AdversarialStorage;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const BLOCKS: u64 = 1024;
const DISK: u64 = BLOCKS * 4096;

/// Bios the guest keeps in flight: every ring full, and a backlog behind.
fn depth(fe: &EmulatedFrontend) -> usize {
    fe.ring_capacity() + 32
}

fn run_full(wl: &mut Workload, fe: &mut EmulatedFrontend, n: u64) {
    let d = depth(fe);
    wl.run(fe, d, n);
}

fn fill_full(wl: &mut Workload, fe: &mut EmulatedFrontend) {
    let d = depth(fe);
    wl.fill(fe, d);
}

struct Outcome {
    stale: Vec<(u64, u64, Option<u64>)>,
    ignored_writes: u64,
    resent: usize,
    failures: u64,
    completed: u64,
    read_mismatches: u64,
    reads: u64,
    /// Requests the hand-off records list as in flight at suspend.
    in_flight_at_suspend: usize,
}

fn frontend(seed: u64) -> EmulatedFrontend {
    EmulatedFrontend::new(
        EmulatedGuest::new(DOMID, 2048).unwrap(),
        FrontendOptions {
            ring_page_order: 1,
            queues: 2,
            persistent: seed % 2 == 0,
            max_indirect_segments: 32,
            seed,
            ..FrontendOptions::default()
        },
    )
    .unwrap()
}

/// Migrates `rounds` times under load on adversarial storage. Before each
/// suspend the storage stalls, so writes are in flight at the source.
fn adversarial_run(protection: bool, rounds: usize, seed: u64, mode: &str) -> Outcome {
    let storage = AdversarialStorage::new(DISK, seed, Duration::from_millis(2));
    let shared: Arc<dyn BlockStorage> = storage.clone();
    let epochs: Arc<dyn EpochStore> = Arc::new(MemEpochStore::default());
    let config = BackendConfig {
        protection,
        ..BackendConfig::default()
    };
    let mut hosts = [Host::new(), Host::new()];
    let mut fe = frontend(seed);
    let mut wl = Workload::new(BLOCKS, seed);
    hosts[0].create_vbd(
        opener("vm1", shared.clone(), epochs.clone()),
        config.clone(),
        None,
    );
    fe.connect(&hosts[0].xs, &hosts[0].platform, FE, BE)
        .unwrap();
    run_full(&mut wl, &mut fe, 100);
    let mut resent = 0;
    let mut stale = Vec::new();
    let mut in_flight_at_suspend = 0;
    for round in 0..rounds {
        let (src, dst) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        // The guest's writes reach the storage and stay in flight there.
        storage.stall(Duration::from_millis(100));
        fill_full(&mut wl, &mut fe);
        assert!(fe.backlog_len() > 0, "the rings are full, requests wait");
        std::thread::sleep(Duration::from_millis(5));
        // Suspend: the guest is paused (the frontend is no longer polled).
        let record = hosts[src].suspend(mode);
        if protection {
            let r = blkshim::handoff::HandoffRecord::from_json(&record).unwrap();
            assert_eq!(r.source_epoch, round as u64 + 1);
            in_flight_at_suspend += r.requests.len();
        }
        let resume = protection.then_some(record.as_str());
        let [a, b] = &mut hosts;
        let (s, d) = if src == 0 { (a, b) } else { (b, a) };
        // Host 1 offers less (no indirect, no persistent grants, one ring):
        // the frontend re-cuts its re-sent requests to the new limits.
        let d_config = if dst == 1 {
            BackendConfig {
                max_indirect_segments: 0,
                persistent: false,
                max_queues: 1,
                ..config.clone()
            }
        } else {
            config.clone()
        };
        d.create_vbd(
            opener("vm1", shared.clone(), epochs.clone()),
            d_config,
            resume,
        );
        fe.reconnect(&d.xs, &d.platform, FE, BE).unwrap();
        wait_phase(d.vbd(), Phase::Connected);
        resent += fe.resent_requests;
        s.destroy_vbd();
        run_full(&mut wl, &mut fe, 40);
        // Check: once everything is done, every block holds what the guest
        // was last told it holds.
        wl.drain(&mut fe);
        assert!(storage.wait_idle(Duration::from_secs(10)));
        stale.extend(wl.stale_blocks(|b| storage.read_at(b * 4096, 4096)));
        run_full(&mut wl, &mut fe, 60);
    }
    wl.drain(&mut fe);
    assert!(storage.wait_idle(Duration::from_secs(10)));
    stale.extend(wl.stale_blocks(|b| storage.read_at(b * 4096, 4096)));
    Outcome {
        stale,
        ignored_writes: storage.stats().ignored_writes.load(Ordering::Relaxed),
        resent,
        failures: wl.failures,
        completed: wl.completed,
        in_flight_at_suspend,
        read_mismatches: wl.read_mismatches,
        reads: wl.reads,
    }
}

#[test]
fn xen_backend_migration_drain_adversarial_no_stale_blocks() {
    for seed in [2u64, 5, 8] {
        let o = adversarial_run(true, 6, seed, "drain");
        assert!(o.resent > 0, "migrations happened with requests in flight");
        assert!(
            o.in_flight_at_suspend > 0,
            "writes were at the storage at suspend"
        );
        assert_eq!(o.failures, 0);
        assert!(o.completed > 600);
        // Whether a 12-block write finds 12 idle blocks depends on thread
        // timing, so indirect use is not asserted here; the
        // xen_backend_protocol tests assert it deterministically.
        assert_eq!(
            o.ignored_writes, 0,
            "two writes to one block were never in flight together"
        );
        assert!(
            o.stale.is_empty(),
            "seed {seed}: stale blocks {:?}",
            o.stale
        );
        assert!(o.reads > 100);
        assert_eq!(
            o.read_mismatches, 0,
            "every read saw the last acknowledged write"
        );
    }
}

#[test]
fn xen_backend_migration_fence_adversarial_no_stale_blocks() {
    for seed in [3u64, 4] {
        let o = adversarial_run(true, 6, seed, "fence");
        assert!(o.resent > 0);
        assert!(o.in_flight_at_suspend > 0);
        assert_eq!(o.failures, 0);
        assert_eq!(o.ignored_writes, 0);
        assert!(
            o.stale.is_empty(),
            "seed {seed}: stale blocks {:?}",
            o.stale
        );
        assert!(o.reads > 100);
        assert_eq!(
            o.read_mismatches, 0,
            "every read saw the last acknowledged write"
        );
    }
}

#[test]
fn xen_backend_unprotected_migration_reproduces_seed_003() {
    // Linux blkback behaviour: nothing drained or fenced, straight to storage.
    let mut found = 0;
    let mut mismatches = 0;
    for seed in [2u64, 5, 8] {
        let o = adversarial_run(false, 6, seed, "drain");
        assert!(o.ignored_writes > 0, "the storage ignored re-sent writes");
        found += o.stale.len();
        mismatches += o.read_mismatches;
    }
    eprintln!("unprotected: {found} stale blocks, {mismatches} reads of stale data");
    assert!(
        found > 0,
        "without protection seeds/003 corruption must show"
    );
}

#[test]
fn xen_backend_migration_real_shared_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    let epoch_dir = dir.path().join("epochs");
    std::fs::create_dir_all(&epoch_dir).unwrap();
    let open_host = || {
        // Each host opens the shared file and the shared epoch store itself.
        let s = open_storage(
            &img,
            &OpenOptions {
                engine: EngineKind::Auto,
                create_size: Some(DISK),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let e: Arc<dyn EpochStore> = Arc::new(FileEpochStore::open(&epoch_dir).unwrap());
        opener("vm1", s, e)
    };
    let config = BackendConfig {
        ledger: Some(Arc::new(
            blkshim::handoff::HandoffLedger::open(&epoch_dir).unwrap(),
        )),
        ..BackendConfig::default()
    };
    let mut hosts = [Host::new(), Host::new()];
    let mut fe = frontend(4);
    let mut wl = Workload::new(BLOCKS, 9);
    hosts[0].create_vbd(open_host(), config.clone(), None);
    fe.connect(&hosts[0].xs, &hosts[0].platform, FE, BE)
        .unwrap();
    run_full(&mut wl, &mut fe, 100);
    let mut resent = 0;
    for round in 0..6 {
        let src = round % 2;
        fill_full(&mut wl, &mut fe);
        assert!(fe.backlog_len() > 0, "the rings are full, requests wait");
        let [a, b] = &mut hosts;
        let (s, d) = if src == 0 { (a, b) } else { (b, a) };
        // The destination is created first and waits for the record on the
        // shared storage (as a destination started before the source's
        // suspend finished would).
        d.create_vbd(open_host(), config.clone(), Some("wait"));
        wait_phase(d.vbd(), Phase::InitWait);
        let mode = if round % 3 == 2 { "fence" } else { "drain" };
        s.suspend(mode);
        fe.reconnect(&d.xs, &d.platform, FE, BE).unwrap();
        wait_phase(d.vbd(), Phase::Connected);
        assert_eq!(d.vbd().status().epoch, round as u64 + 2);
        resent += fe.resent_requests;
        s.destroy_vbd();
        run_full(&mut wl, &mut fe, 150);
    }
    wl.drain(&mut fe);
    assert!(resent > 0);
    assert_eq!(wl.failures, 0);
    assert!(wl.reads > 100);
    assert_eq!(wl.read_mismatches, 0);
    let data = std::fs::read(&img).unwrap();
    let stale = wl.stale_blocks(|b| data[(b * 4096) as usize..(b * 4096 + 4096) as usize].to_vec());
    assert!(stale.is_empty(), "stale blocks {stale:?}");
    // The epoch store moved once per admission.
    let e = FileEpochStore::open(&epoch_dir).unwrap();
    assert_eq!(e.current("vm1").unwrap(), 7);
}

/// One write of `blocks` blocks starting at `first`, stamped `version`.
fn write_bio(tag: u64, first: u64, blocks: u64, version: u64) -> Bio {
    Bio {
        tag,
        op: BioOp::Write,
        sector: first * BLOCK_SECTORS,
        nr_sectors: blocks * BLOCK_SECTORS,
        data: (first..first + blocks)
            .flat_map(|b| block_data(b, version))
            .collect(),
    }
}

/// Polls until every bio finished; returns the completions.
fn complete_all(fe: &mut EmulatedFrontend) -> Vec<Completion> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut done = Vec::new();
    while fe.outstanding() > 0 {
        let got = fe.poll().unwrap();
        if got.is_empty() {
            fe.wait(Duration::from_millis(5)).unwrap();
        }
        done.extend(got);
        assert!(
            Instant::now() < end,
            "{} bios never completed",
            fe.outstanding()
        );
    }
    done
}

/// The source is suspended with its ring full of writes held at the
/// storage and more waiting behind them (merged while they wait, one too
/// large for the destination, which offers no indirect segments). Linux
/// blkfront's ids are shadow slots: the destination's free list starts
/// again from 0, so its first requests (the backlog) reuse the ids of the
/// source's held writes, and those are re-sent under other ids. The back
/// end must tell them apart: every bio completes, every block lands, no
/// response names an id not in use; then ids are reused after each
/// completion.
#[test]
fn xen_backend_migration_full_backlog_and_reused_ids() {
    for (seed, mode) in [(7u64, "drain"), (8, "fence")] {
        let storage = AdversarialStorage::new(DISK, seed, Duration::from_millis(1));
        let shared: Arc<dyn BlockStorage> = storage.clone();
        let epochs: Arc<dyn EpochStore> = Arc::new(MemEpochStore::default());
        let config = BackendConfig::default();
        let mut hosts = [Host::new(), Host::new()];
        let mut fe = EmulatedFrontend::new(
            EmulatedGuest::new(DOMID, 2048).unwrap(),
            FrontendOptions {
                max_indirect_segments: 32,
                seed,
                ..FrontendOptions::default()
            },
        )
        .unwrap();
        hosts[0].create_vbd(
            opener("vm1", shared.clone(), epochs.clone()),
            config.clone(),
            None,
        );
        fe.connect(&hosts[0].xs, &hosts[0].platform, FE, BE)
            .unwrap();
        fe.set_trace(true);
        let cap = fe.ring_capacity() as u64;
        assert_eq!(cap, 32, "one single-page ring");

        storage.stall(Duration::from_millis(300));
        // A full ring: one-block writes to blocks 0..cap-1, ids 0..cap-1,
        // and a 40-block write whose first request takes the last slot
        // while the rest waits.
        for b in 0..cap - 1 {
            fe.submit(write_bio(b + 1, b, 1, 1)).unwrap();
        }
        let split = 500;
        fe.submit(write_bio(split, cap - 1, 40, 1)).unwrap();
        assert_eq!(fe.on_rings() as u64, cap);
        assert_eq!(fe.backlog_len(), 1);
        // Behind them: 30 one-block writes, merged while they wait, and one
        // of 24 blocks (indirect here, too large for the destination).
        let next = cap - 1 + 40;
        for b in next..next + 30 {
            fe.submit(write_bio(b + 1, b, 1, 1)).unwrap();
        }
        let big = 1000;
        fe.submit(write_bio(big, next + 30, 24, 1)).unwrap();
        let blocks = next + 54;
        assert!(fe.backlog_len() >= 3 && fe.backlog_len() < 32);
        let src = fe.take_trace();
        assert_eq!(src.len() as u64, cap);
        for r in &src {
            assert_eq!(
                r.id,
                r.sector / BLOCK_SECTORS,
                "fresh free list: slot = order"
            );
        }
        std::thread::sleep(Duration::from_millis(20));

        let record = hosts[0].suspend(mode);
        let [a, b] = &mut hosts;
        b.create_vbd(
            opener("vm1", shared.clone(), epochs.clone()),
            BackendConfig {
                max_indirect_segments: 0,
                ..config.clone()
            },
            Some(&record),
        );
        fe.reconnect(&b.xs, &b.platform, FE, BE).unwrap();
        wait_phase(b.vbd(), Phase::Connected);
        a.destroy_vbd();
        assert_eq!(fe.max_indirect(), 0);
        let done = complete_all(&mut fe);
        assert_eq!(done.len() as u64, cap + 31, "{mode}: every bio completed");
        assert!(done.iter().any(|c| c.tag == split) && done.iter().any(|c| c.tag == big));
        assert!(done.iter().all(|c| c.status == Status::Okay), "{mode}");
        let dst = fe.take_trace();
        // The backlog went first, under the ids the source's held writes had.
        assert_eq!(dst[0].id, 0);
        assert!(dst[0].sector >= cap * BLOCK_SECTORS, "{mode}: {:?}", dst[0]);
        // (the waiting part of the split write, with the one-block writes
        // merged behind it).
        assert_eq!(dst[0].tags[0], split, "{:?}", dst[0]);
        // The held writes were re-sent, some under an id another of them
        // had at the source.
        let resent: Vec<_> = dst
            .iter()
            .filter(|r| r.sector < (cap - 1) * BLOCK_SECTORS)
            .collect();
        assert!(!resent.is_empty());
        assert!(
            resent.iter().any(|r| r.id != r.sector / BLOCK_SECTORS),
            "{mode}: a re-sent write under another's old id"
        );
        // Nothing larger than a direct request at the destination.
        assert!(dst.iter().all(|r| r.segments <= 11 && !r.indirect));
        assert!(
            dst.iter().filter(|r| r.tags.contains(&big)).count() >= 3,
            "the 24-block write was cut again"
        );
        assert!(storage.wait_idle(Duration::from_secs(10)));
        for b in 0..blocks {
            assert_eq!(
                version_of(b, &storage.read_at(b * 4096, 4096)),
                Some(1),
                "{mode}: block {b}"
            );
        }

        // Ids come back after each completion: the free list is LIFO, so one
        // write at a time reuses the same slot every time.
        for b in 0..8 {
            fe.submit(write_bio(2000 + b, b, 1, 2)).unwrap();
            complete_all(&mut fe);
        }
        let again = fe.take_trace();
        assert_eq!(again.len(), 8);
        assert!(again.iter().all(|r| r.id == again[0].id), "{again:?}");
        assert!(storage.wait_idle(Duration::from_secs(10)));
        for b in 0..8 {
            assert_eq!(version_of(b, &storage.read_at(b * 4096, 4096)), Some(2));
        }
        assert_eq!(fe.bogus_responses, 0);
    }
}
