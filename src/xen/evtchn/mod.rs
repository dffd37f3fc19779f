//! Event channels: the doorbell between frontend and backend. The frontend
//! kicks after pushing requests (when the ring says so), the backend after
//! pushing responses; each side sleeps on its end until kicked.
//!
//! [`EventChannel`] is what the backend uses.
//! - `real.rs` (feature `xen`): `XenEventChannel` binds a real interdomain
//!   channel through libxenevtchn.
//! - `emulated.rs` (feature `test-utils`): `EmulatedEventChannel::pair`
//!   gives two connected ends over eventfds.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

#[cfg(feature = "test-utils")]
mod emulated;
#[cfg(feature = "xen")]
mod real;

#[cfg(feature = "test-utils")]
pub use emulated::EmulatedEventChannel;
#[cfg(feature = "xen")]
pub use real::XenEventChannel;

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
#[cfg(any(feature = "xen", feature = "test-utils"))]
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
