//! The foundation layers composed the way a blkback-style backend will use
//! them, with no hypervisor: a frontend (emulated guest) negotiates over
//! XenStore, grants a two-page x86_32-abi ring and data pages, and kicks an
//! event channel; a minimal backend loop maps the ring, parses requests,
//! moves data with grant copies (indirect segment pages through a
//! read-only grant map) into an in-memory disk, and answers.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blkshim::xen::abi::BlkifAbi;
use blkshim::xen::blkif::{
    encode, parse_request, Limits, Operation, Parsed, Segment, Status, OP_READ, OP_WRITE,
};
use blkshim::xen::evtchn::{EmulatedEventChannel, EventChannel};
use blkshim::xen::grant::{EmulatedGrantMapper, EmulatedGuest, GrantMapper, GrantRef};
use blkshim::xen::ring::{BackRing, FrontRing};
use blkshim::xen::xenstore::{transact, EmulatedXenStore, XenStore, XBT_NULL};
use blkshim::xen::{PAGE_SIZE, SECTOR_SIZE};

const DOMID: u16 = 7;
const FE: &str = "/local/domain/7/device/vbd/51712";
const DISK_SECTORS: u64 = 4096;

/// The backend: negotiate, then serve until the frontend closes (state 5).
fn backend(
    xs: EmulatedXenStore,
    mapper: Arc<EmulatedGrantMapper>,
    evtchn: EmulatedEventChannel,
) -> Vec<u8> {
    xs.watch(FE, "fe").unwrap();
    // Wait for the frontend to publish its ring (state 3 = Initialised).
    loop {
        xs.read_watch(Some(Duration::from_secs(5)))
            .unwrap()
            .expect("frontend never came");
        if xs
            .read_optional(XBT_NULL, &format!("{FE}/state"))
            .unwrap()
            .as_deref()
            == Some("3")
        {
            break;
        }
    }
    let order: u32 = xs
        .read_parsed(XBT_NULL, &format!("{FE}/ring-page-order"))
        .unwrap();
    let refs: Vec<GrantRef> = (0..1u32 << order)
        .map(|i| {
            xs.read_parsed(XBT_NULL, &format!("{FE}/ring-ref{i}"))
                .unwrap()
        })
        .collect();
    let protocol = xs
        .read_optional(XBT_NULL, &format!("{FE}/protocol"))
        .unwrap();
    let abi = BlkifAbi::from_protocol(protocol.as_deref()).unwrap();
    let port: u32 = xs
        .read_parsed(XBT_NULL, &format!("{FE}/event-channel"))
        .unwrap();
    assert_eq!(port, evtchn.local_port() + 1, "frontend names its own port");
    let mut ring = BackRing::new(mapper.map(DOMID, &refs, true).unwrap(), abi).unwrap();
    let limits = Limits {
        max_indirect_segments: 64,
        flush: true,
        ..Limits::new(DISK_SECTORS)
    };
    let mut disk = vec![0u8; DISK_SECTORS as usize * SECTOR_SIZE];

    loop {
        while let Some(raw) = ring.next_request().unwrap() {
            let parsed = parse_request(abi, raw.as_bytes(), &limits).and_then(|p| match p {
                Parsed::Ready(r) => Ok(r),
                Parsed::Indirect(ind) => {
                    let m = mapper.map(DOMID, &ind.indirect_grefs, false).unwrap();
                    let mut pages = vec![vec![0u8; PAGE_SIZE]; ind.indirect_grefs.len()];
                    for (i, p) in pages.iter_mut().enumerate() {
                        m.read_into(i * PAGE_SIZE, p).unwrap();
                    }
                    ind.resolve(&pages, &limits)
                }
            });
            let rsp = match parsed {
                Err(e) => e.response(),
                Ok(req) => {
                    let mut at = req.sector_number as usize * SECTOR_SIZE;
                    for s in req.segments() {
                        let chunk = &mut disk[at..at + s.len()];
                        match req.operation {
                            Operation::Read(_) => {
                                mapper.copy_to_guest(DOMID, s.gref, s.page_offset(), chunk)
                            }
                            _ => mapper.copy_from_guest(DOMID, s.gref, s.page_offset(), chunk),
                        }
                        .unwrap();
                        at += s.len();
                    }
                    req.response(Status::Okay)
                }
            };
            rsp.put(&mut ring).unwrap();
        }
        if ring.push_responses().unwrap() {
            evtchn.notify().unwrap();
        }
        if ring.final_check_for_requests().unwrap() {
            continue;
        }
        if xs
            .read_optional(XBT_NULL, &format!("{FE}/state"))
            .unwrap()
            .as_deref()
            == Some("5")
        {
            return disk;
        }
        evtchn.wait(Some(Duration::from_millis(20))).unwrap();
    }
}

struct Frontend {
    guest: Arc<EmulatedGuest>,
    ring: FrontRing,
    evtchn: EmulatedEventChannel,
    abi: BlkifAbi,
}

impl Frontend {
    /// Sends one request and waits for its response.
    fn call(&mut self, request: &[u8]) -> (u64, u8, i16) {
        self.ring.put_request(request).unwrap();
        if self.ring.push_requests().unwrap() {
            self.evtchn.notify().unwrap();
        }
        loop {
            if let Some(r) = self.ring.next_response().unwrap() {
                return (r.id, r.operation, r.status);
            }
            if !self.ring.final_check_for_responses().unwrap() {
                assert!(
                    self.evtchn.wait(Some(Duration::from_secs(5))).unwrap(),
                    "no response"
                );
            }
        }
    }

    /// Grants `count` data pages from `first` and describes them fully.
    fn segments(&self, first: usize, count: usize, writable: bool) -> Vec<Segment> {
        (first..first + count)
            .map(|p| Segment {
                gref: self.guest.grant(p, writable).unwrap(),
                first_sect: 0,
                last_sect: 7,
            })
            .collect()
    }
}

fn pattern(page: usize) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (page * 31 + i * 7) as u8).collect()
}

#[test]
fn emulated_guest_and_backend_move_data_through_grants() {
    let back_xs = EmulatedXenStore::new();
    let front_xs = back_xs.connect();
    let guest = EmulatedGuest::new(DOMID, 128).unwrap();
    let mapper = Arc::new(EmulatedGrantMapper::new());
    mapper.add_guest(Arc::clone(&guest));
    let (back_ev, front_ev) = EmulatedEventChannel::pair().unwrap();
    let server = {
        let mapper = Arc::clone(&mapper);
        thread::spawn(move || backend(back_xs, mapper, back_ev))
    };

    // blkfront: a two-page ring on pages 0..2, published in one transaction.
    let abi = BlkifAbi::X86_32;
    let ring_refs: Vec<GrantRef> = (0..2).map(|p| guest.grant(p, true).unwrap()).collect();
    let ring = FrontRing::init(guest.pages(0, 2).unwrap(), abi).unwrap();
    transact(&front_xs, 5, |tx| {
        front_xs.write_str(tx, &format!("{FE}/ring-page-order"), "1")?;
        for (i, r) in ring_refs.iter().enumerate() {
            front_xs.write_str(tx, &format!("{FE}/ring-ref{i}"), &r.to_string())?;
        }
        front_xs.write_str(
            tx,
            &format!("{FE}/event-channel"),
            &front_ev.local_port().to_string(),
        )?;
        front_xs.write_str(tx, &format!("{FE}/protocol"), "x86_32-abi")?;
        front_xs.write_str(tx, &format!("{FE}/state"), "3")
    })
    .unwrap();
    let mut fe = Frontend {
        guest: Arc::clone(&guest),
        ring,
        evtchn: front_ev,
        abi,
    };

    // Data pages 8..59 hold a pattern.
    let view = guest.pages(0, 128).unwrap();
    for p in 8..60 {
        view.write_from(p * PAGE_SIZE, &pattern(p)).unwrap();
    }
    // Direct write: 11 pages at sector 0 (pages granted read-only).
    let segs = fe.segments(8, 11, false);
    assert_eq!(
        fe.call(&encode::rw(fe.abi, OP_WRITE, 1, 0, 0, &segs)),
        (1, OP_WRITE, 0)
    );
    // Indirect write: 41 pages at sector 88, segment list in page 100.
    let segs = fe.segments(19, 41, false);
    let list_page = encode::indirect_pages(&segs).remove(0);
    view.write_from(100 * PAGE_SIZE, &list_page).unwrap();
    let list_ref = guest.grant(100, false).unwrap();
    let req = encode::indirect(fe.abi, OP_WRITE, 2, 0, 88, 41, &[list_ref]);
    assert_eq!(fe.call(&req), (2, OP_WRITE, 0));
    // Read all 52 pages back into pages 64..116 via an indirect read.
    let segs = fe.segments(64, 52, true);
    view.write_from(120 * PAGE_SIZE, &encode::indirect_pages(&segs).remove(0))
        .unwrap();
    let list_ref = guest.grant(120, false).unwrap();
    let req = encode::indirect(fe.abi, OP_READ, 3, 0, 0, 52, &[list_ref]);
    assert_eq!(fe.call(&req), (3, OP_READ, 0));
    for i in 0..52 {
        let mut got = vec![0u8; PAGE_SIZE];
        view.read_into((64 + i) * PAGE_SIZE, &mut got).unwrap();
        assert_eq!(got, pattern(8 + i), "page {i} read back wrong");
    }
    // A request past the end and an unknown operation are refused with the
    // statuses blkfront expects.
    let one = fe.segments(60, 1, true);
    assert_eq!(
        fe.call(&encode::rw(fe.abi, OP_READ, 4, 0, DISK_SECTORS - 4, &one)),
        (4, OP_READ, Status::Error.code())
    );
    let mut unknown = encode::rw(fe.abi, OP_READ, 5, 0, 0, &one);
    unknown[0] = 42;
    assert_eq!(fe.call(&unknown), (5, 42, Status::NotSupported.code()));

    // Close: the backend stops; its disk holds what was written.
    front_xs
        .write_str(XBT_NULL, &format!("{FE}/state"), "5")
        .unwrap();
    fe.evtchn.notify().unwrap();
    let disk = server.join().unwrap();
    for i in 0..52 {
        assert_eq!(
            &disk[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            &pattern(8 + i)[..]
        );
    }
    // Everything the backend mapped was unmapped.
    assert_eq!(guest.live_mappings(), 0);
}

/// Frontend and backend on two threads, many requests in flight, both
/// sleeping on their event channel whenever ring.h's final checks say so:
/// every request gets its response, and no side ever sleeps through work
/// (a lost wakeup would show as a wait that times out with work pending).
#[test]
fn concurrent_ends_never_lose_a_wakeup() {
    const TOTAL: u64 = 20_000;
    const PATIENCE: Option<Duration> = Some(Duration::from_secs(10));
    for abi in [BlkifAbi::Native, BlkifAbi::X86_32] {
        let guest = EmulatedGuest::new(DOMID, 4).unwrap();
        let mapper = EmulatedGrantMapper::new();
        mapper.add_guest(Arc::clone(&guest));
        let refs: Vec<GrantRef> = (0..4).map(|p| guest.grant(p, true).unwrap()).collect();
        let mut front = FrontRing::init(guest.pages(0, 4).unwrap(), abi).unwrap();
        let mut back = BackRing::new(mapper.map(DOMID, &refs, true).unwrap(), abi).unwrap();
        let (back_ev, front_ev) = EmulatedEventChannel::pair().unwrap();
        let limits = Limits::new(1 << 30);

        let server = thread::spawn(move || {
            let mut served = 0u64;
            while served < TOTAL {
                while let Some(raw) = back.next_request().unwrap() {
                    let req = match parse_request(abi, raw.as_bytes(), &limits).unwrap() {
                        Parsed::Ready(r) => r,
                        Parsed::Indirect(_) => unreachable!(),
                    };
                    req.response(Status::Okay).put(&mut back).unwrap();
                    served += 1;
                }
                if back.push_responses().unwrap() {
                    back_ev.notify().unwrap();
                }
                if served < TOTAL && !back.final_check_for_requests().unwrap() {
                    assert!(
                        back_ev.wait(PATIENCE).unwrap(),
                        "backend slept through work"
                    );
                }
            }
            served
        });

        let seg = [Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
        }];
        let (mut sent, mut done) = (0u64, 0u64);
        while done < TOTAL {
            let mut queued = false;
            while sent < TOTAL && front.free_requests() > 0 {
                front
                    .put_request(&encode::rw(
                        abi,
                        OP_WRITE,
                        sent,
                        0,
                        sent * 8 % (1 << 29),
                        &seg,
                    ))
                    .unwrap();
                sent += 1;
                queued = true;
                if sent % 7 == 0 {
                    break; // vary batch sizes
                }
            }
            if queued && front.push_requests().unwrap() {
                front_ev.notify().unwrap();
            }
            while let Some(r) = front.next_response().unwrap() {
                assert_eq!((r.id, r.status), (done, 0));
                done += 1;
            }
            let more_to_send = sent < TOTAL && front.free_requests() > 0;
            if done < TOTAL && !more_to_send && !front.final_check_for_responses().unwrap() {
                assert!(
                    front_ev.wait(PATIENCE).unwrap(),
                    "frontend slept through work"
                );
            }
        }
        assert_eq!(server.join().unwrap(), TOTAL);
    }
}
