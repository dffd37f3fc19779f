//! A per-thread io_uring: the [`LocalQueue`] of the io_uring engine.
//!
//! A connection thread that owns one submits its requests to its own ring
//! and reaps their completions itself, in the same `io_uring_enter` that
//! waits for its socket (a poll SQE). The shared ring's reaper thread then
//! sees none of them, so a request costs no thread hand-off at all.
//!
//! The ring is registered in a thread-local slot while it lives; the
//! engine's `submit` looks there, so every layer above (tracker, `Disk`)
//! stays unaware of it.

use super::{enter_error_is_transient, Op, Shared};
use crate::storage::LocalQueue;
use io_uring::{opcode, types, IoUring};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Entries of a per-thread ring: one connection's requests in flight
/// (its budget) plus a poll; more wait in the overflow list.
const LOCAL_ENTRIES: u32 = 128;

/// user_data of the socket poll (never a Box address).
const POLL: u64 = 1;

thread_local! {
    /// The ring this thread drives, if any.
    static CURRENT: Cell<*const LocalRing> = const { Cell::new(std::ptr::null()) };
}

/// A ring owned by one thread (so neither `Send` nor `Sync`).
pub struct LocalRing {
    shared: Arc<Shared>,
    ring: IoUring,
    /// SQEs that found the submission queue full.
    overflow: RefCell<VecDeque<io_uring::squeue::Entry>>,
    in_flight: Cell<usize>,
    poll_armed: Cell<bool>,
    cqes: RefCell<Vec<(u64, i32)>>,
}

impl LocalRing {
    /// Make a ring for `shared`'s image and register it as this thread's.
    /// Boxed, so the address in the thread-local slot stays put.
    pub(super) fn new(shared: Arc<Shared>) -> io::Result<Box<LocalRing>> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .build(LOCAL_ENTRIES)
            .or_else(|_| IoUring::new(LOCAL_ENTRIES))?;
        let me = Box::new(LocalRing {
            shared,
            ring,
            overflow: RefCell::new(VecDeque::new()),
            in_flight: Cell::new(0),
            poll_armed: Cell::new(false),
            cqes: RefCell::new(Vec::with_capacity(LOCAL_ENTRIES as usize * 2)),
        });
        let prev = CURRENT.with(|c| c.replace(&*me as *const LocalRing));
        if !prev.is_null() {
            // One ring per thread: the newer one wins until it is dropped.
            log::warn!("a thread registered a second io_uring queue");
        }
        Ok(me)
    }

    /// Queue `op` on this thread's ring if it has one for `shared`;
    /// otherwise hand it back.
    pub(super) fn try_push(shared: &Arc<Shared>, op: Box<Op>) -> Result<(), Box<Op>> {
        CURRENT.with(|c| {
            let p = c.get();
            // SAFETY: the slot only ever holds the address of a live, boxed
            // LocalRing of this very thread (cleared in its Drop).
            match unsafe { p.as_ref() } {
                Some(local) if Arc::ptr_eq(&local.shared, shared) => {
                    local.in_flight.set(local.in_flight.get() + 1);
                    local.shared.stats.requests.fetch_add(1, Relaxed);
                    local.push_op(op);
                    Ok(())
                }
                _ => Err(op),
            }
        })
    }

    fn push_op(&self, op: Box<Op>) {
        let ptr = Box::into_raw(op);
        // SAFETY: `ptr` came from Box::into_raw; it is turned back into a
        // Box exactly once, when its SQE completes in `run_completions`.
        let sqe = self
            .shared
            .next_sqe(unsafe { &mut *ptr })
            .user_data(ptr as u64);
        self.push(sqe);
    }

    fn push(&self, sqe: io_uring::squeue::Entry) {
        let mut overflow = self.overflow.borrow_mut();
        // SAFETY: only this thread produces SQEs for this ring; the entry's
        // buffers live in its boxed Op until it completes.
        if !overflow.is_empty() || unsafe { self.ring.submission_shared().push(&sqe) }.is_err() {
            overflow.push_back(sqe);
        }
    }

    /// Move overflowed SQEs into the submission queue, submitting to make
    /// room as needed.
    fn fill_sq(&self) -> io::Result<()> {
        let mut overflow = self.overflow.borrow_mut();
        while let Some(sqe) = overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission_shared().push(sqe) }.is_err() {
                self.enter(0)?;
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission_shared().push(sqe) }.is_err() {
                    break; // the kernel is short of room; next time
                }
            }
            overflow.pop_front();
        }
        Ok(())
    }

    fn enter(&self, want: usize) -> io::Result<()> {
        self.shared.stats.enters.fetch_add(1, Relaxed);
        match self.ring.submitter().submit_and_wait(want) {
            Err(e) if !enter_error_is_transient(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Run the callbacks of every completion in the queue; ops that need
    /// another SQE go back on this ring.
    fn run_completions(&self) {
        let mut cqes = std::mem::take(&mut *self.cqes.borrow_mut());
        {
            // SAFETY: only this thread consumes this ring's completions.
            let cq = unsafe { self.ring.completion_shared() };
            cqes.extend(cq.map(|c| (c.user_data(), c.result())));
        }
        for (user_data, res) in cqes.drain(..) {
            if user_data == POLL {
                self.poll_armed.set(false);
                continue;
            }
            // SAFETY: every other user_data is an Op leaked by push_op,
            // completed exactly once.
            let op = unsafe { Box::from_raw(user_data as *mut Op) };
            if self.shared.advance(op, res, |op| self.push_op(op)) {
                self.in_flight.set(self.in_flight.get() - 1);
            }
        }
        *self.cqes.borrow_mut() = cqes;
    }

    fn has_queued(&self) -> bool {
        // SAFETY: only this thread produces SQEs for this ring.
        !self.overflow.borrow().is_empty() || !unsafe { self.ring.submission_shared() }.is_empty()
    }
}

impl LocalQueue for LocalRing {
    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    fn reap(&self) -> io::Result<()> {
        if self.has_queued() {
            self.fill_sq()?;
            self.enter(0)?;
        }
        self.run_completions();
        Ok(())
    }

    fn wait(&self, readable: Option<RawFd>) -> io::Result<()> {
        if let Some(fd) = readable {
            if !self.poll_armed.get() {
                let mask = (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;
                self.push(
                    opcode::PollAdd::new(types::Fd(fd), mask)
                        .build()
                        .user_data(POLL),
                );
                self.poll_armed.set(true);
            }
        } else if self.in_flight.get() == 0 {
            return Ok(()); // nothing could ever wake us
        }
        self.fill_sq()?;
        self.enter(1)?;
        self.run_completions();
        Ok(())
    }

    fn notify_eventfd(&self, fd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(fd)
    }
}

impl Drop for LocalRing {
    /// Unregister, then wait for every request still in the kernel: it
    /// reads or writes buffers this ring's ops own.
    fn drop(&mut self) {
        CURRENT.with(|c| {
            if std::ptr::eq(c.get(), self) {
                c.set(std::ptr::null());
            }
        });
        while self.in_flight.get() > 0 {
            if let Err(e) = self.fill_sq().and_then(|()| self.enter(1)) {
                log::error!("io_uring queue: cannot wait for requests in flight: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            self.run_completions();
        }
    }
}
