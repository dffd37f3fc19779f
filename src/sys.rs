//! Safe wrappers for the few system calls blkshim makes directly: `poll`,
//! eventfd, and non-blocking `send`/`recv` on sockets. Each wrapper owns its
//! one `unsafe` block and says why it is sound, so callers need none.
//!
//! Descriptors are taken as [`AsFd`] where the call does I/O on them, so
//! a wrapper cannot read or write a descriptor its caller does not hold;
//! [`poll`] only looks at readiness and takes raw descriptors, as
//! `struct pollfd` does.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// One entry of a [`poll`] set (a `struct pollfd`).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub struct PollFd(libc::pollfd);

impl PollFd {
    /// Watch `fd` for `events` (`libc::POLLIN`, ...). A negative `fd` is
    /// ignored by `poll`.
    pub fn new(fd: RawFd, events: libc::c_short) -> PollFd {
        PollFd(libc::pollfd {
            fd,
            events,
            revents: 0,
        })
    }

    /// Watch `fd` for data to read (or a connection to accept).
    pub fn readable(fd: RawFd) -> PollFd {
        PollFd::new(fd, libc::POLLIN)
    }

    /// What `poll` reported for this descriptor (0: nothing).
    pub fn revents(&self) -> libc::c_short {
        self.0.revents
    }

    /// `poll` reported something (readiness, hang-up or an error).
    pub fn is_ready(&self) -> bool {
        self.0.revents != 0
    }
}

/// `poll(2)`: wait up to `timeout_ms` milliseconds (-1: without limit)
/// until one of `fds` is ready; returns how many are. An interrupted wait
/// is returned as an [`io::ErrorKind::Interrupted`] error, so that each
/// caller decides whether to retry.
pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `PollFd` is a transparent `libc::pollfd`, so `fds` is a valid
    // array of `fds.len()` pollfds that poll only reads and writes within.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr().cast::<libc::pollfd>(),
            fds.len() as libc::nfds_t,
            timeout_ms,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// An eventfd: a counter the kernel keeps, to wake a thread (or an
/// io_uring read) from another. Closed on drop and on exec.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd at 0; `nonblocking` makes [`EventFd::read`] return
    /// [`io::ErrorKind::WouldBlock`] instead of waiting for a signal.
    pub fn new(nonblocking: bool) -> io::Result<EventFd> {
        let mut flags = libc::EFD_CLOEXEC;
        if nonblocking {
            flags |= libc::EFD_NONBLOCK;
        }
        // SAFETY: a plain system call with no pointers; the result is
        // checked before use.
        let raw = unsafe { libc::eventfd(0, flags) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Add 1 to the counter, waking a reader.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to a descriptor we own.
        let n = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Read and reset the counter (the number of signals since the last
    /// read).
    pub fn read(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte buffer from a
        // descriptor we own.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                8,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(u64::from_ne_bytes(buf))
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One `sendmsg` of `parts`, in order, without blocking
/// (`MSG_DONTWAIT`) and without SIGPIPE for a closed peer
/// (`MSG_NOSIGNAL`); returns the bytes sent, which may be fewer than
/// `parts` holds. A socket that would block gives
/// [`io::ErrorKind::WouldBlock`]. At most `IOV_MAX` (1024) non-empty parts.
pub fn send_nowait(sock: impl AsFd, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let fd = sock.as_fd().as_raw_fd();
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

/// One `recv` into `buf` without blocking (`MSG_DONTWAIT`); returns the
/// bytes read (0: the peer closed its side). No data yet gives
/// [`io::ErrorKind::WouldBlock`].
pub fn recv_nowait(sock: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: recv writes at most buf.len() bytes into buf, which is live
    // and exclusively borrowed for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn poll_sees_readable_and_times_out() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut fds = [PollFd::readable(a.as_raw_fd())];
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
        assert!(!fds[0].is_ready());
        b.write_all(b"x").unwrap();
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        assert!(fds[0].revents() & libc::POLLIN != 0);
        // A negative descriptor is ignored.
        let mut none = [PollFd::readable(-1)];
        assert_eq!(poll(&mut none, 0).unwrap(), 0);
    }

    #[test]
    fn eventfd_counts_signals() {
        let e = EventFd::new(true).unwrap();
        assert_eq!(
            e.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing signalled yet"
        );
        e.signal().unwrap();
        e.signal().unwrap();
        let mut fds = [PollFd::readable(e.as_raw_fd())];
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        assert_eq!(e.read().unwrap(), 2);
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn send_and_recv_without_blocking() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            recv_nowait(&b, &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let n = send_nowait(&a, &[b"he", b"", b"llo"]).unwrap();
        assert_eq!(n, 5);
        assert_eq!(recv_nowait(&b, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        // A full socket takes part of a send, then would block.
        let big = vec![7u8; 1 << 20];
        let mut sent = 0;
        loop {
            match send_nowait(&a, &[&big]) {
                Ok(n) => sent += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert!(sent > 0);
        // The peer gone: an error, not SIGPIPE.
        drop(b);
        let e = send_nowait(&a, &[b"x"]).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
            "{e}"
        );
    }
}
