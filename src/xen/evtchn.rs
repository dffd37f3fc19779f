//! Event channels: the doorbell between frontend and backend. The frontend
//! kicks after pushing requests (when the ring says so), the backend after
//! pushing responses; each side sleeps on its end until kicked.
//!
//! [`EmulatedEventChannel::pair`] gives two connected ends over eventfds.
//! `XenEventChannel` (feature `xen`) binds a real interdomain channel
//! through libxenevtchn.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An event channel port number (`evtchn_port_t`).
pub type Port = u32;

/// One end of an event channel.
pub trait EventChannel: Send + Sync {
    /// This end's port.
    fn local_port(&self) -> Port;

    /// Kicks the other end.
    fn notify(&self) -> io::Result<()>;

    /// Waits up to `timeout` (`None`: forever) for a kick. True if one (or
    /// several, coalesced) arrived; it is consumed and the port re-armed.
    fn wait(&self, timeout: Option<Duration>) -> io::Result<bool>;

    /// A descriptor that polls readable while a kick is pending, for event
    /// loops that wait on several sources (then call `wait(Some(ZERO))`).
    fn as_raw_fd(&self) -> RawFd;
}

/// Polls `fd` for input for up to `timeout`.
fn poll_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let ms = match timeout {
        None => -1,
        Some(d) => i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0 && pfd.revents & libc::POLLIN != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

static NEXT_EMULATED_PORT: AtomicU32 = AtomicU32::new(1);

/// One end of an emulated channel: kicks are eventfd writes to the peer.
#[derive(Debug)]
pub struct EmulatedEventChannel {
    port: Port,
    own: Arc<OwnedFd>,
    peer: Arc<OwnedFd>,
}

fn eventfd() -> io::Result<Arc<OwnedFd>> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl EmulatedEventChannel {
    /// Two connected ends (backend's, frontend's).
    pub fn pair() -> io::Result<(EmulatedEventChannel, EmulatedEventChannel)> {
        let a = eventfd()?;
        let b = eventfd()?;
        let pa = NEXT_EMULATED_PORT.fetch_add(2, Ordering::Relaxed);
        Ok((
            EmulatedEventChannel {
                port: pa,
                own: Arc::clone(&a),
                peer: Arc::clone(&b),
            },
            EmulatedEventChannel {
                port: pa + 1,
                own: b,
                peer: a,
            },
        ))
    }
}

impl EventChannel for EmulatedEventChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8-byte buffer to an eventfd.
        let n = unsafe { libc::write(self.peer.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // A saturated counter already means "pending": nothing is lost.
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(());
        }
        Err(e)
    }

    fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        if !poll_readable(self.own.as_raw_fd(), timeout)? {
            return Ok(false);
        }
        let mut buf = [0u8; 8];
        // SAFETY: 8-byte buffer from an eventfd.
        let n = unsafe { libc::read(self.own.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(false); // another waiter took it
        }
        Err(e)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.own.as_raw_fd()
    }
}

#[cfg(feature = "xen")]
pub use real::XenEventChannel;

#[cfg(feature = "xen")]
mod real {
    use super::*;
    use crate::xen::grant::DomId;
    use crate::xen::sys;
    use std::ptr::NonNull;

    /// An interdomain event channel bound through libxenevtchn. Each
    /// channel has its own handle, so any pending port is this one.
    pub struct XenEventChannel {
        xce: NonNull<sys::xenevtchn_handle>,
        port: Port,
    }

    // SAFETY: libxenevtchn handles may be used from any thread.
    unsafe impl Send for XenEventChannel {}
    // SAFETY: as above.
    unsafe impl Sync for XenEventChannel {}

    impl XenEventChannel {
        /// Binds to `remote_port` of `domid` (from the frontend's
        /// `event-channel` xenstore node).
        pub fn bind_interdomain(domid: DomId, remote_port: Port) -> io::Result<Self> {
            // SAFETY: no logger, no flags.
            let xce = unsafe { sys::xenevtchn_open(std::ptr::null_mut(), 0) };
            let xce = NonNull::new(xce).ok_or_else(io::Error::last_os_error)?;
            // SAFETY: valid handle.
            let port = unsafe {
                sys::xenevtchn_bind_interdomain(xce.as_ptr(), u32::from(domid), remote_port)
            };
            if port < 0 {
                let e = io::Error::last_os_error();
                // SAFETY: close the handle we opened.
                unsafe { sys::xenevtchn_close(xce.as_ptr()) };
                return Err(e);
            }
            Ok(XenEventChannel {
                xce,
                port: port as Port,
            })
        }
    }

    impl Drop for XenEventChannel {
        fn drop(&mut self) {
            // SAFETY: bound port on our own handle, closed once.
            unsafe {
                sys::xenevtchn_unbind(self.xce.as_ptr(), self.port);
                sys::xenevtchn_close(self.xce.as_ptr());
            }
        }
    }

    impl EventChannel for XenEventChannel {
        fn local_port(&self) -> Port {
            self.port
        }

        fn notify(&self) -> io::Result<()> {
            // SAFETY: valid handle and bound port.
            if unsafe { sys::xenevtchn_notify(self.xce.as_ptr(), self.port) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
            if !poll_readable(self.as_raw_fd(), timeout)? {
                return Ok(false);
            }
            // SAFETY: valid handle.
            let port = unsafe { sys::xenevtchn_pending(self.xce.as_ptr()) };
            if port < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: valid handle; re-arm the port that fired.
            if unsafe { sys::xenevtchn_unmask(self.xce.as_ptr(), port as Port) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(true)
        }

        fn as_raw_fd(&self) -> RawFd {
            // SAFETY: valid handle.
            unsafe { sys::xenevtchn_fd(self.xce.as_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn kicks_reach_the_other_end_only() {
        let (back, front) = EmulatedEventChannel::pair().unwrap();
        assert_ne!(back.local_port(), front.local_port());
        assert!(!back.wait(Some(Duration::ZERO)).unwrap());
        front.notify().unwrap();
        assert!(!front.wait(Some(Duration::ZERO)).unwrap());
        assert!(back.wait(Some(Duration::ZERO)).unwrap());
        // Consumed: a second wait finds nothing.
        assert!(!back.wait(Some(Duration::from_millis(1))).unwrap());
        // Several kicks coalesce into one wakeup, like a pending bit.
        back.notify().unwrap();
        back.notify().unwrap();
        assert!(front.wait(None).unwrap());
        assert!(!front.wait(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn wait_blocks_until_kicked_from_another_thread() {
        let (back, front) = EmulatedEventChannel::pair().unwrap();
        let t = thread::spawn(move || back.wait(None).unwrap());
        front.notify().unwrap();
        assert!(t.join().unwrap());
    }
}
