//! The split virtqueue's rings and descriptor chains, read and written in
//! place in guest memory.
//!
//! virtio-queue's `Queue` still holds each queue's state (addresses, size,
//! the next available and used index) and answers the frontend's
//! `GET_VRING_BASE`; this module replaces only its memory accesses on the
//! request path. Those go through vm-memory's generic `Bytes` for every
//! ring entry and descriptor (a region lookup and a slice iterator per 16
//! bytes), and every write takes the dirty-log bitmap's lock even with no
//! migration running: 16 % of the server's CPU on 4 KiB page-cache reads
//! (`benches/vhost_profile.sh --record`). Here an address is translated
//! with one region lookup ([`host`]), guest memory is touched only through
//! raw pointers (volatile and atomic accesses, never references), and the
//! dirty log is the caller's to mark while `VHOST_F_LOG_ALL` is on.
//!
//! [`walk`] is pure (descriptors come from a callback), so the fuzz target
//! `fuzz/fuzz_targets/vhost_chain.rs` checks it against virtio-queue's own
//! `DescriptorChain` on arbitrary tables.

use super::device::Mem;
use super::request::Desc;
use std::sync::atomic::{AtomicU16, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// `VIRTQ_DESC_F_NEXT`: the chain goes on at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes the buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Bytes of a descriptor.
pub const DESC_LEN: u64 = 16;

/// The host address of guest memory `addr..addr + len`, when all of it is
/// in one region of `mem` (always, for what a driver allocates in one
/// piece, unless it straddles two memory slots).
pub fn host(mem: &Mem, addr: u64, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(GuestAddress(addr))?;
    let offset = addr.checked_sub(region.start_addr().0)?;
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Copy guest memory at `addr` into `buf`; false when it is not all guest
/// memory. One region: a plain copy; across regions: vm-memory's.
pub fn read(mem: &Mem, addr: u64, buf: &mut [u8]) -> bool {
    match host(mem, addr, buf.len()) {
        Some(p) => {
            // SAFETY: `p..p + len` is mapped (one region of `mem`, which the
            // caller holds) and `buf` is ours; the driver may change those
            // bytes meanwhile, and what it wrote is what we parse.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
            true
        }
        None => mem.read_slice(buf, GuestAddress(addr)).is_ok(),
    }
}

/// Copy `data` into guest memory at `addr`; false when it is not all
/// guest memory. The caller marks the dirty log (see [`super::device`]).
pub fn write(mem: &Mem, addr: u64, data: &[u8]) -> bool {
    match host(mem, addr, data.len()) {
        Some(p) => {
            // SAFETY: as in `read`; the device owns these bytes until it
            // puts the chain in the used ring.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            true
        }
        None => mem.write_slice(data, GuestAddress(addr)).is_ok(),
    }
}

/// A descriptor as the driver wrote it (little endian, virtio 1.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    pub fn from_bytes(b: &[u8; 16]) -> RawDesc {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[..8]);
        RawDesc {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// The table a descriptor is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The queue's own descriptor table.
    Queue,
    /// An indirect table at this guest address.
    Indirect(u64),
}

/// Walk the chain that starts at `head` of a `size`-entry table into
/// `out`, by virtio-queue's `DescriptorChain` rules: at most one indirect
/// table (its length a multiple of 16, its descriptors' own indirect flag
/// refused), at most as many descriptors per table as it has entries (a
/// loop ends), the chain's total length within `u32`. A descriptor that
/// breaks a rule or cannot be read ends the chain there; the parser then
/// refuses what is left.
pub fn walk(
    head: u16,
    size: u16,
    read: &mut dyn FnMut(Table, u16) -> Option<RawDesc>,
    out: &mut Vec<Desc>,
) {
    let mut table = Table::Queue;
    let mut entries = size;
    let mut next = head;
    let mut ttl = size;
    let mut total = 0u32;
    while ttl > 0 && next < entries {
        let Some(d) = read(table, next) else {
            return;
        };
        if d.flags & DESC_F_INDIRECT != 0 {
            if table != Table::Queue || u64::from(d.len) % DESC_LEN != 0 {
                return;
            }
            let Ok(n) = u16::try_from(u64::from(d.len) / DESC_LEN) else {
                return;
            };
            table = Table::Indirect(d.addr);
            entries = n;
            next = 0;
            ttl = n;
            continue;
        }
        let Some(t) = total.checked_add(d.len) else {
            return;
        };
        total = t;
        if d.flags & DESC_F_NEXT != 0 {
            next = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        out.push(Desc {
            addr: d.addr,
            len: d.len,
            write_only: d.flags & DESC_F_WRITE != 0,
        });
    }
}

/// Bytes before the avail ring's entries (flags, idx), and the used
/// ring's (flags, idx).
const RING_HEADER: u64 = 4;
/// Bytes of a used-ring element (id, len).
const USED_ELEM: u64 = 8;

/// One part of a queue (descriptor table, avail ring, used ring): its
/// guest address, and its host address when all of it is in one region.
#[derive(Debug, Clone, Copy)]
struct Part {
    guest: u64,
    host: Option<*mut u8>,
}

impl Part {
    fn new(mem: &Mem, guest: u64, len: u64) -> Part {
        let host = usize::try_from(len)
            .ok()
            .and_then(|len| host(mem, guest, len));
        Part { guest, host }
    }
}

/// A queue's rings in guest memory, for one batch of pops or one batch of
/// completions. `mem` must be the memory the queue's addresses were set
/// against (the caller holds it, so the host addresses stay mapped).
pub struct Rings<'m> {
    mem: &'m Mem,
    size: u16,
    desc: Part,
    avail: Part,
    used: Part,
}

impl<'m> Rings<'m> {
    /// The rings of a `size`-entry queue at these guest addresses (as
    /// `Queue` checked them: desc 16-, avail 2-, used 4-aligned). A part
    /// not in one region is accessed through vm-memory instead.
    pub fn new(mem: &'m Mem, size: u16, desc: u64, avail: u64, used: u64) -> Rings<'m> {
        let n = u64::from(size);
        Rings {
            mem,
            size,
            desc: Part::new(mem, desc, n * DESC_LEN),
            // flags, idx, ring[size], used_event
            avail: Part::new(mem, avail, RING_HEADER + 2 * n + 2),
            // flags, idx, ring[size], avail_event
            used: Part::new(mem, used, RING_HEADER + USED_ELEM * n + 2),
        }
    }

    /// Every part has a host address (the fast path is taken).
    pub fn in_place(&self) -> bool {
        self.desc.host.is_some() && self.avail.host.is_some() && self.used.host.is_some()
    }

    fn load_u16(&self, part: Part, offset: u64, order: Ordering) -> Option<u16> {
        match part.host {
            Some(p) => {
                // SAFETY: `offset + 2` is within the part (callers' offsets
                // are below its length), the part is mapped, and its base
                // and every u16 field in it are 2-aligned (Queue checks the
                // base's alignment); the driver writes it concurrently, so
                // the access is atomic.
                let a = unsafe { AtomicU16::from_ptr(p.add(offset as usize).cast::<u16>()) };
                Some(u16::from_le(a.load(order)))
            }
            None => self
                .mem
                .load::<u16>(GuestAddress(part.guest.checked_add(offset)?), order)
                .ok()
                .map(u16::from_le),
        }
    }

    fn store_u16(&self, part: Part, offset: u64, val: u16, order: Ordering) -> bool {
        match part.host {
            Some(p) => {
                // SAFETY: as in `load_u16`.
                let a = unsafe { AtomicU16::from_ptr(p.add(offset as usize).cast::<u16>()) };
                a.store(val.to_le(), order);
                true
            }
            None => part.guest.checked_add(offset).is_some_and(|addr| {
                self.mem
                    .store(val.to_le(), GuestAddress(addr), order)
                    .is_ok()
            }),
        }
    }

    /// The avail ring's `idx`, with Acquire: the entries before it (and
    /// their descriptors) are read after it.
    pub fn avail_idx(&self) -> Option<u16> {
        self.load_u16(self.avail, 2, Ordering::Acquire)
    }

    /// The chain head in avail slot `slot` (taken modulo the size).
    pub fn avail_head(&self, slot: u16) -> Option<u16> {
        let offset = RING_HEADER + 2 * u64::from(slot % self.size.max(1));
        self.load_u16(self.avail, offset, Ordering::Relaxed)
    }

    /// The driver's `used_event` (EVENT_IDX): signal it once the used
    /// index passes this.
    pub fn used_event(&self) -> Option<u16> {
        let offset = RING_HEADER + 2 * u64::from(self.size);
        self.load_u16(self.avail, offset, Ordering::Relaxed)
    }

    /// Descriptor `index` of `table`; `None` past the queue's table or
    /// outside guest memory.
    pub fn desc(&self, table: Table, index: u16) -> Option<RawDesc> {
        let mut b = [0u8; 16];
        match table {
            Table::Queue => {
                if index >= self.size {
                    return None;
                }
                let offset = u64::from(index) * DESC_LEN;
                match self.desc.host {
                    Some(p) => {
                        // SAFETY: index < size, so the 16 bytes are in the
                        // table, which is mapped.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                p.add(offset as usize),
                                b.as_mut_ptr(),
                                b.len(),
                            )
                        };
                    }
                    None => {
                        let addr = self.desc.guest.checked_add(offset)?;
                        self.mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
                    }
                }
            }
            Table::Indirect(base) => {
                let addr = base.checked_add(u64::from(index) * DESC_LEN)?;
                if !read(self.mem, addr, &mut b) {
                    return None;
                }
            }
        }
        Some(RawDesc::from_bytes(&b))
    }

    /// Walk the chain at `head` of this queue's table (see [`walk`]).
    pub fn chain(&self, head: u16, out: &mut Vec<Desc>) {
        walk(head, self.size, &mut |t, i| self.desc(t, i), out);
    }

    /// Write used element `slot` (modulo the size): chain `id`, `len`
    /// bytes written. Seen by the driver only after [`Rings::set_used_idx`].
    pub fn put_used(&self, slot: u16, id: u16, len: u32) -> bool {
        let offset = RING_HEADER + USED_ELEM * u64::from(slot % self.size.max(1));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(id).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        match self.used.host {
            Some(p) => {
                // SAFETY: the element is within the used ring, mapped.
                unsafe {
                    std::ptr::copy_nonoverlapping(elem.as_ptr(), p.add(offset as usize), elem.len())
                };
                true
            }
            None => self
                .used
                .guest
                .checked_add(offset)
                .is_some_and(|addr| self.mem.write_slice(&elem, GuestAddress(addr)).is_ok()),
        }
    }

    /// Publish the used index, with Release: the elements (and the data
    /// and status bytes they cover) are visible to the driver before it.
    pub fn set_used_idx(&self, idx: u16) -> bool {
        self.store_u16(self.used, 2, idx, Ordering::Release)
    }

    /// Guest addresses the device wrote in the used ring for slots
    /// `from..to`, plus its index: for the dirty log.
    pub fn used_written(&self, from: u16, to: u16) -> impl Iterator<Item = (u64, usize)> {
        let base = self.used.guest;
        let size = self.size.max(1);
        let mut slot = from;
        std::iter::from_fn(move || {
            if slot == to {
                return None;
            }
            let offset = RING_HEADER + USED_ELEM * u64::from(slot % size);
            slot = slot.wrapping_add(1);
            Some((base.wrapping_add(offset), USED_ELEM as usize))
        })
        .chain(std::iter::once((base.wrapping_add(2), 2)))
    }
}

/// Whether the driver wants a signal after the used index moved from `old`
/// to `new`, given its `used_event` (EVENT_IDX): `used_event` is in
/// `old..new` (wrapping), virtio's `vring_need_event`.
pub fn need_event(used_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Fuzz [`walk`] against virtio-queue's `DescriptorChain`: the input is a
/// queue size exponent (1 byte), a head (2), then a descriptor table of
/// that many entries followed by guest memory (indirect tables), all at
/// guest address 0 of a 64 KiB memory. Both must yield the same chain;
/// its length, when the input was long enough to be a queue.
pub fn fuzz_walk(data: &[u8]) -> Option<usize> {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;
    const MEM: usize = 64 << 10;
    let (&exp, rest) = data.split_first()?;
    let size = 1u16 << (exp % 9);
    let (h, rest) = rest.split_first_chunk::<2>()?;
    let head = u16::from_le_bytes(*h);
    // The avail ring and used ring go in the top 8 KiB of memory.
    let avail = (MEM - 8192) as u64;
    let used = (MEM - 4096) as u64;
    let mut image = vec![0u8; MEM - 8192];
    let n = rest.len().min(image.len());
    image[..n].copy_from_slice(&rest[..n]);
    // Indirect tables anywhere below the rings: keep addresses there.
    for i in 0..usize::from(size) {
        let d = &mut image[i * 16..i * 16 + 8];
        let a = u64::from_le_bytes(d.try_into().unwrap_or_default()) % avail;
        d.copy_from_slice(&a.to_le_bytes());
    }
    let Ok(mem) =
        GuestMemoryMmap::<vhost_user_backend::bitmap::BitmapMmapRegion>::from_ranges(&[(
            GuestAddress(0),
            MEM,
        )])
    else {
        return None;
    };
    if mem.write_slice(&image, GuestAddress(0)).is_err() {
        return None;
    }
    // avail: flags 0, idx 1, ring[0] = head.
    let _ = mem.write_slice(&[0, 0, 1, 0], GuestAddress(avail));
    let _ = mem.write_slice(&head.to_le_bytes(), GuestAddress(avail + 4));
    let mut q = match Queue::new(256) {
        Ok(q) => q,
        Err(_) => return None,
    };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    let theirs: Vec<Desc> = match q.iter(&mem) {
        Ok(mut it) => match it.next() {
            Some(chain) => chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .collect(),
            None => Vec::new(),
        },
        Err(_) => return None,
    };
    let rings = Rings::new(&mem, size, 0, avail, used);
    assert!(rings.in_place());
    assert_eq!(rings.avail_idx(), Some(1));
    assert_eq!(rings.avail_head(0), Some(head));
    let mut ours = Vec::new();
    rings.chain(head, &mut ours);
    assert_eq!(ours, theirs);
    let mut slow = Vec::new();
    let generic = Rings {
        desc: Part {
            guest: 0,
            host: None,
        },
        ..Rings::new(&mem, size, 0, avail, used)
    };
    generic.chain(head, &mut slow);
    assert_eq!(slow, theirs);
    Some(theirs.len())
}
