//! One blkif ring served by one thread: wait on the event channel, consume
//! requests with `RING_FINAL_CHECK_FOR_REQUESTS` semantics, move data through
//! grants (a persistent-grant cache keyed by gref when negotiated), submit to
//! the disk, and answer with push-and-check-notify.
//!
//! Migration safety lives here in one place: once [`RingHandle::suspend`] is
//! called a protected ring consumes **no** further request and publishes no
//! further response (the frontend re-sends whatever it has no answer for).
//! The unprotected mode is Linux xen-blkback's behaviour — straight to the
//! storage, consuming until teardown — kept only so tests can show the
//! corruption of seeds/003.

use crate::handoff::{Disk, Writer};
use crate::metrics::{DiskMetrics, Op, RequestTimer};
use crate::storage::{AlignedBuf, IoDone, IoOutcome, StorageIo};
use crate::sys::{self, EventFd, PollFd};
use crate::xen::abi::BlkifAbi;
use crate::xen::blkif::{parse_request, Limits, Operation, Parsed, Request, Response, Status};
use crate::xen::evtchn::EventChannel;
use crate::xen::grant::{DomId, GrantError, GrantMapper, GrantRef};
use crate::xen::ring::BackRing;
use crate::xen::shared::SharedMem;
use crate::xen::{PAGE_SIZE, SECTOR_SIZE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Most grants kept mapped per ring (Linux: `max_persistent_grants`, 1056).
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

/// Where a ring's requests go.
#[derive(Clone)]
pub enum Target {
    /// Through the core: tracked, epoch-stamped, drained or fenced at suspend.
    Protected {
        disk: Arc<Disk>,
        writer: Arc<Writer>,
    },
    /// Straight to storage, as Linux blkback does (negative tests only:
    /// feature `test-utils`).
    #[cfg(feature = "test-utils")]
    Unprotected {
        storage: Arc<dyn crate::storage::BlockStorage>,
    },
}

impl Target {
    fn submit(&self, tag: u64, io: StorageIo, done: IoDone) {
        match self {
            Target::Protected { disk, writer } => disk.submit(writer, tag, io, done),
            #[cfg(feature = "test-utils")]
            Target::Unprotected { storage } => storage.submit(io, done),
        }
    }

    fn protected(&self) -> bool {
        matches!(self, Target::Protected { .. })
    }
}

/// What a ring needs to run.
pub struct RingConfig {
    pub domid: DomId,
    pub abi: BlkifAbi,
    /// The mapped (possibly multi-page) shared ring.
    pub ring: SharedMem,
    pub evtchn: Arc<dyn EventChannel>,
    pub mapper: Arc<dyn GrantMapper>,
    pub limits: Limits,
    /// `feature-persistent` negotiated: keep data grants mapped.
    pub persistent: bool,
    pub target: Target,
    /// `--metrics`: the disk's request counters and latencies.
    pub metrics: Option<Arc<DiskMetrics>>,
    /// A name for logs and the thread.
    pub name: String,
}

/// Counters of one ring.
#[derive(Default, Debug)]
pub struct RingStats {
    pub consumed: AtomicU64,
    pub answered: AtomicU64,
    pub refused: AtomicU64,
    /// INDIRECT requests served.
    pub indirect: AtomicU64,
    /// Requests by operation (after parsing): what the frontend used.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// FLUSH_DISKCACHE and WRITE_BARRIER.
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    /// Bytes read and written for the guest.
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Responses dropped because the ring was suspended.
    pub withheld: AtomicU64,
}

struct Shared {
    name: String,
    domid: DomId,
    abi: BlkifAbi,
    ring: Mutex<BackRing>,
    evtchn: Arc<dyn EventChannel>,
    mapper: Arc<dyn GrantMapper>,
    limits: Limits,
    target: Target,
    persistent: Option<Mutex<HashMap<(GrantRef, bool), SharedMem>>>,
    suspended: AtomicBool,
    stopping: AtomicBool,
    /// Readable once the ring stops: the thread sleeps on this and the
    /// event channel only, never on a timer, so an idle ring costs nothing.
    stop_fd: EventFd,
    broken: AtomicBool,
    in_flight: AtomicUsize,
    stats: RingStats,
    metrics: Option<Arc<DiskMetrics>>,
}

/// A running ring. Stops (and joins its thread) when dropped.
pub struct RingHandle {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RingHandle {
    /// Maps nothing itself: `config.ring` is already mapped. Starts the thread.
    pub fn start(config: RingConfig) -> io::Result<RingHandle> {
        let ring = BackRing::new(config.ring, config.abi)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            domid: config.domid,
            abi: config.abi,
            ring: Mutex::new(ring),
            evtchn: config.evtchn,
            mapper: config.mapper,
            limits: config.limits,
            target: config.target,
            persistent: config.persistent.then(|| Mutex::new(HashMap::new())),
            suspended: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop_fd: EventFd::new(true)?,
            broken: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stats: RingStats::default(),
            metrics: config.metrics,
        });
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("ring-{}", config.name))
            .spawn(move || run(s))?;
        Ok(RingHandle {
            shared,
            thread: Some(thread),
        })
    }

    /// Stop consuming now (protected rings also stop answering). Returns at
    /// once; the caller then suspends the disk.
    pub fn suspend(&self) {
        self.shared.suspended.store(true, Ordering::SeqCst);
        // Take the ring lock once: a consumer that had already read
        // `suspended == false` finishes taking its current slot first.
        drop(self.shared.ring.lock());
    }

    /// Whether [`RingHandle::suspend`] was called.
    pub fn is_suspended(&self) -> bool {
        self.shared.suspended.load(Ordering::SeqCst)
    }

    /// Whether the ring was disconnected for a guest protocol violation.
    pub fn broken(&self) -> bool {
        self.shared.broken.load(Ordering::Acquire)
    }

    /// Requests consumed and not yet answered (or withheld).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &RingStats {
        &self.shared.stats
    }

    /// Persistent grants currently mapped.
    pub fn persistent_grants(&self) -> usize {
        self.shared
            .persistent
            .as_ref()
            .map_or(0, |p| p.lock().len())
    }

    /// Stops the thread and drops cached grant mappings.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Nonblocking: a full counter (never, with one signal) still reads
        // as readable, which is all the thread looks at.
        let _ = self.shared.stop_fd.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let st = &self.shared.stats;
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            log::info!(
                "ring {}: stopped after {} requests (read {}, write {}, flush {}, discard {}, indirect {}, refused {}; {} B read, {} B written; {} persistent grants)",
                self.shared.name,
                n(&st.consumed),
                n(&st.reads),
                n(&st.writes),
                n(&st.flushes),
                n(&st.discards),
                n(&st.indirect),
                n(&st.refused),
                n(&st.bytes_read),
                n(&st.bytes_written),
                self.persistent_grants()
            );
        }
        if let Some(p) = &self.shared.persistent {
            p.lock().clear();
        }
    }
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long the thread backs off after its wait failed (it then retries).
const WAIT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

fn run(s: Arc<Shared>) {
    loop {
        if s.stopping.load(Ordering::Acquire) {
            return;
        }
        let halted = s.broken.load(Ordering::Acquire)
            || (s.target.protected() && s.suspended.load(Ordering::Acquire));
        if !halted {
            // Consume until empty, then RING_FINAL_CHECK before sleeping.
            let more = consume_all(&s);
            if more {
                continue;
            }
        }
        if let Err(e) = wait_kick_or_stop(&s) {
            log::error!("ring {}: event channel wait failed: {e}", s.name);
            thread::sleep(WAIT_ERROR_BACKOFF);
        }
    }
}

/// Sleeps until the frontend kicks (the kick is then consumed and the port
/// re-armed) or the ring stops.
fn wait_kick_or_stop(s: &Shared) -> io::Result<()> {
    let mut fds = [
        PollFd::readable(s.evtchn.as_raw_fd()),
        PollFd::readable(s.stop_fd.as_raw_fd()),
    ];
    loop {
        match sys::poll(&mut fds, -1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let ev = fds[0].revents();
    if ev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(io::Error::other(format!(
            "event channel descriptor polled {ev:#x}"
        )));
    }
    if ev & libc::POLLIN != 0 {
        s.evtchn.wait(Some(Duration::ZERO))?;
    }
    Ok(())
}

/// Consumes every request available; true if the final check found more.
fn consume_all(s: &Arc<Shared>) -> bool {
    loop {
        let raw = {
            let mut ring = s.ring.lock();
            if s.target.protected() && s.suspended.load(Ordering::SeqCst) {
                return false;
            }
            match ring.next_request() {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    return match ring.final_check_for_requests() {
                        Ok(more) => more,
                        Err(e) => {
                            disconnect(s, &e.to_string());
                            false
                        }
                    };
                }
                Err(e) => {
                    disconnect(s, &e.to_string());
                    return false;
                }
            }
        };
        s.stats.consumed.fetch_add(1, Ordering::Relaxed);
        s.in_flight.fetch_add(1, Ordering::AcqRel);
        handle(s, raw.as_bytes());
    }
}

fn disconnect(s: &Shared, why: &str) {
    if !s.broken.swap(true, Ordering::AcqRel) {
        log::warn!(
            "ring {}: guest protocol violation, ring disconnected: {why}",
            s.name
        );
    }
}

fn handle(s: &Arc<Shared>, slot: &[u8]) {
    let req = match parse_request(s.abi, slot, &s.limits) {
        Ok(Parsed::Ready(r)) => r,
        Ok(Parsed::Indirect(ind)) => {
            let mut pages = vec![vec![0u8; PAGE_SIZE]; ind.indirect_grefs.len()];
            for (page, &gref) in pages.iter_mut().zip(&ind.indirect_grefs) {
                if let Err(e) = s.mapper.copy_from_guest(s.domid, gref, 0, page) {
                    log::warn!("ring {}: indirect page {gref}: {e}", s.name);
                    return refuse(s, ind.id, ind.indirect_op);
                }
            }
            match ind.resolve(&pages, &s.limits) {
                Ok(r) => {
                    s.stats.indirect.fetch_add(1, Ordering::Relaxed);
                    r
                }
                Err(e) => {
                    log::warn!("ring {}: {e}", s.name);
                    s.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return respond(s, e.response());
                }
            }
        }
        Err(e) => {
            log::warn!("ring {}: {e}", s.name);
            s.stats.refused.fetch_add(1, Ordering::Relaxed);
            return respond(s, e.response());
        }
    };
    execute(s, req);
}

fn refuse(s: &Arc<Shared>, id: u64, op: u8) {
    s.stats.refused.fetch_add(1, Ordering::Relaxed);
    respond(
        s,
        Response {
            id,
            operation: op,
            status: Status::Error,
        },
    );
}

/// Publishes one response (or withholds it once a protected ring is
/// suspended: the frontend will re-send the request to the destination).
fn respond(s: &Shared, rsp: Response) {
    s.in_flight.fetch_sub(1, Ordering::AcqRel);
    if s.target.protected() && s.suspended.load(Ordering::SeqCst) {
        s.stats.withheld.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let notify = {
        let mut ring = s.ring.lock();
        match rsp.put(&mut ring).and_then(|()| ring.push_responses()) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("ring {}: cannot answer: {e}", s.name);
                false
            }
        }
    };
    s.stats.answered.fetch_add(1, Ordering::Relaxed);
    if notify {
        if let Err(e) = s.evtchn.notify() {
            log::warn!("ring {}: notify failed: {e}", s.name);
        }
    }
}

fn status_of(r: &io::Result<()>) -> Status {
    match r {
        Ok(()) => Status::Okay,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Status::NotSupported,
        Err(_) => Status::Error,
    }
}

/// Guest memory access for one segment: a cached persistent mapping, or a
/// grant copy.
fn with_mapping<R>(
    s: &Shared,
    gref: GrantRef,
    writable: bool,
    f: impl FnOnce(&SharedMem) -> Result<R, GrantError>,
) -> Option<Result<R, GrantError>> {
    let cache = s.persistent.as_ref()?;
    let mut c = cache.lock();
    if let Some(m) = c.get(&(gref, writable)) {
        return Some(f(m));
    }
    if c.len() >= MAX_PERSISTENT_GRANTS {
        return None;
    }
    match s.mapper.map(s.domid, &[gref], writable) {
        Ok(m) => {
            let r = f(&m);
            c.insert((gref, writable), m);
            Some(r)
        }
        Err(e) => Some(Err(e)),
    }
}

fn gather(s: &Shared, req: &Request) -> Result<AlignedBuf, GrantError> {
    let total: usize = req.segments().iter().map(|g| g.len()).sum();
    let mut buf = AlignedBuf::zeroed(total);
    let mut pos = 0;
    let out = buf.as_mut_slice();
    for seg in req.segments() {
        let dst = &mut out[pos..pos + seg.len()];
        let off = seg.page_offset();
        let mapped = with_mapping(s, seg.gref, false, |m| {
            m.read_into(off, dst).map_err(|_| GrantError::OutOfPage {
                offset: off,
                len: seg.len(),
            })
        });
        match mapped {
            Some(r) => r?,
            None => s.mapper.copy_from_guest(s.domid, seg.gref, off, dst)?,
        }
        pos += seg.len();
    }
    Ok(buf)
}

fn scatter(s: &Shared, req: &Request, data: &[u8]) -> Result<(), GrantError> {
    let mut pos = 0;
    for seg in req.segments() {
        let src = data
            .get(pos..pos + seg.len())
            .ok_or(GrantError::OutOfPage {
                offset: pos,
                len: seg.len(),
            })?;
        let off = seg.page_offset();
        let mapped = with_mapping(s, seg.gref, true, |m| {
            m.write_from(off, src).map_err(|_| GrantError::OutOfPage {
                offset: off,
                len: seg.len(),
            })
        });
        match mapped {
            Some(r) => r?,
            None => s.mapper.copy_to_guest(s.domid, seg.gref, off, src)?,
        }
        pos += seg.len();
    }
    Ok(())
}

fn execute(s: &Arc<Shared>, req: Request) {
    let st = &s.stats;
    let bytes = req.nr_sectors() * SECTOR_SIZE as u64;
    match &req.operation {
        Operation::Read(_) => {
            st.reads.fetch_add(1, Ordering::Relaxed);
            st.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        }
        Operation::Write(_) => {
            st.writes.fetch_add(1, Ordering::Relaxed);
            st.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        }
        Operation::WriteBarrier(_) | Operation::Flush(_) => {
            st.flushes.fetch_add(1, Ordering::Relaxed);
            st.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        }
        Operation::Discard { .. } => {
            st.discards.fetch_add(1, Ordering::Relaxed);
        }
    }
    let offset = req.sector_number * SECTOR_SIZE as u64;
    let tag = req.id;
    let op = match &req.operation {
        Operation::Read(_) => Op::Read,
        Operation::Write(_) => Op::Write,
        Operation::WriteBarrier(_) | Operation::Flush(_) => Op::Flush,
        Operation::Discard { secure: true, .. } => Op::WriteZeroes,
        Operation::Discard { .. } => Op::Trim,
    };
    let timer = DiskMetrics::start(&s.metrics, op);
    // Counted before the answer goes out; payload only when it succeeded.
    let record = move |t: Option<RequestTimer>, status: Status| {
        if let Some(t) = t {
            t.done(if status == Status::Okay { bytes } else { 0 });
        }
    };
    match &req.operation {
        Operation::Read(_) => {
            let buf = AlignedBuf::zeroed((req.nr_sectors() as usize) * SECTOR_SIZE);
            let s2 = Arc::clone(s);
            s.target.submit(
                tag,
                StorageIo::Read { offset, buf },
                Box::new(move |o: IoOutcome| {
                    let mut status = status_of(&o.result);
                    // A suspended ring withholds the answer (the frontend
                    // re-sends the read after resume): no copy into a guest
                    // that may be gone by now.
                    let withheld = s2.target.protected() && s2.suspended.load(Ordering::SeqCst);
                    if status == Status::Okay && !withheld {
                        let ok = o.buf.as_ref().map(|b| scatter(&s2, &req, b.as_slice()));
                        if !matches!(ok, Some(Ok(()))) {
                            log::warn!("ring {}: read {:#x}: bad data grant", s2.name, req.id);
                            status = Status::Error;
                        }
                    }
                    record(timer, status);
                    respond(&s2, req.response(status));
                }),
            );
        }
        Operation::Write(_) => {
            let buf = match gather(s, &req) {
                Ok(b) => b,
                Err(e) => {
                    log::warn!("ring {}: write {:#x}: {e}", s.name, req.id);
                    record(timer, Status::Error);
                    return respond(s, req.response(Status::Error));
                }
            };
            let s2 = Arc::clone(s);
            s.target.submit(
                tag,
                StorageIo::Write {
                    offset,
                    buf,
                    fua: false,
                },
                Box::new(move |o| {
                    let status = status_of(&o.result);
                    record(timer, status);
                    respond(&s2, req.response(status))
                }),
            );
        }
        Operation::WriteBarrier(segs) | Operation::Flush(segs) => {
            // Flush first; then the data (if any) with FUA.
            let data = if segs.is_empty() {
                None
            } else {
                match gather(s, &req) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        log::warn!("ring {}: flush {:#x}: {e}", s.name, req.id);
                        record(timer, Status::Error);
                        return respond(s, req.response(Status::Error));
                    }
                }
            };
            let s2 = Arc::clone(s);
            s.target.submit(
                tag,
                StorageIo::Flush,
                Box::new(move |o| {
                    let status = status_of(&o.result);
                    match (status, data) {
                        (Status::Okay, Some(buf)) => {
                            let s3 = Arc::clone(&s2);
                            s2.target.submit(
                                tag,
                                StorageIo::Write {
                                    offset,
                                    buf,
                                    fua: true,
                                },
                                Box::new(move |o| {
                                    let status = status_of(&o.result);
                                    record(timer, status);
                                    respond(&s3, req.response(status))
                                }),
                            );
                        }
                        (st, _) => {
                            record(timer, st);
                            respond(&s2, req.response(st))
                        }
                    }
                }),
            );
        }
        Operation::Discard { nr_sectors, .. } if *nr_sectors == 0 => {
            record(timer, Status::Okay);
            respond(s, req.response(Status::Okay));
        }
        Operation::Discard { nr_sectors, secure } => {
            let len = nr_sectors * SECTOR_SIZE as u64;
            let io = if *secure {
                // Secure: the range must read back as zeroes, whatever the
                // storage does with holes.
                StorageIo::WriteZeroes {
                    offset,
                    len,
                    may_unmap: false,
                }
            } else {
                StorageIo::Discard { offset, len }
            };
            let s2 = Arc::clone(s);
            s.target.submit(
                tag,
                io,
                Box::new(move |o| {
                    let status = status_of(&o.result);
                    record(timer, status);
                    respond(&s2, req.response(status))
                }),
            );
        }
    }
}
