//! The reply side of a connection: encoding replies, sending them
//! directly from the thread that completes a request when the socket
//! takes them at once, and the writer thread that sends the rest in order.

use super::{release, Budget, BufPool, ConnStats, Sock};
use crate::nbd::proto::*;
use crate::storage::AlignedBuf;
use crate::sys::send_nowait;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::io::{self, BufWriter, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One reply for the writer thread, with the budget its request holds
/// (`None` for requests refused before taking any); the budget is released
/// only once the reply is on the wire, so a client that never reads its
/// replies cannot make the server queue unbounded data.
pub(super) enum Reply {
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
    pub(super) fn held(&self) -> Option<u64> {
        match self {
            Reply::Status { held, .. } | Reply::Data { held, .. } => *held,
            Reply::Raw { .. } | Reply::Kick => None,
        }
    }
}

pub(super) fn outcome_error(r: &io::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) => nbd_error(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Everything a completion needs to answer and account.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) sink: Arc<Sink>,
    pub(super) pool: Arc<BufPool>,
    pub(super) replies: Sender<Reply>,
    pub(super) budget: Arc<Budget>,
    pub(super) stats: Arc<ConnStats>,
}

impl Ctx {
    pub(super) fn finish(&self, handle: u64, bytes: u64, error: u32) {
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
    pub(super) fn send(&self, r: Reply) {
        if BATCHING.with(|b| b.get()) == Arc::as_ptr(&self.sink) {
            return self.sink.batch.lock().push(r);
        }
        if let Err(rs) = self.send_direct(vec![r]) {
            self.to_writer(rs);
        }
    }

    /// Send every gathered reply, with one `sendmsg` when the socket takes
    /// them all.
    pub(super) fn flush_batch(&self) {
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
        // TLS: records must be made under the session's own locks, never
        // by a raw send (all replies go through the writer).
        if st.broken
            || !st.pending.is_empty()
            || !st.w.buffer().is_empty()
            || st.w.get_ref().is_tls()
        {
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
            match send_nowait(st.w.get_ref(), chunk) {
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
    pub(super) static BATCHING: std::cell::Cell<*const Sink> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// iovecs per `sendmsg` (below IOV_MAX, 1024).
const IOV_CHUNK: usize = 512;

/// The reply side of a connection, shared by the writer thread and direct
/// senders; whoever holds the lock owns the byte stream.
pub(super) struct Sink {
    pub(super) state: Mutex<SinkState>,
    /// Replies gathered on the connection thread (see [`BATCHING`]).
    pub(super) batch: Mutex<Vec<Reply>>,
    pub(super) structured: bool,
}

pub(super) struct SinkState {
    pub(super) w: BufWriter<Sock>,
    /// Tail of a reply a direct send could not finish: goes out first.
    pub(super) pending: Vec<u8>,
    pub(super) broken: bool,
}

/// Serialise the replies the direct path could not send; batch whatever
/// is queued into one flush.
pub(super) fn reply_loop(
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

#[cfg(test)]
mod tests {
    use super::super::{Budget, BufPool, ConnStats};
    use super::*;
    use crate::sys::recv_nowait;
    use parking_lot::Condvar;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn data(len: usize, fill: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.as_mut_slice().fill(fill);
        b
    }

    /// A connection's reply side over one end of a socket pair; the other
    /// end is the client.
    fn ctx(structured: bool) -> (Ctx, Receiver<Reply>, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let ctx = Ctx {
            sink: Arc::new(Sink {
                state: Mutex::new(SinkState {
                    w: BufWriter::new(Sock::Unix(server)),
                    pending: Vec::new(),
                    broken: false,
                }),
                batch: Mutex::new(Vec::new()),
                structured,
            }),
            pool: Arc::new(BufPool::default()),
            replies: tx,
            budget: Arc::new(Budget {
                state: Mutex::new((0, 0)),
                cv: Condvar::new(),
            }),
            stats: Arc::new(ConnStats::default()),
        };
        (ctx, rx, client)
    }

    /// Take budget for a request, as the reading side does.
    fn hold(ctx: &Ctx, bytes: u64) {
        ctx.budget.acquire(bytes);
        ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn idle(ctx: &Ctx) -> bool {
        *ctx.budget.state.lock() == (0, 0) && ctx.stats.in_flight.load(Ordering::Relaxed) == 0
    }

    fn status(handle: u64, error: u32, msg: &'static str) -> Reply {
        Reply::Status {
            handle,
            error,
            msg,
            held: None,
        }
    }

    #[test]
    fn status_replies_are_simple_or_structured() {
        let ok = status(9, 0, "");
        let err = status(9, NBD_EIO, "it broke");
        let (head, payload) = reply_parts(&ok, false);
        assert_eq!(head, encode_simple_reply(9, 0));
        assert!(payload.is_none());
        assert_eq!(reply_parts(&err, false).0, encode_simple_reply(9, NBD_EIO));
        assert_eq!(
            reply_parts(&ok, true).0,
            encode_chunk_header(9, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        );
        let (head, payload) = reply_parts(&err, true);
        assert_eq!(head, encode_error_chunk(9, NBD_EIO, "it broke"));
        assert!(payload.is_none());
    }

    #[test]
    fn read_replies_carry_their_data_and_structured_ones_the_offset() {
        let r = Reply::Data {
            handle: 3,
            offset: 0x1234_5000,
            buf: data(4096, 0xAB),
            held: Some(4096),
        };
        let (head, payload) = reply_parts(&r, false);
        assert_eq!(head, encode_simple_reply(3, 0));
        assert_eq!(payload.unwrap(), &[0xAB; 4096][..]);
        let (head, payload) = reply_parts(&r, true);
        let mut want =
            encode_chunk_header(3, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 4096 + 8).to_vec();
        want.extend_from_slice(&0x1234_5000u64.to_be_bytes());
        assert_eq!(head, want);
        assert_eq!(payload.unwrap().len(), 4096);
        assert_eq!(r.held(), Some(4096));
    }

    #[test]
    fn raw_replies_go_out_as_they_are_and_kicks_send_nothing() {
        let raw = Reply::Raw {
            bytes: vec![1, 2, 3],
        };
        assert_eq!(reply_parts(&raw, true), (vec![1, 2, 3], None));
        assert_eq!(reply_parts(&Reply::Kick, true), (Vec::new(), None));
        assert_eq!(raw.held(), None);
        assert_eq!(Reply::Kick.held(), None);
    }

    #[test]
    fn completion_errors_map_to_nbd_errors() {
        let errno = |e: i32| outcome_error(&Err(io::Error::from_raw_os_error(e)));
        assert_eq!(outcome_error(&Ok(())), 0);
        assert_eq!(errno(libc::EPERM), NBD_EPERM);
        assert_eq!(errno(libc::EACCES), NBD_EPERM);
        assert_eq!(errno(libc::ENOSPC), NBD_ENOSPC);
        assert_eq!(errno(libc::EINVAL), NBD_EINVAL);
        assert_eq!(errno(libc::EOPNOTSUPP), NBD_ENOTSUP);
        assert_eq!(errno(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(errno(libc::EBADMSG), NBD_EIO);
        // An error without an errno is an I/O error.
        assert_eq!(outcome_error(&Err(io::Error::other("no errno"))), NBD_EIO);
    }

    #[test]
    fn write_reply_sends_header_then_data_and_recycles_the_buffer() {
        let pool = BufPool::default();
        let mut out = Vec::new();
        let r = Reply::Data {
            handle: 5,
            offset: 0,
            buf: data(512, 7),
            held: None,
        };
        write_reply(&mut out, r, false, &pool).unwrap();
        let mut want = encode_simple_reply(5, 0).to_vec();
        want.extend_from_slice(&[7; 512]);
        assert_eq!(out, want);
        assert_eq!(pool.free.lock().len(), 1, "the read buffer is reused");
    }

    #[test]
    fn a_free_socket_is_answered_directly_and_the_budget_released() {
        let (ctx, rx, mut client) = ctx(false);
        hold(&ctx, 4096);
        ctx.finish(11, 4096, NBD_EPERM);
        let mut got = [0u8; 16];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, encode_simple_reply(11, NBD_EPERM));
        assert_eq!(ctx.stats.refused_stale.load(Ordering::Relaxed), 1);
        assert!(idle(&ctx));
        assert!(rx.try_recv().is_err(), "nothing went through the writer");
    }

    #[test]
    fn on_the_connection_thread_replies_wait_for_the_batch() {
        let (ctx, _rx, client) = ctx(true);
        hold(&ctx, 0);
        hold(&ctx, 0);
        BATCHING.with(|b| b.set(Arc::as_ptr(&ctx.sink)));
        ctx.finish(1, 0, 0);
        ctx.finish(2, 0, NBD_EIO);
        let mut got = [0u8; 64];
        assert_eq!(
            recv_nowait(&client, &mut got).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "gathered, not sent"
        );
        ctx.flush_batch();
        BATCHING.with(|b| b.set(std::ptr::null()));
        let mut want = encode_chunk_header(1, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec();
        want.extend_from_slice(&encode_error_chunk(2, NBD_EIO, ""));
        let n = recv_nowait(&client, &mut got).unwrap();
        assert_eq!(&got[..n], &want[..]);
        assert!(idle(&ctx));
    }

    /// A reply the socket takes only part of leaves the rest as pending
    /// bytes for the writer thread; later replies queue behind them, and
    /// the client sees every byte in order.
    #[test]
    fn a_full_socket_leaves_the_rest_to_the_writer_in_order() {
        let (ctx, rx, mut client) = ctx(false);
        let len = 4 << 20;
        hold(&ctx, len as u64);
        hold(&ctx, 0);
        ctx.send(Reply::Data {
            handle: 1,
            offset: 0,
            buf: data(len, 0x5A),
            held: Some(len as u64),
        });
        assert!(
            !ctx.sink.state.lock().pending.is_empty(),
            "a 4 MiB reply does not fit a socket buffer"
        );
        ctx.finish(2, 0, 0);
        let (sink, pool, budget, stats) = (
            Arc::clone(&ctx.sink),
            Arc::clone(&ctx.pool),
            Arc::clone(&ctx.budget),
            Arc::clone(&ctx.stats),
        );
        let writer =
            std::thread::spawn(move || reply_loop(&sink, rx, "test", &budget, &stats, &pool));
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        ctx.budget.wait_idle();
        let stats = Arc::clone(&ctx.stats);
        drop(ctx); // the writer ends and shuts the socket's write side
        writer.join().unwrap();
        let all = reader.join().unwrap();
        let mut want = encode_simple_reply(1, 0).to_vec();
        want.resize(16 + len, 0x5A);
        want.extend_from_slice(&encode_simple_reply(2, 0));
        assert_eq!(all.len(), want.len());
        assert!(all == want, "replies out of order or corrupted");
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    }
}
