//! The real grant device (feature `xen`): [`XenGrantMapper`] over
//! libxengnttab (/dev/xen/gntdev).

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{check_in_page, DomId, GrantError, GrantMapper, GrantRef};
use crate::xen::shared::SharedMem;
use crate::xen::sys;
use crate::xen::PAGE_SIZE;

/// An open libxengnttab handle (thread-safe: its calls are ioctls).
struct Handle(NonNull<sys::xengnttab_handle>);

// SAFETY: libxengnttab handles may be used from any thread.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from xengnttab_open and is closed once.
        unsafe { sys::xengnttab_close(self.0.as_ptr()) };
    }
}

/// Unmaps a libxengnttab mapping on drop.
struct Unmap {
    handle: Arc<Handle>,
    addr: usize,
    count: u32,
}

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: addr/count is a live mapping from this handle.
        let rc = unsafe {
            sys::xengnttab_unmap(self.handle.0.as_ptr(), self.addr as *mut c_void, self.count)
        };
        if rc != 0 {
            log::error!("xengnttab_unmap: {}", io::Error::last_os_error());
        }
    }
}

/// [`GrantMapper`] over the real grant device (/dev/xen/gntdev).
pub struct XenGrantMapper {
    handle: Arc<Handle>,
}

impl XenGrantMapper {
    /// Opens the grant device.
    pub fn open() -> io::Result<Self> {
        // SAFETY: no logger, no flags.
        let h = unsafe { sys::xengnttab_open(std::ptr::null_mut(), 0) };
        let h = NonNull::new(h).ok_or_else(io::Error::last_os_error)?;
        Ok(XenGrantMapper {
            handle: Arc::new(Handle(h)),
        })
    }

    fn copy(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        local: *mut c_void,
        len: usize,
        to_guest: bool,
    ) -> Result<(), GrantError> {
        check_in_page(offset, len)?;
        let foreign = sys::xengnttab_grant_copy_segment_xengnttab_copy_ptr {
            foreign: sys::xengnttab_grant_copy_segment_xengnttab_copy_ptr__bindgen_ty_1 {
                ref_: gref,
                offset: offset as u16,
                domid,
            },
        };
        let virt = sys::xengnttab_grant_copy_segment_xengnttab_copy_ptr { virt: local };
        let (source, dest, flags) = if to_guest {
            (virt, foreign, sys::GNTCOPY_dest_gref)
        } else {
            (foreign, virt, sys::GNTCOPY_source_gref)
        };
        let mut seg = sys::xengnttab_grant_copy_segment_t {
            source,
            dest,
            len: len as u16,
            flags: flags as u16,
            status: 0,
        };
        // SAFETY: one valid segment; `local` is valid for len bytes.
        let rc = unsafe { sys::xengnttab_grant_copy(self.handle.0.as_ptr(), 1, &mut seg) };
        if rc != 0 {
            return Err(GrantError::Os(io::Error::last_os_error()));
        }
        match i32::from(seg.status) {
            s if s == sys::GNTST_okay as i32 => Ok(()),
            sys::GNTST_bad_gntref => Err(GrantError::InvalidRef { domid, gref }),
            sys::GNTST_permission_denied => Err(GrantError::ReadOnly { domid, gref }),
            s => Err(GrantError::Os(io::Error::other(format!(
                "grant copy status {s}"
            )))),
        }
    }
}

impl GrantMapper for XenGrantMapper {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<SharedMem, GrantError> {
        if refs.is_empty() {
            return Err(GrantError::Empty);
        }
        let count = u32::try_from(refs.len()).map_err(|_| GrantError::Empty)?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let mut refs = refs.to_vec();
        // SAFETY: refs is valid for count entries.
        let p = unsafe {
            sys::xengnttab_map_domain_grant_refs(
                self.handle.0.as_ptr(),
                count,
                u32::from(domid),
                refs.as_mut_ptr(),
                prot,
            )
        };
        let ptr = NonNull::new(p as *mut u8).ok_or_else(|| {
            let e = io::Error::last_os_error();
            match (refs.first(), e.raw_os_error()) {
                (Some(&gref), Some(libc::EINVAL)) => GrantError::InvalidRef { domid, gref },
                _ => GrantError::Os(e),
            }
        })?;
        let owner = Unmap {
            handle: Arc::clone(&self.handle),
            addr: ptr.as_ptr() as usize,
            count,
        };
        // SAFETY: mapped until owner drops; page aligned.
        Ok(unsafe {
            SharedMem::from_raw_parts(ptr, refs.len() * PAGE_SIZE, writable, Box::new(owner))
        })
    }

    fn copy_from_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), GrantError> {
        self.copy(
            domid,
            gref,
            offset,
            dst.as_mut_ptr().cast(),
            dst.len(),
            false,
        )
    }

    fn copy_to_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        src: &[u8],
    ) -> Result<(), GrantError> {
        // The hypervisor only reads from `src` for a copy into the guest.
        self.copy(
            domid,
            gref,
            offset,
            src.as_ptr() as *mut c_void,
            src.len(),
            true,
        )
    }
}
