//! The real XenStore (feature `xen`): [`XenStoreHandle`], a connection to
//! xenstored through libxenstore.

use std::ffi::{c_char, c_void, CStr, CString};
use std::io;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::{TxId, WatchEvent, XenStore, XsError, XBT_NULL};
use crate::xen::sys;

/// A connection to xenstored through libxenstore (thread-safe).
pub struct XenStoreHandle {
    h: NonNull<sys::xs_handle>,
}

// SAFETY: libxenstore handles are usable from any thread.
unsafe impl Send for XenStoreHandle {}
// SAFETY: as above.
unsafe impl Sync for XenStoreHandle {}

impl Drop for XenStoreHandle {
    fn drop(&mut self) {
        // SAFETY: opened by xs_open, closed once.
        unsafe { sys::xs_close(self.h.as_ptr()) };
    }
}

fn cpath(path: &str) -> Result<CString, XsError> {
    CString::new(path).map_err(|_| XsError::Invalid(format!("NUL in {path:?}")))
}

fn last_error(path: &str) -> XsError {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => XsError::NotFound(path.to_string()),
        Some(libc::EAGAIN) => XsError::Again,
        Some(libc::EINVAL) => XsError::Invalid(path.to_string()),
        _ => XsError::Os(e),
    }
}

/// Frees a `char **` vector libxenstore returned (one allocation).
fn take_strings(v: *mut *mut c_char, n: usize) -> Vec<String> {
    let out = (0..n)
        .map(|i| {
            // SAFETY: libxenstore returned n valid C strings in v.
            let s = unsafe { *v.add(i) };
            if s.is_null() {
                String::new()
            } else {
                // SAFETY: non-null NUL-terminated string.
                unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
            }
        })
        .collect();
    // SAFETY: the vector and its strings are one malloc block.
    unsafe { libc::free(v.cast()) };
    out
}

impl XenStoreHandle {
    /// Connects to xenstored (socket or /dev/xen/xenbus).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain call.
        let h = unsafe { sys::xs_open(0) };
        Ok(XenStoreHandle {
            h: NonNull::new(h).ok_or_else(io::Error::last_os_error)?,
        })
    }

    fn watch_event(&self, v: *mut *mut c_char, n: u32) -> Option<WatchEvent> {
        if v.is_null() {
            return None;
        }
        let s = take_strings(v, n as usize);
        let path = s.get(sys::xs_watch_type_XS_WATCH_PATH as usize)?.clone();
        let token = s.get(sys::xs_watch_type_XS_WATCH_TOKEN as usize)?.clone();
        Some(WatchEvent { path, token })
    }
}

impl XenStore for XenStoreHandle {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        let c = cpath(path)?;
        let mut len: u32 = 0;
        // SAFETY: valid handle, C string, out pointer.
        let p = unsafe { sys::xs_read(self.h.as_ptr(), tx, c.as_ptr(), &mut len) };
        if p.is_null() {
            return Err(last_error(path));
        }
        // SAFETY: libxenstore returned len bytes at p (malloc'd).
        let v = unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) }.to_vec();
        // SAFETY: malloc'd by libxenstore.
        unsafe { libc::free(p) };
        Ok(v)
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        let c = cpath(path)?;
        let len = u32::try_from(value.len())
            .map_err(|_| XsError::Invalid("value too long".to_string()))?;
        // SAFETY: valid handle, C string, value buffer of len bytes.
        let ok = unsafe {
            sys::xs_write(
                self.h.as_ptr(),
                tx,
                c.as_ptr(),
                value.as_ptr() as *const c_void,
                len,
            )
        };
        if ok {
            Ok(())
        } else {
            Err(last_error(path))
        }
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        let c = cpath(path)?;
        // SAFETY: valid handle and C string.
        if unsafe { sys::xs_rm(self.h.as_ptr(), tx, c.as_ptr()) } {
            Ok(())
        } else {
            Err(last_error(path))
        }
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        let c = cpath(path)?;
        let mut n: u32 = 0;
        // SAFETY: valid handle, C string, out pointer.
        let v = unsafe { sys::xs_directory(self.h.as_ptr(), tx, c.as_ptr(), &mut n) };
        if v.is_null() {
            return Err(last_error(path));
        }
        Ok(take_strings(v, n as usize))
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let (p, t) = (cpath(path)?, cpath(token)?);
        // SAFETY: valid handle and C strings.
        if unsafe { sys::xs_watch(self.h.as_ptr(), p.as_ptr(), t.as_ptr()) } {
            Ok(())
        } else {
            Err(last_error(path))
        }
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let (p, t) = (cpath(path)?, cpath(token)?);
        // SAFETY: valid handle and C strings.
        if unsafe { sys::xs_unwatch(self.h.as_ptr(), p.as_ptr(), t.as_ptr()) } {
            Ok(())
        } else {
            Err(last_error(path))
        }
    }

    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        if timeout.is_none() {
            let mut n: u32 = 0;
            // SAFETY: valid handle; blocks until an event.
            let v = unsafe { sys::xs_read_watch(self.h.as_ptr(), &mut n) };
            if v.is_null() {
                return Err(last_error("watch"));
            }
            return Ok(self.watch_event(v, n));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            // SAFETY: valid handle; non-blocking check.
            let v = unsafe { sys::xs_check_watch(self.h.as_ptr()) };
            if !v.is_null() {
                return Ok(self.watch_event(v, 2));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(XsError::Os(e));
            }
            let left = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                // SAFETY: valid handle.
                fd: unsafe { sys::xs_fileno(self.h.as_ptr()) },
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    fn transaction_start(&self) -> Result<TxId, XsError> {
        // SAFETY: valid handle.
        let t = unsafe { sys::xs_transaction_start(self.h.as_ptr()) };
        if t == XBT_NULL {
            return Err(last_error("transaction"));
        }
        Ok(t)
    }

    fn transaction_end(&self, tx: TxId, abort: bool) -> Result<(), XsError> {
        // SAFETY: valid handle.
        if unsafe { sys::xs_transaction_end(self.h.as_ptr(), tx, abort) } {
            Ok(())
        } else {
            Err(last_error("transaction"))
        }
    }
}
