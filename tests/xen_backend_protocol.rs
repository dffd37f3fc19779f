//! The xenbus back end and its rings against the emulated blkfront: every
//! ABI, multi-page and multiple rings, persistent grants, indirect segments,
//! flush/FUA/discard/secure discard, and the close sequence.

mod support;

use blkshim::epoch::MemEpochStore;
use blkshim::storage::{BlockStorage, MemStorage};
use blkshim::xen::abi::BlkifAbi;
use blkshim::xen::backend::{BackendConfig, Phase};
use blkshim::xen::blkif::Status;
use blkshim::xen::frontend_emu::{Bio, BioOp, EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::xenstore::{XenStore, XBT_NULL};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const DISK: u64 = 8 << 20;

fn run_one(abi: BlkifAbi, order: u32, queues: u32, persistent: bool, max_indirect: u32) {
    let mem = Arc::new(MemStorage::new(DISK));
    let storage: Arc<dyn BlockStorage> = mem.clone();
    let epochs = Arc::new(MemEpochStore::default());
    let mut host = Host::new();
    host.create_vbd(
        opener("vm1", storage, epochs),
        BackendConfig::default(),
        None,
    );
    let guest = EmulatedGuest::new(DOMID, 4096).unwrap();
    let mut fe = EmulatedFrontend::new(
        guest,
        FrontendOptions {
            abi,
            ring_page_order: order,
            queues,
            persistent,
            max_indirect_segments: max_indirect,
            seed: 3,
        },
    )
    .unwrap();
    fe.connect(&host.xs, &host.platform, FE, BE).unwrap();
    wait_phase(host.vbd(), Phase::Connected);
    assert_eq!(fe.nr_queues(), queues as usize);
    assert_eq!(host.vbd().status().queues, queues as usize);
    assert_eq!(fe.sectors(), DISK / 512);
    assert_eq!(fe.persistent(), persistent);
    assert_eq!(
        host.vbd().status().epoch,
        1,
        "a fresh start advances the epoch"
    );

    let mut wl = Workload::new(256, 11);
    wl.run(&mut fe, 24, 400);
    wl.drain(&mut fe);
    assert_eq!(wl.failures, 0);
    assert!(wl.stale_blocks(|b| mem.read_at(b * 4096, 4096)).is_empty());

    // Read back through the ring, in one large bio (indirect when offered).
    let tag = 1 << 40;
    fe.submit(Bio {
        tag,
        op: BioOp::Read,
        sector: 0,
        nr_sectors: 64 * 8,
        data: Vec::new(),
    })
    .unwrap();
    let data = wait_for(&mut fe, tag);
    assert_eq!(data.status, Status::Okay);
    assert_eq!(data.data, mem.read_at(0, 64 * 4096));

    if persistent {
        let grants: usize = host
            .vbd()
            .with_rings(|r| r.iter().map(|r| r.persistent_grants()).sum());
        assert!(grants > 0, "persistent grants are cached");
    }
    host.vbd().with_rings(|rings| {
        let consumed: u64 = rings
            .iter()
            .map(|r| {
                r.stats()
                    .consumed
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        assert!(consumed >= 400);
        let sum = |f: fn(&blkshim::xen::dataplane::RingStats) -> u64| -> u64 {
            rings.iter().map(|r| f(r.stats())).sum()
        };
        use std::sync::atomic::Ordering::Relaxed;
        // Every request is counted by what it did.
        let by_op = sum(|s| s.reads.load(Relaxed))
            + sum(|s| s.writes.load(Relaxed))
            + sum(|s| s.flushes.load(Relaxed))
            + sum(|s| s.discards.load(Relaxed))
            + sum(|s| s.refused.load(Relaxed));
        assert_eq!(by_op, consumed);
        assert!(sum(|s| s.reads.load(Relaxed)) > 0 && sum(|s| s.writes.load(Relaxed)) > 0);
        assert!(sum(|s| s.bytes_read.load(Relaxed)) >= 64 * 4096);
        let indirect: u64 = rings
            .iter()
            .map(|r| {
                r.stats()
                    .indirect
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        assert_eq!(
            indirect > 0,
            max_indirect > 0,
            "indirect used iff offered and asked"
        );
        if queues > 1 {
            assert!(rings.iter().all(|r| r
                .stats()
                .consumed
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0));
        }
    });

    // Close: frontend Closing -> back end suspends then Closing; Closed.
    host.xs
        .write_str(XBT_NULL, &format!("{FE}/state"), "5")
        .unwrap();
    wait_phase(host.vbd(), Phase::Closing);
    host.xs
        .write_str(XBT_NULL, &format!("{FE}/state"), "6")
        .unwrap();
    wait_phase(host.vbd(), Phase::Closed);
    assert_eq!(
        host.xs
            .read_string(XBT_NULL, &format!("{BE}/state"))
            .unwrap(),
        "6"
    );
}

fn wait_for(fe: &mut EmulatedFrontend, tag: u64) -> blkshim::xen::frontend_emu::Completion {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        for c in fe.poll().unwrap() {
            if c.tag == tag {
                return c;
            }
        }
        assert!(Instant::now() < end, "bio {tag} never completed");
        fe.wait(Duration::from_millis(5)).unwrap();
    }
}

#[test]
fn xen_backend_x86_64_single_page_ring() {
    run_one(BlkifAbi::X86_64, 0, 1, false, 0);
}

#[test]
fn xen_backend_x86_32_multi_page_ring_persistent() {
    run_one(BlkifAbi::X86_32, 2, 1, true, 0);
}

#[test]
fn xen_backend_native_multi_queue_indirect() {
    run_one(BlkifAbi::Native, 1, 3, false, 128);
}

#[test]
fn xen_backend_multi_queue_persistent_indirect_max_order() {
    run_one(BlkifAbi::X86_64, 4, 4, true, 256);
}

#[test]
fn xen_backend_flush_fua_discard_secure() {
    let mem = Arc::new(MemStorage::new(DISK));
    let storage: Arc<dyn BlockStorage> = mem.clone();
    let mut host = Host::new();
    host.create_vbd(
        opener("vm1", storage, Arc::new(MemEpochStore::default())),
        BackendConfig::default(),
        None,
    );
    let mut fe = EmulatedFrontend::new(
        EmulatedGuest::new(DOMID, 1024).unwrap(),
        FrontendOptions::default(),
    )
    .unwrap();
    fe.connect(&host.xs, &host.platform, FE, BE).unwrap();
    assert_eq!(fe.offers(), (true, true, true));
    let bio = |tag, op, sector, nr: u64, fill: u8| Bio {
        tag,
        op,
        sector,
        nr_sectors: nr,
        data: if matches!(op, BioOp::Write | BioOp::WriteFua) {
            vec![fill; nr as usize * 512]
        } else {
            Vec::new()
        },
    };
    fe.submit(bio(1, BioOp::Write, 0, 32, 0xaa)).unwrap();
    assert_eq!(wait_for(&mut fe, 1).status, Status::Okay);
    fe.submit(bio(2, BioOp::WriteFua, 32, 8, 0xbb)).unwrap();
    assert_eq!(wait_for(&mut fe, 2).status, Status::Okay);
    fe.submit(bio(3, BioOp::Flush, 0, 0, 0)).unwrap();
    assert_eq!(wait_for(&mut fe, 3).status, Status::Okay);
    assert_eq!(mem.read_at(32 * 512, 4096), vec![0xbb; 4096]);
    fe.submit(bio(4, BioOp::Discard { secure: false }, 0, 8, 0))
        .unwrap();
    assert_eq!(wait_for(&mut fe, 4).status, Status::Okay);
    assert_eq!(mem.read_at(0, 4096), vec![0; 4096]);
    fe.submit(bio(5, BioOp::Discard { secure: true }, 8, 8, 0))
        .unwrap();
    assert_eq!(wait_for(&mut fe, 5).status, Status::Okay);
    assert_eq!(mem.read_at(4096, 4096), vec![0; 4096]);
    assert_eq!(mem.read_at(8192, 4096), vec![0xaa; 4096]);
    // Past the end: an error response, nothing written.
    fe.submit(bio(6, BioOp::Write, DISK / 512 - 4, 8, 0xcc))
        .unwrap();
    assert_eq!(wait_for(&mut fe, 6).status, Status::Error);
    assert_eq!(mem.read_at(DISK - 2048, 2048), vec![0; 2048]);
}

/// Flush and FUA as Linux blkfront maps them from the back end's offers
/// (`blkfront_gather_backend_features`, `blkif_queue_rw_req`, blk-flush):
/// `feature-flush-cache` wins over `feature-barrier` and gives a write
/// cache without FUA, so a FUA write is a WRITE followed by an empty
/// FLUSH_DISKCACHE; barrier alone gives FUA, so a FUA write is one
/// WRITE_BARRIER with data (never indirect) and a flush an empty
/// WRITE_BARRIER; with neither, a FUA write is a plain WRITE and a flush
/// never reaches the ring.
#[test]
fn xen_backend_fua_and_flush_follow_the_negotiated_features() {
    use blkshim::xen::blkif::{OP_FLUSH_DISKCACHE, OP_WRITE, OP_WRITE_BARRIER};
    for (flush_cache, barrier) in [(true, true), (true, false), (false, true), (false, false)] {
        let mem = Arc::new(MemStorage::new(DISK));
        let storage: Arc<dyn BlockStorage> = mem.clone();
        let mut host = Host::new();
        host.create_vbd(
            opener("vm1", storage, Arc::new(MemEpochStore::default())),
            BackendConfig::default(),
            None,
        );
        wait_phase(host.vbd(), Phase::InitWait);
        // What an older (or a barrier-only) back end would have offered.
        let offer = |k: &str, on: bool| {
            host.xs
                .write_str(XBT_NULL, &format!("{BE}/{k}"), if on { "1" } else { "0" })
                .unwrap()
        };
        offer("feature-flush-cache", flush_cache);
        offer("feature-barrier", barrier);
        let mut fe = EmulatedFrontend::new(
            EmulatedGuest::new(DOMID, 1024).unwrap(),
            FrontendOptions {
                max_indirect_segments: 32,
                seed: 5,
                ..FrontendOptions::default()
            },
        )
        .unwrap();
        fe.connect(&host.xs, &host.platform, FE, BE).unwrap();
        let case = format!("flush-cache {flush_cache}, barrier {barrier}");
        assert_eq!(fe.offers().0, flush_cache || barrier, "{case}");
        assert_eq!(fe.fua(), barrier && !flush_cache, "{case}");
        assert!(fe.max_indirect() > 0);
        fe.set_trace(true);
        let ops = |fe: &mut EmulatedFrontend| -> Vec<(u8, bool, bool)> {
            fe.take_trace()
                .iter()
                .map(|r| (r.op, r.segments > 0, r.indirect))
                .collect()
        };

        // A one-block FUA write.
        fe.submit(Bio {
            tag: 1,
            op: BioOp::WriteFua,
            sector: 16,
            nr_sectors: 8,
            data: vec![0xbb; 4096],
        })
        .unwrap();
        assert_eq!(wait_for(&mut fe, 1).status, Status::Okay, "{case}");
        assert_eq!(mem.read_at(16 * 512, 4096), vec![0xbb; 4096], "{case}");
        let want = match (flush_cache, barrier) {
            (true, _) => vec![(OP_WRITE, true, false), (OP_FLUSH_DISKCACHE, false, false)],
            (false, true) => vec![(OP_WRITE_BARRIER, true, false)],
            (false, false) => vec![(OP_WRITE, true, false)],
        };
        assert_eq!(ops(&mut fe), want, "{case}: FUA write");

        // An empty flush.
        fe.submit(Bio {
            tag: 2,
            op: BioOp::Flush,
            sector: 0,
            nr_sectors: 0,
            data: Vec::new(),
        })
        .unwrap();
        assert_eq!(wait_for(&mut fe, 2).status, Status::Okay, "{case}");
        let want = match (flush_cache, barrier) {
            (true, _) => vec![(OP_FLUSH_DISKCACHE, false, false)],
            (false, true) => vec![(OP_WRITE_BARRIER, false, false)],
            (false, false) => vec![],
        };
        assert_eq!(ops(&mut fe), want, "{case}: flush");

        // A 20-block FUA write: more segments than a direct request holds.
        let data: Vec<u8> = (0..20 * 4096).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        fe.submit(Bio {
            tag: 3,
            op: BioOp::WriteFua,
            sector: 64,
            nr_sectors: 160,
            data: data.clone(),
        })
        .unwrap();
        assert_eq!(wait_for(&mut fe, 3).status, Status::Okay, "{case}");
        assert_eq!(mem.read_at(64 * 512, 20 * 4096), data, "{case}");
        let got = ops(&mut fe);
        match (flush_cache, barrier) {
            // The data as one indirect WRITE, then the post-flush.
            (true, _) => assert_eq!(
                got,
                vec![(OP_WRITE, true, true), (OP_FLUSH_DISKCACHE, false, false)],
                "{case}"
            ),
            // WRITE_BARRIERs of at most 11 segments.
            (false, true) => {
                assert!(got.len() >= 2, "{case}: {got:?}");
                assert!(got.iter().all(|&o| o == (OP_WRITE_BARRIER, true, false)));
            }
            (false, false) => assert_eq!(got, vec![(OP_WRITE, true, true)], "{case}"),
        }
        assert_eq!(fe.bogus_responses, 0);
    }
}
