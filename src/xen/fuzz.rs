//! Fuzz entry for the request path: hostile ring bytes and indirect pages
//! go through [`BackRing`] and [`parse_request`] exactly as a backend would
//! run them. It must never panic or access out of bounds, and whatever it
//! accepts must satisfy the invariants the backend relies on (checked with
//! assertions: a failed one is a parser bug, not bad input).
//!
//! Used by `fuzz/fuzz_targets/blkif_request.rs` (cargo-fuzz) and by
//! `tests/xen_fuzz.rs` over a deterministic corpus on stable Rust.

use super::abi::BlkifAbi;
use super::blkif::{
    parse_request, Limits, Operation, Parsed, Reason, Request, MAX_SEGMENTS_PER_REQUEST,
    SECTORS_PER_PAGE,
};
use super::ring::{BackRing, FrontRing, RingError, RING_HEADER_SIZE};
use super::shared::SharedMem;
use super::PAGE_SIZE;

/// Bytes of fuzz input before the ring contents (see [`fuzz_blkif_request`]).
pub const FUZZ_HEADER_LEN: usize = 20;

/// What one fuzz input did (so a corpus can show it reached every path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuzzOutcome {
    /// Requests taken off the ring.
    pub consumed: u32,
    /// Requests accepted (direct or resolved indirect).
    pub accepted: u32,
    /// Of those, indirect.
    pub accepted_indirect: u32,
    /// Requests refused (answered with ERROR or EOPNOTSUPP).
    pub refused: u32,
    /// The ring was found broken by a bogus `req_prod`.
    pub bogus_producer: bool,
}

/// Fuzz entry: never panics on any input.
///
/// Input layout (missing bytes read as zero): `[0]` ABI, `[1]` feature
/// flags, `[2..4]` max indirect segments, `[4..12]` disk sectors,
/// `[12..16]` req_prod as an offset from the start index, `[16..20]` start
/// index; then the ring's entry area (one or two pages), then indirect
/// pages.
pub fn fuzz_blkif_request(data: &[u8]) {
    let _ = run(data);
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn word<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut w = [0u8; N];
    for (i, b) in w.iter_mut().enumerate() {
        *b = byte(data, at + i);
    }
    w
}

/// The limits encoded in a fuzz input's header.
pub fn fuzz_limits(data: &[u8]) -> Limits {
    let flags = byte(data, 1);
    Limits {
        disk_sectors: u64::from_le_bytes(word(data, 4)),
        block_sectors: if flags & 0x20 != 0 { 8 } else { 1 },
        read_only: flags & 0x01 != 0,
        max_indirect_segments: u32::from(u16::from_le_bytes(word(data, 2))),
        flush: flags & 0x02 != 0,
        barrier: flags & 0x04 != 0,
        discard: flags & 0x08 != 0,
        secure_discard: flags & 0x10 != 0,
    }
}

/// Runs one input and reports what happened.
pub fn run(data: &[u8]) -> FuzzOutcome {
    let mut out = FuzzOutcome::default();
    let abi = match byte(data, 0) % 3 {
        0 => BlkifAbi::Native,
        1 => BlkifAbi::X86_32,
        _ => BlkifAbi::X86_64,
    };
    let pages = if byte(data, 1) & 0x40 != 0 { 2 } else { 1 };
    let limits = fuzz_limits(data);
    let prod_offset = u32::from_le_bytes(word(data, 12));
    let start = u32::from_le_bytes(word(data, 16));

    let Ok(mem) = SharedMem::anonymous(pages * PAGE_SIZE) else {
        return out;
    };
    let Ok(front) = FrontRing::init_at(mem.share(), abi, start) else {
        return out;
    };
    let body = data.get(FUZZ_HEADER_LEN..).unwrap_or(&[]);
    let entries_len = pages * PAGE_SIZE - RING_HEADER_SIZE;
    let ring_bytes = &body[..body.len().min(entries_len)];
    let indirect_bytes = body.get(entries_len..).unwrap_or(&[]);
    if front
        .shared()
        .write_from(RING_HEADER_SIZE, ring_bytes)
        .is_err()
        || front
            .set_req_prod_raw(start.wrapping_add(prod_offset))
            .is_err()
    {
        return out;
    }
    let Ok(mut back) = BackRing::attach(mem, abi, start) else {
        return out;
    };
    let size = back.size();

    // Bounded: a correct ring yields at most `size` requests.
    for _ in 0..=size {
        let raw = match back.next_request() {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(RingError::BogusRequestProducer { .. }) => {
                assert!(prod_offset > size, "sane req_prod called bogus");
                out.bogus_producer = true;
                break;
            }
            Err(_) => break,
        };
        out.consumed += 1;
        assert!(out.consumed <= size, "consumed more than the ring holds");
        let parsed = parse_request(abi, raw.as_bytes(), &limits);
        let result = match parsed {
            Ok(Parsed::Ready(r)) => Ok(r),
            Ok(Parsed::Indirect(ind)) => {
                assert!(!ind.indirect_grefs.is_empty() && ind.indirect_grefs.len() <= 8);
                let pages: Vec<&[u8]> = indirect_bytes
                    .chunks(PAGE_SIZE)
                    .take(ind.indirect_grefs.len())
                    .collect();
                let r = ind.resolve(&pages, &limits);
                if let Err(e) = &r {
                    let full_pages = indirect_bytes.len() / PAGE_SIZE;
                    if full_pages < ind.indirect_grefs.len() {
                        assert!(matches!(e.reason, Reason::BadIndirectPages { .. }));
                    }
                }
                r
            }
            Err(e) => Err(e),
        };
        let response = match result {
            Ok(req) => {
                check_invariants(&req, &limits);
                out.accepted += 1;
                out.accepted_indirect += u32::from(req.indirect);
                req.response(super::blkif::Status::Okay)
            }
            Err(e) => {
                out.refused += 1;
                e.response()
            }
        };
        assert!(response.put(&mut back).is_ok(), "response slot refused");
    }
    let _ = back.push_responses();
    out
}

/// What the backend relies on for every accepted request.
fn check_invariants(req: &Request, limits: &Limits) {
    let segs = req.segments();
    if req.indirect {
        assert!(!segs.is_empty() && segs.len() as u32 <= limits.max_indirect_segments);
    } else {
        assert!(segs.len() <= MAX_SEGMENTS_PER_REQUEST);
    }
    for s in segs {
        assert!(s.first_sect <= s.last_sect && s.last_sect < SECTORS_PER_PAGE);
        assert!(s.page_offset() + s.len() <= PAGE_SIZE);
    }
    let n = req.nr_sectors();
    if n > 0 {
        let end = req.sector_number.checked_add(n);
        assert!(matches!(end, Some(e) if e <= limits.disk_sectors));
    }
    match &req.operation {
        Operation::Read(s) => assert!(!s.is_empty()),
        Operation::Write(s) => assert!(!s.is_empty() && !limits.read_only),
        Operation::WriteBarrier(_) => assert!(limits.barrier && !limits.read_only),
        Operation::Flush(_) => assert!(limits.flush && !limits.read_only),
        Operation::Discard { secure, .. } => {
            assert!(limits.discard && !limits.read_only);
            assert!(!secure || limits.secure_discard);
        }
    }
}
