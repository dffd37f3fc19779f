use super::encode;
use super::*;
use crate::xen::ring::{BackRing, FrontRing};
use crate::xen::shared::SharedMem;

const ABIS: [BlkifAbi; 3] = [BlkifAbi::Native, BlkifAbi::X86_32, BlkifAbi::X86_64];

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn all_features(disk_sectors: u64) -> Limits {
    Limits {
        max_indirect_segments: 256,
        flush: true,
        barrier: true,
        discard: true,
        secure_discard: true,
        ..Limits::new(disk_sectors)
    }
}

fn ready(p: Result<Parsed, RequestError>) -> Request {
    match p {
        Ok(Parsed::Ready(r)) => r,
        other => panic!("expected a ready request, got {other:?}"),
    }
}

fn refused(p: Result<Parsed, RequestError>) -> RequestError {
    match p {
        Err(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn read_write_barrier_flush_round_trip_in_every_abi() {
    let limits = all_features(1 << 20);
    for abi in ABIS {
        let segs = vec![seg(10, 0, 7), seg(11, 2, 5), seg(12, 7, 7)];
        for (op, expect) in [
            (OP_READ, Operation::Read(segs.clone())),
            (OP_WRITE, Operation::Write(segs.clone())),
            (OP_WRITE_BARRIER, Operation::WriteBarrier(segs.clone())),
            (OP_FLUSH_DISKCACHE, Operation::Flush(segs.clone())),
        ] {
            let slot = encode::rw(abi, op, 0xfeed_0000_0000_0001, 0x51, 4096, &segs);
            let r = ready(parse_request(abi, &slot, &limits));
            assert_eq!(r.id, 0xfeed_0000_0000_0001);
            assert_eq!(r.handle, 0x51);
            assert_eq!(r.sector_number, 4096);
            assert_eq!(r.operation, expect);
            assert_eq!(r.nr_sectors(), 8 + 4 + 1);
            assert!(!r.indirect);
            assert_eq!(r.response(Status::Okay).operation, op);
        }
    }
}

#[test]
fn a_slot_parsed_in_the_wrong_abi_reads_other_fields() {
    // The ABIs really differ: an x86_32 slot read as x86_64 has another id.
    let slot = encode::rw(BlkifAbi::X86_32, OP_READ, 7, 0, 8, &[seg(1, 0, 0)]);
    let limits = Limits::new(1 << 40);
    let as_32 = ready(parse_request(BlkifAbi::X86_32, &slot, &limits));
    assert_eq!((as_32.id, as_32.sector_number), (7, 8));
    let mut padded = slot.clone();
    padded.resize(112, 0);
    match parse_request(BlkifAbi::X86_64, &padded, &limits) {
        Ok(Parsed::Ready(r)) => assert_ne!((r.id, r.sector_number), (7, 8)),
        Err(e) => assert_ne!(e.id, 7),
        Ok(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn segment_counts_are_bounded() {
    let limits = all_features(1 << 20);
    for abi in ABIS {
        let e = refused(parse_request(
            abi,
            &encode::rw(abi, OP_READ, 1, 0, 0, &[]),
            &limits,
        ));
        assert_eq!(e.status(), Status::Error);
        assert!(matches!(
            e.reason,
            Reason::BadSegmentCount { nr_segments: 0, .. }
        ));
        let twelve = vec![seg(1, 0, 7); 12];
        let e = refused(parse_request(
            abi,
            &encode::rw(abi, OP_WRITE, 2, 0, 0, &twelve),
            &limits,
        ));
        assert_eq!(
            e.reason,
            Reason::BadSegmentCount {
                nr_segments: 12,
                max: 11
            }
        );
        let eleven = vec![seg(1, 0, 7); 11];
        let r = ready(parse_request(
            abi,
            &encode::rw(abi, OP_WRITE, 3, 0, 0, &eleven),
            &limits,
        ));
        assert_eq!(r.nr_sectors(), 88);
        // An empty flush is a pure cache flush, whatever its sector says.
        let r = ready(parse_request(
            abi,
            &encode::rw(abi, OP_FLUSH_DISKCACHE, 4, 0, u64::MAX, &[]),
            &limits,
        ));
        assert_eq!(r.operation, Operation::Flush(vec![]));
    }
}

#[test]
fn sector_ranges_within_a_page_are_checked() {
    let limits = Limits::new(1 << 20);
    for (first, last, ok) in [
        (0, 7, true),
        (3, 3, true),
        (4, 3, false),
        (0, 8, false),
        (8, 8, false),
        (255, 255, false),
    ] {
        let slot = encode::rw(
            BlkifAbi::Native,
            OP_READ,
            1,
            0,
            0,
            &[seg(5, 0, 7), seg(9, first, last)],
        );
        let p = parse_request(BlkifAbi::Native, &slot, &limits);
        if ok {
            ready(p);
        } else {
            assert_eq!(refused(p).reason, Reason::BadSegment(seg(9, first, last)));
        }
    }
}

#[test]
fn requests_past_the_end_of_the_disk_are_refused() {
    let limits = all_features(1000);
    for abi in ABIS {
        let ok = encode::rw(abi, OP_WRITE, 1, 0, 992, &[seg(1, 0, 7)]);
        ready(parse_request(abi, &ok, &limits));
        let over = encode::rw(abi, OP_WRITE, 1, 0, 993, &[seg(1, 0, 7)]);
        assert_eq!(
            refused(parse_request(abi, &over, &limits)).reason,
            Reason::BeyondEnd {
                sector: 993,
                nr_sectors: 8
            }
        );
        let wraps = encode::rw(abi, OP_READ, 1, 0, u64::MAX - 2, &[seg(1, 0, 7)]);
        assert!(matches!(
            refused(parse_request(abi, &wraps, &limits)).reason,
            Reason::BeyondEnd { .. }
        ));
        let discard_wraps = encode::discard(abi, 1, 0, 10, u64::MAX, false);
        assert!(matches!(
            refused(parse_request(abi, &discard_wraps, &limits)).reason,
            Reason::BeyondEnd { .. }
        ));
    }
}

#[test]
fn unknown_operations_get_eopnotsupp_with_their_id() {
    let limits = all_features(1 << 20);
    for abi in ABIS {
        for op in [4u8, 7, 8, 0x80, 0xff] {
            let mut slot = encode::rw(abi, OP_READ, 0xabcd_ef01_2345_6789, 0, 0, &[seg(1, 0, 0)]);
            slot[0] = op;
            let e = refused(parse_request(abi, &slot, &limits));
            assert_eq!(e.reason, Reason::UnknownOperation(op));
            let rsp = e.response();
            assert_eq!(
                (rsp.id, rsp.operation, rsp.status.code()),
                (0xabcd_ef01_2345_6789, op, -2)
            );
        }
    }
}

#[test]
fn unoffered_features_get_eopnotsupp() {
    let plain = Limits::new(1 << 20);
    let abi = BlkifAbi::Native;
    for slot in [
        encode::rw(abi, OP_FLUSH_DISKCACHE, 1, 0, 0, &[]),
        encode::rw(abi, OP_WRITE_BARRIER, 1, 0, 0, &[]),
        encode::discard(abi, 1, 0, 0, 8, false),
        encode::indirect(abi, OP_READ, 1, 0, 0, 1, &[3]),
    ] {
        let e = refused(parse_request(abi, &slot, &plain));
        assert!(matches!(e.reason, Reason::NotNegotiated(_)), "{e:?}");
        assert_eq!(e.status(), Status::NotSupported);
    }
    // Secure discard needs discard-secure.
    let no_secure = Limits {
        discard: true,
        ..plain
    };
    let slot = encode::discard(abi, 1, 0, 0, 8, true);
    assert_eq!(
        refused(parse_request(abi, &slot, &no_secure)).status(),
        Status::NotSupported
    );
    let r = ready(parse_request(
        abi,
        &encode::discard(abi, 1, 0, 0, 8, false),
        &no_secure,
    ));
    assert_eq!(
        r.operation,
        Operation::Discard {
            nr_sectors: 8,
            secure: false
        }
    );
}

#[test]
fn discard_carries_range_and_secure_flag() {
    let limits = all_features(1 << 30);
    for abi in ABIS {
        let slot = encode::discard(abi, 99, 3, 1 << 20, 1 << 21, true);
        let r = ready(parse_request(abi, &slot, &limits));
        assert_eq!(r.id, 99);
        assert_eq!(r.sector_number, 1 << 20);
        assert_eq!(
            r.operation,
            Operation::Discard {
                nr_sectors: 1 << 21,
                secure: true
            }
        );
        assert_eq!(r.nr_sectors(), 1 << 21);
        assert!(r.is_write());
    }
}

#[test]
fn read_only_disks_refuse_changes() {
    let limits = Limits {
        read_only: true,
        ..all_features(1 << 20)
    };
    let abi = BlkifAbi::Native;
    ready(parse_request(
        abi,
        &encode::rw(abi, OP_READ, 1, 0, 0, &[seg(1, 0, 7)]),
        &limits,
    ));
    for slot in [
        encode::rw(abi, OP_WRITE, 1, 0, 0, &[seg(1, 0, 7)]),
        encode::rw(abi, OP_FLUSH_DISKCACHE, 1, 0, 0, &[]),
        encode::discard(abi, 1, 0, 0, 8, false),
    ] {
        let e = refused(parse_request(abi, &slot, &limits));
        assert_eq!(
            (e.reason.clone(), e.status()),
            (Reason::ReadOnly, Status::Error)
        );
    }
}

#[test]
fn block_size_alignment_is_enforced() {
    let limits = Limits {
        block_sectors: 8,
        ..Limits::new(1 << 20)
    };
    let abi = BlkifAbi::Native;
    ready(parse_request(
        abi,
        &encode::rw(abi, OP_READ, 1, 0, 16, &[seg(1, 0, 7)]),
        &limits,
    ));
    for slot in [
        encode::rw(abi, OP_READ, 1, 0, 17, &[seg(1, 0, 7)]),
        encode::rw(abi, OP_READ, 1, 0, 16, &[seg(1, 0, 3)]),
    ] {
        assert_eq!(
            refused(parse_request(abi, &slot, &limits)).reason,
            Reason::Misaligned
        );
    }
}

#[test]
fn indirect_requests_resolve_from_their_pages() {
    let limits = Limits {
        max_indirect_segments: 1024,
        ..Limits::new(1 << 30)
    };
    for abi in ABIS {
        // 600 segments: two indirect pages; the third gref is not needed.
        let segs: Vec<Segment> = (0..600u32)
            .map(|i| seg(1000 + i, (i % 8) as u8, 7))
            .collect();
        let total: u64 = segs.iter().map(Segment::sectors).sum();
        let slot = encode::indirect(abi, OP_WRITE, 42, 0x33, 2048, 600, &[70, 71, 72]);
        let ind = match parse_request(abi, &slot, &limits) {
            Ok(Parsed::Indirect(i)) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(ind.indirect_grefs, vec![70, 71]);
        assert_eq!((ind.id, ind.handle, ind.sector_number), (42, 0x33, 2048));
        let pages = encode::indirect_pages(&segs);
        let r = ind.resolve(&pages, &limits).unwrap();
        assert!(r.indirect);
        assert_eq!(r.operation, Operation::Write(segs.clone()));
        assert_eq!(r.nr_sectors(), total);
        // The response echoes the indirect op, as blkfront expects.
        assert_eq!(r.response(Status::Okay).operation, OP_WRITE);

        // Wrong number of pages, or a short page.
        let e = ind.resolve(&pages[..1], &limits).unwrap_err();
        assert_eq!(
            e.reason,
            Reason::BadIndirectPages {
                needed: 2,
                given: 1
            }
        );
        let short = vec![pages[0].clone(), vec![0u8; 100]];
        assert!(ind.resolve(&short, &limits).is_err());

        // A bad segment on the second page is found.
        let mut bad = segs.clone();
        bad[599] = seg(5, 6, 2);
        let e = ind
            .resolve(&encode::indirect_pages(&bad), &limits)
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadSegment(seg(5, 6, 2)));
        assert_eq!(e.response().operation, OP_WRITE);
    }
}

#[test]
fn indirect_header_is_validated() {
    let limits = Limits {
        max_indirect_segments: 256,
        ..Limits::new(1 << 30)
    };
    let abi = BlkifAbi::X86_32;
    let parse = |slot: Vec<u8>| refused(parse_request(abi, &slot, &limits));
    assert_eq!(
        parse(encode::indirect(abi, OP_READ, 1, 0, 0, 257, &[1])).reason,
        Reason::BadSegmentCount {
            nr_segments: 257,
            max: 256
        }
    );
    assert!(matches!(
        parse(encode::indirect(abi, OP_READ, 1, 0, 0, 0, &[1])).reason,
        Reason::BadSegmentCount { nr_segments: 0, .. }
    ));
    for op in [OP_DISCARD, OP_INDIRECT, OP_FLUSH_DISKCACHE, 0xee] {
        assert_eq!(
            parse(encode::indirect(abi, op, 1, 0, 0, 4, &[1])).reason,
            Reason::BadIndirectOp(op)
        );
    }
    // More than any page count can hold is capped even if negotiated higher.
    let huge = Limits {
        max_indirect_segments: u32::MAX,
        ..limits
    };
    let slot = encode::indirect(abi, OP_READ, 1, 0, 0, u16::MAX, &[1; 8]);
    assert!(matches!(
        refused(parse_request(abi, &slot, &huge)).reason,
        Reason::BadSegmentCount { max: 4096, .. }
    ));
    // Past the end of the disk, found once the pages are read.
    let ind = match parse_request(
        abi,
        &encode::indirect(abi, OP_READ, 1, 0, (1 << 30) - 8, 2, &[9]),
        &limits,
    ) {
        Ok(Parsed::Indirect(i)) => i,
        other => panic!("{other:?}"),
    };
    let pages = encode::indirect_pages(&[seg(1, 0, 7), seg(2, 0, 0)]);
    assert!(matches!(
        ind.resolve(&pages, &limits).unwrap_err().reason,
        Reason::BeyondEnd { .. }
    ));
}

#[test]
fn truncated_slots_are_refused_not_indexed() {
    let limits = all_features(100);
    for abi in ABIS {
        let slot = encode::rw(abi, OP_READ, 1, 0, 0, &[seg(1, 0, 7)]);
        for len in [0, 1, 8, abi.layout().request_size - 1] {
            let e = refused(parse_request(abi, &slot[..len], &limits));
            assert_eq!(e.reason, Reason::Truncated);
        }
    }
}

/// Requests through a real ring, answered with each status.
#[test]
fn responses_reach_the_frontend_through_the_ring() {
    let limits = all_features(1 << 20);
    for abi in ABIS {
        let mem = SharedMem::anonymous(4096).unwrap();
        let mut front = FrontRing::init(mem.share(), abi).unwrap();
        let mut back = BackRing::new(mem, abi).unwrap();
        front
            .put_request(&encode::rw(abi, OP_READ, 1, 0, 0, &[seg(1, 0, 7)]))
            .unwrap();
        front
            .put_request(&encode::rw(abi, OP_WRITE, 2, 0, 1 << 21, &[seg(1, 0, 7)]))
            .unwrap();
        let mut unknown = encode::rw(abi, OP_READ, 3, 0, 0, &[seg(1, 0, 7)]);
        unknown[0] = 9;
        front.put_request(&unknown).unwrap();
        front.push_requests().unwrap();
        while let Some(raw) = back.next_request().unwrap() {
            let rsp = match parse_request(abi, raw.as_bytes(), &limits) {
                Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                Ok(Parsed::Indirect(_)) => panic!("no indirect sent"),
                Err(e) => e.response(),
            };
            rsp.put(&mut back).unwrap();
        }
        assert!(back.push_responses().unwrap());
        let got: Vec<_> = std::iter::from_fn(|| front.next_response().unwrap())
            .map(|r| (r.id, r.operation, r.status))
            .collect();
        assert_eq!(got, vec![(1, OP_READ, 0), (2, OP_WRITE, -1), (3, 9, -2)]);
    }
}
