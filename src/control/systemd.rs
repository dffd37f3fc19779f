//! Readiness for a `Type=notify` systemd unit (`packaging/systemd/`): the
//! daemons say READY=1 once they really serve, so that units ordered after
//! them (a VM's) never start against a socket that is not there yet, and
//! STOPPING=1 when they begin to drain, so that `systemctl status` shows
//! why a stop takes a while. Without `NOTIFY_SOCKET` (not started by
//! systemd) every call is a no-op.

use sd_notify::NotifyState;

/// READY=1 with a one-line status; call after the listening sockets are
/// bound and the disks opened.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STOPPING=1 with a one-line status; call when a stop signal arrives.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A failed notification is logged, never fatal: the daemon serves either
/// way (systemd then times the start out, which says more than an exit).
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("sd_notify: {e}");
    }
}

/// Write end of the pipe [`stopping_on_sigterm`]'s handler pokes.
static SIGTERM_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_sigterm(_sig: libc::c_int) {
    let fd = SIGTERM_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; fd is our pipe.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

/// For a daemon without a drain of its own (`xen-backend`, which SIGTERM
/// ends at once): under systemd, say STOPPING=1 at SIGTERM and then die of
/// the signal exactly as before. Not under systemd, nothing is installed.
pub fn stopping_on_sigterm() -> std::io::Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    SIGTERM_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    let read_end = fds[0];
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            let mut b = 0u8;
            // SAFETY: read(2) of one byte into a local from our pipe.
            while unsafe { libc::read(read_end, &mut b as *mut u8 as *mut libc::c_void, 1) } < 0 {}
            stopping("SIGTERM: stopping");
            // SAFETY: restoring the default action and raising the signal
            // ends the process as an unhandled SIGTERM would have.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                libc::raise(libc::SIGTERM);
            }
        })?;
    // SAFETY: a zeroed sigaction with a plain handler is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
