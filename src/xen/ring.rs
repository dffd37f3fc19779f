//! The blkif shared ring (xen/io/ring.h `DEFINE_RING_TYPES(blkif, ...)`),
//! for all three ABIs and multi-page rings (`ring-page-order`).
//!
//! Layout of the shared pages: `req_prod, req_event, rsp_prod, rsp_event`
//! (u32 each), 48 bytes of padding, then the entries (a union of request and
//! response, `AbiLayout::entry_size` bytes each). The ring holds the largest
//! power of two of entries that fits in the pages.
//!
//! [`BackRing`] is the backend's side: it copies each request out exactly
//! once, follows ring.h's barrier discipline, and treats a `req_prod` that
//! claims more requests than the ring can hold as a hostile frontend (an
//! error, never a loop over stale slots). [`FrontRing`] is the guest's side,
//! used to emulate a frontend in tests.

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use super::abi::{AbiLayout, BlkifAbi, MAX_REQUEST_SIZE, RSP_ID};
use super::shared::{AccessError, SharedMem};
use super::PAGE_SIZE;

/// Bytes before the first entry: four indexes plus padding.
pub const RING_HEADER_SIZE: usize = 64;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// The largest `ring-page-order` this backend accepts (16 pages, as Linux's
/// xen-blkback's `XENBUS_MAX_RING_GRANT_ORDER`).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Ring failures. After [`RingError::BogusRequestProducer`] the ring stays
/// broken: the backend should stop serving it and disconnect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The shared memory is not a power-of-two number (up to
    /// 2^[`MAX_RING_PAGE_ORDER`]) of whole pages, or is read-only.
    BadGeometry {
        /// Size of the mapping in bytes.
        len: usize,
    },
    /// The frontend's `req_prod` is impossible: more requests outstanding
    /// than the ring holds, or behind what was already consumed.
    BogusRequestProducer {
        /// The `req_prod` the frontend published.
        req_prod: u32,
        /// The backend's private consumer index.
        req_cons: u32,
        /// The backend's private response producer.
        rsp_prod_pvt: u32,
        /// Entries in the ring.
        size: u32,
    },
    /// A response was queued with no request awaiting one.
    NoRequestToAnswer,
    /// The frontend's `rsp_cons`/`rsp_prod` mismatch seen by [`FrontRing`].
    BogusResponseProducer {
        /// The `rsp_prod` seen.
        rsp_prod: u32,
        /// The frontend's consumer index.
        rsp_cons: u32,
    },
    /// [`FrontRing::put_request`] on a full ring, or with a request larger
    /// than an entry.
    Full,
    /// A shared-memory access failed.
    Access(AccessError),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadGeometry { len } => write!(
                f,
                "shared ring of {len} bytes is not 2^n writable pages (n <= {MAX_RING_PAGE_ORDER})"
            ),
            RingError::BogusRequestProducer {
                req_prod,
                req_cons,
                rsp_prod_pvt,
                size,
            } => write!(
                f,
                "frontend provided bogus ring requests (req_prod {req_prod}, req_cons {req_cons}, \
                 rsp_prod_pvt {rsp_prod_pvt}, ring size {size})"
            ),
            RingError::NoRequestToAnswer => write!(f, "response without an outstanding request"),
            RingError::BogusResponseProducer { rsp_prod, rsp_cons } => write!(
                f,
                "backend provided bogus responses (rsp_prod {rsp_prod}, rsp_cons {rsp_cons})"
            ),
            RingError::Full => write!(f, "ring full"),
            RingError::Access(e) => write!(f, "ring access: {e}"),
        }
    }
}

impl std::error::Error for RingError {}

impl From<AccessError> for RingError {
    fn from(e: AccessError) -> Self {
        RingError::Access(e)
    }
}

/// Number of entries a ring of `nr_pages` pages holds in `abi`
/// (`__CONST_RING_SIZE`: largest power of two that fits).
pub fn ring_size(abi: BlkifAbi, nr_pages: usize) -> u32 {
    let bytes = nr_pages.saturating_mul(PAGE_SIZE);
    let fit = bytes.saturating_sub(RING_HEADER_SIZE) / abi.layout().entry_size;
    if fit == 0 {
        return 0;
    }
    let pow2 = 1usize << (usize::BITS - 1 - fit.leading_zeros());
    u32::try_from(pow2).unwrap_or(1 << 31)
}

/// Checks that `mem` can hold a ring and returns its entry count.
fn geometry(mem: &SharedMem, abi: BlkifAbi) -> Result<u32, RingError> {
    let len = mem.len();
    let pages = len / PAGE_SIZE;
    let ok = mem.writable()
        && len % PAGE_SIZE == 0
        && pages.is_power_of_two()
        && pages <= 1 << MAX_RING_PAGE_ORDER;
    if !ok {
        return Err(RingError::BadGeometry { len });
    }
    Ok(ring_size(abi, pages))
}

/// A request exactly as the frontend wrote it, copied out of the ring once.
#[derive(Clone, Copy)]
pub struct RawRequest {
    bytes: [u8; MAX_REQUEST_SIZE],
    len: usize,
}

impl RawRequest {
    /// The request's bytes (`AbiLayout::request_size` of them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Debug for RawRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawRequest({:02x?})", self.as_bytes())
    }
}

/// The backend's end of a blkif ring.
pub struct BackRing {
    mem: SharedMem,
    abi: BlkifAbi,
    layout: &'static AbiLayout,
    size: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
    broken: Option<RingError>,
}

impl fmt::Debug for BackRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackRing")
            .field("abi", &self.abi)
            .field("size", &self.size)
            .field("req_cons", &self.req_cons)
            .field("rsp_prod_pvt", &self.rsp_prod_pvt)
            .field("broken", &self.broken)
            .finish()
    }
}

impl BackRing {
    /// `BACK_RING_INIT`: attach to a freshly initialised ring.
    pub fn new(mem: SharedMem, abi: BlkifAbi) -> Result<Self, RingError> {
        Self::attach(mem, abi, 0)
    }

    /// `BACK_RING_ATTACH`: attach to a ring whose indexes start at `start`
    /// (reconnecting to a ring that was in use).
    pub fn attach(mem: SharedMem, abi: BlkifAbi, start: u32) -> Result<Self, RingError> {
        let size = geometry(&mem, abi)?;
        Ok(BackRing {
            mem,
            abi,
            layout: abi.layout(),
            size,
            req_cons: start,
            rsp_prod_pvt: start,
            broken: None,
        })
    }

    /// The ABI requests are laid out in.
    pub fn abi(&self) -> BlkifAbi {
        self.abi
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Requests consumed so far (free-running index).
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Responses queued so far (free-running index).
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests consumed but not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// The error that broke the ring, if a hostile frontend did.
    pub fn broken(&self) -> Option<&RingError> {
        self.broken.as_ref()
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`, after checking `req_prod` for sanity
    /// (`RING_REQUEST_PROD_OVERFLOW`, and not behind `req_cons`).
    pub fn unconsumed_requests(&mut self) -> Result<u32, RingError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        // Acquire: the entries up to req_prod are read after req_prod (rmb).
        let req_prod = self.mem.atomic_u32(REQ_PROD)?.load(Ordering::Acquire);
        let ahead_of_responses = req_prod.wrapping_sub(self.rsp_prod_pvt);
        let ahead_of_consumer = req_prod.wrapping_sub(self.req_cons);
        if ahead_of_responses > self.size || ahead_of_consumer > self.size {
            let e = RingError::BogusRequestProducer {
                req_prod,
                req_cons: self.req_cons,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.size,
            };
            log::warn!("{e}: halting ring processing");
            self.broken = Some(e.clone());
            return Err(e);
        }
        let room = self.size - self.in_flight();
        Ok(ahead_of_consumer.min(room))
    }

    /// Copies out the next request, if any (`RING_COPY_REQUEST`; the slot is
    /// read once, into the returned value).
    pub fn next_request(&mut self) -> Result<Option<RawRequest>, RingError> {
        if self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let slot = (self.req_cons & (self.size - 1)) as usize;
        let offset = RING_HEADER_SIZE + slot * self.layout.entry_size;
        let mut raw = RawRequest {
            bytes: [0; MAX_REQUEST_SIZE],
            len: self.layout.request_size,
        };
        self.mem
            .read_into(offset, &mut raw.bytes[..self.layout.request_size])?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(raw))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask to be notified
    /// of the next request and re-check, so a request published meanwhile is
    /// not missed. True means there is work: do not sleep.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.mem
            .atomic_u32(REQ_EVENT)?
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst); // mb: req_event visible before re-reading req_prod
        Ok(self.unconsumed_requests()? > 0)
    }

    /// Writes a response into the next response slot (not yet visible to
    /// the frontend: see [`BackRing::push_responses`]).
    pub fn put_response(&mut self, id: u64, operation: u8, status: i16) -> Result<(), RingError> {
        if self.in_flight() == 0 {
            return Err(RingError::NoRequestToAnswer);
        }
        let l = self.layout;
        let mut rsp = [0u8; MAX_REQUEST_SIZE];
        rsp[RSP_ID..RSP_ID + 8].copy_from_slice(&id.to_le_bytes());
        rsp[l.rsp_operation] = operation;
        rsp[l.rsp_status..l.rsp_status + 2].copy_from_slice(&status.to_le_bytes());
        let slot = (self.rsp_prod_pvt & (self.size - 1)) as usize;
        let offset = RING_HEADER_SIZE + slot * l.entry_size;
        self.mem.write_from(offset, &rsp[..l.response_size])?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes queued responses;
    /// true if the frontend asked to be notified (kick its event channel).
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        let rsp_prod = self.mem.atomic_u32(RSP_PROD)?;
        let old = rsp_prod.load(Ordering::Relaxed);
        let new = self.rsp_prod_pvt;
        // Release (wmb): the responses are visible before rsp_prod.
        rsp_prod.store(new, Ordering::Release);
        fence(Ordering::SeqCst); // mb: rsp_prod visible before reading rsp_event
        let event = self.mem.atomic_u32(RSP_EVENT)?.load(Ordering::Relaxed);
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// The shared memory, e.g. to hand back to the grant mapper.
    pub fn into_shared(self) -> SharedMem {
        self.mem
    }
}

/// A response as the frontend reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// Echo of the request id.
    pub id: u64,
    /// Echo of the request operation.
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

/// The guest's end of a blkif ring: emulates a frontend (blkfront) in tests.
pub struct FrontRing {
    mem: SharedMem,
    layout: &'static AbiLayout,
    size: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`: zero the indexes and padding.
    pub fn init(mem: SharedMem, abi: BlkifAbi) -> Result<Self, RingError> {
        Self::init_at(mem, abi, 0)
    }

    /// As [`FrontRing::init`] with all indexes starting at `start` (to
    /// exercise 32-bit index wraparound; pair with [`BackRing::attach`]).
    pub fn init_at(mem: SharedMem, abi: BlkifAbi, start: u32) -> Result<Self, RingError> {
        let size = geometry(&mem, abi)?;
        mem.zero(0, RING_HEADER_SIZE)?;
        mem.atomic_u32(REQ_PROD)?.store(start, Ordering::Relaxed);
        mem.atomic_u32(RSP_PROD)?.store(start, Ordering::Relaxed);
        mem.atomic_u32(REQ_EVENT)?
            .store(start.wrapping_add(1), Ordering::Relaxed);
        mem.atomic_u32(RSP_EVENT)?
            .store(start.wrapping_add(1), Ordering::Release);
        Ok(FrontRing {
            mem,
            layout: abi.layout(),
            size,
            req_prod_pvt: start,
            rsp_cons: start,
        })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The shared memory (tests poke at it to play a hostile guest).
    pub fn shared(&self) -> &SharedMem {
        &self.mem
    }

    /// `RING_FREE_REQUESTS`.
    pub fn free_requests(&self) -> u32 {
        self.size
            .saturating_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Writes a request (already encoded in this ring's ABI) into the next
    /// slot; it becomes visible at [`FrontRing::push_requests`].
    pub fn put_request(&mut self, request: &[u8]) -> Result<(), RingError> {
        if self.free_requests() == 0 || request.len() > self.layout.entry_size {
            return Err(RingError::Full);
        }
        let slot = (self.req_prod_pvt & (self.size - 1)) as usize;
        let offset = RING_HEADER_SIZE + slot * self.layout.entry_size;
        self.mem.zero(offset, self.layout.entry_size)?;
        self.mem.write_from(offset, request)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: true if the backend wants a kick.
    pub fn push_requests(&mut self) -> Result<bool, RingError> {
        let req_prod = self.mem.atomic_u32(REQ_PROD)?;
        let old = req_prod.load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        req_prod.store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.mem.atomic_u32(REQ_EVENT)?.load(Ordering::Relaxed);
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// Takes the next response, if any.
    pub fn next_response(&mut self) -> Result<Option<RawResponse>, RingError> {
        let rsp_prod = self.mem.atomic_u32(RSP_PROD)?.load(Ordering::Acquire);
        if rsp_prod.wrapping_sub(self.rsp_cons) > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(RingError::BogusResponseProducer {
                rsp_prod,
                rsp_cons: self.rsp_cons,
            });
        }
        if rsp_prod == self.rsp_cons {
            return Ok(None);
        }
        let l = self.layout;
        let slot = (self.rsp_cons & (self.size - 1)) as usize;
        let mut b = [0u8; MAX_REQUEST_SIZE];
        self.mem.read_into(
            RING_HEADER_SIZE + slot * l.entry_size,
            &mut b[..l.response_size],
        )?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[RSP_ID..RSP_ID + 8]);
        Ok(Some(RawResponse {
            id: u64::from_le_bytes(id),
            operation: b[l.rsp_operation],
            status: i16::from_le_bytes([b[l.rsp_status], b[l.rsp_status + 1]]),
        }))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: true if responses are waiting.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        let pending = |r: &Self| -> Result<bool, RingError> {
            Ok(r.mem.atomic_u32(RSP_PROD)?.load(Ordering::Acquire) != r.rsp_cons)
        };
        if pending(self)? {
            return Ok(true);
        }
        self.mem
            .atomic_u32(RSP_EVENT)?
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        pending(self)
    }

    /// Sets `req_prod` to any value, as a hostile guest could.
    pub fn set_req_prod_raw(&self, value: u32) -> Result<(), RingError> {
        self.mem
            .atomic_u32(REQ_PROD)?
            .store(value, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::abi::{BlkifAbi, OPERATION};

    const ABIS: [BlkifAbi; 3] = [BlkifAbi::Native, BlkifAbi::X86_32, BlkifAbi::X86_64];

    fn rings(abi: BlkifAbi, pages: usize, start: u32) -> (FrontRing, BackRing) {
        let mem = SharedMem::anonymous(pages * PAGE_SIZE).unwrap();
        let front = FrontRing::init_at(mem.share(), abi, start).unwrap();
        let back = BackRing::attach(mem, abi, start).unwrap();
        (front, back)
    }

    /// A request with a recognisable id and filler, in `abi`'s layout.
    fn request(abi: BlkifAbi, id: u64) -> Vec<u8> {
        let l = abi.layout();
        let mut r = vec![0u8; l.request_size];
        r[OPERATION] = 1;
        r[l.id..l.id + 8].copy_from_slice(&id.to_le_bytes());
        for (i, b) in r[l.sector_number..].iter_mut().enumerate() {
            *b = (id as u8).wrapping_add(i as u8);
        }
        r
    }

    fn id_of(abi: BlkifAbi, raw: &RawRequest) -> u64 {
        let l = abi.layout();
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw.as_bytes()[l.id..l.id + 8]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn ring_size_is_largest_power_of_two_that_fits() {
        assert_eq!(ring_size(BlkifAbi::X86_64, 1), 32); // 4032 / 112 = 36
        assert_eq!(ring_size(BlkifAbi::X86_32, 1), 32); // 4032 / 108 = 37
        assert_eq!(ring_size(BlkifAbi::X86_64, 2), 64); // 8128 / 112 = 72
        assert_eq!(ring_size(BlkifAbi::X86_32, 4), 128); // 16320 / 108 = 151
        assert_eq!(ring_size(BlkifAbi::X86_64, 16), 512); // 65472 / 112 = 584
        assert_eq!(ring_size(BlkifAbi::X86_64, 0), 0);
    }

    #[test]
    fn geometry_rejects_odd_sizes() {
        for len in [100, 3 * PAGE_SIZE, 32 * PAGE_SIZE] {
            let mem = SharedMem::anonymous(len).unwrap();
            assert_eq!(
                BackRing::new(mem, BlkifAbi::Native).unwrap_err(),
                RingError::BadGeometry { len }
            );
        }
    }

    /// Many times the ring size of requests through every ABI and page
    /// order, with free-running indexes that wrap past u32::MAX.
    #[test]
    fn requests_and_responses_survive_wraparound() {
        for abi in ABIS {
            for order in 0..=MAX_RING_PAGE_ORDER {
                let (mut front, mut back) = rings(abi, 1 << order, u32::MAX - 40);
                let size = back.size();
                let mut next_id = 0u64;
                let mut answered = 0u64;
                let total = 5 * u64::from(size) + 3;
                while answered < total {
                    // Fill a random-ish batch, up to the free space.
                    let batch = (next_id % 7 + 1).min(u64::from(front.free_requests()));
                    for _ in 0..batch {
                        if next_id < total {
                            front.put_request(&request(abi, next_id)).unwrap();
                            next_id += 1;
                        }
                    }
                    front.push_requests().unwrap();
                    while let Some(raw) = back.next_request().unwrap() {
                        let id = id_of(abi, &raw);
                        assert_eq!(raw.as_bytes(), &request(abi, id)[..]);
                        back.put_response(id, 1, 0).unwrap();
                    }
                    back.push_responses().unwrap();
                    while let Some(rsp) = front.next_response().unwrap() {
                        assert_eq!(rsp.id, answered);
                        assert_eq!((rsp.operation, rsp.status), (1, 0));
                        answered += 1;
                    }
                }
                assert_eq!(back.in_flight(), 0);
                assert!(!back.final_check_for_requests().unwrap());
            }
        }
    }

    #[test]
    fn backend_never_consumes_more_than_free_slots() {
        let (mut front, mut back) = rings(BlkifAbi::Native, 1, 0);
        for id in 0..32 {
            front.put_request(&request(BlkifAbi::Native, id)).unwrap();
        }
        assert_eq!(
            front.put_request(&request(BlkifAbi::Native, 99)),
            Err(RingError::Full)
        );
        front.push_requests().unwrap();
        for _ in 0..32 {
            assert!(back.next_request().unwrap().is_some());
        }
        assert_eq!(back.in_flight(), 32);
        assert!(back.next_request().unwrap().is_none());
        // A guest that publishes more while all slots await responses is lying.
        front.set_req_prod_raw(33).unwrap();
        assert!(matches!(
            back.next_request(),
            Err(RingError::BogusRequestProducer { req_prod: 33, .. })
        ));
    }

    #[test]
    fn malicious_req_prod_breaks_the_ring_instead_of_looping() {
        for abi in ABIS {
            let (front, mut back) = rings(abi, 1, 0);
            let size = back.size();
            // Exactly a full ring is legal.
            front.set_req_prod_raw(size).unwrap();
            assert_eq!(back.unconsumed_requests().unwrap(), size);
            // One more is not, and the ring stays broken.
            front.set_req_prod_raw(size + 1).unwrap();
            assert!(back.next_request().is_err());
            front.set_req_prod_raw(1).unwrap();
            assert!(back.next_request().is_err());
            assert!(back.final_check_for_requests().is_err());
            assert!(back.broken().is_some());

            for bogus in [u32::MAX, 0x8000_0000, size + 1] {
                let (front, mut back) = rings(abi, 1, 0);
                front.set_req_prod_raw(bogus).unwrap();
                assert_eq!(
                    back.next_request().unwrap_err(),
                    RingError::BogusRequestProducer {
                        req_prod: bogus,
                        req_cons: 0,
                        rsp_prod_pvt: 0,
                        size
                    }
                );
            }
        }
    }

    #[test]
    fn req_prod_moving_backwards_is_detected() {
        let (mut front, mut back) = rings(BlkifAbi::Native, 1, 0);
        for id in 0..4 {
            front.put_request(&request(BlkifAbi::Native, id)).unwrap();
        }
        front.push_requests().unwrap();
        for _ in 0..4 {
            back.next_request().unwrap();
        }
        for id in 0..4 {
            back.put_response(id, 1, 0).unwrap();
        }
        front.set_req_prod_raw(2).unwrap();
        assert!(matches!(
            back.next_request(),
            Err(RingError::BogusRequestProducer { req_prod: 2, .. })
        ));
    }

    #[test]
    fn response_without_request_is_refused() {
        let (_front, mut back) = rings(BlkifAbi::Native, 1, 0);
        assert_eq!(
            back.put_response(1, 0, 0),
            Err(RingError::NoRequestToAnswer)
        );
    }

    #[test]
    fn notifications_follow_event_indexes() {
        let (mut front, mut back) = rings(BlkifAbi::X86_32, 1, 0);
        // Backend asleep: req_event = 1, so the first request kicks.
        front.put_request(&request(BlkifAbi::X86_32, 7)).unwrap();
        assert!(front.push_requests().unwrap());
        // The backend has not re-armed req_event: no kick for the second.
        front.put_request(&request(BlkifAbi::X86_32, 8)).unwrap();
        assert!(!front.push_requests().unwrap());
        assert_eq!(
            back.next_request()
                .unwrap()
                .map(|r| id_of(BlkifAbi::X86_32, &r)),
            Some(7)
        );
        assert_eq!(
            back.next_request()
                .unwrap()
                .map(|r| id_of(BlkifAbi::X86_32, &r)),
            Some(8)
        );
        // Final check re-arms req_event to req_cons + 1.
        assert!(!back.final_check_for_requests().unwrap());
        front.put_request(&request(BlkifAbi::X86_32, 9)).unwrap();
        assert!(front.push_requests().unwrap());
        // A request published just before the final check is seen by it.
        assert!(back.final_check_for_requests().unwrap());

        // Frontend waits for the first response (rsp_event = 1).
        back.put_response(7, 1, 0).unwrap();
        assert!(back.push_responses().unwrap());
        back.put_response(8, 1, -1).unwrap();
        assert!(!back.push_responses().unwrap());
        assert_eq!(front.next_response().unwrap().map(|r| r.id), Some(7));
        let r = front.next_response().unwrap().unwrap();
        assert_eq!((r.id, r.status), (8, -1));
        assert!(!front.final_check_for_responses().unwrap());
        back.next_request().unwrap();
        back.put_response(9, 1, 0).unwrap();
        assert!(back.push_responses().unwrap());
    }

    #[test]
    fn responses_land_at_abi_offsets() {
        for abi in [BlkifAbi::X86_32, BlkifAbi::X86_64] {
            let (mut front, mut back) = rings(abi, 1, 0);
            front.put_request(&request(abi, 1)).unwrap();
            front.put_request(&request(abi, 2)).unwrap();
            front.push_requests().unwrap();
            back.next_request().unwrap();
            back.next_request().unwrap();
            back.put_response(0x0102_0304_0506_0708, 6, -2).unwrap();
            back.put_response(5, 0, 0).unwrap();
            back.push_responses().unwrap();
            let l = abi.layout();
            let mut slot1 = vec![0u8; l.response_size];
            front
                .shared()
                .read_into(RING_HEADER_SIZE + l.entry_size, &mut slot1)
                .unwrap();
            assert_eq!(slot1[0], 5);
            let mut slot0 = vec![0u8; l.response_size];
            front
                .shared()
                .read_into(RING_HEADER_SIZE, &mut slot0)
                .unwrap();
            assert_eq!(&slot0[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
            assert_eq!(slot0[l.rsp_operation], 6);
            assert_eq!(
                &slot0[l.rsp_status..l.rsp_status + 2],
                &(-2i16).to_le_bytes()
            );
        }
    }
}
