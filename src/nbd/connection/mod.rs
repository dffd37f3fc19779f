//! The transmission phase of one connection. This thread reads and
//! validates requests and submits them to the disk, so they pipeline. With
//! the io_uring engine it owns a per-connection ring: it sleeps in that
//! ring (woken by a completion or by socket data), runs the completions
//! itself and sends all their replies with one `sendmsg` — no other thread
//! touches a request, as in qemu's event loop. Replies the socket does not
//! take at once, and those of requests completed elsewhere (another
//! connection's completion started them, or an engine without a local
//! queue), go out directly when the socket is free or through a writer
//! thread that may block.
//!
//! This file holds the reading side (requests, budget, buffers) and
//! [`serve`]; `socket` the client socket and header reads; `reply` the
//! reply encoding and both ways replies leave (directly or through the
//! writer thread). The transmission phase ends with a [`ConnError`] unless
//! the client disconnects.

mod reply;
mod socket;

pub use socket::Sock;

use reply::{outcome_error, reply_loop, Ctx, Reply, Sink, SinkState, BATCHING};
use socket::read_header;

use super::allocation::AllocationMap;
use super::handshake::Negotiated;
use super::proto::*;
use crate::handoff::{Disk, Writer};
use crate::metrics::{DiskMetrics, Op, RequestTimer};
use crate::storage::{AlignedBuf, IoOutcome, LocalQueue, StorageIo};
use crate::sys::recv_nowait;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Live counters of one connection, shown by `blkshim ctl status`.
#[derive(Debug, Default, Serialize)]
pub struct ConnStats {
    pub id: u64,
    pub peer: String,
    pub disk: String,
    pub epoch: u64,
    pub in_flight: AtomicUsize,
    pub requests: AtomicU64,
    pub refused_stale: AtomicU64,
    /// The disk's request metrics, when `--metrics` is on.
    #[serde(skip)]
    pub metrics: Option<Arc<DiskMetrics>>,
}

/// Why a connection's transmission phase ended other than by the client's
/// disconnect (or the server shutting the read side down).
#[derive(Debug)]
pub enum ConnError {
    /// The client went away in the middle of a request: a header cut
    /// short, or the payload of a refused write not all sent.
    VanishedMidRequest(io::Error),
    /// The client went away in the middle of a write's payload.
    VanishedMidWrite(io::Error),
    /// A request header that is not NBD: the stream cannot be followed.
    Protocol(ProtoError),
    /// A refused request whose payload is too large to skip, so the
    /// stream cannot be followed either (after its error reply).
    Unrecoverable(&'static str),
    /// The per-connection I/O queue failed.
    Queue(io::Error),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::VanishedMidRequest(e) => write!(f, "client vanished mid-request: {e}"),
            ConnError::VanishedMidWrite(e) => write!(f, "client vanished mid-write: {e}"),
            ConnError::Protocol(e) => write!(f, "protocol error: {e}"),
            ConnError::Unrecoverable(why) => write!(f, "unrecoverable request: {why}"),
            ConnError::Queue(e) => write!(f, "I/O queue failed: {e}"),
        }
    }
}

impl std::error::Error for ConnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnError::VanishedMidRequest(e)
            | ConnError::VanishedMidWrite(e)
            | ConnError::Queue(e) => Some(e),
            ConnError::Protocol(e) => Some(e),
            ConnError::Unrecoverable(_) => None,
        }
    }
}

/// Bounds what one connection has in flight, so a client cannot make the
/// server buffer unbounded write payloads.
struct Budget {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

const MAX_IN_FLIGHT: usize = 256;
const MAX_IN_FLIGHT_BYTES: u64 = 128 << 20;

impl Budget {
    fn full(g: &(usize, u64), bytes: u64) -> bool {
        g.0 > 0 && (g.0 >= MAX_IN_FLIGHT || g.1 + bytes > MAX_IN_FLIGHT_BYTES)
    }

    fn acquire(&self, bytes: u64) {
        let mut g = self.state.lock();
        while Self::full(&g, bytes) {
            self.cv.wait(&mut g);
        }
        g.0 += 1;
        g.1 += bytes;
    }

    fn try_acquire(&self, bytes: u64) -> bool {
        let mut g = self.state.lock();
        if Self::full(&g, bytes) {
            return false;
        }
        g.0 += 1;
        g.1 += bytes;
        true
    }

    fn release(&self, bytes: u64) {
        let mut g = self.state.lock();
        g.0 = g.0.saturating_sub(1);
        g.1 = g.1.saturating_sub(bytes);
        self.cv.notify_all();
    }

    fn wait_idle(&self) {
        let mut g = self.state.lock();
        while g.0 > 0 {
            self.cv.wait(&mut g);
        }
    }
}

fn release(budget: &Budget, stats: &ConnStats, bytes: u64) {
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    budget.release(bytes);
}

/// Serve the transmission phase until the client disconnects, the socket
/// fails, or the server shuts the read side down. Returns once every
/// request taken from the client has been answered (or the client is gone).
pub fn serve(sock: Sock, neg: Negotiated, stats: Arc<ConnStats>) {
    let label = format!("conn {} ({})", stats.id, stats.peer);
    let write_half = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::error!("{label}: cannot clone socket: {e}");
            return;
        }
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let structured = neg.structured;
    let wlabel = label.clone();
    let budget = Arc::new(Budget {
        state: Mutex::new((0, 0)),
        cv: Condvar::new(),
    });
    let pool = Arc::new(BufPool::default());
    let sink = Arc::new(Sink {
        batch: Mutex::new(Vec::new()),
        structured,
        state: Mutex::new(SinkState {
            w: BufWriter::with_capacity(256 << 10, write_half),
            pending: Vec::new(),
            broken: false,
        }),
    });
    let (wbudget, wstats, wpool) = (Arc::clone(&budget), Arc::clone(&stats), Arc::clone(&pool));
    let wsink = Arc::clone(&sink);
    let writer_thread = std::thread::Builder::new()
        .name(format!("nbd-reply-{}", stats.id))
        .stack_size(256 << 10)
        .spawn(move || reply_loop(&wsink, rx, &wlabel, &wbudget, &wstats, &wpool));
    let writer_thread = match writer_thread {
        Ok(t) => t,
        Err(e) => {
            log::error!("{label}: cannot start reply thread: {e}");
            return;
        }
    };
    let ctx = Ctx {
        sink,
        pool,
        replies: tx,
        budget,
        stats,
    };
    let Negotiated {
        disk,
        writer,
        limits,
        allocation,
        ..
    } = neg;
    let writer = Arc::new(writer);
    // The queue sleeps on the raw socket and reads it without blocking,
    // which a TLS session (with plaintext it may already hold) cannot do.
    let queue = if sock.is_tls() {
        None
    } else {
        match disk.local_queue() {
            Ok(q) => q,
            Err(e) => {
                log::warn!("{label}: no per-connection I/O queue ({e}); using the shared one");
                None
            }
        }
    };
    if queue.is_some() {
        BATCHING.with(|b| b.set(Arc::as_ptr(&ctx.sink)));
    }
    let mut reader = BufReader::with_capacity(
        64 << 10,
        ConnReader {
            sock,
            queue,
            ctx: ctx.clone(),
        },
    );
    let how = read_loop(
        &mut reader,
        &disk,
        &writer,
        &limits,
        allocation.as_deref(),
        &ctx,
    );
    match &how {
        Ok(()) => log::debug!("{label}: closed"),
        Err(e) => log::warn!("{label}: {e}; closing"),
    }
    let ConnReader { queue, .. } = reader.into_inner();
    if let Some(q) = &queue {
        while q.in_flight() > 0 {
            ctx.flush_batch();
            if let Err(e) = q.wait(None) {
                log::error!("{label}: waiting for I/O in flight: {e}");
                break;
            }
        }
    }
    ctx.flush_batch();
    // Anything the queue still finishes as it drops answers directly.
    BATCHING.with(|b| b.set(std::ptr::null()));
    drop(queue);
    ctx.budget.wait_idle();
    let Ctx { replies, .. } = ctx;
    drop(replies);
    let _ = writer_thread.join();
    log::info!("{label}: disconnected");
}

/// The socket's read side. With a per-connection I/O queue it never
/// sleeps in `recv` while requests are in flight: it sleeps in the queue,
/// which wakes for a completion or for socket data, runs the completions
/// and sends their gathered replies first.
struct ConnReader {
    sock: Sock,
    queue: Option<Box<dyn LocalQueue>>,
    ctx: Ctx,
}

impl ConnReader {
    /// Complete and answer what has finished, without sleeping.
    fn progress(&self) -> io::Result<()> {
        if let Some(q) = &self.queue {
            q.reap()?;
            self.ctx.flush_batch();
        }
        Ok(())
    }

    /// Submit what is queued on the connection's ring now, not when the
    /// buffered requests are all parsed (see `read_loop`'s O_DIRECT reads).
    fn submit_now(&self) -> io::Result<()> {
        if let Some(q) = &self.queue {
            q.reap()?;
        }
        Ok(())
    }

    /// Take `bytes` of the connection's budget, completing requests while
    /// it is exhausted.
    fn take(&self, bytes: u64) -> io::Result<()> {
        let ctx = &self.ctx;
        match &self.queue {
            None => ctx.budget.acquire(bytes),
            Some(q) => {
                while !ctx.budget.try_acquire(bytes) {
                    ctx.flush_batch();
                    if ctx.budget.try_acquire(bytes) {
                        break;
                    }
                    if q.in_flight() > 0 {
                        q.wait(None)?;
                    } else {
                        // Only replies in the writer thread hold it now.
                        ctx.budget.acquire(bytes);
                        break;
                    }
                }
            }
        }
        ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(q) = &self.queue else {
            return self.sock.read(buf);
        };
        let fd = self.sock.as_raw_fd();
        loop {
            self.progress()?;
            let e = match recv_nowait(&self.sock, buf) {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.kind() {
                io::ErrorKind::WouldBlock => {}
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
            if q.in_flight() == 0 {
                // Nothing can complete here until more requests come.
                return self.sock.read(buf);
            }
            q.wait(Some(fd))?;
        }
    }
}

/// Take budget for one request (see [`ConnReader::take`]).
fn take(r: &BufReader<ConnReader>, bytes: u64) -> Result<(), ConnError> {
    r.get_ref().take(bytes).map_err(ConnError::Queue)
}

fn read_loop(
    r: &mut BufReader<ConnReader>,
    disk: &Arc<Disk>,
    writer: &Arc<Writer>,
    lim: &ExportLimits,
    allocation: Option<&AllocationMap>,
    ctx: &Ctx,
) -> Result<(), ConnError> {
    let caps = disk.capabilities();
    let (fast_zero, direct) = (caps.fast_zero, caps.direct);
    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        if let Err(e) = read_header(r, &mut hdr) {
            return match e {
                None => Ok(()),
                Some(e) => Err(ConnError::VanishedMidRequest(e)),
            };
        }
        let h = parse_request_header(&hdr).map_err(ConnError::Protocol)?;
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let cmd = match validate_request(&h, lim) {
            Ok(c) => c,
            Err(refusal) => {
                log::warn!(
                    "conn {}: request {:?} refused: {} (NBD error {})",
                    ctx.stats.id,
                    h,
                    refusal.why,
                    refusal.error
                );
                if let Some(n) = refusal.drain {
                    io::copy(&mut r.by_ref().take(n as u64), &mut io::sink())
                        .map_err(ConnError::VanishedMidRequest)?;
                }
                ctx.send(Reply::Status {
                    handle: h.handle,
                    error: refusal.error,
                    msg: refusal.why,
                    held: None,
                });
                if refusal.drain.is_none() {
                    return Err(ConnError::Unrecoverable(refusal.why));
                }
                continue;
            }
        };
        let handle = h.handle;
        match cmd {
            Command::Disconnect => return Ok(()),
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::BlockStatus);
                let extents = allocation
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                    .and_then(|a| a.extents(offset, len, lim.min_block as u64, req_one));
                record(timer, 0);
                match extents {
                    Ok(e) if !e.is_empty() => ctx.send(Reply::Raw {
                        bytes: encode_block_status(handle, &e),
                    }),
                    other => {
                        let errno = other.err().and_then(|e| e.raw_os_error());
                        ctx.send(Reply::Status {
                            handle,
                            error: nbd_error(errno.unwrap_or(libc::EIO)),
                            msg: "block status failed",
                            held: None,
                        })
                    }
                }
            }
            Command::Read { offset, len } => {
                let bytes = len as u64;
                take(r, bytes)?;
                let c = ctx.clone();
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::Read);
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Read {
                        offset,
                        buf: ctx.pool.get(len as usize),
                    },
                    Box::new(move |o: IoOutcome| match (o.result, o.buf) {
                        (Ok(()), Some(buf)) => {
                            record(timer, bytes);
                            c.send(Reply::Data {
                                handle,
                                offset,
                                buf,
                                held: Some(bytes),
                            });
                        }
                        (r, buf) => {
                            if let Some(b) = buf {
                                c.pool.put(b);
                            }
                            let err = if r.is_ok() {
                                NBD_EIO
                            } else {
                                outcome_error(&r)
                            };
                            record(timer, 0);
                            c.finish(handle, bytes, err)
                        }
                    }),
                );
                if direct {
                    // An O_DIRECT read goes to the device at once, not with
                    // the requests parsed after it from the same receive:
                    // reads submitted together come back together, and the
                    // device idles while the client answers the batch.
                    // randread 4 KiB QD32 on one connection: 58k -> 67k
                    // IOPS, ahead in 7 of 7 interleaved rounds (README).
                    r.get_ref().submit_now().map_err(ConnError::Queue)?;
                }
            }
            Command::Write { offset, len, fua } => {
                let bytes = len as u64;
                take(r, bytes)?;
                let mut buf = ctx.pool.get(len as usize);
                if let Err(e) = r.read_exact(buf.as_mut_slice()) {
                    release(&ctx.budget, &ctx.stats, bytes);
                    return Err(ConnError::VanishedMidWrite(e));
                }
                let c = ctx.clone();
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::Write);
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Write { offset, buf, fua },
                    Box::new(move |o: IoOutcome| {
                        if let Some(b) = o.buf {
                            c.pool.put(b);
                        }
                        record(timer, if o.result.is_ok() { bytes } else { 0 });
                        c.finish(handle, bytes, outcome_error(&o.result))
                    }),
                );
            }
            Command::Flush => {
                take(r, 0)?;
                let c = ctx.clone();
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::Flush);
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Flush,
                    Box::new(move |o: IoOutcome| {
                        record(timer, 0);
                        c.finish(handle, 0, outcome_error(&o.result))
                    }),
                );
            }
            Command::Trim { offset, len, fua } => {
                take(r, 0)?;
                let io = StorageIo::Discard {
                    offset,
                    len: len as u64,
                };
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::Trim);
                submit_then_flush(disk, writer, handle, io, fua, ctx, timer);
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast_only,
            } => {
                let timer = DiskMetrics::start(&ctx.stats.metrics, Op::WriteZeroes);
                if fast_only && !fast_zero {
                    record(timer, 0);
                    ctx.send(Reply::Status {
                        handle,
                        error: NBD_ENOTSUP,
                        msg: "fast zero not supported by this storage",
                        held: None,
                    });
                    continue;
                }
                take(r, 0)?;
                let io = StorageIo::WriteZeroes {
                    offset,
                    len: len as u64,
                    may_unmap,
                };
                submit_then_flush(disk, writer, handle, io, fua, ctx, timer);
            }
        }
    }
}

/// Submit `io`; with `fua`, follow a success with a flush before replying
/// (discard and write-zeroes carry no FUA of their own).
fn submit_then_flush(
    disk: &Arc<Disk>,
    writer: &Arc<Writer>,
    handle: u64,
    io: StorageIo,
    fua: bool,
    ctx: &Ctx,
    timer: Option<RequestTimer>,
) {
    let c = ctx.clone();
    let (d, w) = (Arc::clone(disk), Arc::clone(writer));
    disk.submit(
        writer,
        handle,
        io,
        Box::new(move |o: IoOutcome| {
            if o.result.is_err() || !fua {
                record(timer, 0);
                return c.finish(handle, 0, outcome_error(&o.result));
            }
            let c2 = c.clone();
            d.submit(
                &w,
                handle,
                StorageIo::Flush,
                Box::new(move |o: IoOutcome| {
                    record(timer, 0);
                    c2.finish(handle, 0, outcome_error(&o.result))
                }),
            );
        }),
    );
}

/// Count a request as answered (metrics on), before its reply goes out.
fn record(timer: Option<RequestTimer>, ok_bytes: u64) {
    if let Some(t) = timer {
        t.done(ok_bytes);
    }
}

/// Reused payload buffers: a fresh 1 MiB buffer costs an mmap and 256
/// page faults per request.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
}

const POOL_MAX_BUFS: usize = 64;
const POOL_MAX_CAP: usize = 4 << 20;

impl BufPool {
    fn get(&self, len: usize) -> AlignedBuf {
        let reused = {
            let mut f = self.free.lock();
            f.iter()
                .rposition(|b| b.capacity() >= len)
                .map(|i| f.swap_remove(i))
        };
        let mut b = reused.unwrap_or_else(|| AlignedBuf::zeroed(len.next_power_of_two().max(4096)));
        b.set_len(len);
        b
    }

    fn put(&self, b: AlignedBuf) {
        if b.capacity() <= POOL_MAX_CAP {
            let mut f = self.free.lock();
            if f.len() < POOL_MAX_BUFS {
                f.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    #[test]
    fn errors_say_what_ended_the_connection() {
        let eof = || io::Error::from(io::ErrorKind::UnexpectedEof);
        let cases = [
            (
                ConnError::VanishedMidRequest(eof()),
                "client vanished mid-request: unexpected end of file",
            ),
            (
                ConnError::VanishedMidWrite(eof()),
                "client vanished mid-write: unexpected end of file",
            ),
            (
                ConnError::Protocol(ProtoError::BadMagic(7)),
                &format!("protocol error: {}", ProtoError::BadMagic(7)),
            ),
            (
                ConnError::Unrecoverable("write too large"),
                "unrecoverable request: write too large",
            ),
            (
                ConnError::Queue(io::Error::from_raw_os_error(libc::EBADF)),
                &format!(
                    "I/O queue failed: {}",
                    io::Error::from_raw_os_error(libc::EBADF)
                ),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
            let has_source = !matches!(e, ConnError::Unrecoverable(_));
            assert_eq!(std::error::Error::source(&e).is_some(), has_source, "{e:?}");
        }
    }

    #[test]
    fn the_budget_admits_one_request_of_any_size_and_bounds_the_rest() {
        let b = budget();
        // One request is always admitted, however large.
        assert!(b.try_acquire(MAX_IN_FLIGHT_BYTES * 2));
        assert!(!b.try_acquire(0), "over the byte bound");
        b.release(MAX_IN_FLIGHT_BYTES * 2);
        for _ in 0..MAX_IN_FLIGHT {
            assert!(b.try_acquire(0));
        }
        assert!(!b.try_acquire(0), "over the request bound");
        for _ in 0..MAX_IN_FLIGHT {
            b.release(0);
        }
        assert_eq!(*b.state.lock(), (0, 0));
        b.wait_idle();
    }

    #[test]
    fn a_blocked_acquire_goes_on_when_budget_is_released() {
        let b = Arc::new(budget());
        b.acquire(MAX_IN_FLIGHT_BYTES);
        let b2 = Arc::clone(&b);
        let t = std::thread::spawn(move || b2.acquire(1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(b.state.lock().0, 1, "still waiting");
        b.release(MAX_IN_FLIGHT_BYTES);
        t.join().unwrap();
        assert_eq!(*b.state.lock(), (1, 1));
    }

    #[test]
    fn the_pool_reuses_buffers_big_enough() {
        let pool = BufPool::default();
        let b = pool.get(3000);
        assert_eq!(b.len(), 3000);
        assert!(b.capacity() >= 4096);
        let cap = b.capacity();
        pool.put(b);
        let again = pool.get(100);
        assert_eq!(again.len(), 100);
        assert_eq!(again.capacity(), cap, "reused");
        // Buffers over the cap are not kept.
        pool.put(pool.get(POOL_MAX_CAP + 1));
        assert!(pool.free.lock().is_empty());
    }
}
