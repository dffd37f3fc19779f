//! Emulated event channels (feature `test-utils`): two connected ends
//! over eventfds ([`EmulatedEventChannel::pair`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{poll_readable, EventChannel, Port};

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
