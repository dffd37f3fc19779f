//! Real event channels (feature `xen`): [`XenEventChannel`], an
//! interdomain channel bound through libxenevtchn.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::time::Duration;

use super::{poll_readable, EventChannel, Port};
use crate::xen::grant::DomId;
use crate::xen::sys;

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
        let port =
            unsafe { sys::xenevtchn_bind_interdomain(xce.as_ptr(), u32::from(domid), remote_port) };
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
