//! Memory shared with an untrusted guest (a mapped ring or data page).
//!
//! The guest can change any byte at any time, so every access goes through
//! volatile or atomic operations, and callers copy what they need out once
//! and work on the copy (no double fetch). All accesses are bounds-checked.

use std::any::Any;
use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

/// An access outside the region, misaligned, or a write to a read-only one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// `offset..offset+len` is not inside the region of `size` bytes.
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// An atomic access at an offset that is not 4-byte aligned.
    Misaligned(usize),
    /// A write to memory the guest granted read-only.
    ReadOnly,
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessError::OutOfBounds { offset, len, size } => write!(
                f,
                "access of {len} bytes at {offset} outside shared region of {size} bytes"
            ),
            AccessError::Misaligned(off) => write!(f, "misaligned atomic access at {off}"),
            AccessError::ReadOnly => write!(f, "write to read-only shared memory"),
        }
    }
}

impl std::error::Error for AccessError {}

/// A contiguous mapping shared with a guest. Dropping the last handle drops
/// the owner, which unmaps the memory (grant unmap, munmap).
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the region is only ever accessed with volatile or atomic
// operations, which is how memory shared with another domain must be treated
// anyway; the owner is Send + Sync.
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

/// Unmaps an anonymous mapping on drop.
struct AnonMapping {
    addr: usize,
    len: usize,
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len came from a successful mmap that nothing else unmaps.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

impl SharedMem {
    /// Wraps an existing mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped (readable, and writable if `writable`)
    /// until `owner` is dropped, and be at least 4-byte aligned.
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Self {
        SharedMem {
            ptr,
            len,
            writable,
            owner: Arc::from(owner),
        }
    }

    /// Another handle on the same memory (e.g. the guest's and the
    /// backend's view in an emulation). The mapping lives until both drop.
    pub fn share(&self) -> SharedMem {
        SharedMem {
            ptr: self.ptr,
            len: self.len,
            writable: self.writable,
            owner: Arc::clone(&self.owner),
        }
    }

    /// A fresh zeroed shared anonymous mapping of `len` bytes (page aligned).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: plain anonymous mmap; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let owner = AnonMapping {
            addr: addr as usize,
            len,
        };
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: the mapping lives until `owner` drops; mmap is page aligned.
        Ok(unsafe { Self::from_raw_parts(ptr, len, true, Box::new(owner)) })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The start of the mapping, for handing to I/O (e.g. io_uring buffers).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), AccessError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(AccessError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the region, each byte
    /// read exactly once.
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), AccessError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; the source stays mapped while self lives.
        unsafe { volatile_copy_from(self.ptr.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    pub fn write_from(&self, offset: usize, src: &[u8]) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the mapping is writable.
        unsafe { volatile_copy_to(self.ptr.as_ptr().add(offset), src) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeroes.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: bounds checked above.
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset + i), 0) };
        }
        Ok(())
    }

    /// The 32-bit word at `offset` as an atomic (ring indexes).
    pub fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, AccessError> {
        self.check(offset, 4)?;
        let p = self.ptr.as_ptr().wrapping_add(offset);
        if (p as usize) % 4 != 0 {
            return Err(AccessError::Misaligned(offset));
        }
        // SAFETY: in bounds, aligned, and mapped for as long as &self lives;
        // all other accesses to shared memory are volatile or atomic.
        Ok(unsafe { AtomicU32::from_ptr(p as *mut u32) })
    }
}

/// Volatile copy out of shared memory, a word at a time where aligned.
///
/// # Safety
/// `src..src+dst.len()` must be readable.
unsafe fn volatile_copy_from(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    let n = dst.len();
    while i < n {
        // SAFETY: i < n, inside the readable range the caller vouched for.
        let p = unsafe { src.add(i) };
        if (p as usize) % 8 == 0 && n - i >= 8 {
            // SAFETY: p is 8-aligned and p..p+8 lies in the readable range.
            let w = unsafe { std::ptr::read_volatile(p as *const u64) };
            dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: p lies in the readable range.
            dst[i] = unsafe { std::ptr::read_volatile(p) };
            i += 1;
        }
    }
}

/// Volatile copy into shared memory, a word at a time where aligned.
///
/// # Safety
/// `dst..dst+src.len()` must be writable.
unsafe fn volatile_copy_to(dst: *mut u8, src: &[u8]) {
    let mut i = 0;
    let n = src.len();
    while i < n {
        // SAFETY: i < n, inside the writable range the caller vouched for.
        let p = unsafe { dst.add(i) };
        if (p as usize) % 8 == 0 && n - i >= 8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&src[i..i + 8]);
            // SAFETY: p is 8-aligned and p..p+8 lies in the writable range.
            unsafe { std::ptr::write_volatile(p as *mut u64, u64::from_ne_bytes(w)) };
            i += 8;
        } else {
            // SAFETY: p lies in the writable range.
            unsafe { std::ptr::write_volatile(p, src[i]) };
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn accesses_are_bounds_checked() {
        let m = SharedMem::anonymous(4096).unwrap();
        let mut buf = [0u8; 16];
        assert!(m.read_into(4090, &mut buf).is_err());
        assert!(m.read_into(usize::MAX - 3, &mut buf).is_err());
        assert!(m.write_from(4095, &[1, 2]).is_err());
        assert_eq!(m.atomic_u32(2).unwrap_err(), AccessError::Misaligned(2));
        assert!(m.atomic_u32(4094).is_err());
        m.write_from(3, &[9; 13]).unwrap();
        m.read_into(0, &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 9]);
        assert_eq!(buf[15], 9);
        m.atomic_u32(0)
            .unwrap()
            .store(0xdead_beef, Ordering::SeqCst);
        m.read_into(0, &mut buf[..4]).unwrap();
        assert_eq!(
            u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]),
            0xdead_beef
        );
    }
}
