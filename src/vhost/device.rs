//! The virtio-blk device of one frontend connection: the
//! [`VhostUserBackend`] that pops descriptor chains, submits them through
//! the core [`Disk`] as this connection's [`Writer`], and completes them
//! into guest memory.
//!
//! Guest memory is `GuestMemoryMmap<BitmapMmapRegion>`: once qemu sends
//! `VHOST_USER_SET_LOG_BASE` (live migration, `VHOST_F_LOG_ALL` +
//! `LOG_SHMFD`), every write the device makes into guest memory through
//! vm-memory (read data, get-id, status bytes, the used ring) also sets the
//! page's bit in qemu's dirty log, so qemu re-sends those pages.

use super::request::{self, Desc, Limits, Op, Refusal, Request};
use super::ring::{self, Rings};
use crate::handoff::{Disk, Writer};
use crate::metrics::{DiskMetrics, Op as MetricOp, RequestTimer};
use crate::storage::{AlignedBuf, IoOutcome, LocalQueue, StorageIo};
use parking_lot::{Condvar, Mutex};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory with qemu's dirty log behind it.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;

/// A queue of the device.
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// `VHOST_F_LOG_ALL`: the device logs its writes to guest memory.
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Largest read or write (as NBD's): bigger ones get IOERR.
pub const MAX_DATA: u64 = 32 << 20;
/// `size_max`: largest segment.
const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes segment, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// How long `GET_VRING_BASE` waits for a queue's requests in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Device settings shared by every connection of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// `num_queues` offered (qemu's `num-queues` may use fewer).
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            num_queues: 2,
            queue_size: 256,
        }
    }
}

/// Reused payload buffers of one connection, by power-of-two size class:
/// a fresh buffer is zeroed (a 1 MiB write zeroed 1 MiB, then copied
/// 1 MiB in) and, when big, costs an mmap and a page fault per page. A
/// reused one is only overwritten (by the guest's data, or by the read).
#[derive(Default)]
struct BufPool {
    classes: Mutex<Vec<Vec<AlignedBuf>>>,
}

/// Buffers kept per size class.
const POOL_PER_CLASS: usize = 256;
/// Largest buffer kept (bigger ones are rare: `size_max` is 1 MiB).
const POOL_MAX_CAP: usize = 4 << 20;

impl BufPool {
    /// The size class of a `len`-byte request and its capacity.
    fn class(len: usize) -> (usize, usize) {
        let cap = len.max(4096).next_power_of_two();
        (cap.trailing_zeros() as usize, cap)
    }

    /// A buffer of `len` bytes with unspecified (not necessarily zero)
    /// contents: the caller overwrites all of it.
    fn get(&self, len: usize) -> AlignedBuf {
        let (class, cap) = Self::class(len);
        let reused = self.classes.lock().get_mut(class).and_then(Vec::pop);
        let mut b = reused.unwrap_or_else(|| AlignedBuf::zeroed(cap));
        // Shrinking: no bytes are zeroed.
        b.set_len(len);
        b
    }

    fn put(&self, mut b: AlignedBuf) {
        if b.is_borrowed() {
            return;
        }
        let cap = b.capacity();
        if cap > POOL_MAX_CAP || !cap.is_power_of_two() || cap < 4096 {
            return;
        }
        // Full length while pooled, so the next `get` only shrinks it
        // (zeroes bytes only the first time a shorter request used it).
        b.set_len(cap);
        let class = cap.trailing_zeros() as usize;
        let mut classes = self.classes.lock();
        if classes.len() <= class {
            classes.resize_with(class + 1, Vec::new);
        }
        if classes[class].len() < POOL_PER_CLASS {
            classes[class].push(b);
        }
    }
}

/// Requests of one queue popped and not yet completed.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn add(&self, n: usize) {
        *self.count.lock() += n;
    }

    fn done(&self, n: usize) {
        let mut c = self.count.lock();
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Wait until nothing is in flight; false at the timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = self.count.lock();
        while *c > 0 {
            if self.idle.wait_until(&mut c, deadline).timed_out() {
                return *c == 0;
            }
        }
        true
    }
}

/// A queue's completion event: the worker's io_uring signals it when
/// requests finish (edge-triggered in the worker's epoll set, so it is
/// never read).
struct CompletionEvent {
    fd: EventFd,
    /// In its worker's epoll set ([`BlkDevice::attach`]): only then may the
    /// worker take a queue of its own (nothing else would reap it).
    registered: AtomicBool,
}

thread_local! {
    /// The state of the queue worker running on this thread.
    static WORKER: Worker = Worker::default();
}

/// A queue worker's own I/O queue and the chains it finished meanwhile.
///
/// With a [`LocalQueue`], the worker's requests are submitted by its own
/// io_uring (one `io_uring_enter` per batch of chains) and completed on
/// the worker itself when the ring signals the queue's [`CompletionEvent`]:
/// no hop to the engine's reaper thread per request. While the worker
/// handles an event, the chains it completes are collected and put in the
/// used ring together at the end, under one lock, with one signal to the
/// driver. Completions running on any other thread (the engine's reaper, a
/// request the tracker held back and another thread released) publish
/// their chain at once, as before.
#[derive(Default)]
struct Worker {
    /// Declared first: dropped (waiting for its requests, completing them
    /// at once) before `batch` when the worker thread exits.
    queue: RefCell<Option<Box<dyn LocalQueue>>>,
    tried: Cell<bool>,
    /// `Some` while the worker handles an event.
    batch: RefCell<Option<Vec<(Completion, u32)>>>,
    spare: RefCell<Vec<(Completion, u32)>>,
    /// Publish the batch every [`PUBLISH_EARLY_EVERY`] chains, not only at
    /// the end of the event: see [`BlkDevice::publish_early`].
    publish_early: Cell<bool>,
}

impl Worker {
    /// Collect this thread's completions from now on.
    fn begin(&self, publish_early: bool) {
        self.publish_early.set(publish_early);
        if let Ok(mut b) = self.batch.try_borrow_mut() {
            if b.is_none() {
                let spare = self
                    .spare
                    .try_borrow_mut()
                    .map(|mut s| std::mem::take(&mut *s))
                    .unwrap_or_default();
                *b = Some(spare);
            }
        }
    }

    /// Keep `c` for [`Worker::end`] if collecting; else hand it back.
    fn defer(&self, c: Completion, len: u32) -> Option<(Completion, u32)> {
        match self.batch.try_borrow_mut() {
            Ok(mut b) => match b.as_mut() {
                Some(v) => {
                    v.push((c, len));
                    if v.len() >= PUBLISH_EARLY_EVERY
                        && self.publish_early.get()
                        && BUSY_WORKERS.load(Ordering::Relaxed) < cpus()
                    {
                        publish(v);
                        v.clear();
                    }
                    None
                }
                None => Some((c, len)),
            },
            Err(_) => Some((c, len)),
        }
    }

    /// Submit what is queued and run what finished (no waiting).
    fn reap(&self, label: &str) {
        if let Ok(q) = self.queue.try_borrow() {
            if let Some(q) = q.as_ref() {
                if let Err(e) = q.reap() {
                    log::warn!("{label}: I/O queue: {e}");
                }
            }
        }
    }

    /// Stop collecting and publish what was collected.
    fn end(&self) {
        let taken = self.batch.try_borrow_mut().ok().and_then(|mut b| b.take());
        if let Some(mut v) = taken {
            publish(&v);
            v.clear();
            if let Ok(mut spare) = self.spare.try_borrow_mut() {
                *spare = v;
            }
        }
    }
}

/// Largest request read into or written from guest memory in place under
/// O_DIRECT. Bigger ones go through a pooled buffer: a 1 MiB write from
/// the guest's memfd pages measured 5 % slower than from a pooled buffer
/// (3 interleaved rounds); the device takes at most 254 segments, and
/// scattered guest pages split such a request where the pool's mostly
/// contiguous pages do not.
const WINDOW_DIRECT_MAX: usize = 64 << 10;

/// Chains per early publication (see [`BlkDevice::publish_early`]).
const PUBLISH_EARLY_EVERY: usize = 2;

/// Queue workers of every device handling an event right now.
static BUSY_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// The CPUs this process may run on.
fn cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Put finished chains in their used rings: consecutive chains of one
/// queue under one lock, and one signal to the driver for them (when it
/// wants one).
fn publish(done: &[(Completion, u32)]) {
    let mut rest = done;
    while let Some((first, _)) = rest.first() {
        let n = rest
            .iter()
            .take_while(|(c, _)| Arc::ptr_eq(&c.in_flight, &first.in_flight))
            .count();
        let notify = {
            let mut state = first.vring.get_mut();
            let q = state.get_queue_mut();
            // The memory table as it is now (as virtio-queue's `add_used`
            // did): the used ring's address is the guest's, and qemu may
            // have replaced the table since the chains were popped.
            let current = first.shared.mem.memory();
            let mem: &Mem = &current;
            let rings = Rings::new(mem, q.size(), q.desc_table(), q.avail_ring(), q.used_ring());
            let old = q.next_used();
            let mut slot = old;
            for (c, len) in &rest[..n] {
                if c.head >= q.size() {
                    log::warn!(
                        "vhost-user-blk: used ring: chain {} is not in a queue of {}",
                        c.head,
                        q.size()
                    );
                    continue;
                }
                if !rings.put_used(slot, c.head, *len) {
                    log::warn!("vhost-user-blk: used ring: not guest memory");
                    continue;
                }
                slot = slot.wrapping_add(1);
            }
            if !rings.set_used_idx(slot) {
                log::warn!("vhost-user-blk: used ring index: not guest memory");
            }
            q.set_next_used(slot);
            // Orders the index before `used_event` is read (a driver that
            // re-armed meanwhile is seen), and the writes before the dirty
            // log's flag (see `log_written`).
            log_written(&first.shared, mem, rings.used_written(old, slot));
            if first.event_idx && slot != old {
                rings
                    .used_event()
                    .is_none_or(|e| ring::need_event(e, slot, old))
            } else {
                slot != old
            }
        };
        if notify {
            if let Err(e) = first.vring.signal_used_queue() {
                log::debug!("vhost-user-blk: signalling the driver: {e}");
            }
        }
        first.in_flight.done(n);
        rest = &rest[n..];
    }
}

/// Counters of a connection, for `ctl status` and the tests.
#[derive(Default, Debug)]
pub struct DeviceStats {
    pub requests: AtomicU64,
    pub refused_stale: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
}

/// The part of a device its requests' completions use, behind one `Arc`.
struct DeviceShared {
    label: Arc<str>,
    stats: Arc<DeviceStats>,
    /// Stale refusals are logged once per burst.
    stale_logged: LogBurst,
    pool: BufPool,
    /// VHOST_F_LOG_ALL acked (a migration is copying RAM): the device's
    /// writes to guest memory are marked in qemu's dirty log.
    log_all: AtomicBool,
    /// The frontend's memory table, as it changes.
    mem: GuestMemoryAtomic<Mem>,
}

/// One frontend connection's device.
pub struct BlkDevice {
    disk: Arc<Disk>,
    /// `None`: the socket's epoch is below the disk's (fenced): every
    /// request is answered IOERR.
    writer: Option<Writer>,
    label: Arc<str>,
    opts: DeviceOptions,
    limits: Limits,
    features: u64,
    config: Vec<u8>,
    mem: GuestMemoryAtomic<Mem>,
    event_idx: AtomicBool,
    /// What completions need (one reference per request).
    shared: Arc<DeviceShared>,
    in_flight: Vec<Arc<InFlight>>,
    next_tag: AtomicU64,
    pub stats: Arc<DeviceStats>,
    /// The disk's request metrics (`--metrics`), as NBD connections count.
    metrics: Option<Arc<DiskMetrics>>,
    /// Per queue: its worker's completion event.
    completions: Vec<CompletionEvent>,
    /// Set by [`BlkDevice::quiesce`]: kicks no longer pop requests.
    quiesced: AtomicBool,
    /// Workers popping chains right now, which `quiesce` waits out.
    popping: AtomicUsize,
    /// Per queue: its available ring was found invalid (an index further
    /// ahead than the queue is long). The queue is served no more until the
    /// frontend stops and restarts it: popping it again would fail again,
    /// as fast as the driver kicks.
    ring_broken: Vec<AtomicBool>,
    /// Other errors reading an available ring are logged once per burst.
    ring_error_logged: LogBurst,
    /// Submit each popped read or write to the storage at once rather
    /// than with its batch, with O_DIRECT, while fewer workers are busy
    /// than there are CPUs. A batch submitted together is completed
    /// together by the device, answered together, and comes back together:
    /// a convoy that leaves the device idle between batches (one signal per
    /// ~31 requests on one queue). Submitting each request breaks it up:
    /// 4 KiB QD32 on one queue, randread 68k -> 78k IOPS, randwrite 60k ->
    /// 75k, each ahead in 5 of 5 interleaved rounds (README). With four
    /// queues on two CPUs every worker is busy, the device is kept full
    /// anyway and a submission per request only costs: batched then
    /// (randread j4 124k -> 134k, ahead in 6 of 7 rounds; randwrite j4
    /// lost 86k -> 68k when its writes went one by one). Through the page
    /// cache every request costs CPU, not device time: always batched.
    at_once: bool,
    /// Through the page cache, where a request completes inside its
    /// submission: publish the chains a worker completes every
    /// [`PUBLISH_EARLY_EVERY`], not all at the end of the event, while
    /// fewer workers are busy than there are CPUs. Published at the end,
    /// the whole queue (32 chains) went back to the driver at once, which
    /// then refilled it at once: the driver and the device took turns,
    /// each idle while the other worked. Handed back two at a time, the
    /// driver refills while the worker still serves (4 KiB QD32 one queue,
    /// randread 200k -> 350k IOPS, randwrite 180k -> 300k). With every CPU
    /// busy (four queues on two CPUs) there is no idle time to fill and
    /// each early signal only costs: off then (randread j4 480k either
    /// way, 350k had it stayed on). Under O_DIRECT the device groups
    /// completions itself, and early publication measured no better.
    publish_early: bool,
    /// Alignment a guest buffer needs to be used in place (the engine's
    /// under O_DIRECT, none through the page cache), and the largest
    /// request that is: see `guest_window`.
    window_align: usize,
    window_max: usize,
}

impl BlkDevice {
    pub fn new(
        disk: Arc<Disk>,
        writer: Option<Writer>,
        label: String,
        opts: DeviceOptions,
        mem: GuestMemoryAtomic<Mem>,
        metrics: Option<Arc<DiskMetrics>>,
    ) -> BlkDevice {
        let caps = disk.capabilities();
        let block = caps.alignment.max(512);
        let limits = Limits {
            capacity: disk.size(),
            block,
            max_data: MAX_DATA,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: 1,
        };
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VHOST_F_LOG_ALL
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if caps.discard {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        let config = config_space(&limits, opts, caps.discard);
        let n = usize::from(opts.num_queues.max(1));
        let completions = (0..n)
            .map_while(|_| match EventFd::new(EFD_NONBLOCK) {
                Ok(fd) => Some(CompletionEvent {
                    fd,
                    registered: AtomicBool::new(false),
                }),
                Err(e) => {
                    log::warn!("{label}: completion event: {e}; using the shared I/O queue");
                    None
                }
            })
            .collect();
        let label: Arc<str> = label.into();
        let stats = Arc::new(DeviceStats::default());
        let shared = Arc::new(DeviceShared {
            label: Arc::clone(&label),
            stats: Arc::clone(&stats),
            stale_logged: LogBurst::default(),
            pool: BufPool::default(),
            log_all: AtomicBool::new(false),
            mem: mem.clone(),
        });
        BlkDevice {
            disk,
            writer,
            label,
            opts,
            limits,
            features,
            config,
            mem,
            event_idx: AtomicBool::new(false),
            shared,
            in_flight: (0..n).map(|_| Arc::new(InFlight::default())).collect(),
            next_tag: AtomicU64::new(1),
            stats,
            metrics,
            completions,
            quiesced: AtomicBool::new(false),
            popping: AtomicUsize::new(0),
            ring_broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            ring_error_logged: LogBurst::default(),
            at_once: caps.direct,
            publish_early: !caps.direct,
            window_align: if caps.direct {
                usize::try_from(block).unwrap_or(4096)
            } else {
                1
            },
            window_max: if caps.direct {
                WINDOW_DIRECT_MAX
            } else {
                usize::MAX
            },
        }
    }

    /// Stop popping requests, and wait until every popped one is in its used
    /// ring; false at the timeout. Before the connection is cut (`ctl
    /// vhost-remove`, the server stopping): a frontend that loses its backend
    /// takes the used index as where to resume (qemu, with no inflight
    /// region, sets the next backend's avail index to it), so a request
    /// popped and not yet completed would be served twice (once late by
    /// this connection, once by the next) and one completed out of order
    /// would be skipped. Requests made available after this stay in the
    /// ring for the next connection.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.quiesced.store(true, Ordering::SeqCst);
        // A worker either saw the flag, or counted itself in `popping`
        // before it looked (both SeqCst): wait for the latter to leave.
        while self.popping.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.drain(deadline.saturating_duration_since(Instant::now()))
    }

    /// The writer's epoch, if registered.
    pub fn epoch(&self) -> Option<u64> {
        self.writer.as_ref().map(Writer::epoch)
    }

    /// The event id of the queue workers' completion events (ids up to
    /// `num_queues` are the daemon's).
    fn completion_event(&self) -> u16 {
        self.opts.num_queues.max(1).saturating_add(1)
    }

    /// Add each queue's completion event to its worker's epoll set, so the
    /// workers may submit through queues of their own (see `Worker`).
    /// Before the daemon starts; a worker without it uses the shared queue.
    pub fn attach(&self, daemon: &VhostUserDaemon<Arc<BlkDevice>>) {
        let handlers = daemon.get_epoll_handlers();
        for (ev, h) in self.completions.iter().zip(handlers.iter()) {
            match h.register_listener(
                ev.fd.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(self.completion_event()),
            ) {
                Ok(()) => ev.registered.store(true, Ordering::Release),
                Err(e) => log::warn!(
                    "{}: completion event: {e}; using the shared I/O queue",
                    self.label
                ),
            }
        }
    }

    /// On the worker thread of `queue`: take a queue of its own, once.
    fn local_queue(&self, w: &Worker, queue: usize) {
        if w.tried.replace(true) {
            return;
        }
        let Some(ev) = self.completions.get(queue) else {
            return;
        };
        if !ev.registered.load(Ordering::Acquire) {
            return;
        }
        match self.disk.local_queue() {
            Ok(Some(q)) => match q.notify_eventfd(ev.fd.as_raw_fd()) {
                Ok(()) => {
                    if let Ok(mut slot) = w.queue.try_borrow_mut() {
                        *slot = Some(q);
                    }
                }
                Err(e) => log::info!(
                    "{}: queue {queue}: no completion event for its I/O queue ({e}); using the shared one",
                    self.label
                ),
            },
            Ok(None) => {}
            Err(e) => log::warn!(
                "{}: queue {queue}: no I/O queue of its own ({e}); using the shared one",
                self.label
            ),
        }
    }

    /// Wait until every queue's requests completed (after the frontend left).
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.in_flight
            .iter()
            .all(|f| f.wait_idle(deadline.saturating_duration_since(Instant::now())))
    }

    /// Pop every available chain of `vring` and start it; false if the
    /// available ring is invalid (the queue is then marked broken).
    fn process_queue(&self, queue: usize, vring: &Vring) -> bool {
        let mem = self.mem.memory().into_inner();
        let mut heads: Vec<u16> = Vec::new();
        // Built under the queue's lock (its addresses), used after it too:
        // it only borrows `mem`.
        let rings = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            if !q.ready() || q.avail_ring() == 0 {
                // A kick the worker took just as the frontend stopped the
                // ring (GET_VRING_BASE): the next start comes with a kick
                // of its own.
                log::debug!("{}: queue {queue}: kicked while not ready", self.label);
                return false;
            }
            let (size, avail) = (q.size(), q.avail_ring());
            let rings = Rings::new(&mem, size, q.desc_table(), avail, q.used_ring());
            let Some(idx) = rings.avail_idx() else {
                if self.ring_error_logged.first() {
                    log::warn!(
                        "{}: queue {queue}: cannot read the available ring at {avail:#x}: not guest memory",
                        self.label
                    );
                }
                return false;
            };
            let mut slot = q.next_avail();
            if idx.wrapping_sub(slot) > size {
                let first = self
                    .ring_broken
                    .get(queue)
                    .is_some_and(|b| !b.swap(true, Ordering::AcqRel));
                if first {
                    log::error!(
                        "{}: queue {queue}: the available ring's index is further ahead than the queue is long; the queue is not served again until the frontend restarts it",
                        self.label
                    );
                }
                return false;
            }
            while slot != idx {
                let Some(head) = rings.avail_head(slot) else {
                    break;
                };
                heads.push(head);
                slot = slot.wrapping_add(1);
            }
            q.set_next_avail(slot);
            rings
        };
        let in_flight = &self.in_flight[queue.min(self.in_flight.len() - 1)];
        in_flight.add(heads.len());
        let mut descs: Vec<Desc> = Vec::with_capacity(4);
        for head in heads {
            descs.clear();
            rings.chain(head, &mut descs);
            let mut read = |addr: u64, buf: &mut [u8]| ring::read(&mem, addr, buf);
            let parsed = request::parse(&descs, &mut read, &self.limits);
            self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
            let done = Completion {
                mem: Arc::clone(&mem),
                vring: vring.clone(),
                head,
                event_idx: self.event_idx.load(Ordering::Acquire),
                in_flight: Arc::clone(in_flight),
                shared: Arc::clone(&self.shared),
                timer: None,
                payload: 0,
            };
            match parsed {
                Ok(req) => {
                    let data = matches!(req.op, Op::Read { .. } | Op::Write { .. });
                    self.start(req, done);
                    if data && self.at_once && BUSY_WORKERS.load(Ordering::Relaxed) < cpus() {
                        // Submit it now (one io_uring_enter), not with the
                        // batch: see `at_once`.
                        let _ = WORKER.try_with(|w| w.reap(&self.label));
                    }
                }
                Err(refusal) => {
                    self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "{}: queue {queue}: chain {head} refused: {}",
                        self.label,
                        refusal.reason()
                    );
                    match refusal {
                        Refusal::Answer { addr, status, .. } => {
                            done.finish(Some(addr), status, 0, &[])
                        }
                        Refusal::NoStatus { .. } => done.finish(None, 0, 0, &[]),
                    }
                }
            }
        }
        true
    }

    /// Submit a parsed request through the disk.
    fn start(&self, req: Request, mut done: Completion) {
        let metric = match req.op {
            Op::Read { len, .. } => Some((MetricOp::Read, len)),
            Op::Write { len, .. } => Some((MetricOp::Write, len)),
            Op::Flush => Some((MetricOp::Flush, 0)),
            Op::Discard { .. } => Some((MetricOp::Trim, 0)),
            Op::WriteZeroes { .. } => Some((MetricOp::WriteZeroes, 0)),
            Op::GetId => None,
        };
        if let Some((op, payload)) = metric {
            done.timer = DiskMetrics::start(&self.metrics, op);
            done.payload = payload;
        }
        let Some(writer) = &self.writer else {
            self.note_stale(&req.op);
            return done.finish(Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0, &[]);
        };
        let io = match req.op {
            Op::GetId => {
                let name = self.disk.name().as_bytes();
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = name.len().min(id.len());
                id[..n].copy_from_slice(&name[..n]);
                let mut off = 0usize;
                let mut ok = true;
                for s in &req.data {
                    let len = s.len as usize;
                    ok &= ring::write(&done.mem, s.addr, &id[off..off + len]);
                    off += len;
                }
                let status = if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                return done.finish(Some(req.status), status as u8, off as u32, &req.data);
            }
            Op::Read { offset, len } => StorageIo::Read {
                offset,
                buf: self
                    .window(&done.mem, &req.data)
                    .unwrap_or_else(|| self.shared.pool.get(len as usize)),
            },
            Op::Write { offset, len } => {
                let buf = match self.window(&done.mem, &req.data) {
                    Some(window) => window,
                    None => match self.gather(&done.mem, &req.data, len) {
                        Some(buf) => buf,
                        None => {
                            return done.finish(Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0, &[])
                        }
                    },
                };
                StorageIo::Write {
                    offset,
                    buf,
                    fua: false,
                }
            }
            Op::Flush => StorageIo::Flush,
            Op::Discard { offset, len } => StorageIo::Discard { offset, len },
            Op::WriteZeroes { offset, len, unmap } => StorageIo::WriteZeroes {
                offset,
                len,
                may_unmap: unmap,
            },
        };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let epoch = writer.epoch();
        let op = req.op;
        self.disk.submit(
            writer,
            tag,
            io,
            Box::new(move |outcome: IoOutcome| {
                let shared = Arc::clone(&done.shared);
                let mut written = 0u32;
                let status = match outcome.result {
                    Ok(()) => {
                        if let (Op::Read { .. }, Some(buf)) = (op, &outcome.buf) {
                            match deliver_read(&done.mem, buf, &req.data) {
                                Some(n) => {
                                    written = n;
                                    VIRTIO_BLK_S_OK
                                }
                                None => VIRTIO_BLK_S_IOERR,
                            }
                        } else {
                            VIRTIO_BLK_S_OK
                        }
                    }
                    Err(e) => {
                        let label = &shared.label;
                        if e.raw_os_error() == Some(libc::EPERM) {
                            shared.stats.refused_stale.fetch_add(1, Ordering::Relaxed);
                            if shared.stale_logged.first() {
                                log::warn!(
                                    "{label}: {op:?} refused: epoch {epoch} is fenced (a newer writer took the disk); answered IOERR"
                                );
                            }
                        } else {
                            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                            log::warn!("{label}: {op:?} failed: {e}");
                        }
                        VIRTIO_BLK_S_IOERR
                    }
                };
                if let Some(buf) = outcome.buf {
                    shared.pool.put(buf);
                }
                let dirty = if written > 0 { &req.data[..] } else { &[] };
                done.finish(Some(req.status), status as u8, written, dirty);
            }),
        );
    }

    /// The request's data as a window on guest memory, if this device's
    /// engine can use it in place (see `guest_window`).
    fn window(&self, mem: &Arc<Mem>, segs: &[request::Segment]) -> Option<AlignedBuf> {
        guest_window(mem, segs, self.window_align, self.window_max)
    }

    /// Copy a write's segments into a pooled buffer; `None` (logged) when
    /// one is not guest memory.
    fn gather(&self, mem: &Mem, segs: &[request::Segment], len: u64) -> Option<AlignedBuf> {
        let mut buf = self.shared.pool.get(len as usize);
        let mut off = 0usize;
        for s in segs {
            let end = off + s.len as usize;
            if !ring::read(mem, s.addr, &mut buf.as_mut_slice()[off..end]) {
                self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{}: write data at {:#x} is not guest memory",
                    self.label,
                    s.addr
                );
                self.shared.pool.put(buf);
                return None;
            }
            off = end;
        }
        Some(buf)
    }

    fn note_stale(&self, op: &Op) {
        self.shared
            .stats
            .refused_stale
            .fetch_add(1, Ordering::Relaxed);
        if self.shared.stale_logged.first() {
            log::warn!(
                "{}: {op:?} refused: this socket's epoch is below the disk's; answered IOERR",
                self.label
            );
        }
    }
}

/// Says whether an event is the first of its burst (none in the second
/// before it), so a flood of the same refusal logs one line a second.
#[derive(Default)]
struct LogBurst(Mutex<Option<Instant>>);

impl LogBurst {
    fn first(&self) -> bool {
        let mut last = self.0.lock();
        if last.is_some_and(|t| t.elapsed() <= Duration::from_secs(1)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// The segments as one window on guest memory, when they are contiguous in
/// this process's mapping and their start is aligned to `align`: a read or
/// write then goes between the storage and guest memory with no copy (as
/// qemu-storage-daemon's). The window holds `mem`, so the mapping outlives
/// the I/O even if the frontend replaces its memory table meanwhile.
/// `None`: copy through a pooled buffer instead.
fn guest_window(
    mem: &Arc<Mem>,
    segs: &[request::Segment],
    align: usize,
    max: usize,
) -> Option<AlignedBuf> {
    let mut start: *mut u8 = std::ptr::null_mut();
    let mut total = 0usize;
    for s in segs {
        let len = s.len as usize;
        let p = ring::host(mem, s.addr, len)?;
        if total == 0 {
            start = p;
        } else if p != start.wrapping_add(total) {
            return None;
        }
        total = total.checked_add(len)?;
    }
    let ptr = std::ptr::NonNull::new(start)?;
    if total == 0 || total > max || (start as usize) % align.max(1) != 0 {
        return None;
    }
    let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(mem) as _;
    // SAFETY: every byte of the window is in a region of `mem` (`host`
    // checked each segment), and `owner` keeps those mappings alive.
    Some(unsafe { AlignedBuf::borrowed(ptr, total, owner) })
}

/// Mark guest memory the device wrote in qemu's dirty log while
/// `VHOST_F_LOG_ALL` is on (a migration copies RAM), so qemu re-sends those
/// pages. The fence orders the writes before the flag's load: a write that
/// finds logging off was visible before qemu's SET_FEATURES(LOG_ALL) was
/// answered, so before the RAM copy started. Ranges in two regions were
/// written (and marked) by vm-memory itself (`ring::write`'s fallback).
fn log_written(shared: &DeviceShared, mem: &Mem, ranges: impl IntoIterator<Item = (u64, usize)>) {
    fence(Ordering::SeqCst);
    if !shared.log_all.load(Ordering::Relaxed) {
        return;
    }
    for (addr, len) in ranges {
        if let Ok(slice) = mem.get_slice(GuestAddress(addr), len) {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Put a finished read's data in the guest's segments: copied from a
/// pooled buffer, or already there (read in place). The bytes written,
/// `None` on a bad address. The caller logs the segments as dirty.
fn deliver_read(mem: &Mem, buf: &AlignedBuf, segs: &[request::Segment]) -> Option<u32> {
    if buf.is_borrowed() {
        return u32::try_from(buf.len()).ok();
    }
    scatter(mem, buf.as_slice(), segs)
}

/// Copy `data` into the segments; the bytes written, `None` on a bad address.
fn scatter(mem: &Mem, data: &[u8], segs: &[request::Segment]) -> Option<u32> {
    let mut off = 0usize;
    for s in segs {
        let end = off.checked_add(s.len as usize)?;
        if !ring::write(mem, s.addr, data.get(off..end)?) {
            return None;
        }
        off = end;
    }
    u32::try_from(off).ok()
}

/// Everything needed to complete one chain, from any thread.
struct Completion {
    mem: Arc<Mem>,
    vring: Vring,
    head: u16,
    event_idx: bool,
    in_flight: Arc<InFlight>,
    shared: Arc<DeviceShared>,
    /// `--metrics`: the request's timer, and its payload counted on success.
    timer: Option<RequestTimer>,
    payload: u64,
}

impl Completion {
    /// Write the status byte (when there is one), log it and `dirty` (the
    /// data the device wrote) in the dirty log, put the chain in the used
    /// ring with `written` + 1 bytes, and signal the driver if it wants it.
    fn finish(
        mut self,
        status_addr: Option<u64>,
        status: u8,
        written: u32,
        dirty: &[request::Segment],
    ) {
        if let Some(t) = self.timer.take() {
            t.done(if u32::from(status) == VIRTIO_BLK_S_OK {
                self.payload
            } else {
                0
            });
        }
        let mut len = written;
        if let Some(addr) = status_addr {
            if ring::write(&self.mem, addr, &[status]) {
                len = len.saturating_add(1);
            }
        }
        let data = dirty.iter().map(|s| (s.addr, s.len as usize));
        let status = status_addr.map(|a| (a, 1));
        log_written(&self.shared, &self.mem, data.chain(status));
        // On a worker handling an event: published with the rest at its
        // end. Elsewhere (or while the worker's state is torn down): now.
        let mut pending = Some((self, len));
        let _ = WORKER.try_with(|w| {
            if let Some((c, len)) = pending.take() {
                pending = w.defer(c, len);
            }
        });
        if let Some(one) = pending {
            publish(std::slice::from_ref(&one));
        }
    }
}

/// The virtio-blk config space (virtio 1.2 5.2.4), little-endian.
fn config_space(l: &Limits, opts: DeviceOptions, discard: bool) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put = |c: &mut Vec<u8>, at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
    put(&mut c, 0, &(l.capacity / request::SECTOR).to_le_bytes());
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    let seg_max = u32::from(opts.queue_size.saturating_sub(2).max(1));
    put(&mut c, 12, &seg_max.to_le_bytes());
    put(&mut c, 20, &(l.block as u32).to_le_bytes());
    // Topology: physical block exponent 0, alignment offset 0, min_io_size
    // 1 block, opt_io_size 0 (no preference).
    put(&mut c, 26, &1u16.to_le_bytes());
    put(&mut c, 34, &opts.num_queues.max(1).to_le_bytes());
    let align = (l.block / request::SECTOR) as u32;
    if discard {
        put(&mut c, 36, &l.max_discard_sectors.to_le_bytes());
        put(&mut c, 40, &l.max_discard_seg.to_le_bytes());
        put(&mut c, 44, &align.to_le_bytes());
    }
    put(&mut c, 48, &l.max_discard_sectors.to_le_bytes());
    put(&mut c, 52, &l.max_discard_seg.to_le_bytes());
    c[56] = u8::from(discard);
    c
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues.max(1))
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No INFLIGHT_SHMFD: vhost-user-backend 0.24 answers
        // GET_INFLIGHT_FD "not supported" (see README: what reconnect loses).
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        // qemu sets VHOST_F_LOG_ALL for a live migration's RAM copy (and
        // sends the log with SET_LOG_BASE): the device's writes to guest
        // memory then also mark qemu's dirty bitmap (BitmapMmapRegion).
        let on = features & VHOST_F_LOG_ALL != 0;
        // SeqCst: pairs with `log_written`'s fence.
        if self.shared.log_all.swap(on, Ordering::SeqCst) != on {
            log::info!(
                "{}: dirty logging {} (VHOST_F_LOG_ALL)",
                self.label,
                if on { "on" } else { "off" }
            );
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let mut out = vec![0u8; size as usize];
        if start < self.config.len() {
            let n = (self.config.len() - start).min(out.len());
            out[..n].copy_from_slice(&self.config[start..start + n]);
        }
        out
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        // The same GuestMemoryAtomic as `self.mem`: the handler updated it.
        Ok(())
    }

    /// One worker thread per queue: `thread_id` is the queue's index.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|i| 1u64 << i).collect()
    }

    /// The worker threads' exit events: without them the daemon's drop
    /// (after the frontend left) would wait for its workers forever.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("{}: exit event: {e}", self.label);
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend (a migration source stopping, qemu
        // stopping the device) takes the ring's index as final, so every
        // popped request must be in the used ring first.
        // A ring stopped is set up afresh before it starts again.
        if let Some(b) = self.ring_broken.get(queue_index as usize) {
            b.store(false, Ordering::Release);
        }
        if let Some(f) = self.in_flight.get(queue_index as usize) {
            if !f.wait_idle(STOP_TIMEOUT) {
                log::warn!(
                    "{}: queue {queue_index} stopped with requests still in flight",
                    self.label
                );
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let queue = thread_id;
        let run = |w: &Worker| {
            BUSY_WORKERS.fetch_add(1, Ordering::Relaxed);
            w.begin(self.publish_early);
            self.local_queue(w, queue);
            if device_event == self.completion_event() {
                w.reap(&self.label);
            } else {
                self.handle_kick(device_event, vrings, queue);
            }
            // Submit what the batch queued (one io_uring_enter) and run
            // what is done already; the second submits what callbacks of
            // the first queued.
            w.reap(&self.label);
            w.reap(&self.label);
            w.end();
            BUSY_WORKERS.fetch_sub(1, Ordering::Relaxed);
        };
        if WORKER.try_with(run).is_err() {
            self.handle_kick(device_event, vrings, queue);
        }
        Ok(())
    }
}

impl BlkDevice {
    /// The frontend kicked a queue: pop and start what it made available.
    fn handle_kick(&self, device_event: u16, vrings: &[Vring], queue: usize) {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!("{}: event {device_event} for no queue", self.label);
            return;
        };
        if self
            .ring_broken
            .get(queue)
            .is_some_and(|b| b.load(Ordering::Acquire))
        {
            return;
        }
        let _popping = Popping::enter(self);
        if self.quiesced.load(Ordering::SeqCst) {
            return;
        }
        if self.event_idx.load(Ordering::Acquire) {
            loop {
                if let Err(e) = vring.disable_notification() {
                    log::warn!("{}: queue {queue}: {e}", self.label);
                }
                if !self.process_queue(queue, vring) {
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        log::warn!("{}: queue {queue}: {e}", self.label);
                        break;
                    }
                }
            }
        } else {
            self.process_queue(queue, vring);
        }
    }
}

/// Counts a worker in [`BlkDevice::popping`] while it pops.
struct Popping<'a>(&'a AtomicUsize);

impl<'a> Popping<'a> {
    fn enter(dev: &'a BlkDevice) -> Popping<'a> {
        dev.popping.fetch_add(1, Ordering::SeqCst);
        Popping(&dev.popping)
    }
}

impl Drop for Popping<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
