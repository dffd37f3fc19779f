//! The io_uring engine.
//!
//! Submitters push SQEs into the shared submission queue under a lock and
//! return; one reaper thread owns every `io_uring_enter`: each call submits
//! whatever has accumulated and waits for completions. So a burst of requests
//! costs one syscall, not one per request. A submitter makes a syscall only
//! when the reaper is asleep in the kernel: it writes an eventfd the ring is
//! reading, which completes and wakes the reaper (once per sleep, however many
//! submitters arrive meanwhile). Before sleeping after it ran callbacks, the
//! reaper yields once, so the requests those callbacks provoke usually join
//! its next enter and need no wakeup at all.
//!
//! A thread may instead own a ring of its own ([`LocalRing`], through
//! `BlockStorage::local_queue`): its submissions then complete on it and
//! the reaper never sees them.
//!
//! Each request is a boxed `Op` whose address is the SQE's user_data. The
//! reaper finishes short reads/writes by resubmitting the rest, retries
//! EINTR/EAGAIN, walks the write-zeroes fallbacks, and calls the completion
//! callback — on the reaper thread, so callbacks must be quick and must not
//! block (they may submit more I/O).

mod local;

pub use local::LocalRing;

use super::file::{take_buf, ImageFile, MAX_CHUNK, PUNCH, ZERO_CHUNK, ZERO_RANGE};
use super::{
    AlignedBuf, BlockStorage, Capabilities, IoDone, IoOutcome, LocalQueue, OpenOptions, StorageIo,
};
use crate::sys::EventFd;
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Submission queue entries; more requests than this wait in an overflow list.
const RING_ENTRIES: u32 = 256;

/// user_data of the eventfd read that wakes the reaper (never a Box address).
const WAKE: u64 = 0;

/// Whether io_uring works here with every opcode this engine uses. Creating a
/// ring fails with ENOSYS/EPERM in some sandboxes and old kernels.
pub fn supported() -> bool {
    let Ok(ring) = IoUring::new(4) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
    ]
    .iter()
    .all(|&code| probe.is_supported(code))
}

/// Asynchronous I/O through one io_uring and one reaper thread.
pub struct UringStorage {
    shared: Arc<Shared>,
    reaper: Option<JoinHandle<()>>,
}

struct Shared {
    ring: IoUring,
    image: ImageFile,
    /// SQEs that found the submission queue full. Its lock also serialises
    /// every push into the submission queue.
    overflow: Mutex<VecDeque<squeue::Entry>>,
    /// Written by a submitter to wake the reaper out of `io_uring_enter`.
    wake_fd: EventFd,
    /// Where the ring reads the eventfd counter into.
    wake_buf: AtomicU64,
    /// The reaper is (about to be) blocked in the kernel.
    reaper_idle: AtomicBool,
    /// The eventfd was written and the reaper has not seen it yet.
    wake_sent: AtomicBool,
    /// Requests accepted and not yet completed.
    in_flight: AtomicUsize,
    shutdown: AtomicBool,
    stats: Counters,
}

/// Syscall accounting, to show that batching works (see [`UringStats`]).
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    enters: AtomicU64,
    wakeups: AtomicU64,
}

/// How many syscalls the engine needed for how many requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringStats {
    /// Requests accepted (excluding ones rejected by validation).
    pub requests: u64,
    /// `io_uring_enter` calls made by the reaper.
    pub enters: u64,
    /// eventfd writes by submitters that found the reaper asleep.
    pub wakeups: u64,
}

/// What an in-flight request is doing now.
enum Step {
    Read(AlignedBuf),
    Write(AlignedBuf, bool),
    Flush,
    /// Punch a hole (discard, or write-zeroes that may unmap).
    Punch,
    ZeroRange {
        may_unmap: bool,
    },
    /// Writing zero buffers because the file system cannot zero ranges.
    ZeroFill(AlignedBuf),
}

struct Op {
    step: Step,
    offset: u64,
    len: u64,
    /// Bytes of a read/write/zero-fill already done.
    progress: u64,
    done: IoDone,
}

impl UringStorage {
    /// Open `path` and start the reaper thread.
    pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<Self> {
        let image = ImageFile::open(path, opts)?;
        let ring = IoUring::new(RING_ENTRIES)?;
        let wake_fd = EventFd::new(false)?;
        let shared = Arc::new(Shared {
            ring,
            image,
            overflow: Mutex::new(VecDeque::new()),
            wake_fd,
            wake_buf: AtomicU64::new(0),
            reaper_idle: AtomicBool::new(false),
            wake_sent: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            stats: Counters::default(),
        });
        let reaper_shared = Arc::clone(&shared);
        let reaper = thread::Builder::new()
            .name("blkshim-uring".into())
            .spawn(move || reaper_shared.reap_loop())?;
        Ok(UringStorage {
            shared,
            reaper: Some(reaper),
        })
    }
}

impl UringStorage {
    /// Syscall counters since the engine was opened.
    pub fn stats(&self) -> UringStats {
        let c = &self.shared.stats;
        UringStats {
            requests: c.requests.load(Relaxed),
            enters: c.enters.load(Relaxed),
            wakeups: c.wakeups.load(Relaxed),
        }
    }
}

impl BlockStorage for UringStorage {
    fn size(&self) -> u64 {
        self.shared.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.image.capabilities()
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        let image = &self.shared.image;
        if let Err(e) = image.validate(&io) {
            let buf = take_buf(io);
            return done(IoOutcome {
                result: Err(e),
                buf,
            });
        }
        // Cached reads and small buffered writes need no kernel worker.
        let io = match image
            .try_cached_read(io)
            .or_else(|io| image.try_inline_write(io))
        {
            Ok(out) => return done(out),
            Err(io) => io,
        };
        let (offset, len) = io.byte_range().unwrap_or((0, 0));
        if len == 0 && !matches!(io, StorageIo::Flush) {
            // Nothing to do, and a zero-length SQE would read as end-of-file.
            let buf = take_buf(io);
            return done(IoOutcome {
                result: Ok(()),
                buf,
            });
        }
        let step = match io {
            StorageIo::Read { buf, .. } => Step::Read(buf),
            StorageIo::Write { buf, fua, .. } => Step::Write(buf, fua),
            StorageIo::Flush => Step::Flush,
            StorageIo::Discard { .. } if image.punch_ok => Step::Punch,
            StorageIo::Discard { .. } => zero_fill(len),
            StorageIo::WriteZeroes { may_unmap, .. } if image.zero_range_ok => {
                Step::ZeroRange { may_unmap }
            }
            StorageIo::WriteZeroes { may_unmap, .. } if may_unmap && image.punch_ok => Step::Punch,
            StorageIo::WriteZeroes { .. } => zero_fill(len),
        };
        let op = Box::new(Op {
            step,
            offset,
            len,
            progress: 0,
            done,
        });
        let Err(op) = LocalRing::try_push(&self.shared, op) else {
            return;
        };
        self.shared.in_flight.fetch_add(1, SeqCst);
        self.shared.stats.requests.fetch_add(1, Relaxed);
        self.shared.push_op(op);
    }

    /// A ring for the calling thread alone: see [`LocalRing`].
    fn local_queue(&self) -> io::Result<Option<Box<dyn LocalQueue>>> {
        Ok(Some(LocalRing::new(Arc::clone(&self.shared))?))
    }
}

impl Drop for UringStorage {
    /// Let the reaper finish everything in flight, then join it — unless the
    /// last reference was dropped inside a completion callback, on the
    /// reaper itself, which then exits on its own once idle.
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.wake_reaper();
        if let Some(reaper) = self.reaper.take() {
            if reaper.thread().id() != thread::current().id() {
                let _ = reaper.join();
            }
        }
    }
}

fn zero_fill(len: u64) -> Step {
    Step::ZeroFill(AlignedBuf::zeroed(len.clamp(1, ZERO_CHUNK) as usize))
}

/// Hand the outcome to the callback. A panicking callback must not take the
/// reaper (and every other request) down with it.
fn finish(op: Op, result: io::Result<()>) {
    let Op { step, done, .. } = op;
    let buf = match step {
        Step::Read(buf) | Step::Write(buf, _) => Some(buf),
        _ => None,
    };
    if catch_unwind(AssertUnwindSafe(|| done(IoOutcome { result, buf }))).is_err() {
        log::error!("storage completion callback panicked");
    }
}

impl Shared {
    /// Queue the next SQE of `op`; the reaper owns it until it completes.
    fn push_op(&self, op: Box<Op>) {
        let ptr = Box::into_raw(op);
        // SAFETY: `ptr` came from Box::into_raw and is only turned back into
        // a Box by the reaper when this SQE completes.
        let sqe = self.next_sqe(unsafe { &mut *ptr }).user_data(ptr as u64);
        self.push(sqe);
    }

    fn next_sqe(&self, op: &mut Op) -> squeue::Entry {
        let fd = types::Fd(self.image.fd());
        let pos = op.offset + op.progress;
        let rest = op.len - op.progress;
        let progress = op.progress as usize;
        match &mut op.step {
            Step::Read(buf) => {
                let n = rest.min(MAX_CHUNK) as u32;
                // SAFETY (of the kernel's write): the buffer lives in the Op,
                // which stays boxed until this SQE completes.
                let ptr = buf.as_mut_ptr().wrapping_add(progress);
                opcode::Read::new(fd, ptr, n).offset(pos).build()
            }
            Step::Write(buf, fua) => {
                let n = rest.min(MAX_CHUNK) as u32;
                let ptr = buf.as_ptr().wrapping_add(progress);
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, n)
                    .offset(pos)
                    .rw_flags(flags)
                    .build()
            }
            Step::ZeroFill(zeroes) => {
                let n = rest.min(zeroes.len() as u64) as u32;
                opcode::Write::new(fd, zeroes.as_ptr(), n)
                    .offset(pos)
                    .build()
            }
            Step::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Step::Punch => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(PUNCH)
                .build(),
            Step::ZeroRange { .. } => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(ZERO_RANGE)
                .build(),
        }
    }

    /// Put an SQE in the submission queue (or the overflow list when full)
    /// and wake the reaper if it sleeps.
    fn push(&self, sqe: squeue::Entry) {
        {
            let mut overflow = self.overflow.lock();
            // SAFETY: the overflow lock makes us the only SQ producer; the
            // entry's buffers outlive it (they live in its boxed Op or Shared).
            let pushed =
                overflow.is_empty() && unsafe { self.ring.submission_shared().push(&sqe) }.is_ok();
            if !pushed {
                overflow.push_back(sqe);
                drop(overflow);
                // Only the reaper moves overflowed entries into the ring.
                return self.wake_reaper();
            }
        }
        self.submit_if_reaper_idle();
    }

    /// A reaper asleep in its enter has already taken what was queued
    /// before it slept: submit ours ourselves (its completion then wakes
    /// the reaper), saving the eventfd round trip through the reaper. Same
    /// SeqCst pairing as [`Self::wake_reaper`].
    fn submit_if_reaper_idle(&self) {
        fence(SeqCst);
        if self.reaper_idle.load(SeqCst) {
            self.stats.enters.fetch_add(1, Relaxed);
            if let Err(e) = self.ring.submitter().submit() {
                log_enter_error(&e);
                self.wake_reaper();
            }
        }
    }

    /// Move overflowed SQEs into the submission queue while there is room.
    /// Returns true when some are still waiting.
    fn fill_sq(&self) -> bool {
        let mut overflow = self.overflow.lock();
        // SAFETY: as in `push`.
        let mut sq = unsafe { self.ring.submission_shared() };
        while let Some(sqe) = overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { sq.push(sqe) }.is_err() {
                break;
            }
            overflow.pop_front();
        }
        !overflow.is_empty()
    }

    /// Pairs with the reaper's `reaper_idle` store then enter (both SeqCst):
    /// either the reaper's enter sees what we pushed, or we see it idle.
    fn wake_reaper(&self) {
        fence(SeqCst);
        if self.reaper_idle.load(SeqCst) && !self.wake_sent.swap(true, SeqCst) {
            self.stats.wakeups.fetch_add(1, Relaxed);
            let _ = self.wake_fd.signal();
        }
    }

    fn arm_wake(&self) {
        let fd = types::Fd(self.wake_fd.as_raw_fd());
        let sqe = opcode::Read::new(fd, self.wake_buf.as_ptr().cast(), 8)
            .build()
            .user_data(WAKE);
        self.push(sqe);
    }

    fn reap_loop(&self) {
        let mut wake_armed = false;
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(2 * RING_ENTRIES as usize);
        let mut ran_callbacks = false;
        loop {
            if !wake_armed {
                self.arm_wake();
                wake_armed = true;
            }
            if ran_callbacks {
                // The callbacks just run usually woke a submitter that answers
                // with new requests. Give it the CPU once, so its SQEs ride on
                // our next enter instead of costing an eventfd wakeup (this
                // halves the context switches per request at QD 32 on a busy
                // machine, and costs ~nothing on an idle one).
                thread::yield_now();
            }
            let mut backlog = self.fill_sq();
            while backlog {
                // Make room: submitting frees SQ slots (no waiting).
                self.stats.enters.fetch_add(1, Relaxed);
                if let Err(e) = self.ring.submitter().submit() {
                    log_enter_error(&e);
                    break;
                }
                backlog = self.fill_sq();
            }
            self.reaper_idle.store(true, SeqCst);
            if self.shutdown.load(SeqCst) && self.in_flight.load(SeqCst) == 0 {
                self.reaper_idle.store(false, SeqCst);
                break;
            }
            let want = if backlog { 0 } else { 1 };
            self.stats.enters.fetch_add(1, Relaxed);
            let entered = self.ring.submitter().submit_and_wait(want);
            self.reaper_idle.store(false, SeqCst);
            if let Err(e) = entered {
                log_enter_error(&e);
            }
            self.collect(&mut cqes);
            ran_callbacks = false;
            for (user_data, res) in cqes.drain(..) {
                if user_data == WAKE {
                    wake_armed = false;
                    self.wake_sent.store(false, SeqCst);
                } else {
                    // SAFETY: every other user_data is an Op leaked by push_op,
                    // completed exactly once.
                    let op = unsafe { Box::from_raw(user_data as *mut Op) };
                    self.on_complete(op, res);
                    ran_callbacks = true;
                }
            }
        }
        // The ring still reads the eventfd into `wake_buf`: complete that read
        // before `Shared` (and the buffer) can be freed.
        if wake_armed {
            self.wake_sent.store(true, SeqCst);
            let _ = self.wake_fd.signal();
            while wake_armed {
                if let Err(e) = self.ring.submitter().submit_and_wait(1) {
                    log_enter_error(&e);
                }
                self.collect(&mut cqes);
                wake_armed = !cqes.drain(..).any(|(user_data, _)| user_data == WAKE);
            }
        }
    }

    fn collect(&self, cqes: &mut Vec<(u64, i32)>) {
        // SAFETY: only the reaper consumes completions.
        let cq = unsafe { self.ring.completion_shared() };
        cqes.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
    }

    /// One SQE of `op` finished with `res` (bytes, or -errno).
    fn on_complete(&self, op: Box<Op>, res: i32) {
        if self.advance(op, res, |op| self.push_op(op)) {
            self.in_flight.fetch_sub(1, SeqCst);
        }
    }

    /// Take `op` one step on from its SQE's result `res`: either hand it
    /// to `requeue` for its next SQE (short transfer, retry, fallback) or
    /// finish it (true). Shared by the reaper and the per-thread rings.
    fn advance(&self, mut op: Box<Op>, res: i32, requeue: impl FnOnce(Box<Op>)) -> bool {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            requeue(op);
            return false;
        }
        let unsupported = res == -libc::EOPNOTSUPP || res == -libc::ENOSYS;
        let result = match &op.step {
            Step::Read(_) | Step::Write(..) | Step::ZeroFill(_) => {
                if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if res == 0 {
                    Err(match op.step {
                        Step::Read(_) => io::ErrorKind::UnexpectedEof.into(),
                        _ => io::ErrorKind::WriteZero.into(),
                    })
                } else {
                    op.progress += res as u64;
                    if op.progress < op.len {
                        requeue(op); // short transfer: do the rest
                        return false;
                    }
                    Ok(())
                }
            }
            Step::ZeroRange { may_unmap } if unsupported => {
                op.step = if *may_unmap && self.image.punch_ok {
                    Step::Punch
                } else {
                    zero_fill(op.len)
                };
                requeue(op);
                return false;
            }
            Step::Punch if unsupported => {
                op.step = zero_fill(op.len);
                requeue(op);
                return false;
            }
            Step::Flush | Step::Punch | Step::ZeroRange { .. } if res < 0 => {
                Err(io::Error::from_raw_os_error(-res))
            }
            Step::Flush | Step::Punch | Step::ZeroRange { .. } => Ok(()),
        };
        finish(*op, result);
        true
    }
}

fn log_enter_error(e: &io::Error) {
    if !enter_error_is_transient(e) {
        log::error!("io_uring_enter failed: {e}");
        // Do not spin on a persistent failure.
        thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Interrupted, or the kernel is short of resources / the CQ overflowed:
/// reaping completions and entering again resolves all of them.
fn enter_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

#[cfg(test)]
mod tests {
    //! The kernel rarely returns short transfers or EINTR on demand, so these
    //! tests feed `on_complete` those results for an op that never reached the
    //! kernel and check the engine finishes the rest for real.
    use super::*;
    use crossbeam_channel::bounded;

    fn engine_with_file(data: &[u8]) -> (tempfile::TempDir, UringStorage) {
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let path = dir.path().join("img");
        std::fs::write(&path, data).expect("write image");
        let opts = OpenOptions {
            direct: false,
            ..OpenOptions::default()
        };
        let storage = UringStorage::open(&path, &opts).expect("open");
        (dir, storage)
    }

    /// Pretend the kernel completed the first SQE of `step` with `res`.
    fn fake_first_completion(storage: &UringStorage, step: Step, len: u64, res: i32) -> IoOutcome {
        let (tx, rx) = bounded(1);
        let op = Box::new(Op {
            step,
            offset: 0,
            len,
            progress: 0,
            done: Box::new(move |out| {
                let _ = tx.send(out);
            }),
        });
        storage.shared.in_flight.fetch_add(1, SeqCst);
        storage.shared.on_complete(op, res);
        rx.recv().expect("completion")
    }

    #[test]
    fn short_read_is_completed() {
        let file: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let (_dir, storage) = engine_with_file(&file);
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[..4096].fill(0xee); // "already read" by the fake SQE
        let out = fake_first_completion(&storage, Step::Read(buf), 8192, 4096);
        out.result.expect("read");
        let got = out.buf.expect("buffer");
        assert!(got.as_slice()[..4096].iter().all(|&b| b == 0xee));
        assert_eq!(got.as_slice()[4096..], file[4096..], "the rest was read");
    }

    #[test]
    fn short_write_is_completed() {
        let (dir, storage) = engine_with_file(&[0u8; 8192]);
        let buf = AlignedBuf::from_slice(&[0x77; 8192]);
        let out = fake_first_completion(&storage, Step::Write(buf, false), 8192, 512);
        out.result.expect("write");
        drop(storage);
        let file = std::fs::read(dir.path().join("img")).expect("read image");
        assert!(
            file[..512].iter().all(|&b| b == 0),
            "the faked part is untouched"
        );
        assert!(
            file[512..].iter().all(|&b| b == 0x77),
            "the rest was written"
        );
    }

    #[test]
    fn eintr_and_eagain_are_retried() {
        let file = vec![0x42u8; 4096];
        let (_dir, storage) = engine_with_file(&file);
        for errno in [libc::EINTR, libc::EAGAIN] {
            let out =
                fake_first_completion(&storage, Step::Read(AlignedBuf::zeroed(4096)), 4096, -errno);
            out.result.expect("retried read");
            assert_eq!(out.buf.expect("buffer").as_slice(), &file[..]);
        }
    }

    #[test]
    fn errors_and_end_of_file_are_reported() {
        let (_dir, storage) = engine_with_file(&[0u8; 4096]);
        let out = fake_first_completion(
            &storage,
            Step::Read(AlignedBuf::zeroed(4096)),
            4096,
            -libc::EIO,
        );
        assert_eq!(
            out.result.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EIO))
        );
        let out = fake_first_completion(&storage, Step::Read(AlignedBuf::zeroed(4096)), 4096, 0);
        assert_eq!(
            out.result.map_err(|e| e.kind()),
            Err(io::ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn unsupported_zero_range_falls_back_to_zero_buffers() {
        let (dir, storage) = engine_with_file(&[0x55u8; 16384]);
        let step = Step::ZeroRange { may_unmap: false };
        let out = fake_first_completion(&storage, step, 16384, -libc::EOPNOTSUPP);
        out.result.expect("write zeroes");
        drop(storage);
        let file = std::fs::read(dir.path().join("img")).expect("read image");
        assert!(file.iter().all(|&b| b == 0));
    }
}
