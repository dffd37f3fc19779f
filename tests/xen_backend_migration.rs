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
use blkshim::xen::frontend_emu::{EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::testing::AdversarialStorage;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::*;

const BLOCKS: u64 = 48;
const DISK: u64 = 1 << 20;

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
    wl.run(&mut fe, 12, 100);
    let mut resent = 0;
    let mut stale = Vec::new();
    let mut in_flight_at_suspend = 0;
    for round in 0..rounds {
        let (src, dst) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        // The guest's writes reach the storage and stay in flight there.
        storage.stall(Duration::from_millis(100));
        wl.fill(&mut fe, 12);
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
        wl.run(&mut fe, 12, 40);
        // Check: once everything is done, every block holds what the guest
        // was last told it holds.
        wl.drain(&mut fe);
        assert!(storage.wait_idle(Duration::from_secs(10)));
        stale.extend(wl.stale_blocks(|b| storage.read_at(b * 4096, 4096)));
        wl.run(&mut fe, 12, 60);
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
    let mut wl = Workload::new(BLOCKS * 4, 9);
    hosts[0].create_vbd(open_host(), config.clone(), None);
    fe.connect(&hosts[0].xs, &hosts[0].platform, FE, BE)
        .unwrap();
    wl.run(&mut fe, 16, 100);
    let mut resent = 0;
    for round in 0..6 {
        let src = round % 2;
        wl.fill(&mut fe, 16);
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
        wl.run(&mut fe, 16, 150);
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
