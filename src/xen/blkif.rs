//! blkif requests and responses: from the bytes a frontend put in a ring
//! slot (already copied out by [`BackRing`]) to a
//! validated [`Request`], and back to a [`Response`].
//!
//! Everything a request says is checked against the negotiated [`Limits`]
//! before the backend acts on it: segment counts, per-page sector ranges,
//! the disk's end, read-only, and which optional operations were offered.
//! A rejected request still carries its `id` and `operation`
//! ([`RequestError`]) so the backend can answer it: unknown or
//! unnegotiated operations with `BLKIF_RSP_EOPNOTSUPP`, the rest with
//! `BLKIF_RSP_ERROR` (as Linux xen-blkback does).
//!
//! Indirect requests are parsed in two steps: [`parse_request`] returns
//! [`Parsed::Indirect`] naming the grant refs of the pages that hold the
//! segment list; the backend maps those pages, copies them out once, and
//! calls [`IndirectRequest::resolve`].

use std::fmt;

use super::abi::{self, BlkifAbi};
use super::ring::{BackRing, RingError};
use super::{sys, PAGE_SIZE, SECTOR_SIZE};

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = sys::BLKIF_OP_READ as u8;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = sys::BLKIF_OP_WRITE as u8;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = sys::BLKIF_OP_WRITE_BARRIER as u8;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = sys::BLKIF_OP_FLUSH_DISKCACHE as u8;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = sys::BLKIF_OP_DISCARD as u8;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = sys::BLKIF_OP_INDIRECT as u8;
/// `BLKIF_DISCARD_SECURE`.
pub const DISCARD_SECURE: u8 = sys::BLKIF_DISCARD_SECURE as u8;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments in a direct request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = sys::BLKIF_MAX_SEGMENTS_PER_REQUEST as usize;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize =
    sys::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST as usize;
/// Segment descriptors per indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / abi::SEGMENT_SIZE;
/// The most segments an indirect request can describe at all.
pub const MAX_INDIRECT_SEGMENTS: u32 =
    (MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE) as u32;
/// Sectors per 4 KiB page: `last_sect` is at most this minus one.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE / SECTOR_SIZE) as u8;

/// `BLKIF_RSP_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `BLKIF_RSP_OKAY`.
    Okay,
    /// `BLKIF_RSP_ERROR`.
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP`.
    NotSupported,
}

impl Status {
    /// The wire value.
    pub fn code(self) -> i16 {
        match self {
            Status::Okay => sys::BLKIF_RSP_OKAY as i16,
            Status::Error => sys::BLKIF_RSP_ERROR as i16,
            Status::NotSupported => sys::BLKIF_RSP_EOPNOTSUPP as i16,
        }
    }
}

/// What the backend negotiated with the frontend and knows about the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// Logical block size in 512-byte sectors: starts and segment lengths
    /// must be multiples of it (1 for 512-byte disks, 8 for 4 KiB ones).
    pub block_sectors: u64,
    /// Writes, barriers, flushes and discards are refused.
    pub read_only: bool,
    /// `feature-max-indirect-segments` (0: indirect not offered).
    pub max_indirect_segments: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`.
    pub secure_discard: bool,
}

impl Limits {
    /// A writable disk of `disk_sectors` with 512-byte blocks, no optional
    /// features.
    pub fn new(disk_sectors: u64) -> Self {
        Limits {
            disk_sectors,
            block_sectors: 1,
            read_only: false,
            max_indirect_segments: 0,
            flush: false,
            barrier: false,
            discard: false,
            secure_discard: false,
        }
    }
}

/// One page-sized piece of a read or write: sectors `first_sect..=last_sect`
/// of the granted page `gref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Grant ref of the data page.
    pub gref: u32,
    /// First 512-byte sector within the page.
    pub first_sect: u8,
    /// Last sector within the page (inclusive).
    pub last_sect: u8,
}

impl Segment {
    /// Sectors this segment covers (valid once parsed: 1..=8).
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect.saturating_sub(self.first_sect)) + 1
    }

    /// Byte offset of the data within its page.
    pub fn page_offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE
    }

    /// Bytes of data in this segment.
    pub fn len(&self) -> usize {
        self.sectors() as usize * SECTOR_SIZE
    }

    /// Never true for a parsed segment.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn decode(bytes: &[u8]) -> Segment {
        Segment {
            gref: le_u32(bytes, abi::SEGMENT_GREF),
            first_sect: bytes.get(abi::SEGMENT_FIRST_SECT).copied().unwrap_or(0),
            last_sect: bytes.get(abi::SEGMENT_LAST_SECT).copied().unwrap_or(0),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        put(out, abi::SEGMENT_GREF, &self.gref.to_le_bytes());
        put(out, abi::SEGMENT_FIRST_SECT, &[self.first_sect]);
        put(out, abi::SEGMENT_LAST_SECT, &[self.last_sect]);
    }
}

/// What a request asks the disk to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read into the segments' pages.
    Read(Vec<Segment>),
    /// Write from the segments' pages.
    Write(Vec<Segment>),
    /// `WRITE_BARRIER`: flush, then write (possibly nothing), durably.
    WriteBarrier(Vec<Segment>),
    /// `FLUSH_DISKCACHE`: flush, then write (possibly nothing), durably.
    Flush(Vec<Segment>),
    /// Discard `nr_sectors` from the start sector (`secure`: must not be
    /// readable afterwards).
    Discard {
        /// Sectors to discard.
        nr_sectors: u64,
        /// `BLKIF_DISCARD_SECURE` was set (and offered).
        secure: bool,
    },
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the response.
    pub id: u64,
    /// Operation to echo in the response (for indirect requests the
    /// indirect op, as Linux xen-blkback does).
    pub wire_operation: u8,
    /// The virtual device handle.
    pub handle: u16,
    /// First 512-byte sector.
    pub sector_number: u64,
    /// What to do.
    pub operation: Operation,
    /// It came as `BLKIF_OP_INDIRECT`.
    pub indirect: bool,
}

impl Request {
    /// The data segments (empty for discard and empty flushes).
    pub fn segments(&self) -> &[Segment] {
        match &self.operation {
            Operation::Read(s)
            | Operation::Write(s)
            | Operation::WriteBarrier(s)
            | Operation::Flush(s) => s,
            Operation::Discard { .. } => &[],
        }
    }

    /// Sectors touched: the segments' total, or the discard length.
    pub fn nr_sectors(&self) -> u64 {
        match &self.operation {
            Operation::Discard { nr_sectors, .. } => *nr_sectors,
            _ => self.segments().iter().map(Segment::sectors).sum(),
        }
    }

    /// Whether it changes the disk (everything but a read).
    pub fn is_write(&self) -> bool {
        !matches!(self.operation, Operation::Read(_))
    }

    /// The response to send when it is done.
    pub fn response(&self, status: Status) -> Response {
        Response {
            id: self.id,
            operation: self.wire_operation,
            status,
        }
    }
}

/// A response to put on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub operation: u8,
    /// Outcome.
    pub status: Status,
}

impl Response {
    /// Queues it on `ring` (publish with [`BackRing::push_responses`]).
    pub fn put(&self, ring: &mut BackRing) -> Result<(), RingError> {
        ring.put_response(self.id, self.operation, self.status.code())
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An operation code blkif does not define (or `RESERVED_1`).
    UnknownOperation(u8),
    /// An operation the backend did not offer (flush, barrier, discard,
    /// secure discard, indirect).
    NotNegotiated(u8),
    /// Wrong number of segments for the operation.
    BadSegmentCount {
        /// Segments the request claims.
        nr_segments: u32,
        /// The most allowed.
        max: u32,
    },
    /// `first_sect > last_sect` or `last_sect > 7`.
    BadSegment(Segment),
    /// The request reaches past the end of the disk (or overflows).
    BeyondEnd {
        /// Start sector.
        sector: u64,
        /// Length in sectors.
        nr_sectors: u64,
    },
    /// Start or length not a multiple of the logical block size.
    Misaligned,
    /// A change to a read-only disk.
    ReadOnly,
    /// `indirect_op` is not READ or WRITE.
    BadIndirectOp(u8),
    /// The indirect segment pages given do not match the request.
    BadIndirectPages {
        /// Pages needed.
        needed: usize,
        /// Pages given.
        given: usize,
    },
    /// The slot is shorter than a request in this ABI.
    Truncated,
}

/// A refused request, with what is needed to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// The request's id.
    pub id: u64,
    /// The operation byte to echo.
    pub operation: u8,
    /// Why.
    pub reason: Reason,
}

impl RequestError {
    /// `EOPNOTSUPP` for unknown/unoffered operations, `ERROR` otherwise.
    pub fn status(&self) -> Status {
        match self.reason {
            Reason::UnknownOperation(_) | Reason::NotNegotiated(_) => Status::NotSupported,
            _ => Status::Error,
        }
    }

    /// The response that refuses the request.
    pub fn response(&self) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status: self.status(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blkif request id {:#x} op {} refused: {:?}",
            self.id, self.operation, self.reason
        )
    }
}

impl std::error::Error for RequestError {}

/// An indirect request whose segment pages still have to be fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectRequest {
    /// Echoed in the response.
    pub id: u64,
    /// `indirect_op` (READ or WRITE).
    pub indirect_op: u8,
    /// The virtual device handle.
    pub handle: u16,
    /// First sector.
    pub sector_number: u64,
    /// Segments in the indirect pages.
    pub nr_segments: u32,
    /// Grant refs of the pages holding the segments (exactly as many as
    /// `nr_segments` needs).
    pub indirect_grefs: Vec<u32>,
}

/// The result of parsing a ring slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete, validated request.
    Ready(Request),
    /// An indirect request: fetch `indirect_grefs`, then
    /// [`IndirectRequest::resolve`].
    Indirect(IndirectRequest),
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn put(out: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(d) = out.get_mut(off..off + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// Parses one ring slot (`RawRequest::as_bytes`) in `abi` against `limits`.
pub fn parse_request(abi: BlkifAbi, slot: &[u8], limits: &Limits) -> Result<Parsed, RequestError> {
    let l = abi.layout();
    let operation = slot.first().copied().unwrap_or(u8::MAX);
    let id = le_u64(slot, l.id);
    let fail = |reason| RequestError {
        id,
        operation,
        reason,
    };
    if slot.len() < l.request_size {
        return Err(fail(Reason::Truncated));
    }
    let handle = le_u16(slot, abi::HANDLE);
    let sector_number = le_u64(slot, l.sector_number);
    match operation {
        OP_READ | OP_WRITE | OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE => {
            let offered = match operation {
                OP_WRITE_BARRIER => limits.barrier,
                OP_FLUSH_DISKCACHE => limits.flush,
                _ => true,
            };
            if !offered {
                return Err(fail(Reason::NotNegotiated(operation)));
            }
            let nr_segments = u32::from(slot[abi::NR_SEGMENTS]);
            let may_be_empty = matches!(operation, OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE);
            if nr_segments as usize > MAX_SEGMENTS_PER_REQUEST
                || (nr_segments == 0 && !may_be_empty)
            {
                return Err(fail(Reason::BadSegmentCount {
                    nr_segments,
                    max: MAX_SEGMENTS_PER_REQUEST as u32,
                }));
            }
            let segments: Vec<Segment> = (0..nr_segments as usize)
                .map(|i| Segment::decode(&slot[l.seg + i * abi::SEGMENT_SIZE..]))
                .collect();
            finish_rw(
                id,
                operation,
                operation,
                handle,
                sector_number,
                segments,
                false,
                limits,
            )
            .map(Parsed::Ready)
        }
        OP_DISCARD => {
            if !limits.discard {
                return Err(fail(Reason::NotNegotiated(operation)));
            }
            let secure = slot[abi::DISCARD_FLAG] & DISCARD_SECURE != 0;
            if secure && !limits.secure_discard {
                return Err(fail(Reason::NotNegotiated(operation)));
            }
            if limits.read_only {
                return Err(fail(Reason::ReadOnly));
            }
            let nr_sectors = le_u64(slot, l.discard_nr_sectors);
            check_range(sector_number, nr_sectors, limits).map_err(fail)?;
            Ok(Parsed::Ready(Request {
                id,
                wire_operation: operation,
                handle,
                sector_number,
                operation: Operation::Discard { nr_sectors, secure },
                indirect: false,
            }))
        }
        OP_INDIRECT => {
            if limits.max_indirect_segments == 0 {
                return Err(fail(Reason::NotNegotiated(operation)));
            }
            let indirect_op = slot[abi::INDIRECT_OP];
            if indirect_op != OP_READ && indirect_op != OP_WRITE {
                return Err(fail(Reason::BadIndirectOp(indirect_op)));
            }
            let nr_segments = u32::from(le_u16(slot, abi::INDIRECT_NR_SEGMENTS));
            let max = limits.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
            if nr_segments == 0 || nr_segments > max {
                return Err(fail(Reason::BadSegmentCount { nr_segments, max }));
            }
            let pages = (nr_segments as usize).div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            let indirect_grefs = (0..pages)
                .map(|i| le_u32(slot, l.indirect_grefs + 4 * i))
                .collect();
            Ok(Parsed::Indirect(IndirectRequest {
                id,
                indirect_op,
                handle: le_u16(slot, l.indirect_handle),
                sector_number: le_u64(slot, l.indirect_sector_number),
                nr_segments,
                indirect_grefs,
            }))
        }
        other => Err(fail(Reason::UnknownOperation(other))),
    }
}

impl IndirectRequest {
    /// Completes the request from local copies of its indirect pages (one
    /// per `indirect_grefs` entry, each `PAGE_SIZE` bytes).
    pub fn resolve<P: AsRef<[u8]>>(
        &self,
        pages: &[P],
        limits: &Limits,
    ) -> Result<Request, RequestError> {
        let needed = self.indirect_grefs.len();
        if pages.len() != needed || pages.iter().any(|p| p.as_ref().len() != PAGE_SIZE) {
            return Err(RequestError {
                id: self.id,
                operation: self.indirect_op,
                reason: Reason::BadIndirectPages {
                    needed,
                    given: pages.len(),
                },
            });
        }
        let segments = (0..self.nr_segments as usize)
            .map(|i| {
                let page = pages[i / SEGMENTS_PER_INDIRECT_PAGE].as_ref();
                let at = (i % SEGMENTS_PER_INDIRECT_PAGE) * abi::SEGMENT_SIZE;
                Segment::decode(&page[at..])
            })
            .collect();
        finish_rw(
            self.id,
            self.indirect_op,
            self.indirect_op,
            self.handle,
            self.sector_number,
            segments,
            true,
            limits,
        )
    }
}

/// Checks segments, range and permissions of a read/write/barrier/flush.
#[allow(clippy::too_many_arguments)]
fn finish_rw(
    id: u64,
    wire_operation: u8,
    op: u8,
    handle: u16,
    sector_number: u64,
    segments: Vec<Segment>,
    indirect: bool,
    limits: &Limits,
) -> Result<Request, RequestError> {
    let fail = |reason| RequestError {
        id,
        operation: wire_operation,
        reason,
    };
    if op != OP_READ && limits.read_only {
        return Err(fail(Reason::ReadOnly));
    }
    let bs = limits.block_sectors.max(1);
    let mut total = 0u64;
    for s in &segments {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
            return Err(fail(Reason::BadSegment(*s)));
        }
        if s.sectors() % bs != 0 {
            return Err(fail(Reason::Misaligned));
        }
        total += s.sectors();
    }
    if total > 0 {
        if sector_number % bs != 0 {
            return Err(fail(Reason::Misaligned));
        }
        check_range(sector_number, total, limits).map_err(fail)?;
    }
    let operation = match op {
        OP_READ => Operation::Read(segments),
        OP_WRITE => Operation::Write(segments),
        OP_WRITE_BARRIER => Operation::WriteBarrier(segments),
        _ => Operation::Flush(segments),
    };
    Ok(Request {
        id,
        wire_operation,
        handle,
        sector_number,
        operation,
        indirect,
    })
}

fn check_range(sector: u64, nr_sectors: u64, limits: &Limits) -> Result<(), Reason> {
    match sector.checked_add(nr_sectors) {
        Some(end) if end <= limits.disk_sectors => Ok(()),
        _ => Err(Reason::BeyondEnd { sector, nr_sectors }),
    }
}

/// Encoders for the frontend's side: build ring slots and indirect pages
/// (emulated guests in tests, fuzz seeds).
pub mod encode {
    use super::*;

    /// A READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE request. Segments beyond
    /// `BLKIF_MAX_SEGMENTS_PER_REQUEST` are not written, but `nr_segments`
    /// is set to `segments.len()` (saturating) so bad counts can be built.
    pub fn rw(
        abi: BlkifAbi,
        op: u8,
        id: u64,
        handle: u16,
        sector: u64,
        segments: &[Segment],
    ) -> Vec<u8> {
        let l = abi.layout();
        let mut b = vec![0u8; l.request_size];
        b[abi::OPERATION] = op;
        b[abi::NR_SEGMENTS] = u8::try_from(segments.len()).unwrap_or(u8::MAX);
        put(&mut b, abi::HANDLE, &handle.to_le_bytes());
        put(&mut b, l.id, &id.to_le_bytes());
        put(&mut b, l.sector_number, &sector.to_le_bytes());
        for (i, s) in segments.iter().take(MAX_SEGMENTS_PER_REQUEST).enumerate() {
            s.encode(&mut b[l.seg + i * abi::SEGMENT_SIZE..]);
        }
        b
    }

    /// A DISCARD request.
    pub fn discard(
        abi: BlkifAbi,
        id: u64,
        handle: u16,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    ) -> Vec<u8> {
        let l = abi.layout();
        let mut b = vec![0u8; l.request_size];
        b[abi::OPERATION] = OP_DISCARD;
        b[abi::DISCARD_FLAG] = if secure { DISCARD_SECURE } else { 0 };
        put(&mut b, abi::HANDLE, &handle.to_le_bytes());
        put(&mut b, l.id, &id.to_le_bytes());
        put(&mut b, l.sector_number, &sector.to_le_bytes());
        put(&mut b, l.discard_nr_sectors, &nr_sectors.to_le_bytes());
        b
    }

    /// An INDIRECT request (up to 8 indirect grefs are written).
    pub fn indirect(
        abi: BlkifAbi,
        indirect_op: u8,
        id: u64,
        handle: u16,
        sector: u64,
        nr_segments: u16,
        indirect_grefs: &[u32],
    ) -> Vec<u8> {
        let l = abi.layout();
        let mut b = vec![0u8; l.request_size];
        b[abi::OPERATION] = OP_INDIRECT;
        b[abi::INDIRECT_OP] = indirect_op;
        put(
            &mut b,
            abi::INDIRECT_NR_SEGMENTS,
            &nr_segments.to_le_bytes(),
        );
        put(&mut b, l.id, &id.to_le_bytes());
        put(&mut b, l.indirect_sector_number, &sector.to_le_bytes());
        put(&mut b, l.indirect_handle, &handle.to_le_bytes());
        for (i, g) in indirect_grefs
            .iter()
            .take(MAX_INDIRECT_PAGES_PER_REQUEST)
            .enumerate()
        {
            put(&mut b, l.indirect_grefs + 4 * i, &g.to_le_bytes());
        }
        b
    }

    /// The indirect pages holding `segments` (512 per page).
    pub fn indirect_pages(segments: &[Segment]) -> Vec<Vec<u8>> {
        segments
            .chunks(SEGMENTS_PER_INDIRECT_PAGE)
            .map(|chunk| {
                let mut page = vec![0u8; PAGE_SIZE];
                for (i, s) in chunk.iter().enumerate() {
                    s.encode(&mut page[i * abi::SEGMENT_SIZE..]);
                }
                page
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
