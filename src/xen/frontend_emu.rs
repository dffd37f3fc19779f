//! An emulated blkfront for tests and benches, modelled on Linux's
//! `drivers/block/xen-blkfront.c` (with blk-mq and blk-flush around it): it
//! negotiates over XenStore, grants ring and data pages in an
//! [`EmulatedGuest`], and keeps a shadow of every request on a ring.
//!
//! What it does as Linux does:
//!
//! - **Ids are shadow slots** (`get_id_from_freelist`/`add_id_to_freelist`):
//!   each ring has a shadow array of its ring size (`BLK_RING_SIZE`, ring
//!   pages included) and a LIFO free list; a request's id is its slot, freed
//!   and reused as soon as its response arrives. `talk_to_blkback` resets
//!   the free list of every new ring, so after a resume ids start from 0
//!   again and collide with the ids the old back end saw.
//! - **Features** (`blkfront_gather_backend_features`): `feature-barrier`
//!   gives flush+FUA, `feature-flush-cache` gives flush and no FUA (it wins
//!   over barrier); `feature-max-indirect-segments` is used only above
//!   `BLKIF_MAX_SEGMENTS_PER_REQUEST`, capped by ours.
//! - **Flush and FUA** (`xlvbd_flush` -> `blk_queue_write_cache`, blk-flush,
//!   `blkif_queue_rw_req`): an empty flush goes as `WRITE_BARRIER` when the
//!   back end has FUA, else as `FLUSH_DISKCACHE`, and completes at once
//!   without a request when it has no flush. A FUA write goes as a
//!   `WRITE_BARRIER` with data when the back end has FUA; with flush only
//!   the block layer strips the FUA and sends a plain `WRITE`, then an empty
//!   `FLUSH_DISKCACHE` once the write completed (the post-flush); with
//!   neither it is a plain `WRITE`. A flush or barrier answered with
//!   `EOPNOTSUPP`, or an empty one answered with an error, turns flush and
//!   FUA off and completes without error (`blkif_interrupt`).
//! - **Splitting** (`blkif_set_queue_limits`, `blk_queue_split`): a bio is
//!   cut into requests of at most the segment limit (indirect or 11; 11 for
//!   a FUA write, which `blkif_queue_rw_req` never sends indirect); its data
//!   keeps its page offset. A bio split in several requests completes when
//!   all of them have, with the first error any of them had (`bio_chain`).
//! - **The backlog**: requests that find their ring full (or too few grant
//!   pages: `gnttab_alloc_grant_references` failing) wait, in order, and
//!   are dispatched as responses free slots (`BLK_STS_DEV_RESOURCE`,
//!   `kick_pending_request_queues`). A bio submitted while requests wait is
//!   back-merged into the last waiting request when contiguous and within
//!   the limits, as blk-mq merges into requests not yet dispatched.
//! - **Resume** ([`EmulatedFrontend::reconnect`]: `blkfront_resume`,
//!   `talk_to_blkback`, `blkif_recover`): the guest is frozen (the frontend
//!   simply stops being polled); the shadows are walked ring by ring, slot
//!   by slot; flush, FUA and discard requests are kept whole and requeued
//!   (`blk_mq_requeue_request`, in the reverse order of the walk, as
//!   `list_add` leaves them), reads and writes give back their bios, which
//!   are submitted again (`submit_bio`): split to the new back end's limits
//!   and merged into waiting requests. The new rings first take the backlog
//!   (`kick_pending_request_queues`), then the requeued requests, then the
//!   re-submitted bios, all under fresh slot ids. Nothing unfinished is
//!   dropped. That re-send is exactly what seeds/003's storage turns into
//!   corruption when the source was not drained or fenced.
//!
//! What still differs from Linux:
//!
//! - One global backlog, dispatched round-robin over the rings; blk-mq maps
//!   each CPU to one hardware queue and keeps per-queue lists.
//! - No tag limit: Linux's queue depth is the ring size, so bios beyond it
//!   wait for a tag (already split to the limits) and only then become
//!   requests; here they become waiting requests at once (and can merge).
//! - No plug: bios are merged only into waiting requests (never into one
//!   just dispatched), only at the back, and only with their neighbour in
//!   the backlog; segments of two bios are never merged into one segment.
//!   The elevator does not reorder.
//! - Waiting requests whose size exceeds a new back end's limits are
//!   re-split at resume; Linux dispatches them as built, which
//!   `blkif_queue_rw_req` does not handle (`BUG_ON`).
//! - A FUA write cut in several requests gets one post-flush for all of
//!   them (blk-flush runs a sequence per request, and coalesces flushes);
//!   `REQ_PREFLUSH` is not modelled (no pre-flush before a write).
//! - A FUA write on a barrier back end is cut at 11 segments; Linux would
//!   build larger ones when indirect segments are offered and hit the
//!   `BUG_ON` in `blkif_queue_rw_req`.
//! - With `feature-persistent` the frontend grants each data page once and
//!   reuses it, but writes straight into it (no bounce copy); Linux copies
//!   into a pool of persistent pages. A grant the back end still maps when
//!   it is ended is retried later (as gnttab's deferred list does) and its
//!   page not reused meanwhile; without persistent grants Linux would reuse
//!   such a grant as if persistent.
//! - No extra request for a 64 KiB-page guest (`HAS_EXTRA_REQ`); no
//!   `discard-granularity`/`discard-alignment`: discards are sent as
//!   submitted, never split.
//! - A response with an id out of range or of a free slot is counted in
//!   [`EmulatedFrontend::bogus_responses`] and ignored (Linux WARNs and
//!   ignores it); an unknown operation is not a `BUG()`.

use crate::xen::abi::{BlkifAbi, PROTOCOL_X86_32, PROTOCOL_X86_64};
use crate::xen::blkif::{
    encode, Segment, Status, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ,
    OP_WRITE, OP_WRITE_BARRIER,
};
use crate::xen::evtchn::{EmulatedEventChannel, EventChannel};
use crate::xen::grant::{EmulatedGuest, GrantRef};
use crate::xen::platform::EmulatedPlatform;
use crate::xen::ring::FrontRing;
use crate::xen::shared::SharedMem;
use crate::xen::xenstore::{transact, XenStore, XBT_NULL};
use crate::xen::{PAGE_SIZE, SECTOR_SIZE};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sectors in a page.
const SPP: u64 = (PAGE_SIZE / SECTOR_SIZE) as u64;

/// What a bio asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BioOp {
    Read,
    Write,
    /// Write with REQ_FUA: sent as the negotiated features say (see the
    /// module documentation).
    WriteFua,
    /// An empty flush (REQ_OP_FLUSH).
    Flush,
    Discard {
        secure: bool,
    },
}

/// A block I/O the guest issues.
#[derive(Clone, Debug)]
pub struct Bio {
    /// The guest's name for it (completions carry it).
    pub tag: u64,
    pub op: BioOp,
    pub sector: u64,
    pub nr_sectors: u64,
    /// Write data (`nr_sectors * 512` bytes); empty otherwise.
    pub data: Vec<u8>,
}

/// A finished bio.
#[derive(Clone, Debug)]
pub struct Completion {
    pub tag: u64,
    pub status: Status,
    /// Read data.
    pub data: Vec<u8>,
}

/// A request as it was put on a ring (see [`EmulatedFrontend::set_trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentRequest {
    /// Ring (queue) index.
    pub queue: usize,
    /// The request id: its shadow slot.
    pub id: u64,
    /// The operation (`OP_*`; for an indirect request, the indirect op).
    pub op: u8,
    pub indirect: bool,
    pub sector: u64,
    pub nr_sectors: u64,
    /// Data segments.
    pub segments: usize,
    /// Tags of the bios it carries parts of.
    pub tags: Vec<u64>,
}

/// What the frontend asks for; the back end's offers cap it.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    pub abi: BlkifAbi,
    pub ring_page_order: u32,
    pub queues: u32,
    pub persistent: bool,
    /// Use indirect requests up to this many segments (Linux's
    /// `max_indirect_segments`; 0, or 11 and below: never).
    pub max_indirect_segments: u32,
    /// Seed for the page offsets of bio data.
    pub seed: u64,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            abi: BlkifAbi::X86_64,
            ring_page_order: 0,
            queues: 1,
            persistent: false,
            max_indirect_segments: 0,
            seed: 1,
        }
    }
}

/// What a request is, before the negotiated features choose its operation
/// (`blkif_queue_rw_req` decides at dispatch, from the request's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// A write whose REQ_FUA reached the driver (the back end had FUA).
    Fua,
    /// REQ_OP_FLUSH: no data.
    Flush,
    Discard {
        secure: bool,
    },
}

/// Which part of a bio a request carries.
#[derive(Clone, Copy, Debug)]
struct Piece {
    tag: u64,
    /// Offset into the bio, in sectors.
    bio_offset: u64,
    nr_sectors: u64,
    /// Sector of its first page the data starts at.
    phase: u8,
}

impl Piece {
    fn segments(&self) -> usize {
        if self.nr_sectors == 0 {
            0
        } else {
            (u64::from(self.phase) + self.nr_sectors).div_ceil(SPP) as usize
        }
    }
}

/// A request, waiting or on a ring.
#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    sector: u64,
    pieces: Vec<Piece>,
}

impl Spec {
    fn nr_sectors(&self) -> u64 {
        self.pieces.iter().map(|p| p.nr_sectors).sum()
    }

    fn segments(&self) -> usize {
        self.pieces.iter().map(Piece::segments).sum()
    }
}

/// A shadow slot in use: the request and the grants it holds.
struct Shadow {
    spec: Spec,
    op: u8,
    data_pages: Vec<(usize, GrantRef)>,
    indirect_pages: Vec<(usize, GrantRef)>,
}

struct BioState {
    bio: Bio,
    /// Pieces not completed yet.
    pending: usize,
    status: Status,
    read: Vec<u8>,
    /// A FUA write on a flush-only back end: an empty flush follows the data.
    post_flush: bool,
}

struct Queue {
    ring: FrontRing,
    evtchn: EmulatedEventChannel,
    ring_pages: Vec<(usize, GrantRef)>,
    /// `rinfo->shadow`, indexed by id.
    shadow: Vec<Option<Shadow>>,
    /// `rinfo->shadow_free`: free ids, the next one last.
    free: Vec<usize>,
}

/// Negotiated with the current back end.
#[derive(Clone, Debug, Default)]
struct Negotiated {
    persistent: bool,
    max_indirect: u32,
    flush: bool,
    fua: bool,
    discard: bool,
    secure: bool,
    sectors: u64,
}

/// The emulated blkfront.
pub struct EmulatedFrontend {
    guest: Arc<EmulatedGuest>,
    mem: SharedMem,
    opts: FrontendOptions,
    neg: Negotiated,
    queues: Vec<Queue>,
    next_queue: usize,
    free_pages: Vec<usize>,
    /// Persistent grants: page -> gref, kept granted and reused.
    persistent_pool: Vec<(usize, GrantRef)>,
    /// Pages whose grant the back end still maps.
    deferred: Vec<(usize, GrantRef)>,
    bios: HashMap<u64, BioState>,
    /// Requests not on a ring yet, in dispatch order.
    backlog: VecDeque<Spec>,
    rng: u64,
    done: Vec<Completion>,
    trace: Option<Vec<SentRequest>>,
    /// Requests the last recovery requeued or built from re-submitted bios.
    pub resent_requests: usize,
    /// Responses with an id that was not in use (ignored).
    pub bogus_responses: u64,
}

fn rand(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn wait_for_state<S: XenStore + ?Sized>(
    xs: &S,
    path: &str,
    want: &[u32],
    timeout: Duration,
) -> io::Result<u32> {
    let end = Instant::now() + timeout;
    loop {
        let st = xs
            .read_optional(XBT_NULL, &format!("{path}/state"))
            .map_err(|e| err(e.to_string()))?
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if want.contains(&st) {
            return Ok(st);
        }
        if Instant::now() > end {
            return Err(err(format!("{path}: state {st}, wanted {want:?}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_num<S: XenStore + ?Sized>(xs: &S, path: &str) -> u64 {
    xs.read_optional(XBT_NULL, path)
        .ok()
        .flatten()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Cuts `piece` (at disk `sector`) into pieces of at most `segs` segments.
fn split_piece(sector: u64, piece: Piece, segs: usize) -> Vec<(u64, Piece)> {
    let mut out = Vec::new();
    let mut p = piece;
    let mut at = sector;
    loop {
        let room = segs as u64 * SPP - u64::from(p.phase);
        if p.nr_sectors <= room {
            out.push((at, p));
            return out;
        }
        out.push((
            at,
            Piece {
                nr_sectors: room,
                ..p
            },
        ));
        at += room;
        p = Piece {
            tag: p.tag,
            bio_offset: p.bio_offset + room,
            nr_sectors: p.nr_sectors - room,
            phase: 0,
        };
    }
}

impl EmulatedFrontend {
    /// A frontend in a fresh guest of `nr_pages` pages.
    pub fn new(guest: Arc<EmulatedGuest>, opts: FrontendOptions) -> io::Result<Self> {
        let n = guest.nr_pages();
        let mem = guest.pages(0, n)?;
        let seed = opts.seed;
        Ok(EmulatedFrontend {
            guest,
            mem,
            opts,
            neg: Negotiated::default(),
            queues: Vec::new(),
            next_queue: 0,
            free_pages: (0..n).rev().collect(),
            persistent_pool: Vec::new(),
            deferred: Vec::new(),
            bios: HashMap::new(),
            backlog: VecDeque::new(),
            rng: seed | 1,
            done: Vec::new(),
            trace: None,
            resent_requests: 0,
            bogus_responses: 0,
        })
    }

    /// The disk size the back end announced.
    pub fn sectors(&self) -> u64 {
        self.neg.sectors
    }

    /// Whether the back end offered (and we use) persistent grants.
    pub fn persistent(&self) -> bool {
        self.neg.persistent
    }

    /// Segments per indirect request in use (0: none).
    pub fn max_indirect(&self) -> u32 {
        self.neg.max_indirect
    }

    /// The back end's offers as in use: (flush, discard, secure discard).
    pub fn offers(&self) -> (bool, bool, bool) {
        (self.neg.flush, self.neg.discard, self.neg.secure)
    }

    /// Whether FUA writes reach the ring as such (`feature_fua`: the back
    /// end offered `feature-barrier` and not `feature-flush-cache`).
    pub fn fua(&self) -> bool {
        self.neg.fua
    }

    /// Rings connected.
    pub fn nr_queues(&self) -> usize {
        self.queues.len()
    }

    /// Requests that fit on all rings at once (ring size of each, summed).
    pub fn ring_capacity(&self) -> usize {
        self.queues.iter().map(|q| q.shadow.len()).sum()
    }

    /// Requests on the rings now.
    pub fn on_rings(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.shadow.len() - q.free.len())
            .sum()
    }

    /// Requests waiting for room on a ring.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Starts (`true`) or stops recording every request put on a ring.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
    }

    /// The requests put on rings since the last call (tracing on).
    pub fn take_trace(&mut self) -> Vec<SentRequest> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The front ring of queue `q` (tests play a hostile guest through it).
    pub fn ring_mut(&mut self, q: usize) -> Option<&mut FrontRing> {
        self.queues.get_mut(q).map(|q| &mut q.ring)
    }

    /// Kicks queue `q`'s back end.
    pub fn kick(&self, q: usize) -> io::Result<()> {
        match self.queues.get(q) {
            Some(q) => q.evtchn.notify(),
            None => Ok(()),
        }
    }

    /// Grants a page for a test to reference (hostile-guest tests).
    pub fn grant_test_page(&mut self, writable: bool) -> io::Result<(usize, GrantRef)> {
        let page = self.free_pages.pop().ok_or_else(|| err("guest full"))?;
        Ok((page, self.guest.grant(page, writable)?))
    }

    /// Writes into guest page `page` at `offset` (tests).
    pub fn write_page(&self, page: usize, offset: usize, data: &[u8]) -> io::Result<()> {
        self.mem
            .write_from(page * PAGE_SIZE + offset, data)
            .map_err(|e| err(e.to_string()))
    }

    /// The xenbus handshake with the back end at `be` for the device at `fe`
    /// (`talk_to_blkback`, then `blkfront_connect`): wait for InitWait,
    /// read the offers, set up rings, event channels and empty shadows,
    /// publish them, become Initialised, wait for Connected, become
    /// Connected and dispatch what waits.
    pub fn connect<S: XenStore + ?Sized>(
        &mut self,
        xs: &S,
        platform: &EmulatedPlatform,
        fe: &str,
        be: &str,
    ) -> io::Result<()> {
        let t = Duration::from_secs(10);
        wait_for_state(xs, be, &[2], t)?;
        platform.add_guest(Arc::clone(&self.guest));
        let max_order = read_num(xs, &format!("{be}/max-ring-page-order")) as u32;
        let max_queues = read_num(xs, &format!("{be}/multi-queue-max-queues")).max(1) as u32;
        let order = self.opts.ring_page_order.min(max_order);
        let nq = self.opts.queues.clamp(1, max_queues);
        // Grants from an earlier back end are not reused (blkfront drops
        // its persistent grants on resume).
        self.persistent_pool.clear();
        let mut old = std::mem::take(&mut self.queues);
        for q in old.drain(..) {
            // A page the old back end still maps is never reused: on a real
            // migration it is the source host's memory.
            for (p, g) in q.ring_pages {
                self.end_access(p, g);
            }
        }
        self.retry_deferred();
        let domid = self.guest.domid();
        let mut published = Vec::new();
        for _ in 0..nq {
            let n = 1usize << order;
            let mut pages = Vec::new();
            for _ in 0..n {
                pages.push(self.alloc_contiguous_fallback()?);
            }
            // Ring pages must be one contiguous mapping for FrontRing: take
            // a fresh contiguous run instead when they are not.
            let pages = if pages.windows(2).all(|w| w[1] == w[0] + 1) {
                pages
            } else {
                self.free_pages.extend(pages);
                self.take_run(n)?
            };
            let mem = self.guest.pages(pages[0], n)?;
            let ring = FrontRing::init(mem, self.opts.abi).map_err(|e| err(e.to_string()))?;
            let refs: Vec<GrantRef> = pages
                .iter()
                .map(|&p| self.guest.grant(p, true))
                .collect::<io::Result<_>>()?;
            let (be_end, fe_end) = EmulatedEventChannel::pair()?;
            let port = fe_end.local_port();
            platform.offer_event_channel(domid, port, be_end);
            published.push((refs.clone(), port));
            // `talk_to_blkback`: shadow[j].req.id = j + 1, shadow_free = 0.
            let size = ring.size() as usize;
            self.queues.push(Queue {
                ring,
                evtchn: fe_end,
                ring_pages: pages.iter().copied().zip(refs.iter().copied()).collect(),
                shadow: (0..size).map(|_| None).collect(),
                free: (0..size).rev().collect(),
            });
        }
        let protocol = match self.opts.abi {
            BlkifAbi::X86_32 => Some(PROTOCOL_X86_32),
            BlkifAbi::X86_64 => Some(PROTOCOL_X86_64),
            // No node: the back end assumes its own ABI, as Linux does.
            BlkifAbi::Native => None,
        };
        let persistent = self.opts.persistent;
        transact(xs, 10, |tx| {
            let w = |k: &str, v: String| xs.write_str(tx, &format!("{fe}/{k}"), &v);
            let ring_nodes = |prefix: &str, refs: &[GrantRef], port: u32| {
                if order == 0 {
                    w(&format!("{prefix}ring-ref"), refs[0].to_string())?;
                } else {
                    for (i, r) in refs.iter().enumerate() {
                        w(&format!("{prefix}ring-ref{i}"), r.to_string())?;
                    }
                }
                w(&format!("{prefix}event-channel"), port.to_string())
            };
            if order > 0 {
                w("ring-page-order", order.to_string())?;
            }
            if nq == 1 {
                ring_nodes("", &published[0].0, published[0].1)?;
            } else {
                w("multi-queue-num-queues", nq.to_string())?;
                for (i, (refs, port)) in published.iter().enumerate() {
                    ring_nodes(&format!("queue-{i}/"), refs, *port)?;
                }
            }
            if let Some(p) = protocol {
                w("protocol", p.to_string())?;
            }
            w("feature-persistent", u8::from(persistent).to_string())?;
            w("state", "3".into())
        })
        .map_err(|e| err(e.to_string()))?;
        wait_for_state(xs, be, &[4], t)?;
        self.gather_backend_features(xs, be);
        xs.write_str(XBT_NULL, &format!("{fe}/state"), "4")
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// `blkfront_gather_backend_features` (and the sectors
    /// `blkfront_connect` reads).
    fn gather_backend_features<S: XenStore + ?Sized>(&mut self, xs: &S, be: &str) {
        let has = |k: &str| read_num(xs, &format!("{be}/{k}")) != 0;
        let (mut flush, mut fua) = (false, false);
        if has("feature-barrier") {
            flush = true;
            fua = true;
        }
        if has("feature-flush-cache") {
            flush = true;
            fua = false;
        }
        let discard = has("feature-discard");
        let mut indirect = (read_num(xs, &format!("{be}/feature-max-indirect-segments")) as u32)
            .min(self.opts.max_indirect_segments);
        if indirect as usize <= MAX_SEGMENTS_PER_REQUEST {
            indirect = 0;
        }
        self.neg = Negotiated {
            persistent: self.opts.persistent && has("feature-persistent"),
            max_indirect: indirect,
            flush,
            fua,
            discard,
            secure: discard && has("discard-secure"),
            sectors: read_num(xs, &format!("{be}/sectors")),
        };
    }

    fn alloc_contiguous_fallback(&mut self) -> io::Result<usize> {
        self.free_pages
            .pop()
            .ok_or_else(|| err("guest out of pages"))
    }

    fn take_run(&mut self, n: usize) -> io::Result<Vec<usize>> {
        self.free_pages.sort_unstable_by(|a, b| b.cmp(a));
        let asc: Vec<usize> = self.free_pages.iter().rev().copied().collect();
        let start = asc
            .windows(n)
            .find(|w| w[n - 1] == w[0] + n - 1)
            .map(|w| w[0])
            .ok_or_else(|| err("no contiguous pages for a ring"))?;
        self.free_pages.retain(|&p| p < start || p >= start + n);
        Ok((start..start + n).collect())
    }

    /// Segments a request of `kind` may have (`blkif_set_queue_limits`).
    fn max_segments(&self, kind: Kind) -> usize {
        if kind != Kind::Fua && self.neg.max_indirect > 0 {
            self.neg.max_indirect as usize
        } else {
            MAX_SEGMENTS_PER_REQUEST
        }
    }

    /// Queues `bio`: split into requests as the negotiated limits require,
    /// dispatched as far as the rings have room.
    pub fn submit(&mut self, bio: Bio) -> io::Result<()> {
        let tag = bio.tag;
        let data_bio = matches!(bio.op, BioOp::Read | BioOp::Write | BioOp::WriteFua);
        // Where the guest's buffer starts in its first page.
        let phase = if data_bio && bio.nr_sectors > 0 {
            (rand(&mut self.rng) % SPP) as u8
        } else {
            0
        };
        let (kind, post_flush) = match bio.op {
            BioOp::Read => (Some(Kind::Read), false),
            BioOp::Write => (Some(Kind::Write), false),
            // blk-flush: with FUA the write goes down as is; with a write
            // cache but no FUA, the FUA bit is stripped and a post-flush
            // follows; with neither, it is a plain write.
            BioOp::WriteFua if self.neg.fua => (Some(Kind::Fua), false),
            BioOp::WriteFua => (Some(Kind::Write), self.neg.flush),
            // blk-flush: no write cache, nothing to flush.
            BioOp::Flush if !self.neg.flush => (None, false),
            BioOp::Flush => (Some(Kind::Flush), false),
            // The block layer refuses a discard the queue does not offer.
            BioOp::Discard { secure } if !self.neg.discard || (secure && !self.neg.secure) => {
                self.done.push(Completion {
                    tag,
                    status: Status::NotSupported,
                    data: Vec::new(),
                });
                return Ok(());
            }
            BioOp::Discard { secure } => (Some(Kind::Discard { secure }), false),
        };
        let read = if bio.op == BioOp::Read {
            vec![0; bio.nr_sectors as usize * SECTOR_SIZE]
        } else {
            Vec::new()
        };
        let Some(kind) = kind else {
            self.done.push(Completion {
                tag,
                status: Status::Okay,
                data: read,
            });
            return Ok(());
        };
        let piece = Piece {
            tag,
            bio_offset: 0,
            nr_sectors: bio.nr_sectors,
            phase,
        };
        let pieces = if data_bio {
            split_piece(bio.sector, piece, self.max_segments(kind))
        } else {
            vec![(bio.sector, piece)]
        };
        self.bios.insert(
            tag,
            BioState {
                pending: pieces.len(),
                status: Status::Okay,
                read,
                post_flush,
                bio,
            },
        );
        for (sector, p) in pieces {
            self.enqueue(kind, sector, p);
        }
        self.pump()
    }

    /// Adds a request for `piece` to the backlog, back-merged into the last
    /// waiting request when blk-mq would. Returns whether it merged.
    fn enqueue(&mut self, kind: Kind, sector: u64, piece: Piece) -> bool {
        let limit = self.max_segments(kind);
        if let Some(last) = self.backlog.back_mut() {
            if matches!(kind, Kind::Read | Kind::Write)
                && last.kind == kind
                && last.sector + last.nr_sectors() == sector
                && last.segments() + piece.segments() <= limit
            {
                last.pieces.push(piece);
                return true;
            }
        }
        self.backlog.push_back(Spec {
            kind,
            sector,
            pieces: vec![piece],
        });
        false
    }

    fn take_data_page(&mut self) -> io::Result<(usize, GrantRef)> {
        if self.neg.persistent {
            if let Some(pg) = self.persistent_pool.pop() {
                return Ok(pg);
            }
        }
        let page = self
            .free_pages
            .pop()
            .ok_or_else(|| err("guest out of pages"))?;
        Ok((page, self.guest.grant(page, true)?))
    }

    fn release_page(&mut self, page: usize, gref: GrantRef) {
        if self.neg.persistent {
            self.persistent_pool.push((page, gref));
        } else {
            self.end_access(page, gref);
        }
    }

    /// `gnttab_end_foreign_access`: a page whose grant the back end still
    /// maps is not reused until it lets go (deferred, retried later).
    fn end_access(&mut self, page: usize, gref: GrantRef) {
        if self.guest.revoke(gref).is_ok() {
            self.free_pages.push(page);
        } else {
            self.deferred.push((page, gref));
        }
    }

    /// `gnttab_handle_deferred`: retries the grants still mapped.
    fn retry_deferred(&mut self) {
        for (page, gref) in std::mem::take(&mut self.deferred) {
            self.end_access(page, gref);
        }
    }

    /// Dispatches waiting requests, in order, while a ring has a free slot
    /// and the guest has the pages to grant (`blkif_queue_rq`).
    fn pump(&mut self) -> io::Result<()> {
        let mut kick = vec![false; self.queues.len()];
        let nq = self.queues.len();
        while let Some(spec) = self.backlog.front() {
            let Some(q) = (0..nq).map(|i| (self.next_queue + i) % nq).find(|&q| {
                self.queues[q].ring.free_requests() > 0 && !self.queues[q].free.is_empty()
            }) else {
                break;
            };
            // `gnttab_alloc_grant_references` failing: wait for pages.
            let pages_needed = spec.segments() + 2;
            let pool = if self.neg.persistent {
                self.persistent_pool.len()
            } else {
                0
            };
            if self.free_pages.len() + pool < pages_needed + 8 || self.free_pages.len() < 4 {
                self.retry_deferred();
                if self.free_pages.len() + pool < pages_needed + 8 || self.free_pages.len() < 4 {
                    break;
                }
            }
            let spec = self.backlog.pop_front().expect("front exists");
            self.next_queue = q + 1;
            // `get_id_from_freelist`.
            let id = self.queues[q].free.pop().expect("a free slot");
            let (bytes, shadow) = self.build(q, id as u64, spec)?;
            self.queues[q]
                .ring
                .put_request(&bytes)
                .map_err(|e| err(e.to_string()))?;
            self.queues[q].shadow[id] = Some(shadow);
            kick[q] = true;
        }
        for (q, k) in kick.into_iter().enumerate() {
            if k && self.queues[q]
                .ring
                .push_requests()
                .map_err(|e| err(e.to_string()))?
            {
                self.queues[q].evtchn.notify()?;
            }
        }
        Ok(())
    }

    /// The flush operation `blkif_queue_rw_req` picks (`None`: the back end
    /// has neither, the request goes as a plain write).
    fn flush_op(&self) -> Option<u8> {
        if self.neg.flush && self.neg.fua {
            Some(OP_WRITE_BARRIER)
        } else if self.neg.flush {
            Some(OP_FLUSH_DISKCACHE)
        } else {
            None
        }
    }

    fn build(&mut self, q: usize, id: u64, spec: Spec) -> io::Result<(Vec<u8>, Shadow)> {
        let abi = self.opts.abi;
        let mut shadow = Shadow {
            spec: spec.clone(),
            op: OP_READ,
            data_pages: Vec::new(),
            indirect_pages: Vec::new(),
        };
        let mut indirect = false;
        let mut nsegs = 0;
        let bytes = match spec.kind {
            Kind::Discard { secure } => {
                shadow.op = OP_DISCARD;
                let secure = secure && self.neg.secure;
                encode::discard(abi, id, 0, spec.sector, spec.nr_sectors(), secure)
            }
            Kind::Flush => {
                shadow.op = self.flush_op().unwrap_or(OP_WRITE);
                encode::rw(abi, shadow.op, id, 0, spec.sector, &[])
            }
            Kind::Read | Kind::Write | Kind::Fua => {
                let mut segs = Vec::new();
                for piece in &spec.pieces {
                    let data = self.piece_data(spec.kind, piece);
                    let mut done = 0u64;
                    let mut first = piece.phase;
                    while done < piece.nr_sectors {
                        let n = (SPP - u64::from(first)).min(piece.nr_sectors - done);
                        let (page, gref) = self.take_data_page()?;
                        if !data.is_empty() {
                            let at = page * PAGE_SIZE + usize::from(first) * SECTOR_SIZE;
                            let src = &data
                                [done as usize * SECTOR_SIZE..(done + n) as usize * SECTOR_SIZE];
                            self.mem
                                .write_from(at, src)
                                .map_err(|e| err(e.to_string()))?;
                        }
                        segs.push(Segment {
                            gref,
                            first_sect: first,
                            last_sect: first + n as u8 - 1,
                        });
                        shadow.data_pages.push((page, gref));
                        done += n;
                        first = 0;
                    }
                }
                nsegs = segs.len();
                shadow.op = match spec.kind {
                    Kind::Read => OP_READ,
                    Kind::Write => OP_WRITE,
                    _ => self.flush_op().unwrap_or(OP_WRITE),
                };
                if segs.len() <= MAX_SEGMENTS_PER_REQUEST {
                    encode::rw(abi, shadow.op, id, 0, spec.sector, &segs)
                } else {
                    if spec.kind == Kind::Fua || self.neg.max_indirect == 0 {
                        return Err(err(format!(
                            "request of {} segments without indirect",
                            segs.len()
                        )));
                    }
                    indirect = true;
                    let pages = encode::indirect_pages(&segs);
                    let mut grefs = Vec::new();
                    for p in pages {
                        let page = self
                            .free_pages
                            .pop()
                            .ok_or_else(|| err("guest out of pages"))?;
                        self.mem
                            .write_from(page * PAGE_SIZE, &p)
                            .map_err(|e| err(e.to_string()))?;
                        let gref = self.guest.grant(page, false)?;
                        grefs.push(gref);
                        shadow.indirect_pages.push((page, gref));
                    }
                    encode::indirect(
                        abi,
                        shadow.op,
                        id,
                        0,
                        spec.sector,
                        segs.len() as u16,
                        &grefs,
                    )
                }
            }
        };
        if let Some(t) = self.trace.as_mut() {
            let mut tags: Vec<u64> = spec.pieces.iter().map(|p| p.tag).collect();
            tags.dedup();
            t.push(SentRequest {
                queue: q,
                id,
                op: shadow.op,
                indirect,
                sector: spec.sector,
                nr_sectors: spec.nr_sectors(),
                segments: nsegs,
                tags,
            });
        }
        Ok((bytes, shadow))
    }

    fn piece_data(&self, kind: Kind, p: &Piece) -> Vec<u8> {
        if !matches!(kind, Kind::Write | Kind::Fua) {
            return Vec::new();
        }
        let Some(b) = self.bios.get(&p.tag) else {
            return Vec::new();
        };
        let a = p.bio_offset as usize * SECTOR_SIZE;
        let e = a + p.nr_sectors as usize * SECTOR_SIZE;
        b.bio.data.get(a..e).unwrap_or(&[]).to_vec()
    }

    /// Takes responses, finishes bios, dispatches more of the backlog.
    /// Returns the bios that finished since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<Completion>> {
        for q in 0..self.queues.len() {
            loop {
                while let Some(rsp) = self.queues[q]
                    .ring
                    .next_response()
                    .map_err(|e| err(e.to_string()))?
                {
                    self.finish(q, rsp.id, rsp.operation, rsp.status);
                }
                if !self.queues[q]
                    .ring
                    .final_check_for_responses()
                    .map_err(|e| err(e.to_string()))?
                {
                    break;
                }
            }
        }
        self.pump()?;
        Ok(std::mem::take(&mut self.done))
    }

    /// Waits up to `timeout` for a kick on any ring.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|q| libc::pollfd {
                fd: q.evtchn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: valid pollfd array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        for q in &self.queues {
            let _ = q.evtchn.wait(Some(Duration::ZERO));
        }
        Ok(())
    }

    /// One response (`blkif_interrupt`, `blkif_completion`).
    fn finish(&mut self, q: usize, id: u64, operation: u8, status: i16) {
        // An id we never handed out, or of a free slot: WARN and ignore.
        let slot = usize::try_from(id)
            .ok()
            .filter(|&i| i < self.queues[q].shadow.len());
        let Some(sh) = slot.and_then(|i| self.queues[q].shadow[i].take()) else {
            log::warn!("emulated blkfront: ring {q}: response for unused id {id}");
            self.bogus_responses += 1;
            return;
        };
        // `add_id_to_freelist`: the slot is reused by the next request.
        self.queues[q].free.push(id as usize);
        let mut status = if status == Status::Okay.code() {
            Status::Okay
        } else if status == Status::NotSupported.code() {
            Status::NotSupported
        } else {
            Status::Error
        };
        match operation {
            OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER => {
                let unsupported = status == Status::NotSupported
                    || (status == Status::Error && sh.data_pages.is_empty());
                if status != Status::Okay {
                    // The back end cannot flush after all: stop asking.
                    self.neg.flush = false;
                    self.neg.fua = false;
                }
                if unsupported {
                    status = Status::Okay;
                }
            }
            OP_DISCARD if status == Status::NotSupported => {
                self.neg.discard = false;
                self.neg.secure = false;
            }
            _ => {}
        }
        // Read data out of the pages before they are released.
        let mut data = Vec::new();
        if sh.spec.kind == Kind::Read && status == Status::Okay {
            let mut pages = sh.data_pages.iter();
            for piece in &sh.spec.pieces {
                let mut first = piece.phase;
                let mut left = piece.nr_sectors;
                while left > 0 {
                    let Some((page, _)) = pages.next() else { break };
                    let n = (SPP - u64::from(first)).min(left);
                    let mut b = vec![0u8; n as usize * SECTOR_SIZE];
                    let _ = self
                        .mem
                        .read_into(page * PAGE_SIZE + usize::from(first) * SECTOR_SIZE, &mut b);
                    data.extend_from_slice(&b);
                    left -= n;
                    first = 0;
                }
            }
        }
        for (p, g) in sh.data_pages {
            self.release_page(p, g);
        }
        for (p, g) in sh.indirect_pages {
            self.end_access(p, g);
        }
        let mut at = 0usize;
        for piece in &sh.spec.pieces {
            let len = piece.nr_sectors as usize * SECTOR_SIZE;
            let Some(b) = self.bios.get_mut(&piece.tag) else {
                continue;
            };
            if status != Status::Okay {
                // `bio_chain`: the first error sticks.
                if b.status == Status::Okay {
                    b.status = status;
                }
            } else if let Some(src) = data.get(at..at + len) {
                let o = piece.bio_offset as usize * SECTOR_SIZE;
                if let Some(dst) = b.read.get_mut(o..o + len) {
                    dst.copy_from_slice(src);
                }
            }
            at += len;
            b.pending = b.pending.saturating_sub(1);
            if b.pending > 0 {
                continue;
            }
            if b.post_flush && b.status == Status::Okay && self.neg.flush {
                // blk-flush's post-flush of a FUA write.
                b.post_flush = false;
                b.pending = 1;
                let (tag, sector) = (b.bio.tag, b.bio.sector);
                self.enqueue(
                    Kind::Flush,
                    sector,
                    Piece {
                        tag,
                        bio_offset: 0,
                        nr_sectors: 0,
                        phase: 0,
                    },
                );
                continue;
            }
            if let Some(b) = self.bios.remove(&piece.tag) {
                self.done.push(Completion {
                    tag: b.bio.tag,
                    status: b.status,
                    data: b.read,
                });
            }
        }
    }

    /// Bios not finished yet.
    pub fn outstanding(&self) -> usize {
        self.bios.len()
    }

    /// Resume after a migration (`blkfront_resume`, `talk_to_blkback`,
    /// `blkif_recover`): connect to the destination, then dispatch the
    /// backlog, the requeued flush/FUA/discard requests and the re-submitted
    /// read/write bios, in that order, under fresh slot ids.
    pub fn reconnect<S: XenStore + ?Sized>(
        &mut self,
        xs: &S,
        platform: &EmulatedPlatform,
        fe: &str,
        be: &str,
    ) -> io::Result<()> {
        // `blkfront_resume`: walk every ring's shadow, slot by slot.
        let mut requeue: VecDeque<Spec> = VecDeque::new();
        let mut resubmit: Vec<(Kind, u64, Piece)> = Vec::new();
        let mut old_grants = Vec::new();
        for q in &mut self.queues {
            for slot in q.shadow.iter_mut() {
                let Some(sh) = slot.take() else { continue };
                old_grants.extend(sh.data_pages);
                old_grants.extend(sh.indirect_pages);
                match sh.spec.kind {
                    Kind::Read | Kind::Write => {
                        let mut at = sh.spec.sector;
                        for p in sh.spec.pieces {
                            resubmit.push((sh.spec.kind, at, p));
                            at += p.nr_sectors;
                        }
                    }
                    // Whole requests, `list_add`ed: the last found first.
                    _ => requeue.push_front(sh.spec),
                }
            }
        }
        // `blkif_free`: the old rings are gone with the source, and so are
        // its grants (a page it still maps is never reused).
        old_grants.extend(std::mem::take(&mut self.persistent_pool));
        for (p, g) in old_grants {
            self.end_access(p, g);
        }
        xs.write_str(XBT_NULL, &format!("{fe}/state"), "1")
            .map_err(|e| err(e.to_string()))?;
        self.connect(xs, platform, fe, be)?;

        // Requests that waited keep their place, first in line; one built
        // for larger limits than the new back end's is cut again.
        let waiting: Vec<Spec> = self.backlog.drain(..).collect();
        for spec in waiting {
            let limit = self.max_segments(spec.kind);
            if spec.segments() <= limit {
                self.backlog.push_back(spec);
                continue;
            }
            let mut cur: Option<Spec> = None;
            let mut at = spec.sector;
            for piece in spec.pieces {
                let parts = split_piece(at, piece, limit);
                at += piece.nr_sectors;
                if let Some(b) = self.bios.get_mut(&piece.tag) {
                    b.pending += parts.len() - 1;
                }
                for (sector, p) in parts {
                    match cur.as_mut() {
                        Some(c) if c.segments() + p.segments() <= limit => c.pieces.push(p),
                        _ => {
                            self.backlog.extend(cur.take());
                            cur = Some(Spec {
                                kind: spec.kind,
                                sector,
                                pieces: vec![p],
                            });
                        }
                    }
                }
            }
            self.backlog.extend(cur);
        }
        self.resent_requests = requeue.len();
        self.backlog.extend(requeue);
        // `submit_bio` of every bio the shadow held.
        for (kind, sector, p) in resubmit {
            self.resent_requests += self.resplit(kind, sector, p);
        }
        self.pump()
    }

    /// Queues `piece` again, cut to the current limits and merged into the
    /// last waiting request when it can. Returns the requests it added.
    fn resplit(&mut self, kind: Kind, sector: u64, piece: Piece) -> usize {
        let parts = split_piece(sector, piece, self.max_segments(kind));
        if let Some(b) = self.bios.get_mut(&piece.tag) {
            b.pending += parts.len() - 1;
        }
        parts
            .into_iter()
            .filter(|&(at, p)| !self.enqueue(kind, at, p))
            .count()
    }
}
