//! The emulated grant table (feature `test-utils`): [`EmulatedGuest`] is a
//! guest without a hypervisor (memfd-backed RAM plus a grant table), and
//! [`EmulatedGrantMapper`] maps its refs by mmapping the memfd's pages, so
//! guest and backend really share pages.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{check_in_page, DomId, GrantError, GrantMapper, GrantRef};
use crate::xen::shared::SharedMem;
use crate::xen::PAGE_SIZE;

/// One entry of an emulated guest's grant table.
#[derive(Clone, Copy, Debug)]
struct GrantEntry {
    page: usize,
    writable: bool,
    maps: usize,
}

/// A guest without a hypervisor: memfd-backed RAM plus a grant table.
pub struct EmulatedGuest {
    domid: DomId,
    memfd: OwnedFd,
    nr_pages: usize,
    table: Mutex<GrantTable>,
}

struct GrantTable {
    entries: HashMap<GrantRef, GrantEntry>,
    next_ref: GrantRef,
}

impl GrantTable {
    /// The page `gref` grants, if granted (and writable when `write`): the
    /// one access check, for copies and for maps (which hold the lock over
    /// all their refs).
    fn page_for(&self, domid: DomId, gref: GrantRef, write: bool) -> Result<usize, GrantError> {
        let e = self
            .entries
            .get(&gref)
            .ok_or(GrantError::InvalidRef { domid, gref })?;
        if write && !e.writable {
            return Err(GrantError::ReadOnly { domid, gref });
        }
        Ok(e.page)
    }
}

impl fmt::Debug for EmulatedGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedGuest")
            .field("domid", &self.domid)
            .field("nr_pages", &self.nr_pages)
            .finish()
    }
}

/// Unmaps an mmapped range on drop and tells the guest's grant table.
struct MappedGrants {
    addr: usize,
    len: usize,
    guest: Option<Arc<EmulatedGuest>>,
    refs: Vec<GrantRef>,
}

impl Drop for MappedGrants {
    fn drop(&mut self) {
        // SAFETY: addr/len is a mapping this struct owns.
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
        if let Some(guest) = &self.guest {
            let mut t = guest.table.lock();
            for r in &self.refs {
                if let Some(e) = t.entries.get_mut(r) {
                    e.maps = e.maps.saturating_sub(1);
                }
            }
        }
    }
}

impl EmulatedGuest {
    /// A guest `domid` with `nr_pages` pages of zeroed RAM and no grants.
    pub fn new(domid: DomId, nr_pages: usize) -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall with a static C string.
        let fd = unsafe { libc::memfd_create(c"blkshim-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|l| libc::off_t::try_from(l).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "guest too big"))?;
        // SAFETY: valid fd.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(EmulatedGuest {
            domid,
            memfd,
            nr_pages,
            table: Mutex::new(GrantTable {
                entries: HashMap::new(),
                next_ref: 8, // refs 0..7 are reserved in real grant tables
            }),
        }))
    }

    /// The guest's domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Pages of guest RAM.
    pub fn nr_pages(&self) -> usize {
        self.nr_pages
    }

    /// The guest's own view of `count` pages from `first` (what the guest
    /// kernel writes rings and data through). Needs no grant.
    pub fn pages(&self, first: usize, count: usize) -> io::Result<SharedMem> {
        let end = first.checked_add(count);
        if count == 0 || !matches!(end, Some(e) if e <= self.nr_pages) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "page range outside guest RAM",
            ));
        }
        let len = count * PAGE_SIZE;
        // SAFETY: maps our own memfd; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.memfd.as_raw_fd(),
                (first * PAGE_SIZE) as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let owner = MappedGrants {
            addr: addr as usize,
            len,
            guest: None,
            refs: Vec::new(),
        };
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: mapped until owner drops; page aligned.
        Ok(unsafe { SharedMem::from_raw_parts(ptr, len, true, Box::new(owner)) })
    }

    /// `gnttab_grant_foreign_access`: grants `page` to the backend.
    pub fn grant(&self, page: usize, writable: bool) -> io::Result<GrantRef> {
        if page >= self.nr_pages {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "page outside guest RAM",
            ));
        }
        let mut t = self.table.lock();
        let gref = t.next_ref;
        t.next_ref = t.next_ref.wrapping_add(1);
        t.entries.insert(
            gref,
            GrantEntry {
                page,
                writable,
                maps: 0,
            },
        );
        Ok(gref)
    }

    /// `gnttab_end_foreign_access`: revokes a grant that is not mapped.
    pub fn revoke(&self, gref: GrantRef) -> Result<(), GrantError> {
        let mut t = self.table.lock();
        match t.entries.get(&gref) {
            None => Err(GrantError::InvalidRef {
                domid: self.domid,
                gref,
            }),
            Some(e) if e.maps > 0 => Err(GrantError::Busy(gref)),
            Some(_) => {
                t.entries.remove(&gref);
                Ok(())
            }
        }
    }

    /// How many backend mappings of `gref` are live (0 if not granted).
    pub fn map_count(&self, gref: GrantRef) -> usize {
        self.table.lock().entries.get(&gref).map_or(0, |e| e.maps)
    }

    /// Total live backend mappings of this guest's grants.
    pub fn live_mappings(&self) -> usize {
        self.table.lock().entries.values().map(|e| e.maps).sum()
    }

    /// Looks `gref` up for an access; the page index.
    fn lookup(&self, gref: GrantRef, write: bool) -> Result<usize, GrantError> {
        self.table.lock().page_for(self.domid, gref, write)
    }

    fn map_refs(
        self: &Arc<Self>,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<SharedMem, GrantError> {
        if refs.is_empty() {
            return Err(GrantError::Empty);
        }
        // Validate every ref and take the mapping counts under one lock.
        let pages: Vec<usize> = {
            let mut t = self.table.lock();
            let mut pages = Vec::with_capacity(refs.len());
            for &gref in refs {
                pages.push(t.page_for(self.domid, gref, writable)?);
            }
            for gref in refs {
                if let Some(e) = t.entries.get_mut(gref) {
                    e.maps += 1;
                }
            }
            pages
        };
        let len = refs.len() * PAGE_SIZE;
        // From here on, dropping `owner` undoes both the counts and the mmap.
        let mut owner = MappedGrants {
            addr: 0,
            len: 0,
            guest: Some(Arc::clone(self)),
            refs: refs.to_vec(),
        };
        // SAFETY: reserve an address range; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(GrantError::Os(io::Error::last_os_error()));
        }
        owner.addr = base as usize;
        owner.len = len;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        for (i, page) in pages.iter().enumerate() {
            // SAFETY: replaces one page of our own reservation with a page
            // of the guest memfd.
            let p = unsafe {
                libc::mmap(
                    (owner.addr + i * PAGE_SIZE) as *mut c_void,
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.memfd.as_raw_fd(),
                    (page * PAGE_SIZE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(GrantError::Os(io::Error::last_os_error()));
            }
        }
        let ptr = NonNull::new(base as *mut u8).ok_or(GrantError::Empty)?;
        // SAFETY: mapped (with `prot`) until owner drops; page aligned.
        Ok(unsafe { SharedMem::from_raw_parts(ptr, len, writable, Box::new(owner)) })
    }

    fn copy(&self, gref: GrantRef, offset: usize, buf: CopyBuf<'_>) -> Result<(), GrantError> {
        let write = matches!(buf, CopyBuf::ToGuest(_));
        let len = match &buf {
            CopyBuf::ToGuest(s) => s.len(),
            CopyBuf::FromGuest(d) => d.len(),
        };
        check_in_page(offset, len)?;
        let page = self.lookup(gref, write)?;
        let pos = (page * PAGE_SIZE + offset) as libc::off_t;
        let fd = self.memfd.as_raw_fd();
        // SAFETY: buffers are valid for len bytes; fd is ours.
        let n = unsafe {
            match buf {
                CopyBuf::ToGuest(s) => libc::pwrite(fd, s.as_ptr() as *const c_void, len, pos),
                CopyBuf::FromGuest(d) => libc::pread(fd, d.as_mut_ptr() as *mut c_void, len, pos),
            }
        };
        if n < 0 || n as usize != len {
            return Err(GrantError::Os(io::Error::last_os_error()));
        }
        Ok(())
    }
}

enum CopyBuf<'a> {
    ToGuest(&'a [u8]),
    FromGuest(&'a mut [u8]),
}

/// [`GrantMapper`] over [`EmulatedGuest`]s.
#[derive(Default)]
pub struct EmulatedGrantMapper {
    guests: Mutex<HashMap<DomId, Arc<EmulatedGuest>>>,
}

impl EmulatedGrantMapper {
    /// A mapper that knows no guests yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `guest`'s grants reachable.
    pub fn add_guest(&self, guest: Arc<EmulatedGuest>) {
        self.guests.lock().insert(guest.domid(), guest);
    }

    fn guest(&self, domid: DomId, gref: GrantRef) -> Result<Arc<EmulatedGuest>, GrantError> {
        self.guests
            .lock()
            .get(&domid)
            .cloned()
            .ok_or(GrantError::InvalidRef { domid, gref })
    }
}

impl GrantMapper for EmulatedGrantMapper {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<SharedMem, GrantError> {
        let first = refs.first().copied().ok_or(GrantError::Empty)?;
        self.guest(domid, first)?.map_refs(refs, writable)
    }

    fn copy_from_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), GrantError> {
        self.guest(domid, gref)?
            .copy(gref, offset, CopyBuf::FromGuest(dst))
    }

    fn copy_to_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        src: &[u8],
    ) -> Result<(), GrantError> {
        self.guest(domid, gref)?
            .copy(gref, offset, CopyBuf::ToGuest(src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::abi::BlkifAbi;
    use crate::xen::ring::{BackRing, FrontRing};

    fn setup(pages: usize) -> (Arc<EmulatedGuest>, EmulatedGrantMapper) {
        let guest = EmulatedGuest::new(5, pages).unwrap();
        let mapper = EmulatedGrantMapper::new();
        mapper.add_guest(Arc::clone(&guest));
        (guest, mapper)
    }

    #[test]
    fn mapped_grants_share_the_guest_pages() {
        let (guest, mapper) = setup(8);
        let view = guest.pages(0, 8).unwrap();
        let a = guest.grant(6, true).unwrap();
        let b = guest.grant(2, true).unwrap();
        // Mapped in ref order, not page order.
        let m = mapper.map(5, &[a, b], true).unwrap();
        assert_eq!(m.len(), 2 * PAGE_SIZE);
        view.write_from(6 * PAGE_SIZE + 10, b"guest").unwrap();
        let mut got = [0u8; 5];
        m.read_into(10, &mut got).unwrap();
        assert_eq!(&got, b"guest");
        m.write_from(PAGE_SIZE + 3, b"back").unwrap();
        let mut got = [0u8; 4];
        view.read_into(2 * PAGE_SIZE + 3, &mut got).unwrap();
        assert_eq!(&got, b"back");
        assert_eq!(guest.map_count(a), 1);
        assert_eq!(
            guest.revoke(a).unwrap_err().to_string(),
            GrantError::Busy(a).to_string()
        );
        drop(m);
        assert_eq!(guest.live_mappings(), 0);
        guest.revoke(a).unwrap();
        assert!(matches!(
            mapper.map(5, &[a], false),
            Err(GrantError::InvalidRef { gref, .. }) if gref == a
        ));
    }

    #[test]
    fn invalid_and_read_only_refs_are_refused() {
        let (guest, mapper) = setup(4);
        let ro = guest.grant(1, false).unwrap();
        let rw = guest.grant(2, true).unwrap();
        assert!(matches!(
            mapper.map(5, &[rw, 999], true),
            Err(GrantError::InvalidRef { gref: 999, .. })
        ));
        assert!(matches!(
            mapper.map(6, &[rw], true),
            Err(GrantError::InvalidRef { domid: 6, .. })
        ));
        assert!(matches!(
            mapper.map(5, &[rw, ro], true),
            Err(GrantError::ReadOnly { .. })
        ));
        assert!(matches!(mapper.map(5, &[], true), Err(GrantError::Empty)));
        // Failed maps leave nothing mapped.
        assert_eq!(guest.live_mappings(), 0);
        let m = mapper.map(5, &[ro], false).unwrap();
        assert!(!m.writable());
        assert!(m.write_from(0, b"x").is_err());
        assert!(mapper.copy_to_guest(5, ro, 0, b"x").is_err());
        assert!(matches!(
            mapper.copy_from_guest(5, 12345, 0, &mut [0u8; 4]),
            Err(GrantError::InvalidRef { gref: 12345, .. })
        ));
        assert!(guest.grant(4, true).is_err());
    }

    #[test]
    fn grant_copy_moves_bytes_within_one_page() {
        let (guest, mapper) = setup(2);
        let g = guest.grant(1, true).unwrap();
        mapper.copy_to_guest(5, g, 4000, b"0123456789").unwrap();
        let mut back = [0u8; 10];
        mapper.copy_from_guest(5, g, 4000, &mut back).unwrap();
        assert_eq!(&back, b"0123456789");
        let view = guest.pages(1, 1).unwrap();
        view.read_into(4000, &mut back).unwrap();
        assert_eq!(&back, b"0123456789");
        assert!(matches!(
            mapper.copy_to_guest(5, g, 4090, b"0123456789"),
            Err(GrantError::OutOfPage { .. })
        ));
    }

    #[test]
    fn multi_page_ring_over_granted_pages() {
        let (guest, mapper) = setup(16);
        // Guest puts a 4-page ring on pages 4..8 and grants them.
        let refs: Vec<GrantRef> = (4..8).map(|p| guest.grant(p, true).unwrap()).collect();
        let mut front = FrontRing::init(guest.pages(4, 4).unwrap(), BlkifAbi::X86_32).unwrap();
        let mut back =
            BackRing::new(mapper.map(5, &refs, true).unwrap(), BlkifAbi::X86_32).unwrap();
        assert_eq!(back.size(), 128);
        for id in 0..100u8 {
            front.put_request(&[0, 1, 0, 0, id]).unwrap();
        }
        front.push_requests().unwrap();
        let mut n = 0;
        while let Some(r) = back.next_request().unwrap() {
            assert_eq!(r.as_bytes()[4], n);
            back.put_response(u64::from(n), 0, 0).unwrap();
            n += 1;
        }
        assert_eq!(n, 100);
        back.push_responses().unwrap();
        assert_eq!(front.next_response().unwrap().map(|r| r.id), Some(0));
        drop(back);
        assert_eq!(guest.live_mappings(), 0);
    }
}
