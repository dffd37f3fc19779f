//! An emulated blkfront for tests and benches: it negotiates over XenStore,
//! grants ring and data pages in an [`EmulatedGuest`], and keeps a shadow of
//! every request in flight.
//!
//! Migration follows Linux blkfront's `blkif_recover`: the guest is frozen
//! ([`EmulatedFrontend`] simply stops being polled), the shadow is kept, and
//! after [`EmulatedFrontend::reconnect`] to the destination every unfinished
//! read/write is re-sent as bios that are split and merged differently,
//! under new ring ids; flush, FUA and discard bios are re-sent whole. That
//! re-send is exactly what seeds/003's storage turns into corruption when
//! the source was not drained or fenced.

use crate::xen::abi::{BlkifAbi, PROTOCOL_X86_32, PROTOCOL_X86_64};
use crate::xen::blkif::{
    encode, Segment, Status, MAX_SEGMENTS_PER_REQUEST, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE,
};
use crate::xen::evtchn::{EmulatedEventChannel, EventChannel};
use crate::xen::grant::{EmulatedGuest, GrantRef};
use crate::xen::platform::EmulatedPlatform;
use crate::xen::ring::FrontRing;
use crate::xen::shared::SharedMem;
use crate::xen::xenstore::{transact, XenStore, XBT_NULL};
use crate::xen::{PAGE_SIZE, SECTOR_SIZE};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a bio asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BioOp {
    Read,
    Write,
    /// Write with FUA: sent as FLUSH_DISKCACHE with data, never split.
    WriteFua,
    /// An empty flush.
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

/// What the frontend asks for; the back end's offers cap it.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    pub abi: BlkifAbi,
    pub ring_page_order: u32,
    pub queues: u32,
    pub persistent: bool,
    /// Use indirect requests up to this many segments (0: never).
    pub max_indirect_segments: u32,
    /// Seed for how re-sent bios are split and merged.
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

/// Which part of a bio a request carries.
#[derive(Clone, Copy, Debug)]
struct Piece {
    tag: u64,
    /// Offset into the bio, in sectors.
    bio_offset: u64,
    nr_sectors: u64,
}

/// A request waiting to be built and put on a ring.
#[derive(Clone, Debug)]
struct Spec {
    op: BioOp,
    sector: u64,
    pieces: Vec<Piece>,
    /// First sector in the first data page (varies the segment layout).
    phase: u8,
}

impl Spec {
    fn nr_sectors(&self) -> u64 {
        self.pieces.iter().map(|p| p.nr_sectors).sum()
    }
}

/// A request on a ring: its spec and the grants it holds.
struct Shadow {
    spec: Spec,
    data_pages: Vec<(usize, GrantRef)>,
    indirect_pages: Vec<(usize, GrantRef)>,
}

struct BioState {
    bio: Bio,
    pending: usize,
    status: Status,
    read: Vec<u8>,
}

struct Queue {
    ring: FrontRing,
    evtchn: EmulatedEventChannel,
    ring_pages: Vec<(usize, GrantRef)>,
}

/// Negotiated with the current back end.
#[derive(Clone, Debug, Default)]
struct Negotiated {
    persistent: bool,
    max_indirect: u32,
    flush: bool,
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
    shadow: HashMap<u64, Shadow>,
    bios: HashMap<u64, BioState>,
    backlog: VecDeque<Spec>,
    next_id: u64,
    rng: u64,
    done: Vec<Completion>,
    /// Requests re-sent by the last recovery.
    pub resent_requests: usize,
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
            shadow: HashMap::new(),
            bios: HashMap::new(),
            backlog: VecDeque::new(),
            next_id: 1,
            rng: seed | 1,
            done: Vec::new(),
            resent_requests: 0,
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

    /// The back end's offers: (flush, discard, secure discard).
    pub fn offers(&self) -> (bool, bool, bool) {
        (self.neg.flush, self.neg.discard, self.neg.secure)
    }

    /// Rings connected.
    pub fn nr_queues(&self) -> usize {
        self.queues.len()
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

    /// The xenbus handshake with the back end at `be` for the device at `fe`:
    /// wait for InitWait, read the offers, set up rings and event channels,
    /// publish them, become Initialised, wait for Connected, become Connected.
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
        let be_persistent = read_num(xs, &format!("{be}/feature-persistent")) == 1;
        let be_indirect = read_num(xs, &format!("{be}/feature-max-indirect-segments")) as u32;
        self.neg = Negotiated {
            persistent: self.opts.persistent && be_persistent,
            max_indirect: self.opts.max_indirect_segments.min(be_indirect),
            flush: read_num(xs, &format!("{be}/feature-flush-cache")) == 1,
            discard: read_num(xs, &format!("{be}/feature-discard")) == 1,
            secure: read_num(xs, &format!("{be}/discard-secure")) == 1,
            sectors: read_num(xs, &format!("{be}/sectors")),
        };
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
                if self.guest.revoke(g).is_ok() {
                    self.free_pages.push(p);
                }
            }
        }
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
            self.queues.push(Queue {
                ring,
                evtchn: fe_end,
                ring_pages: pages.iter().copied().zip(refs.iter().copied()).collect(),
            });
        }
        let protocol = match self.opts.abi {
            BlkifAbi::X86_32 => Some(PROTOCOL_X86_32),
            BlkifAbi::X86_64 => Some(PROTOCOL_X86_64),
            // No node: the back end assumes its own ABI, as Linux does.
            BlkifAbi::Native => None,
        };
        let persistent = self.neg.persistent;
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
        xs.write_str(XBT_NULL, &format!("{fe}/state"), "4")
            .map_err(|e| err(e.to_string()))?;
        Ok(())
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

    /// Queues `bio` (split into requests as the negotiated limits require).
    pub fn submit(&mut self, bio: Bio) -> io::Result<()> {
        let tag = bio.tag;
        let specs = self.split(&bio, 0);
        self.bios.insert(
            tag,
            BioState {
                pending: specs.len(),
                status: Status::Okay,
                read: if bio.op == BioOp::Read {
                    vec![0; bio.nr_sectors as usize * SECTOR_SIZE]
                } else {
                    Vec::new()
                },
                bio,
            },
        );
        self.backlog.extend(specs);
        self.pump()
    }

    fn max_sectors(&self) -> u64 {
        let segs = if self.neg.max_indirect > 0 {
            self.neg.max_indirect as u64
        } else {
            MAX_SEGMENTS_PER_REQUEST as u64
        };
        // With a non-zero phase the first page holds fewer sectors.
        (segs - 1) * 8
    }

    /// Requests for `bio`; `cut` > 0 splits read/write data into pieces of
    /// at most `cut` sectors (a different split than the first time).
    fn split(&mut self, bio: &Bio, cut: u64) -> Vec<Spec> {
        match bio.op {
            BioOp::Read | BioOp::Write | BioOp::WriteFua => {
                // A FUA write goes as FLUSH_DISKCACHE with data, which has no
                // indirect form: at most a direct request's worth each.
                let limit = if bio.op == BioOp::WriteFua {
                    (MAX_SEGMENTS_PER_REQUEST as u64 - 1) * 8
                } else {
                    self.max_sectors()
                };
                let max = if cut > 0 { cut.min(limit) } else { limit };
                let mut out = Vec::new();
                let mut off = 0;
                while off < bio.nr_sectors {
                    let n = (bio.nr_sectors - off).min(max);
                    out.push(Spec {
                        op: bio.op,
                        sector: bio.sector + off,
                        pieces: vec![Piece {
                            tag: bio.tag,
                            bio_offset: off,
                            nr_sectors: n,
                        }],
                        phase: 0,
                    });
                    off += n;
                }
                out
            }
            _ => vec![Spec {
                op: bio.op,
                sector: bio.sector,
                pieces: vec![Piece {
                    tag: bio.tag,
                    bio_offset: 0,
                    nr_sectors: bio.nr_sectors,
                }],
                phase: 0,
            }],
        }
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
        } else if self.guest.revoke(gref).is_ok() {
            self.free_pages.push(page);
        }
        // A grant the back end still maps is leaked rather than reused.
    }

    /// Builds as many backlog requests as fit and pushes them.
    fn pump(&mut self) -> io::Result<()> {
        let mut kick = vec![false; self.queues.len()];
        while let Some(spec) = self.backlog.front().cloned() {
            if self.queues.is_empty() {
                break;
            }
            let q = self.next_queue % self.queues.len();
            if self.queues[q].ring.free_requests() == 0 {
                break;
            }
            let pages_needed = spec.nr_sectors().div_ceil(8) as usize + 2;
            if !self.neg.persistent && self.free_pages.len() < pages_needed + 8 {
                break;
            }
            self.backlog.pop_front();
            self.next_queue += 1;
            let id = self.next_id;
            self.next_id += 1;
            let (bytes, shadow) = self.build(id, spec)?;
            self.queues[q]
                .ring
                .put_request(&bytes)
                .map_err(|e| err(e.to_string()))?;
            self.shadow.insert(id, shadow);
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

    fn build(&mut self, id: u64, spec: Spec) -> io::Result<(Vec<u8>, Shadow)> {
        let abi = self.opts.abi;
        let mut shadow = Shadow {
            spec: spec.clone(),
            data_pages: Vec::new(),
            indirect_pages: Vec::new(),
        };
        let bytes = match spec.op {
            BioOp::Discard { secure } => {
                encode::discard(abi, id, 0, spec.sector, spec.nr_sectors(), secure)
            }
            BioOp::Flush => encode::rw(abi, OP_FLUSH_DISKCACHE, id, 0, spec.sector, &[]),
            BioOp::Read | BioOp::Write | BioOp::WriteFua => {
                // Lay the data out in pages, first page from `phase`.
                let data = self.spec_data(&spec);
                let total = spec.nr_sectors();
                let mut segs = Vec::new();
                let mut done = 0u64;
                let mut first = spec.phase.min(7);
                while done < total {
                    let n = (8 - u64::from(first)).min(total - done);
                    let (page, gref) = self.take_data_page()?;
                    if !data.is_empty() {
                        let at = page * PAGE_SIZE + usize::from(first) * SECTOR_SIZE;
                        let src =
                            &data[done as usize * SECTOR_SIZE..(done + n) as usize * SECTOR_SIZE];
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
                let op = match spec.op {
                    BioOp::Read => OP_READ,
                    BioOp::Write => OP_WRITE,
                    _ => OP_FLUSH_DISKCACHE,
                };
                if segs.len() <= MAX_SEGMENTS_PER_REQUEST || op == OP_FLUSH_DISKCACHE {
                    encode::rw(abi, op, id, 0, spec.sector, &segs)
                } else {
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
                    encode::indirect(abi, op, id, 0, spec.sector, segs.len() as u16, &grefs)
                }
            }
        };
        Ok((bytes, shadow))
    }

    fn spec_data(&self, spec: &Spec) -> Vec<u8> {
        if !matches!(spec.op, BioOp::Write | BioOp::WriteFua) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for p in &spec.pieces {
            if let Some(b) = self.bios.get(&p.tag) {
                let a = p.bio_offset as usize * SECTOR_SIZE;
                let e = a + p.nr_sectors as usize * SECTOR_SIZE;
                out.extend_from_slice(b.bio.data.get(a..e).unwrap_or(&[]));
            }
        }
        out
    }

    /// Takes responses, finishes bios, pushes more backlog. Returns the bios
    /// that finished since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<Completion>> {
        for q in 0..self.queues.len() {
            loop {
                while let Some(rsp) = self.queues[q]
                    .ring
                    .next_response()
                    .map_err(|e| err(e.to_string()))?
                {
                    self.finish(rsp.id, rsp.status);
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

    fn finish(&mut self, id: u64, status: i16) {
        let Some(sh) = self.shadow.remove(&id) else {
            log::warn!("emulated blkfront: response for unknown id {id}");
            return;
        };
        let status = if status == Status::Okay.code() {
            Status::Okay
        } else if status == Status::NotSupported.code() {
            Status::NotSupported
        } else {
            Status::Error
        };
        // Read data out of the pages before they are released.
        let mut data = Vec::new();
        if sh.spec.op == BioOp::Read && status == Status::Okay {
            let mut first = sh.spec.phase.min(7);
            let mut left = sh.spec.nr_sectors();
            for (page, _) in &sh.data_pages {
                let n = (8 - u64::from(first)).min(left);
                let mut b = vec![0u8; n as usize * SECTOR_SIZE];
                let _ = self
                    .mem
                    .read_into(page * PAGE_SIZE + usize::from(first) * SECTOR_SIZE, &mut b);
                data.extend_from_slice(&b);
                left -= n;
                first = 0;
            }
        }
        for (p, g) in sh.data_pages {
            self.release_page(p, g);
        }
        for (p, g) in sh.indirect_pages {
            if self.guest.revoke(g).is_ok() {
                self.free_pages.push(p);
            }
        }
        let mut at = 0usize;
        for piece in &sh.spec.pieces {
            let len = piece.nr_sectors as usize * SECTOR_SIZE;
            let Some(b) = self.bios.get_mut(&piece.tag) else {
                continue;
            };
            if status != Status::Okay {
                b.status = status;
            } else if let Some(src) = data.get(at..at + len) {
                let o = piece.bio_offset as usize * SECTOR_SIZE;
                if let Some(dst) = b.read.get_mut(o..o + len) {
                    dst.copy_from_slice(src);
                }
            }
            at += len;
            b.pending = b.pending.saturating_sub(1);
            if b.pending == 0 {
                if let Some(b) = self.bios.remove(&piece.tag) {
                    self.done.push(Completion {
                        tag: b.bio.tag,
                        status: b.status,
                        data: b.read,
                    });
                }
            }
        }
    }

    /// Bios not finished yet.
    pub fn outstanding(&self) -> usize {
        self.bios.len()
    }

    /// `blkif_recover` after a migration: connect to the destination, then
    /// re-send every unfinished request. Reads and writes are re-cut —
    /// adjacent pieces merged, long ones split at other boundaries, data laid
    /// out at other page offsets — under new ids; flush, FUA and discard
    /// bios are re-sent whole.
    pub fn reconnect<S: XenStore + ?Sized>(
        &mut self,
        xs: &S,
        platform: &EmulatedPlatform,
        fe: &str,
        be: &str,
    ) -> io::Result<()> {
        // The old rings are gone with the source; so are its grants.
        let old: Vec<Shadow> = self.shadow.drain().map(|(_, s)| s).collect();
        for sh in &old {
            for &(p, g) in sh.data_pages.iter().chain(&sh.indirect_pages) {
                if self.guest.revoke(g).is_ok() {
                    self.free_pages.push(p);
                }
            }
        }
        for (p, g) in std::mem::take(&mut self.persistent_pool) {
            if self.guest.revoke(g).is_ok() {
                self.free_pages.push(p);
            }
        }
        self.backlog.clear();
        xs.write_str(XBT_NULL, &format!("{fe}/state"), "1")
            .map_err(|e| err(e.to_string()))?;
        self.connect(xs, platform, fe, be)?;
        self.next_id += 1000 + rand(&mut self.rng) % 1000;

        // Every unfinished bio, whole (pieces already done are not redone by
        // blkfront either: it re-queues requests, which is what we have).
        let mut rw: BTreeMap<(u64, u64), (BioOp, Piece)> = BTreeMap::new();
        let mut whole: Vec<u64> = Vec::new();
        for sh in old {
            let mut at = sh.spec.sector;
            for p in sh.spec.pieces {
                let sector = at;
                at += p.nr_sectors;
                match sh.spec.op {
                    BioOp::Read | BioOp::Write => {
                        rw.insert((sector, p.tag), (sh.spec.op, p));
                    }
                    _ => {
                        if !whole.contains(&p.tag) {
                            whole.push(p.tag);
                        }
                    }
                }
            }
        }
        for b in self.bios.values_mut() {
            b.pending = 0;
        }
        let mut specs: Vec<Spec> = Vec::new();
        let max = self.max_sectors();
        // Merge adjacent pieces of the same op, then cut at random sizes.
        for (&(sector, _), &(op, piece)) in &rw {
            // Cuts stay on 4 KiB boundaries: the block layer never splits
            // below the logical block size.
            let cut = 8 * (1 + rand(&mut self.rng) % (max / 8).max(1));
            let merged = specs.last_mut().is_some_and(|last| {
                let fits = last.op == op
                    && last.sector + last.nr_sectors() == sector
                    && last.nr_sectors() + piece.nr_sectors <= cut;
                if fits {
                    last.pieces.push(piece);
                }
                fits
            });
            if merged {
                continue;
            }
            // Split this piece at `cut`.
            let mut off = 0;
            while off < piece.nr_sectors {
                let n = (piece.nr_sectors - off).min(cut);
                specs.push(Spec {
                    op,
                    sector: sector + off,
                    pieces: vec![Piece {
                        tag: piece.tag,
                        bio_offset: piece.bio_offset + off,
                        nr_sectors: n,
                    }],
                    phase: (rand(&mut self.rng) % 8) as u8,
                });
                off += n;
            }
        }
        for tag in whole {
            if let Some(b) = self.bios.get(&tag) {
                let bio = b.bio.clone();
                specs.extend(self.split(&bio, 0));
            }
        }
        for s in &specs {
            for p in &s.pieces {
                if let Some(b) = self.bios.get_mut(&p.tag) {
                    b.pending += 1;
                }
            }
        }
        self.resent_requests = specs.len();
        self.backlog.extend(specs);
        self.pump()
    }
}
