//! A hostile guest against the real back end: bad grants, bad segment
//! counts and bounds, requests past the end of the disk, malformed indirect
//! pages, a runaway req_prod, bad XenStore nodes. Each gets an error
//! response or a disconnect of that ring; the back end keeps serving, and
//! nothing outside the disk or the granted memory is touched.

mod support;

use blkshim::epoch::MemEpochStore;
use blkshim::storage::{BlockStorage, MemStorage};
use blkshim::xen::abi::BlkifAbi;
use blkshim::xen::backend::{BackendConfig, Phase};
use blkshim::xen::blkif::{encode, Segment, Status, OP_INDIRECT, OP_READ, OP_WRITE};
use blkshim::xen::frontend_emu::{Bio, BioOp, EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::xenstore::{XenStore, XBT_NULL};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const DISK: u64 = 1 << 20;
const ABI: BlkifAbi = BlkifAbi::X86_64;

struct Rig {
    host: Host,
    fe: EmulatedFrontend,
    mem: Arc<MemStorage>,
}

fn rig(queues: u32) -> Rig {
    let mem = Arc::new(MemStorage::new(DISK));
    let storage: Arc<dyn BlockStorage> = mem.clone();
    let mut host = Host::new();
    host.create_vbd(
        opener("vm1", storage, Arc::new(MemEpochStore::default())),
        BackendConfig {
            max_indirect_segments: 64,
            ..BackendConfig::default()
        },
        None,
    );
    let mut fe = EmulatedFrontend::new(
        EmulatedGuest::new(DOMID, 256).unwrap(),
        FrontendOptions {
            abi: ABI,
            queues,
            max_indirect_segments: 64,
            ..FrontendOptions::default()
        },
    )
    .unwrap();
    fe.connect(&host.xs, &host.platform, FE, BE).unwrap();
    wait_phase(host.vbd(), Phase::Connected);
    Rig { host, fe, mem }
}

/// Puts a raw request on ring `q` and returns the status answered for `id`.
fn send_raw(fe: &mut EmulatedFrontend, q: usize, bytes: &[u8], id: u64) -> i16 {
    let ring = fe.ring_mut(q).unwrap();
    ring.put_request(bytes).unwrap();
    ring.push_requests().unwrap();
    fe.kick(q).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(r) = fe.ring_mut(q).unwrap().next_response().unwrap() {
            assert_eq!(r.id, id, "responses come back for the request sent");
            return r.status;
        }
        assert!(Instant::now() < end, "no response for {id}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn err() -> i16 {
    Status::Error.code()
}

#[test]
fn xen_backend_refuses_bad_requests_and_keeps_serving() {
    let Rig { host, mut fe, mem } = rig(1);
    let (page, good) = fe.grant_test_page(true).unwrap();
    fe.write_page(page, 0, &[0x5a; 4096]).unwrap();
    let (_, ro) = fe.grant_test_page(false).unwrap();

    // A grant ref the guest never issued: write and read refused.
    let bad = 0xdead_beef;
    let w = encode::rw(ABI, OP_WRITE, 1, 0, 0, &[seg(bad, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 1), err());
    let r = encode::rw(ABI, OP_READ, 2, 0, 0, &[seg(bad, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &r, 2), err());
    // A read into a read-only grant: the back end may not write it.
    let r = encode::rw(ABI, OP_READ, 3, 0, 0, &[seg(ro, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &r, 3), err());
    // Twelve segments in a direct request (the limit is eleven).
    let segs = vec![seg(good, 0, 0); 12];
    let w = encode::rw(ABI, OP_WRITE, 4, 0, 0, &segs);
    assert_eq!(send_raw(&mut fe, 0, &w, 4), err());
    // first_sect > last_sect; last_sect past the page.
    let w = encode::rw(ABI, OP_WRITE, 5, 0, 0, &[seg(good, 5, 2)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 5), err());
    let w = encode::rw(ABI, OP_WRITE, 6, 0, 0, &[seg(good, 0, 8)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 6), err());
    // Past the end of the disk, and a sector number that overflows.
    let w = encode::rw(ABI, OP_WRITE, 7, 0, DISK / 512 - 7, &[seg(good, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 7), err());
    let w = encode::rw(ABI, OP_WRITE, 8, 0, u64::MAX - 3, &[seg(good, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 8), err());
    let d = encode::discard(ABI, 9, 0, 8, u64::MAX, false);
    assert_eq!(send_raw(&mut fe, 0, &d, 9), err());
    // An unknown operation: EOPNOTSUPP.
    let mut u = encode::rw(ABI, OP_WRITE, 10, 0, 0, &[seg(good, 0, 7)]);
    u[0] = 77;
    assert_eq!(send_raw(&mut fe, 0, &u, 10), Status::NotSupported.code());
    // Nothing reached the disk.
    assert_eq!(mem.read_at(0, DISK as usize), vec![0; DISK as usize]);

    // Indirect: an indirect page ref that is not granted.
    let ind = encode::indirect(ABI, OP_WRITE, 11, 0, 0, 16, &[bad]);
    assert_eq!(send_raw(&mut fe, 0, &ind, 11), err());
    // More segments than feature-max-indirect-segments (64).
    let ind = encode::indirect(ABI, OP_WRITE, 12, 0, 0, 65, &[good]);
    assert_eq!(send_raw(&mut fe, 0, &ind, 12), err());
    // An indirect op that is not READ or WRITE.
    let mut ind = encode::indirect(ABI, OP_WRITE, 13, 0, 0, 1, &[good]);
    ind[1] = OP_INDIRECT;
    assert_eq!(send_raw(&mut fe, 0, &ind, 13), err());
    // A well-formed indirect page whose segments are malformed.
    let (ipage, igref) = fe.grant_test_page(false).unwrap();
    let pages = encode::indirect_pages(&[seg(good, 0, 7), seg(good, 6, 1)]);
    fe.write_page(ipage, 0, &pages[0]).unwrap();
    let ind = encode::indirect(ABI, OP_WRITE, 14, 0, 0, 2, &[igref]);
    assert_eq!(send_raw(&mut fe, 0, &ind, 14), err());
    // An indirect page naming an ungranted data page.
    let pages = encode::indirect_pages(&[seg(good, 0, 7), seg(bad, 0, 7)]);
    fe.write_page(ipage, 0, &pages[0]).unwrap();
    let ind = encode::indirect(ABI, OP_WRITE, 15, 0, 0, 2, &[igref]);
    assert_eq!(send_raw(&mut fe, 0, &ind, 15), err());
    assert_eq!(mem.read_at(0, DISK as usize), vec![0; DISK as usize]);

    // And a good request still works.
    let w = encode::rw(ABI, OP_WRITE, 16, 0, 8, &[seg(good, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 0, &w, 16), Status::Okay.code());
    assert_eq!(mem.read_at(4096, 4096), vec![0x5a; 4096]);
    let refused = host
        .vbd()
        .with_rings(|r| r[0].stats().refused.load(Ordering::Relaxed));
    assert!(refused >= 10);
    assert!(!host.vbd().with_rings(|r| r[0].broken()));
}

#[test]
fn xen_backend_runaway_req_prod_disconnects_only_that_ring() {
    let Rig { host, mut fe, mem } = rig(2);
    // Queue 0's req_prod jumps far ahead of the ring.
    let ring = fe.ring_mut(0).unwrap();
    ring.set_req_prod_raw(0x4000_0000).unwrap();
    fe.kick(0).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !host.vbd().with_rings(|r| r[0].broken()) {
        assert!(Instant::now() < end, "ring 0 not disconnected");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        host.vbd()
            .with_rings(|r| r[0].stats().consumed.load(Ordering::Relaxed)),
        0,
        "no slot of the bogus range was consumed"
    );
    // Queue 1 keeps serving.
    let (page, good) = fe.grant_test_page(true).unwrap();
    fe.write_page(page, 0, &[0x77; 4096]).unwrap();
    let w = encode::rw(ABI, OP_WRITE, 5, 0, 16, &[seg(good, 0, 7)]);
    assert_eq!(send_raw(&mut fe, 1, &w, 5), Status::Okay.code());
    assert_eq!(mem.read_at(8192, 4096), vec![0x77; 4096]);
    assert!(!host.vbd().with_rings(|r| r[1].broken()));
}

#[test]
fn xen_backend_bad_xenstore_nodes_fail_the_vbd_not_the_process() {
    for (node, value) in [
        ("ring-ref", "not-a-number"),
        ("ring-page-order", "9"),
        ("protocol", "sparc-abi"),
        ("multi-queue-num-queues", "99"),
        ("event-channel", "424242"),
    ] {
        let mem = Arc::new(MemStorage::new(DISK));
        let mut host = Host::new();
        host.create_vbd(
            opener("vm1", mem, Arc::new(MemEpochStore::default())),
            BackendConfig::default(),
            None,
        );
        wait_phase(host.vbd(), Phase::InitWait);
        let w = |k: &str, v: &str| {
            host.xs
                .write_str(XBT_NULL, &format!("{FE}/{k}"), v)
                .unwrap()
        };
        let guest = EmulatedGuest::new(DOMID, 16).unwrap();
        host.platform.add_guest(Arc::clone(&guest));
        let g = guest.grant(0, true).unwrap();
        w("ring-ref", &g.to_string());
        w("event-channel", "1");
        w(node, value);
        w("state", "3");
        wait_phase(host.vbd(), Phase::Failed);
        let e = host
            .xs
            .read_string(XBT_NULL, &format!("{BE}/blkshim-error"))
            .unwrap();
        assert!(!e.is_empty(), "{node}: error published");
        assert_eq!(guest.live_mappings(), 0, "{node}: nothing left mapped");
    }
}

#[test]
fn xen_backend_guest_cannot_read_past_the_disk_through_bios() {
    let Rig {
        mut fe,
        host: _host,
        ..
    } = rig(1);
    fe.submit(Bio {
        tag: 1,
        op: BioOp::Read,
        sector: DISK / 512 - 8,
        nr_sectors: 16,
        data: Vec::new(),
    })
    .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let done = fe.poll().unwrap();
        if let Some(c) = done.iter().find(|c| c.tag == 1) {
            assert_eq!(c.status, Status::Error);
            break;
        }
        assert!(Instant::now() < end);
        fe.wait(Duration::from_millis(5)).unwrap();
    }
}
