//! Page-aligned I/O buffers, so the same buffer works with O_DIRECT; or,
//! for zero-copy front ends, a window on memory someone else owns (a
//! vhost-user guest's RAM) that the engines use the same way.

use std::alloc::{self, Layout};
use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Buffer alignment: enough for O_DIRECT on every common device.
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer aligned to `BUF_ALIGN`, zero-filled on creation; or a
/// borrowed window (see [`AlignedBuf::borrowed`]).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// `Some`: the bytes belong to this owner, which keeps them mapped
    /// while the buffer lives; they are not freed here.
    owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>, or
// borrows a window that its `Send + Sync` owner keeps valid.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN;
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("valid buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap,
            owner: None,
        }
    }

    /// A buffer over `len` bytes at `ptr` that `owner` keeps valid: the
    /// vhost-user export reads into and writes from guest memory this way,
    /// with no copy. The engines only hand the pointer to the kernel
    /// (io_uring, pread/pwrite); its alignment is whatever `ptr`'s is, so
    /// the caller checks it against the engine's before using it with
    /// O_DIRECT.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long
    /// as `owner` lives, and nothing may free or unmap it before then.
    /// Another party (the guest) may change the bytes meanwhile: the
    /// result of such a race is that party's data, as on real hardware.
    pub unsafe fn borrowed(
        ptr: NonNull<u8>,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        AlignedBuf {
            ptr,
            len,
            cap: len,
            owner: Some(owner),
        }
    }

    /// True for a window made by [`AlignedBuf::borrowed`]: not for a pool.
    pub fn is_borrowed(&self) -> bool {
        self.owner.is_some()
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the allocation can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the length within the capacity; new bytes are zero.
    /// Returns false (and changes nothing) when `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.cap {
            return false;
        }
        if len > self.len {
            let old = self.len;
            self.as_full_mut()[old..len].fill(0);
        }
        self.len = len;
        true
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn as_full_mut(&mut self) -> &mut [u8] {
        // SAFETY: the whole allocation is initialised (alloc_zeroed); a
        // borrowed window's capacity is its length, valid by contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            return;
        }
        let layout = Layout::from_size_align(self.cap, BUF_ALIGN).expect("valid buffer layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(1000);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[999] = 7;
        assert!(b.set_len(4096));
        assert_eq!(b.as_slice()[999], 7);
        assert!(b.as_slice()[1000..].iter().all(|&x| x == 0));
        assert!(!b.set_len(4097));
    }

    #[test]
    fn borrowed_window_is_not_freed_and_clones_to_owned() {
        let owner = Arc::new(std::sync::Mutex::new(vec![5u8; 64]));
        let ptr = NonNull::new(owner.lock().unwrap().as_mut_ptr()).unwrap();
        let keep: Arc<dyn Any + Send + Sync> = owner.clone();
        // SAFETY: the Vec lives in `owner`, which the buffer keeps alive.
        let mut b = unsafe { AlignedBuf::borrowed(ptr, 16, keep) };
        assert!(b.is_borrowed());
        b.as_mut_slice()[0] = 9;
        let c = b.clone();
        assert!(!c.is_borrowed());
        assert!(!b.set_len(17), "a window cannot grow");
        drop(b);
        assert_eq!(owner.lock().unwrap()[0], 9);
        assert_eq!(c.as_slice()[..2], [9, 5]);
    }
}
