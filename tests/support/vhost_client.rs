//! A small vhost-user-blk frontend (the driver side) on the rust-vmm crates,
//! for tests and benchmarks: it drives any vhost-user-blk backend
//! (blkshim's, qemu-storage-daemon's) from userspace, with no guest.
//!
//! Guest memory is one sealed-size, shared memfd mapped once (vm-memory),
//! at guest-physical address 0. Each queue gets a split virtqueue laid out
//! by hand in that memory (descriptor table, avail ring, used ring), then a
//! page of request headers and status bytes, then one data buffer per
//! request slot (4096-aligned, so O_DIRECT backends need no bounce).
//!
//! A request is a chain of 3 descriptors (header, data, status; 2 for a
//! flush), always from its slot's own three descriptors `3 * slot ..`.
//!
//! Included with `#[path = ...] mod vhost_client;` by tests/vhost_client.rs
//! and examples/vhost_blk_load.rs.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const SECTOR: u64 = 512;
const PAGE: u64 = 4096;
/// The part of `struct virtio_blk_config` read with GET_CONFIG (up to and
/// including `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// How long each vhost-user message of the setup may wait for its answer.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// virtio-blk request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqType {
    In,
    Out,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
    GetId,
}

impl ReqType {
    fn code(self) -> u32 {
        match self {
            ReqType::In => VIRTIO_BLK_T_IN,
            ReqType::Out => VIRTIO_BLK_T_OUT,
            ReqType::Flush => VIRTIO_BLK_T_FLUSH,
            ReqType::Discard => VIRTIO_BLK_T_DISCARD,
            ReqType::WriteZeroes { .. } => VIRTIO_BLK_T_WRITE_ZEROES,
            ReqType::GetId => VIRTIO_BLK_T_GET_ID,
        }
    }
}

/// The device's config space, as GET_CONFIG returned it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub wce: u8,
}

impl BlkConfig {
    fn parse(b: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        BlkConfig {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            wce: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }
}

/// `VHOST_F_LOG_ALL`: the backend logs its writes to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The dirty log a backend writes during a migration (qemu's layout: bit
/// `n % 8` of byte `n / 8` for the guest page `n`).
pub struct DirtyLog {
    file: File,
}

impl DirtyLog {
    /// Whether the backend logged the page holding guest address `gpa`.
    pub fn is_dirty(&self, gpa: u64) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let page = gpa / PAGE;
        let mut b = [0u8; 1];
        self.file.read_exact_at(&mut b, page / 8)?;
        Ok(b[0] & (1 << (page % 8)) != 0)
    }

    /// Clear every bit (qemu does so as it sends the pages).
    pub fn clear(&self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata()?.len() as usize;
        self.file.write_all_at(&vec![0u8; len], 0)
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub queues: usize,
    /// Descriptors per queue (a power of two, at least `3 * slots`).
    pub queue_size: u16,
    /// Requests in flight per queue at most (each with its own buffer).
    pub slots: usize,
    /// Bytes of each slot's data buffer (rounded up to 4096).
    pub slot_bytes: usize,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when the backend offers it.
    pub event_idx: bool,
}

/// One descriptor, for hand-made (e.g. deliberately malformed) chains.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One harvested used-ring entry.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The slot (head descriptor / 3); `usize::MAX` for a head that was no
    /// slot's (a malformed chain's).
    pub slot: usize,
    /// The head descriptor index the backend returned.
    pub id: u32,
    /// Bytes the backend says it wrote (used.len).
    pub len: u32,
    /// The request's status byte (VIRTIO_BLK_S_*), 0xff if not written.
    pub status: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Held,
    InFlight,
}

/// The shared guest memory (one region at GPA 0).
struct Memory {
    mem: GuestMemoryMmap,
    host: *mut u8,
    size: u64,
}

// SAFETY: the mapping lives as long as `mem` and is only accessed through
// raw pointers whose disjointness each Queue maintains (one owner per
// queue's ring and slots); GuestMemoryMmap itself is Send + Sync.
unsafe impl Send for Memory {}
// SAFETY: as for Send: shared access never aliases a queue's own area.
unsafe impl Sync for Memory {}

/// One virtqueue of the device, with its slots. Owned by one thread at a
/// time (`&mut`), so a load generator drives each queue from its thread.
pub struct Queue {
    index: usize,
    size: u16,
    mem: Arc<Memory>,
    desc: u64,
    avail: u64,
    used: u64,
    /// Headers (16 bytes per slot), then status bytes (one per slot).
    meta: u64,
    data: u64,
    slot_bytes: usize,
    slots: Vec<SlotState>,
    free: Vec<usize>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    /// Completions harvested while waiting for a specific one.
    stash: Vec<Completion>,
}

impl Queue {
    fn host(&self, gpa: u64) -> *mut u8 {
        assert!(gpa < self.mem.size);
        // SAFETY: gpa is inside the mapping (asserted), which is mapped for
        // `size` bytes at `host`.
        unsafe { self.mem.host.add(gpa as usize) }
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        assert!(gpa % 2 == 0);
        // SAFETY: 2-aligned, inside the mapping, which outlives &self; the
        // backend may write it concurrently, hence the atomic.
        unsafe { &*(self.host(gpa) as *const AtomicU16) }
    }

    fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa + bytes.len() as u64 <= self.mem.size);
        // SAFETY: in bounds (asserted); the area is this queue's and no
        // request in flight uses it (callers write only their slot's).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host(gpa), bytes.len()) }
    }

    fn read_bytes(&self, gpa: u64, out: &mut [u8]) {
        assert!(gpa + out.len() as u64 <= self.mem.size);
        // SAFETY: in bounds (asserted); the request that filled it has
        // completed, so the backend no longer writes it.
        unsafe { std::ptr::copy_nonoverlapping(self.host(gpa), out.as_mut_ptr(), out.len()) }
    }

    pub fn index(&self) -> usize {
        self.index
    }
    pub fn slots(&self) -> usize {
        self.slots.len()
    }
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| **s == SlotState::InFlight)
            .count()
    }

    /// Guest-physical addresses of a slot's header (16 bytes), data buffer
    /// (`slot_bytes`) and status byte, for hand-made chains.
    pub fn header_gpa(&self, slot: usize) -> u64 {
        self.meta + 16 * slot as u64
    }
    pub fn status_gpa(&self, slot: usize) -> u64 {
        self.meta + 16 * self.slots.len() as u64 + slot as u64
    }
    pub fn data_gpa(&self, slot: usize) -> u64 {
        self.data + (slot * self.slot_bytes) as u64
    }
    /// Guest-physical address of the used ring (its own page).
    pub fn used_gpa(&self) -> u64 {
        self.used
    }
    /// The first of a slot's three descriptor indices (its chain's head).
    pub fn desc_index(&self, slot: usize) -> u16 {
        (3 * slot) as u16
    }
    pub fn queue_size(&self) -> u16 {
        self.size
    }
    /// Bytes of guest memory (GPAs at or past this are outside it).
    pub fn mem_size(&self) -> u64 {
        self.mem.size
    }

    /// Takes a free slot (None when all are held or in flight).
    pub fn alloc(&mut self) -> Option<usize> {
        let s = self.free.pop()?;
        self.slots[s] = SlotState::Held;
        Some(s)
    }

    /// Gives a held (completed) slot back.
    pub fn release(&mut self, slot: usize) {
        assert_eq!(self.slots[slot], SlotState::Held, "slot {slot} not held");
        self.slots[slot] = SlotState::Free;
        self.free.push(slot);
    }

    /// A held slot's data buffer.
    pub fn buf_mut(&mut self, slot: usize) -> &mut [u8] {
        assert_eq!(self.slots[slot], SlotState::Held, "slot {slot} not held");
        let p = self.host(self.data_gpa(slot));
        // SAFETY: the slot's buffer is inside the mapping, belongs to this
        // slot alone, and the slot is not in flight (asserted), so nothing
        // else reads or writes it while the &mut borrow of self lasts.
        unsafe { std::slice::from_raw_parts_mut(p, self.slot_bytes) }
    }

    fn write_desc(&self, i: u16, d: RawDesc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.write_bytes(self.desc + 16 * u64::from(i % self.size), &b);
    }

    /// Writes a slot's request header.
    pub fn write_header(&self, slot: usize, type_: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write_bytes(self.header_gpa(slot), &h);
    }

    /// Publishes `idx` as the avail ring's index as it is (a broken or
    /// hostile driver's), without putting any head in the ring.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        fence(Ordering::Release);
        self.u16_at(self.avail + 2)
            .store(idx.to_le(), Ordering::Release);
    }

    /// Puts `head` in the avail ring (not yet kicked).
    pub fn publish_head(&mut self, head: u16) {
        let slot_pos = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.u16_at(slot_pos).store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        self.u16_at(self.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// Submits a request from a held slot: header, the slot's data buffer
    /// (`len` bytes: device-writable for In/GetId, readable otherwise; none
    /// for Flush), status. Discard and WriteZeroes take `offset`/`len` as
    /// the range and send one segment. Call `kick` after a batch.
    pub fn submit(&mut self, slot: usize, req: ReqType, offset: u64, len: usize) {
        assert_eq!(self.slots[slot], SlotState::Held, "slot {slot} not held");
        let mut data_len = len;
        let mut sector = offset / SECTOR;
        match req {
            ReqType::Discard | ReqType::WriteZeroes { .. } => {
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&(offset / SECTOR).to_le_bytes());
                seg[8..12].copy_from_slice(&((len as u64 / SECTOR) as u32).to_le_bytes());
                let flags: u32 = matches!(req, ReqType::WriteZeroes { unmap: true }) as u32;
                seg[12..16].copy_from_slice(&flags.to_le_bytes());
                self.write_bytes(self.data_gpa(slot), &seg);
                data_len = 16;
                sector = 0;
            }
            ReqType::GetId => {
                data_len = VIRTIO_BLK_ID_BYTES as usize;
                sector = 0;
            }
            ReqType::Flush => {
                data_len = 0;
                sector = 0;
            }
            ReqType::In | ReqType::Out => {}
        }
        assert!(data_len <= self.slot_bytes, "{data_len} > slot size");
        self.write_header(slot, req.code(), sector);
        self.write_bytes(self.status_gpa(slot), &[0xff]);
        let d0 = self.desc_index(slot);
        let next = VRING_DESC_F_NEXT as u16;
        let status = RawDesc {
            addr: self.status_gpa(slot),
            len: 1,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        };
        self.write_desc(
            d0,
            RawDesc {
                addr: self.header_gpa(slot),
                len: 16,
                flags: next,
                next: d0 + 1,
            },
        );
        if data_len == 0 {
            self.write_desc(d0 + 1, status);
        } else {
            let writable = matches!(req, ReqType::In | ReqType::GetId);
            self.write_desc(
                d0 + 1,
                RawDesc {
                    addr: self.data_gpa(slot),
                    len: data_len as u32,
                    flags: next
                        | if writable {
                            VRING_DESC_F_WRITE as u16
                        } else {
                            0
                        },
                    next: d0 + 2,
                },
            );
            self.write_desc(d0 + 2, status);
        }
        self.slots[slot] = SlotState::InFlight;
        self.publish_head(d0);
    }

    /// Submits a hand-made chain in a held slot's descriptors (at most 3,
    /// written at `desc_index(slot)..`; flags and next exactly as given),
    /// publishing the slot's head. For robustness tests.
    pub fn submit_raw(&mut self, slot: usize, chain: &[RawDesc]) {
        assert_eq!(self.slots[slot], SlotState::Held, "slot {slot} not held");
        assert!(!chain.is_empty() && chain.len() <= 3);
        let d0 = self.desc_index(slot);
        for (i, d) in chain.iter().enumerate() {
            self.write_desc(d0 + i as u16, *d);
        }
        self.write_bytes(self.status_gpa(slot), &[0xff]);
        self.slots[slot] = SlotState::InFlight;
        self.publish_head(d0);
    }

    /// Tells the backend about new avail entries if it asked to be told.
    pub fn kick(&mut self) {
        let old = self.kicked_idx;
        let new = self.avail_idx;
        if old == new {
            return;
        }
        self.kicked_idx = new;
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let ev = u16::from_le(
                self.u16_at(self.used + 4 + 8 * u64::from(self.size))
                    .load(Ordering::Acquire),
            );
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            u16::from_le(self.u16_at(self.used).load(Ordering::Acquire))
                & VRING_USED_F_NO_NOTIFY as u16
                == 0
        };
        if notify {
            self.kick.write(1).expect("kick eventfd");
        }
    }

    /// Harvests the used ring without blocking; returns how many were added.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.stash.len();
        out.append(&mut self.stash);
        n + self.harvest(out)
    }

    /// The used ring's new entries (not the stash).
    fn harvest(&mut self, out: &mut Vec<Completion>) -> usize {
        let n0 = out.len();
        let used_idx = u16::from_le(self.u16_at(self.used + 2).load(Ordering::Acquire));
        while self.last_used != used_idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let mut b = [0u8; 8];
            self.read_bytes(e, &mut b);
            let id = u32::from_le_bytes(b[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(b[4..8].try_into().unwrap());
            self.last_used = self.last_used.wrapping_add(1);
            let slot = if id % 3 == 0 && ((id / 3) as usize) < self.slots.len() {
                (id / 3) as usize
            } else {
                usize::MAX
            };
            let mut status = 0xff;
            if slot != usize::MAX {
                let mut s = [0u8];
                self.read_bytes(self.status_gpa(slot), &mut s);
                status = s[0];
                if self.slots[slot] == SlotState::InFlight {
                    self.slots[slot] = SlotState::Held;
                }
            }
            out.push(Completion {
                slot,
                id,
                len,
                status,
            });
        }
        out.len() - n0
    }

    /// Harvests, blocking on the call eventfd until at least one
    /// completion arrives or `timeout` passes (Ok(0) then).
    pub fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        if !self.stash.is_empty() {
            return Ok(self.poll(out));
        }
        self.wait_ring(out, timeout)
    }

    fn wait_ring(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.harvest(out);
            if n > 0 {
                return Ok(n);
            }
            if self.event_idx {
                // Interrupt me when the entry at last_used is written.
                self.u16_at(self.avail + 4 + 2 * u64::from(self.size))
                    .store(self.last_used.to_le(), Ordering::Release);
                fence(Ordering::SeqCst);
                let n = self.harvest(out);
                if n > 0 {
                    return Ok(n);
                }
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(0);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // Non-blocking: EAGAIN when only the timeout woke us.
            let _ = self.call.read();
        }
    }

    /// Waits for `slot`'s completion (others are kept for the next poll).
    pub fn wait_slot(&mut self, slot: usize, timeout: Duration) -> io::Result<Completion> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            if let Some(i) = self.stash.iter().position(|c| c.slot == slot) {
                return Ok(self.stash.remove(i));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no completion"));
            }
            got.clear();
            self.wait_ring(&mut got, Some(left))?;
            self.stash.append(&mut got);
        }
    }

    /// Submits one request in a fresh slot and waits for it: the slot's
    /// status, with the slot held (for reading its buffer) until released.
    fn one(
        &mut self,
        req: ReqType,
        offset: u64,
        len: usize,
        fill: &[u8],
    ) -> io::Result<(usize, Completion)> {
        let slot = self
            .alloc()
            .ok_or_else(|| io::Error::other("no free slot"))?;
        self.buf_mut(slot)[..fill.len()].copy_from_slice(fill);
        self.submit(slot, req, offset, len);
        self.kick();
        match self.wait_slot(slot, Duration::from_secs(30)) {
            Ok(c) => Ok((slot, c)),
            Err(e) => Err(e), // the slot stays in flight: never reused
        }
    }

    fn done(&mut self, req: ReqType, offset: u64, len: usize, fill: &[u8]) -> io::Result<()> {
        let (slot, c) = self.one(req, offset, len, fill)?;
        self.release(slot);
        status_result(c.status)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let step = self.slot_bytes;
        for (i, chunk) in buf.chunks_mut(step).enumerate() {
            let (slot, c) = self.one(ReqType::In, offset + (i * step) as u64, chunk.len(), &[])?;
            let n = chunk.len();
            chunk.copy_from_slice(&self.buf_mut(slot)[..n]);
            self.release(slot);
            status_result(c.status)?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let step = self.slot_bytes;
        for (i, chunk) in buf.chunks(step).enumerate() {
            self.done(ReqType::Out, offset + (i * step) as u64, chunk.len(), chunk)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.done(ReqType::Flush, 0, 0, &[])
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.done(ReqType::Discard, offset, len as usize, &[])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.done(ReqType::WriteZeroes { unmap }, offset, len as usize, &[])
    }

    /// The device id (up to 20 bytes, NUL-padded).
    pub fn get_id(&mut self) -> io::Result<Vec<u8>> {
        let (slot, c) = self.one(ReqType::GetId, 0, 0, &[])?;
        let mut id = self.buf_mut(slot)[..VIRTIO_BLK_ID_BYTES as usize].to_vec();
        self.release(slot);
        status_result(c.status)?;
        if let Some(end) = id.iter().position(|b| *b == 0) {
            id.truncate(end);
        }
        Ok(id)
    }
}

/// VIRTIO_BLK_S_* as an io::Result.
pub fn status_result(status: u8) -> io::Result<()> {
    match u32::from(status) {
        VIRTIO_BLK_S_OK => Ok(()),
        VIRTIO_BLK_S_UNSUPP => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        VIRTIO_BLK_S_IOERR => Err(io::Error::from_raw_os_error(libc::EIO)),
        _ => Err(io::Error::other(format!("virtio-blk status {status}"))),
    }
}

fn verr(what: &str, e: vhost::Error) -> io::Error {
    io::Error::other(format!("vhost-user {what}: {e}"))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// A connected vhost-user-blk frontend.
pub struct VhostBlkClient {
    frontend: Frontend,
    queues: Vec<Queue>,
    config: BlkConfig,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    mem: Arc<Memory>,
}

impl VhostBlkClient {
    /// `queues` queues of `queue_size` descriptors (slots = queue_size / 3
    /// per queue), the slots' buffers sharing `mem_bytes` of guest memory.
    pub fn connect(
        socket: impl AsRef<Path>,
        queues: usize,
        queue_size: u16,
        mem_bytes: usize,
    ) -> io::Result<Self> {
        let slots = usize::from(queue_size) / 3;
        let per_queue = mem_bytes / queues.max(1);
        let overhead =
            16 * usize::from(queue_size) + 3 * PAGE as usize + 17 * slots + PAGE as usize;
        let slot_bytes = (per_queue.saturating_sub(overhead) / slots.max(1)) / 4096 * 4096;
        if slot_bytes == 0 {
            return Err(io::Error::other("mem_bytes too small for the slots"));
        }
        Self::connect_with(
            socket,
            &ClientOptions {
                queues,
                queue_size,
                slots,
                slot_bytes,
                event_idx: true,
            },
        )
    }

    pub fn connect_with(socket: impl AsRef<Path>, o: &ClientOptions) -> io::Result<Self> {
        assert!(o.queues >= 1 && o.slots >= 1);
        assert!(
            o.queue_size.is_power_of_two(),
            "queue_size must be a power of two"
        );
        assert!(
            3 * o.slots <= usize::from(o.queue_size),
            "3 descriptors per slot"
        );
        let slot_bytes = align_up(o.slot_bytes as u64, PAGE);
        let qs = u64::from(o.queue_size);
        // Per queue: desc | avail (+used_event) | used (+avail_event) | meta | data.
        let desc_bytes = 16 * qs;
        let avail_bytes = 6 + 2 * qs;
        let used_bytes = 6 + 8 * qs;
        let meta_bytes = 17 * o.slots as u64;
        let ring_area = align_up(desc_bytes, PAGE)
            + align_up(avail_bytes, PAGE)
            + align_up(used_bytes, PAGE)
            + align_up(meta_bytes, PAGE);
        let per_queue = ring_area + slot_bytes * o.slots as u64;
        let size = per_queue * o.queues as u64;

        let mem = Arc::new(Memory::new(size)?);
        // A backend that accepts but never answers fails the setup after
        // SETUP_TIMEOUT instead of hanging the caller: a watchdog shuts the
        // socket down unless this function returned first (dropping
        // `_setup_done`). (Socket timeouts would not do: the vhost crate
        // retries a recvmsg that timed out.)
        let stream = UnixStream::connect(socket.as_ref())?;
        let guard = stream.try_clone()?;
        let (_setup_done, setup_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if setup_rx.recv_timeout(SETUP_TIMEOUT) == Err(mpsc::RecvTimeoutError::Timeout) {
                let _ = guard.shutdown(std::net::Shutdown::Both);
            }
        });
        let mut fe = Frontend::from_stream(stream, o.queues as u64);
        fe.set_owner().map_err(|e| verr("SET_OWNER", e))?;
        let offered = fe.get_features().map_err(|e| verr("GET_FEATURES", e))?;
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 || offered & pf == 0 {
            return Err(io::Error::other(format!(
                "backend features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES"
            )));
        }
        let mut want = (1u64 << VIRTIO_F_VERSION_1)
            | pf
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_RO);
        if o.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & want;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        if o.queues > 1 && features & (1 << VIRTIO_BLK_F_MQ) == 0 {
            return Err(io::Error::other("backend has no VIRTIO_BLK_F_MQ"));
        }

        let pf_offered = fe
            .get_protocol_features()
            .map_err(|e| verr("GET_PROTOCOL_FEATURES", e))?;
        let pf_acked = pf_offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD);
        fe.set_protocol_features(pf_acked)
            .map_err(|e| verr("SET_PROTOCOL_FEATURES", e))?;
        if pf_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message answered: a failure shows at its own message.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if pf_acked.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().map_err(|e| verr("GET_QUEUE_NUM", e))?;
            if (o.queues as u64) > n {
                return Err(io::Error::other(format!(
                    "backend has {n} queues, asked {}",
                    o.queues
                )));
            }
        }
        fe.set_features(features)
            .map_err(|e| verr("SET_FEATURES", e))?;

        let config = if pf_acked.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, buf) = fe
                .get_config(
                    0,
                    CONFIG_LEN as u32,
                    VhostUserConfigFlags::empty(),
                    &[0; CONFIG_LEN],
                )
                .map_err(|e| verr("GET_CONFIG", e))?;
            BlkConfig::parse(&buf)
        } else {
            BlkConfig::default()
        };
        if o.queues > 1 && config.num_queues != 0 && usize::from(config.num_queues) < o.queues {
            return Err(io::Error::other(format!(
                "config num_queues {} < {}",
                config.num_queues, o.queues
            )));
        }

        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| verr("memory region", e))?;
        fe.set_mem_table(&regions)
            .map_err(|e| verr("SET_MEM_TABLE", e))?;

        let mut queues = Vec::with_capacity(o.queues);
        for i in 0..o.queues {
            let base = per_queue * i as u64;
            let desc = base;
            let avail = desc + align_up(desc_bytes, PAGE);
            let used = avail + align_up(avail_bytes, PAGE);
            let meta = used + align_up(used_bytes, PAGE);
            let data = meta + align_up(meta_bytes, PAGE);
            let kick = EventFd::new(EFD_NONBLOCK)?;
            let call = EventFd::new(EFD_NONBLOCK)?;
            let host = |gpa: u64| mem.host as u64 + gpa;
            fe.set_vring_num(i, o.queue_size)
                .map_err(|e| verr("SET_VRING_NUM", e))?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: o.queue_size,
                    queue_size: o.queue_size,
                    flags: 0,
                    desc_table_addr: host(desc),
                    used_ring_addr: host(used),
                    avail_ring_addr: host(avail),
                    log_addr: None,
                },
            )
            .map_err(|e| verr("SET_VRING_ADDR", e))?;
            fe.set_vring_base(i, 0)
                .map_err(|e| verr("SET_VRING_BASE", e))?;
            fe.set_vring_call(i, &call)
                .map_err(|e| verr("SET_VRING_CALL", e))?;
            fe.set_vring_kick(i, &kick)
                .map_err(|e| verr("SET_VRING_KICK", e))?;
            fe.set_vring_enable(i, true)
                .map_err(|e| verr("SET_VRING_ENABLE", e))?;
            queues.push(Queue {
                index: i,
                size: o.queue_size,
                mem: mem.clone(),
                desc,
                avail,
                used,
                meta,
                data,
                slot_bytes: slot_bytes as usize,
                slots: vec![SlotState::Free; o.slots],
                free: (0..o.slots).rev().collect(),
                avail_idx: 0,
                kicked_idx: 0,
                last_used: 0,
                event_idx,
                kick,
                call,
                stash: Vec::new(),
            });
        }
        Ok(VhostBlkClient {
            frontend: fe,
            queues,
            config,
            features,
            protocol_features: pf_acked,
            mem,
        })
    }

    pub fn config(&self) -> BlkConfig {
        self.config
    }

    /// Start dirty logging as qemu does for a live migration: the features
    /// again with `VHOST_F_LOG_ALL`, then `SET_LOG_BASE` with a zeroed
    /// memfd of one bit per 4 KiB page of guest memory. Read it with
    /// [`DirtyLog::is_dirty`].
    pub fn start_dirty_log(&mut self) -> io::Result<DirtyLog> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
        {
            return Err(io::Error::other("backend has no LOG_SHMFD"));
        }
        let pages = self.mem.size.div_ceil(PAGE);
        let bytes = align_up(pages.div_ceil(8), PAGE);
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"blkshim-vhost-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes)?;
        self.frontend
            .set_features(self.features | VHOST_F_LOG_ALL)
            .map_err(|e| verr("SET_FEATURES (LOG_ALL)", e))?;
        self.frontend
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: bytes,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .map_err(|e| verr("SET_LOG_BASE", e))?;
        Ok(DirtyLog { file })
    }
    /// The virtio features acked (SET_FEATURES).
    pub fn features(&self) -> u64 {
        self.features
    }
    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }
    pub fn event_idx(&self) -> bool {
        self.has_feature(VIRTIO_RING_F_EVENT_IDX)
    }
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
    pub fn queue(&mut self, q: usize) -> &mut Queue {
        &mut self.queues[q]
    }
    /// All queues, e.g. one per scoped thread.
    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    /// The vhost-user connection, for sending further messages.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    pub fn read(&mut self, q: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.queues[q].read(offset, buf)
    }
    pub fn write(&mut self, q: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.queues[q].write(offset, buf)
    }
    pub fn flush(&mut self, q: usize) -> io::Result<()> {
        self.queues[q].flush()
    }
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> io::Result<()> {
        self.queues[q].discard(offset, len)
    }
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.queues[q].write_zeroes(offset, len, unmap)
    }
    pub fn get_id(&mut self, q: usize) -> io::Result<Vec<u8>> {
        self.queues[q].get_id()
    }
}

impl Memory {
    /// A memfd of `size` bytes, its size sealed, mapped shared once.
    fn new(size: u64) -> io::Result<Self> {
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe {
            libc::memfd_create(
                c"blkshim-vhost-client".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: fcntl on our own fd with valid seal flags.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
        let host = mem
            .find_region(GuestAddress(0))
            .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
            .ok_or_else(|| io::Error::other("no host address"))?;
        Ok(Memory { mem, host, size })
    }
}
