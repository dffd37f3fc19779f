//! Suspend stops the ring at once (unlike Linux blkback, which keeps
//! consuming until teardown), a stale destination is refused, and the
//! `xen-backend` supervisor follows `backend/vbd` like tapback.

mod support;

use blkshim::epoch::{EpochStore, MemEpochStore};
use blkshim::storage::{BlockStorage, MemStorage};
use blkshim::xen::backend::{BackendConfig, Phase};
use blkshim::xen::frontend_emu::{Bio, BioOp, EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::testing::AdversarialStorage;
use blkshim::xen::xenstore::{XenStore, XBT_NULL};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

fn write_bio(tag: u64, block: u64) -> Bio {
    Bio {
        tag,
        op: BioOp::Write,
        sector: block * 8,
        nr_sectors: 8,
        data: block_data(block, tag),
    }
}

fn consumed(host: &Host) -> u64 {
    host.vbd().with_rings(|r| {
        r.iter()
            .map(|r| r.stats().consumed.load(Ordering::SeqCst))
            .sum()
    })
}

/// A host serving `storage` as vm1 with fresh epochs and no resume record.
fn vm1_host(storage: Arc<dyn BlockStorage>, config: BackendConfig) -> Host {
    let mut host = Host::new();
    host.create_vbd(
        opener("vm1", storage, Arc::new(MemEpochStore::default())),
        config,
        None,
    );
    host
}

/// A default frontend with `guest_pages` of RAM, connected to `host`.
fn connect_frontend(host: &Host, guest_pages: usize) -> EmulatedFrontend {
    let mut fe = EmulatedFrontend::new(
        EmulatedGuest::new(DOMID, guest_pages).unwrap(),
        FrontendOptions::default(),
    )
    .unwrap();
    fe.connect(&host.xs, &host.platform, FE, BE).unwrap();
    fe
}

/// Writes version `b + 1` to each block `b` of `blocks`.
fn submit_writes(fe: &mut EmulatedFrontend, blocks: std::ops::Range<u64>) {
    for b in blocks {
        fe.submit(write_bio(b + 1, b)).unwrap();
    }
}

/// Waits (up to 5 s) until the rings have consumed `n` requests.
fn wait_consumed(host: &Host, n: u64, what: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    while consumed(host) < n {
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn xen_backend_suspend_stops_consuming_at_once() {
    let storage = AdversarialStorage::new(1 << 20, 1, Duration::from_millis(1));
    let host = vm1_host(storage.clone(), BackendConfig::default());
    let mut fe = connect_frontend(&host, 512);
    storage.stall(Duration::from_millis(200));
    submit_writes(&mut fe, 0..8);
    wait_consumed(&host, 8, "the 8 writes were not consumed");
    // Suspend while the 8 writes are held at the storage.
    host.xs
        .write_str(XBT_NULL, &format!("{BE}/blkshim-suspend"), "drain")
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !host.vbd().with_rings(|r| r[0].is_suspended()) {
        assert!(Instant::now() < end, "suspend never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        storage.pending() > 0,
        "the writes are still held at the storage"
    );
    let at_suspend = consumed(&host);
    assert_eq!(at_suspend, 8);
    submit_writes(&mut fe, 8..16);
    wait_phase(host.vbd(), Phase::Suspended);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        consumed(&host),
        at_suspend,
        "no request consumed after suspend"
    );
    // The drained writes landed, but no response was published: the
    // frontend will re-send them to the destination.
    assert_eq!(fe.poll().unwrap().len(), 0);
    for b in 0..8 {
        assert_eq!(version_of(b, &storage.read_at(b * 4096, 4096)), Some(b + 1));
    }
    for b in 8..16 {
        assert_eq!(version_of(b, &storage.read_at(b * 4096, 4096)), Some(0));
    }
    let rec = host.vbd().status().record.unwrap();
    assert_eq!(rec.requests.len(), 8);
    assert_eq!(rec.source_epoch, 1);
}

#[test]
fn xen_backend_destination_with_stale_record_is_refused() {
    let mem: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(1 << 20));
    let epochs: Arc<dyn EpochStore> = Arc::new(MemEpochStore::default());
    let mut x = Host::new();
    x.create_vbd(
        opener("vm1", mem.clone(), epochs.clone()),
        BackendConfig::default(),
        None,
    );
    let mut fe = connect_frontend(&x, 256);
    let record = x.suspend("fence");
    // A first destination resumes with the record...
    let mut y = Host::new();
    y.create_vbd(
        opener("vm1", mem.clone(), epochs.clone()),
        BackendConfig::default(),
        Some(&record),
    );
    fe.reconnect(&y.xs, &y.platform, FE, BE).unwrap();
    wait_phase(y.vbd(), Phase::Connected);
    assert_eq!(epochs.current("vm1").unwrap(), 2);
    // ...a second one replaying the same record is refused and never
    // connects (it would be a second writer).
    let mut z = Host::new();
    z.create_vbd(
        opener("vm1", mem, epochs.clone()),
        BackendConfig::default(),
        Some(&record),
    );
    wait_phase(z.vbd(), Phase::InitWait);
    let guest = EmulatedGuest::new(DOMID, 16).unwrap();
    z.platform.add_guest(Arc::clone(&guest));
    let w = |k: &str, v: &str| z.xs.write_str(XBT_NULL, &format!("{FE}/{k}"), v).unwrap();
    w("ring-ref", &guest.grant(0, true).unwrap().to_string());
    w("event-channel", "1");
    w("state", "3");
    wait_phase(z.vbd(), Phase::Failed);
    assert!(z.vbd().status().error.unwrap().contains("stale"));
    assert_eq!(epochs.current("vm1").unwrap(), 2);
    assert_ne!(
        z.xs.read_string(XBT_NULL, &format!("{BE}/state")).unwrap(),
        "4"
    );
    assert_eq!(guest.live_mappings(), 0);
}

#[test]
fn xen_backend_supervisor_follows_backend_vbd() {
    let mem: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(1 << 20));
    let root = VBD_ROOT;
    let (store, _platform, mut sup) = supervisor(
        opener("vm1", mem, Arc::new(MemEpochStore::default())),
        BackendConfig::default(),
    );
    sup.reconcile().unwrap();
    assert!(sup.vbds().is_empty());
    for (dom, dev) in [(7, 51712), (8, 51728)] {
        let be = format!("{root}/{dom}/{dev}");
        let w = |k: &str, v: &str| store.write_str(XBT_NULL, &format!("{be}/{k}"), v).unwrap();
        w("params", "aio:/shared/vm1.img");
        w("mode", "w");
        w("frontend", &format!("/local/domain/{dom}/device/vbd/{dev}"));
        w("frontend-id", &dom.to_string());
        w("state", "1");
    }
    sup.reconcile().unwrap();
    assert_eq!(sup.vbds().len(), 2);
    for h in sup.vbds().values() {
        wait_phase(h, Phase::InitWait);
    }
    assert_eq!(
        store
            .read_string(XBT_NULL, &format!("{root}/8/51728/feature-persistent"))
            .unwrap(),
        "1"
    );
    store.rm(XBT_NULL, &format!("{root}/8")).unwrap();
    sup.reconcile().unwrap();
    assert_eq!(sup.vbds().len(), 1);
    assert!(sup.vbds().contains_key(&format!("{root}/7/51712")));
}

/// A vbd removed before its `params` came (a domain destroyed while the
/// toolstack was still setting its disk up, or a guest that crashed at
/// once): its back end notices and finishes, instead of waiting for nodes
/// that will never come.
#[test]
fn xen_backend_removed_before_params_finishes() {
    let mem: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(1 << 20));
    let root = VBD_ROOT;
    let (store, _platform, mut sup) = supervisor(
        opener("vm1", mem, Arc::new(MemEpochStore::default())),
        BackendConfig::default(),
    );
    let be = format!("{root}/9/51712");
    let w = |k: &str, v: &str| store.write_str(XBT_NULL, &format!("{be}/{k}"), v).unwrap();
    w("frontend", "/local/domain/9/device/vbd/51712");
    w("frontend-id", "9");
    w("state", "1");
    sup.reconcile().unwrap();
    assert_eq!(sup.vbds().len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    store.rm(XBT_NULL, &format!("{root}/9")).unwrap();
    sup.reconcile().unwrap();
    assert!(sup.vbds().is_empty());
    let t = Instant::now();
    while !sup.retiring().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the back end of a vbd removed before its params never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
        sup.reconcile().unwrap();
    }
}

#[test]
fn xen_backend_params_like_tapback_and_file_opener() {
    use blkshim::xen::backend::{disk_name_for, params_path};
    use std::path::Path;
    assert_eq!(params_path("aio:/srv/vm1.img"), Path::new("/srv/vm1.img"));
    assert_eq!(params_path("raw:/srv/vm1.img"), Path::new("/srv/vm1.img"));
    assert_eq!(params_path(" /dev/vg/vm1 "), Path::new("/dev/vg/vm1"));
    assert_eq!(disk_name_for(Path::new("/srv/vm 1.img")), "srv_vm_1.img");
    blkshim::epoch::validate_disk_name(&disk_name_for(Path::new("/../x/.y"))).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let opener = blkshim::xen::daemon::file_opener(
        dir.path().join("epochs"),
        blkshim::storage::EngineKind::ThreadPool,
        Default::default(),
    )
    .unwrap();
    let d = opener(&format!("aio:{}", img.display())).unwrap();
    assert_eq!(d.storage.size(), 1 << 20);
    assert_eq!(d.epochs.current(&d.name).unwrap(), 0);
    assert!(opener("aio:/nonexistent/blkshim/x.img").is_err());
}

#[test]
fn xen_backend_unprotected_keeps_consuming_after_suspend_like_blkback() {
    // The contrast to the test above: Linux blkback's behaviour, which the
    // negative migration test relies on.
    let mem: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(1 << 20));
    let host = vm1_host(
        mem,
        BackendConfig {
            protection: false,
            ..BackendConfig::default()
        },
    );
    let mut fe = connect_frontend(&host, 256);
    host.suspend("drain");
    wait_phase(host.vbd(), Phase::Suspended);
    let before = consumed(&host);
    submit_writes(&mut fe, 0..4);
    wait_consumed(&host, before + 4, "unprotected ring stopped consuming");
}

#[test]
fn xen_backend_removed_while_connected_still_drains_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AdversarialStorage::new(1 << 20, 7, Duration::from_millis(1));
    let host = vm1_host(
        storage.clone(),
        BackendConfig {
            ledger: Some(Arc::new(
                blkshim::handoff::HandoffLedger::open(dir.path()).unwrap(),
            )),
            ..BackendConfig::default()
        },
    );
    let mut fe = connect_frontend(&host, 512);
    storage.stall(Duration::from_millis(100));
    submit_writes(&mut fe, 0..6);
    wait_consumed(&host, 6, "the 6 writes were not consumed");
    // The toolstack destroys the domain's devices with writes in flight.
    host.xs.rm(XBT_NULL, "/local/domain/0/backend").unwrap();
    let path = dir.path().join("vm1.handoff.json");
    let end = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < end, "no record after removal");
        std::thread::sleep(Duration::from_millis(2));
    }
    let rec = blkshim::handoff::HandoffRecord::from_json(&std::fs::read_to_string(&path).unwrap())
        .unwrap();
    assert_eq!(rec.requests.len(), 6);
    // Published only after the writes left the storage.
    assert_eq!(storage.pending(), 0);
    for b in 0..6 {
        assert_eq!(version_of(b, &storage.read_at(b * 4096, 4096)), Some(b + 1));
    }
    assert!(
        host.xs.read_optional(XBT_NULL, BE).unwrap().is_none(),
        "the removed node was not recreated"
    );
}

/// Completions of `n` requests, waiting up to 5 s.
fn complete(fe: &mut EmulatedFrontend, n: usize) -> Vec<blkshim::xen::frontend_emu::Completion> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < end, "{} of {n} answered", got.len());
        got.extend(fe.poll().unwrap());
        std::thread::sleep(Duration::from_millis(1));
    }
    got
}

/// `xen-backend --metrics`: the rings of a vbd count their requests in
/// the disk's metrics, and the suspend is a hand-off there.
#[test]
fn xen_backend_metrics_count_ring_requests_and_the_suspend() {
    let metrics = Arc::new(blkshim::metrics::Metrics::new());
    let storage: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(1 << 20));
    let host = vm1_host(
        storage,
        BackendConfig {
            metrics: Some(Arc::clone(&metrics)),
            ..BackendConfig::default()
        },
    );
    let mut fe = connect_frontend(&host, 512);
    submit_writes(&mut fe, 0..8);
    complete(&mut fe, 8);
    for (i, op) in [BioOp::Read, BioOp::Flush, BioOp::Discard { secure: false }]
        .into_iter()
        .enumerate()
    {
        let data_op = matches!(op, BioOp::Read);
        fe.submit(Bio {
            tag: 100 + i as u64,
            op,
            sector: if data_op { 0 } else { 64 },
            nr_sectors: if matches!(op, BioOp::Flush) { 0 } else { 8 },
            data: Vec::new(),
        })
        .unwrap();
    }
    let got = complete(&mut fe, 3);
    assert!(
        got.iter()
            .all(|c| c.status == blkshim::xen::blkif::Status::Okay),
        "{got:?}"
    );
    host.xs
        .write_str(XBT_NULL, &format!("{BE}/blkshim-suspend"), "drain")
        .unwrap();
    wait_phase(host.vbd(), Phase::Suspended);
    let text = metrics.encode().unwrap();
    let disk = "vm1";
    for line in [
        format!("blkshim_requests_total{{disk=\"{disk}\",op=\"write\"}} 8\n"),
        format!("blkshim_bytes_total{{disk=\"{disk}\",op=\"write\"}} 32768\n"),
        format!("blkshim_requests_total{{disk=\"{disk}\",op=\"read\"}} 1\n"),
        format!("blkshim_bytes_total{{disk=\"{disk}\",op=\"read\"}} 4096\n"),
        format!("blkshim_requests_total{{disk=\"{disk}\",op=\"flush\"}} 1\n"),
        format!("blkshim_requests_total{{disk=\"{disk}\",op=\"trim\"}} 1\n"),
        format!("blkshim_request_duration_seconds_count{{disk=\"{disk}\",class=\"write\"}} 8\n"),
        format!("blkshim_request_duration_seconds_count{{disk=\"{disk}\",class=\"other\"}} 2\n"),
        format!("blkshim_in_flight{{disk=\"{disk}\"}} 0\n"),
        format!("blkshim_epoch{{disk=\"{disk}\"}} 1\n"),
        format!(
            "blkshim_handoffs_total{{disk=\"{disk}\",method=\"suspend\",outcome=\"drained\"}} 1\n"
        ),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }
}
