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

use super::allocation::AllocationMap;
use super::handshake::Negotiated;
use super::proto::*;
use crate::handoff::{Disk, Writer};
use crate::storage::{AlignedBuf, IoOutcome, LocalQueue, StorageIo};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A client socket, unix or TCP.
#[derive(Debug)]
pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn raw_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::unix::io::AsRawFd;
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }

    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(d),
            Sock::Tcp(s) => s.set_read_timeout(d),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
        }
    }
}

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

/// One reply for the writer thread, with the budget its request holds
/// (`None` for requests refused before taking any); the budget is released
/// only once the reply is on the wire, so a client that never reads its
/// replies cannot make the server queue unbounded data.
enum Reply {
    /// A reply without data (or an error).
    Status {
        handle: u64,
        error: u32,
        msg: &'static str,
        held: Option<u64>,
    },
    /// A reply already encoded (block status).
    Raw { bytes: Vec<u8> },
    /// Nothing to send: wakes the writer to push out bytes a direct send
    /// left behind.
    Kick,
    /// A successful read.
    Data {
        handle: u64,
        offset: u64,
        buf: AlignedBuf,
        held: Option<u64>,
    },
}

impl Reply {
    fn held(&self) -> Option<u64> {
        match self {
            Reply::Status { held, .. } | Reply::Data { held, .. } => *held,
            Reply::Raw { .. } | Reply::Kick => None,
        }
    }
}

fn outcome_error(r: &io::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) => nbd_error(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Everything a completion needs to answer and account.
#[derive(Clone)]
struct Ctx {
    sink: Arc<Sink>,
    pool: Arc<BufPool>,
    replies: Sender<Reply>,
    budget: Arc<Budget>,
    stats: Arc<ConnStats>,
}

impl Ctx {
    fn finish(&self, handle: u64, bytes: u64, error: u32) {
        if error == NBD_EPERM {
            self.stats.refused_stale.fetch_add(1, Ordering::Relaxed);
        }
        self.send(Reply::Status {
            handle,
            error,
            msg: "",
            held: Some(bytes),
        });
    }

    /// Send a reply. On the connection's own thread it is gathered and
    /// goes out with the others at the next [`Ctx::flush_batch`];
    /// elsewhere straight from this thread when the socket is free and
    /// takes it without blocking (saves a thread hop), else through the
    /// writer thread.
    fn send(&self, r: Reply) {
        if BATCHING.with(|b| b.get()) == Arc::as_ptr(&self.sink) {
            return self.sink.batch.lock().push(r);
        }
        if let Err(rs) = self.send_direct(vec![r]) {
            self.to_writer(rs);
        }
    }

    /// Send every gathered reply, with one `sendmsg` when the socket takes
    /// them all.
    fn flush_batch(&self) {
        let replies = std::mem::take(&mut *self.sink.batch.lock());
        if replies.is_empty() {
            return;
        }
        if let Err(rs) = self.send_direct(replies) {
            self.to_writer(rs);
        }
    }

    /// Send `replies` from this thread, without blocking: `Err` hands them
    /// back when the writer thread owns the stream (it holds the lock or
    /// has bytes queued) or the socket failed (the writer then meets and
    /// logs the error). What the socket does not take is kept, in order,
    /// as pending bytes for the writer; nothing else may be sent directly
    /// until they are out.
    fn send_direct(&self, replies: Vec<Reply>) -> Result<(), Vec<Reply>> {
        let Some(mut st) = self.sink.state.try_lock() else {
            return Err(replies);
        };
        if st.broken || !st.pending.is_empty() || !st.w.buffer().is_empty() {
            return Err(replies);
        }
        let mut heads = Vec::with_capacity(replies.len() * 32);
        let mut spans = Vec::with_capacity(replies.len());
        for r in &replies {
            let start = heads.len();
            let (head, _) = reply_parts(r, self.sink.structured);
            heads.extend_from_slice(&head);
            spans.push(start..heads.len());
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(replies.len() * 2);
        for (r, span) in replies.iter().zip(&spans) {
            parts.push(&heads[span.clone()]);
            if let Reply::Data { buf, .. } = r {
                parts.push(buf.as_slice());
            }
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        for chunk in parts.chunks(IOV_CHUNK) {
            let want: usize = chunk.iter().map(|p| p.len()).sum();
            match send_nowait(self.sink.fd, chunk) {
                Ok(n) => {
                    sent += n;
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) if sent == 0 => {
                    drop(parts);
                    return Err(replies);
                }
                Err(_) => break, // the writer meets it with the rest
            }
        }
        if sent < total {
            let mut skip = sent;
            for p in &parts {
                let k = skip.min(p.len());
                st.pending.extend_from_slice(&p[k..]);
                skip -= k;
            }
            drop(st);
            let _ = self.replies.send(Reply::Kick);
        } else {
            drop(st);
        }
        drop(parts);
        for r in replies {
            let held = r.held();
            if let Reply::Data { buf, .. } = r {
                self.pool.put(buf);
            }
            if let Some(b) = held {
                release(&self.budget, &self.stats, b);
            }
        }
        Ok(())
    }

    /// Queue replies for the writer thread; if it is gone, release their
    /// budget here.
    fn to_writer(&self, replies: Vec<Reply>) {
        for r in replies {
            if let Err(e) = self.replies.send(r) {
                if let Some(bytes) = e.into_inner().held() {
                    release(&self.budget, &self.stats, bytes);
                }
            }
        }
    }
}

thread_local! {
    /// The sink whose replies this thread gathers into one send (set by a
    /// connection thread that completes its own requests).
    static BATCHING: std::cell::Cell<*const Sink> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// iovecs per `sendmsg` (below IOV_MAX, 1024).
const IOV_CHUNK: usize = 512;

/// The reply side of a connection, shared by the writer thread and direct
/// senders; whoever holds the lock owns the byte stream.
struct Sink {
    state: Mutex<SinkState>,
    /// Replies gathered on the connection thread (see [`BATCHING`]).
    batch: Mutex<Vec<Reply>>,
    fd: std::os::unix::io::RawFd,
    structured: bool,
}

struct SinkState {
    w: BufWriter<Sock>,
    /// Tail of a reply a direct send could not finish: goes out first.
    pending: Vec<u8>,
    broken: bool,
}

/// One non-blocking `sendmsg` of `parts`; returns the bytes sent.
fn send_nowait(fd: std::os::unix::io::RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: a zeroed msghdr is valid; iov outlives the call and each
    // entry points into a live slice that sendmsg only reads.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
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
        fd: write_half.raw_fd(),
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
    let queue = match disk.local_queue() {
        Ok(q) => q,
        Err(e) => {
            log::warn!("{label}: no per-connection I/O queue ({e}); using the shared one");
            None
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
        let fd = self.sock.raw_fd();
        loop {
            self.progress()?;
            // SAFETY: reads at most buf.len() bytes into buf.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
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
fn take(r: &BufReader<ConnReader>, bytes: u64) -> Result<(), String> {
    r.get_ref()
        .take(bytes)
        .map_err(|e| format!("I/O queue failed: {e}"))
}

fn read_loop(
    r: &mut BufReader<ConnReader>,
    disk: &Arc<Disk>,
    writer: &Arc<Writer>,
    lim: &ExportLimits,
    allocation: Option<&AllocationMap>,
    ctx: &Ctx,
) -> Result<(), String> {
    let fast_zero = disk.capabilities().fast_zero;
    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        if let Err(e) = read_header(r, &mut hdr) {
            return match e {
                None => Ok(()),
                Some(e) => Err(format!("client vanished mid-request: {e}")),
            };
        }
        let h = parse_request_header(&hdr).map_err(|e| format!("protocol error: {e}"))?;
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
                        .map_err(|e| format!("client vanished mid-request: {e}"))?;
                }
                ctx.send(Reply::Status {
                    handle: h.handle,
                    error: refusal.error,
                    msg: refusal.why,
                    held: None,
                });
                if refusal.drain.is_none() {
                    return Err(format!("unrecoverable request: {}", refusal.why));
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
                let extents = allocation
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                    .and_then(|a| a.extents(offset, len, lim.min_block as u64, req_one));
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
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Read {
                        offset,
                        buf: ctx.pool.get(len as usize),
                    },
                    Box::new(move |o: IoOutcome| match (o.result, o.buf) {
                        (Ok(()), Some(buf)) => {
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
                            c.finish(handle, bytes, err)
                        }
                    }),
                );
            }
            Command::Write { offset, len, fua } => {
                let bytes = len as u64;
                take(r, bytes)?;
                let mut buf = ctx.pool.get(len as usize);
                if let Err(e) = r.read_exact(buf.as_mut_slice()) {
                    release(&ctx.budget, &ctx.stats, bytes);
                    return Err(format!("client vanished mid-write: {e}"));
                }
                let c = ctx.clone();
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Write { offset, buf, fua },
                    Box::new(move |o: IoOutcome| {
                        if let Some(b) = o.buf {
                            c.pool.put(b);
                        }
                        c.finish(handle, bytes, outcome_error(&o.result))
                    }),
                );
            }
            Command::Flush => {
                take(r, 0)?;
                let c = ctx.clone();
                disk.submit(
                    writer,
                    handle,
                    StorageIo::Flush,
                    Box::new(move |o: IoOutcome| c.finish(handle, 0, outcome_error(&o.result))),
                );
            }
            Command::Trim { offset, len, fua } => {
                take(r, 0)?;
                let io = StorageIo::Discard {
                    offset,
                    len: len as u64,
                };
                submit_then_flush(disk, writer, handle, io, fua, ctx);
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast_only,
            } => {
                if fast_only && !fast_zero {
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
                submit_then_flush(disk, writer, handle, io, fua, ctx);
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
) {
    let c = ctx.clone();
    let (d, w) = (Arc::clone(disk), Arc::clone(writer));
    disk.submit(
        writer,
        handle,
        io,
        Box::new(move |o: IoOutcome| {
            if o.result.is_err() || !fua {
                return c.finish(handle, 0, outcome_error(&o.result));
            }
            let c2 = c.clone();
            d.submit(
                &w,
                handle,
                StorageIo::Flush,
                Box::new(move |o: IoOutcome| c2.finish(handle, 0, outcome_error(&o.result))),
            );
        }),
    );
}

/// Read a request header. `Err(None)`: clean end of stream before a header.
fn read_header(r: &mut impl Read, hdr: &mut [u8]) -> Result<(), Option<io::Error>> {
    let mut got = 0;
    while got < hdr.len() {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Err(None),
            Ok(0) => {
                return Err(Some(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated request header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Some(e)),
        }
    }
    Ok(())
}

/// Serialise the replies the direct path could not send; batch whatever
/// is queued into one flush.
fn reply_loop(
    sink: &Sink,
    rx: Receiver<Reply>,
    label: &str,
    budget: &Budget,
    stats: &ConnStats,
    pool: &BufPool,
) {
    let mut sent: Vec<u64> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut guard = sink.state.lock();
        let st = &mut *guard;
        if !st.broken && !st.pending.is_empty() {
            let p = std::mem::take(&mut st.pending);
            if let Err(e) = st.w.write_all(&p) {
                log::warn!("{label}: cannot send reply: {e}");
                st.broken = true;
            }
        }
        let mut next = Some(first);
        while let Some(reply) = next {
            if let Some(b) = reply.held() {
                sent.push(b);
            }
            if !st.broken {
                if let Err(e) = write_reply(&mut st.w, reply, sink.structured, pool) {
                    log::warn!("{label}: cannot send reply: {e}");
                    st.broken = true;
                }
            }
            next = rx.try_recv().ok();
        }
        if !st.broken {
            if let Err(e) = st.w.flush() {
                log::warn!("{label}: cannot send reply: {e}");
                st.broken = true;
            }
        }
        drop(guard);
        for b in sent.drain(..) {
            release(budget, stats, b);
        }
    }
    let _ = sink.state.lock().w.get_ref().shutdown(Shutdown::Write);
}

/// A reply's header bytes and its payload (a read's data).
fn reply_parts(reply: &Reply, structured: bool) -> (Vec<u8>, Option<&[u8]>) {
    match reply {
        Reply::Status {
            handle, error, msg, ..
        } => {
            let head = if structured && *error != 0 {
                encode_error_chunk(*handle, *error, msg)
            } else if structured {
                encode_chunk_header(*handle, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()
            } else {
                encode_simple_reply(*handle, *error).to_vec()
            };
            (head, None)
        }
        Reply::Raw { bytes } => (bytes.clone(), None),
        Reply::Kick => (Vec::new(), None),
        Reply::Data {
            handle,
            offset,
            buf,
            ..
        } => {
            let head = if structured {
                let len = buf.len() as u32 + 8;
                let mut h =
                    encode_chunk_header(*handle, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, len)
                        .to_vec();
                h.extend_from_slice(&offset.to_be_bytes());
                h
            } else {
                encode_simple_reply(*handle, 0).to_vec()
            };
            (head, Some(buf.as_slice()))
        }
    }
}

fn write_reply(
    w: &mut impl Write,
    reply: Reply,
    structured: bool,
    pool: &BufPool,
) -> io::Result<()> {
    let r = {
        let (head, payload) = reply_parts(&reply, structured);
        w.write_all(&head)
            .and_then(|()| w.write_all(payload.unwrap_or(&[])))
    };
    if let Reply::Data { buf, .. } = reply {
        pool.put(buf);
    }
    r
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
