//! A storage that holds I/Os before they reach the engine, in the manner of
//! nbdkit's delay filter: **a testing option** (`blkshim serve
//! --storage-delay write=2s`), never for production.
//!
//! What it models: an I/O the core has already submitted ("at the storage"
//! for the tracker) that the storage has not carried out yet, like a write
//! sitting in a SAN's queue or on a slow path to shared storage. Each
//! matching I/O is held for its delay **before** it is submitted to the
//! inner engine, so its data reaches the disk only at the end of the delay,
//! just before its completion runs: the latest moment a real storage could
//! land it. (A delay *after* submitting would model only a late
//! acknowledgement of data already on disk, which no ordering can get
//! wrong.)
//!
//! It reorders nothing the core decided: the tracker submits a request only
//! when no overlapping one is in flight, and a held I/O counts as in flight
//! until its completion runs. What can overtake a held I/O is only what the
//! [`BlockStorage`] contract already allows to finish out of order: a
//! non-overlapping I/O, or one of a kind with a shorter delay (a flush
//! covers the writes that *completed* before it, and a held write has not).
//!
//! With `armed-file=PATH` the delays apply only while PATH exists (checked
//! every [`ARM_POLL`]): a test arms it to catch one writer's I/Os at the
//! storage and disarms it so that the next writer's I/Os go straight
//! through, overtaking the held ones unless something orders them.

use super::{BlockStorage, Capabilities, IoDone, StorageIo};
use parking_lot::{Condvar, Mutex};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the armed file is looked for.
pub const ARM_POLL: Duration = Duration::from_millis(50);

/// Delay per kind of I/O (zero: passed straight through).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageDelay {
    pub read: Duration,
    pub write: Duration,
    pub flush: Duration,
    /// Discard.
    pub trim: Duration,
    pub zeroes: Duration,
    /// Delays apply only while this file exists; `None`: always.
    pub armed_file: Option<PathBuf>,
}

impl StorageDelay {
    /// The delay for `io`.
    pub fn for_io(&self, io: &StorageIo) -> Duration {
        match io {
            StorageIo::Read { .. } => self.read,
            StorageIo::Write { .. } => self.write,
            StorageIo::Flush => self.flush,
            StorageIo::Discard { .. } => self.trim,
            StorageIo::WriteZeroes { .. } => self.zeroes,
        }
    }

    /// No kind is delayed.
    pub fn is_zero(&self) -> bool {
        [self.read, self.write, self.flush, self.trim, self.zeroes]
            .iter()
            .all(Duration::is_zero)
    }
}

impl std::fmt::Display for StorageDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds = [
            ("read", self.read),
            ("write", self.write),
            ("flush", self.flush),
            ("trim", self.trim),
            ("zeroes", self.zeroes),
        ];
        let mut first = true;
        for (k, d) in kinds.iter().filter(|(_, d)| !d.is_zero()) {
            write!(f, "{}{k}={d:?}", if first { "" } else { "," })?;
            first = false;
        }
        if first {
            write!(f, "none")?;
        }
        if let Some(p) = &self.armed_file {
            write!(f, ",armed-file={}", p.display())?;
        }
        Ok(())
    }
}

/// One held I/O; the heap's top is the earliest due (then the first held).
struct Held {
    due: Instant,
    seq: u64,
    io: StorageIo,
    done: IoDone,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        // Reversed: BinaryHeap is a max-heap.
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    held: BinaryHeap<Held>,
    seq: u64,
    stop: bool,
    /// Held since the queue was last empty (for the log).
    batch: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    armed: AtomicBool,
    released: AtomicU64,
}

/// A [`BlockStorage`] that holds matching I/Os for their delay before it
/// submits them to `inner`. See the module documentation.
pub struct DelayStorage {
    inner: Arc<dyn BlockStorage>,
    delay: StorageDelay,
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
}

impl DelayStorage {
    /// Wrap `inner`; starts the thread that releases held I/Os. Logs a
    /// warning: this is for tests.
    pub fn new(inner: Arc<dyn BlockStorage>, delay: StorageDelay) -> std::io::Result<Self> {
        let armed = delay.armed_file.as_ref().is_none_or(|p| p.exists());
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            armed: AtomicBool::new(armed),
            released: AtomicU64::new(0),
        });
        log::warn!(
            "storage delay {delay} ({}): a testing option that holds I/Os before they reach the storage; never use it in production",
            if armed { "armed" } else { "disarmed until the file exists" }
        );
        let timer = {
            let (shared, inner, file) = (
                Arc::clone(&shared),
                Arc::clone(&inner),
                delay.armed_file.clone(),
            );
            std::thread::Builder::new()
                .name("storage-delay".into())
                .spawn(move || release_loop(&shared, inner.as_ref(), file))?
        };
        Ok(DelayStorage {
            inner,
            delay,
            shared,
            timer: Some(timer),
        })
    }

    /// I/Os held now.
    pub fn held(&self) -> usize {
        self.shared.queue.lock().held.len()
    }

    /// I/Os held and then submitted to the inner engine so far.
    pub fn released(&self) -> u64 {
        self.shared.released.load(Ordering::Relaxed)
    }

    /// Whether delays apply now.
    pub fn armed(&self) -> bool {
        self.shared.armed.load(Ordering::Acquire)
    }
}

/// The release thread: submits each held I/O when it is due, and follows
/// the armed file. On stop, what is still held is submitted at once.
fn release_loop(shared: &Shared, inner: &dyn BlockStorage, file: Option<PathBuf>) {
    let mut next_poll = Instant::now() + ARM_POLL;
    let mut q = shared.queue.lock();
    loop {
        let now = Instant::now();
        if let Some(f) = &file {
            if now >= next_poll {
                let armed = f.exists();
                if shared.armed.swap(armed, Ordering::AcqRel) != armed {
                    log::info!(
                        "storage delay {} ({} {})",
                        if armed { "armed" } else { "disarmed" },
                        f.display(),
                        if armed { "exists" } else { "is gone" }
                    );
                }
                next_poll = now + ARM_POLL;
            }
        }
        let due = q.held.peek().map(|h| h.due);
        match due {
            Some(d) if d <= now || q.stop => {
                let Some(h) = q.held.pop() else { continue };
                let empty = q.held.is_empty();
                let batch = std::mem::take(&mut q.batch);
                if !empty {
                    q.batch = batch;
                }
                drop(q);
                shared.released.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "storage delay: releasing {:?} held since {:?}",
                    h.io.byte_range(),
                    h.due
                );
                inner.submit(h.io, h.done);
                if empty {
                    log::info!("storage delay: released every held I/O ({batch} since the queue was last empty)");
                }
                q = shared.queue.lock();
            }
            None if q.stop => return,
            _ => {
                let mut until = due.unwrap_or(now + Duration::from_secs(3600));
                if file.is_some() {
                    until = until.min(next_poll);
                }
                shared.wake.wait_until(&mut q, until);
            }
        }
    }
}

impl BlockStorage for DelayStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        let d = self.delay.for_io(&io);
        if d.is_zero() || !self.armed() {
            return self.inner.submit(io, done);
        }
        let mut q = self.shared.queue.lock();
        if q.stop {
            drop(q);
            return self.inner.submit(io, done);
        }
        if q.held.is_empty() {
            let (offset, len) = io.byte_range().unwrap_or((0, 0));
            log::info!(
                "storage delay: holding I/Os (first: {} of {len} bytes at {offset}, for {d:?})",
                kind(&io)
            );
        }
        q.seq += 1;
        q.batch += 1;
        let held = Held {
            due: Instant::now() + d,
            seq: q.seq,
            io,
            done,
        };
        q.held.push(held);
        drop(q);
        self.shared.wake.notify_one();
    }

    // No local queue: every I/O must pass through the hold.
}

fn kind(io: &StorageIo) -> &'static str {
    match io {
        StorageIo::Read { .. } => "read",
        StorageIo::Write { .. } => "write",
        StorageIo::Flush => "flush",
        StorageIo::Discard { .. } => "trim",
        StorageIo::WriteZeroes { .. } => "write-zeroes",
    }
}

impl Drop for DelayStorage {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.timer.take() {
            if t.join().is_err() {
                log::error!("storage delay: release thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{AlignedBuf, IoOutcome, MemStorage};
    use std::sync::mpsc;

    fn write(disk: &dyn BlockStorage, offset: u64, byte: u8) -> mpsc::Receiver<IoOutcome> {
        let (tx, rx) = mpsc::channel();
        let buf = AlignedBuf::from_slice(&[byte; 4096]);
        disk.submit(
            StorageIo::Write {
                offset,
                buf,
                fua: false,
            },
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        );
        rx
    }

    fn delayed(write_ms: u64, file: Option<PathBuf>) -> (Arc<MemStorage>, DelayStorage) {
        let mem = Arc::new(MemStorage::new(1 << 20));
        let d = StorageDelay {
            write: Duration::from_millis(write_ms),
            armed_file: file,
            ..StorageDelay::default()
        };
        let inner: Arc<dyn BlockStorage> = mem.clone();
        (mem, DelayStorage::new(inner, d).unwrap())
    }

    #[test]
    fn a_held_write_reaches_the_disk_only_at_its_completion() {
        let (mem, disk) = delayed(800, None);
        let t0 = Instant::now();
        let rx = write(&disk, 4096, 0xab);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(disk.held(), 1);
        assert_eq!(mem.read_at(4096, 1)[0], 0, "held: not on the disk yet");
        assert!(rx.try_recv().is_err(), "held: not completed yet");
        let out = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(out.result.is_ok());
        assert!(t0.elapsed() >= Duration::from_millis(800));
        assert_eq!(mem.read_at(4096, 1)[0], 0xab);
        assert_eq!((disk.held(), disk.released()), (0, 1));
    }

    #[test]
    fn undelayed_kinds_pass_straight_through() {
        let (mem, disk) = delayed(10_000, None);
        let (tx, rx) = mpsc::channel();
        disk.submit(
            StorageIo::Read {
                offset: 0,
                buf: AlignedBuf::zeroed(4096),
            },
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        );
        // MemStorage completes synchronously: nothing held, done already.
        assert!(rx.try_recv().unwrap().result.is_ok());
        assert_eq!(disk.held(), 0);
        drop(mem);
    }

    #[test]
    fn writes_leave_in_due_order_and_a_shorter_delay_may_overtake() {
        let mem = Arc::new(MemStorage::new(1 << 20));
        let inner: Arc<dyn BlockStorage> = mem.clone();
        let disk = DelayStorage::new(
            inner,
            StorageDelay {
                write: Duration::from_millis(200),
                zeroes: Duration::from_millis(20),
                ..StorageDelay::default()
            },
        )
        .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for (i, off) in [(0u8, 0u64), (1, 8192)] {
            let (order, tx) = (Arc::clone(&order), tx.clone());
            disk.submit(
                StorageIo::Write {
                    offset: off,
                    buf: AlignedBuf::from_slice(&[i + 1; 4096]),
                    fua: false,
                },
                Box::new(move |_| {
                    order.lock().push(i);
                    let _ = tx.send(());
                }),
            );
        }
        let (o2, tx2) = (Arc::clone(&order), tx.clone());
        disk.submit(
            StorageIo::WriteZeroes {
                offset: 65536,
                len: 4096,
                may_unmap: false,
            },
            Box::new(move |_| {
                o2.lock().push(2);
                let _ = tx2.send(());
            }),
        );
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(*order.lock(), vec![2, 0, 1]);
    }

    #[test]
    fn the_armed_file_turns_the_delay_on_and_off_and_held_ios_keep_their_due_time() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("armed");
        let (mem, disk) = delayed(600, Some(flag.clone()));
        assert!(!disk.armed());
        let rx = write(&disk, 0, 1);
        assert!(
            rx.try_recv().unwrap().result.is_ok(),
            "disarmed: straight through"
        );
        std::fs::write(&flag, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !disk.armed() {
            assert!(Instant::now() < deadline, "never armed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let held = write(&disk, 0, 2);
        std::fs::remove_file(&flag).unwrap();
        while disk.armed() {
            assert!(Instant::now() < deadline, "never disarmed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Disarmed: a later write to another block lands at once, while the
        // held one still waits out its delay.
        let rx = write(&disk, 8192, 3);
        assert!(rx.try_recv().unwrap().result.is_ok());
        assert_eq!((mem.read_at(0, 1)[0], mem.read_at(8192, 1)[0]), (1, 3));
        assert!(held
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .result
            .is_ok());
        assert_eq!(mem.read_at(0, 1)[0], 2);
    }

    /// The gateway's hand-off over a held write, on the real `Disk`: the
    /// newer writer's overlapping write is ordered after the held one (it
    /// would overtake it otherwise: the delay is disarmed for it), the
    /// held write is fenced at the drain deadline, and the block ends with
    /// the newer data.
    #[test]
    fn the_tracker_orders_a_newer_write_after_a_held_one_and_fences_it_at_the_deadline() {
        use crate::epoch::MemEpochStore;
        use crate::handoff::{Disk, DiskOptions};
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("armed");
        std::fs::write(&flag, b"").unwrap();
        let (mem, delayed) = delayed(1500, Some(flag.clone()));
        let delayed = Arc::new(delayed);
        let disk = Disk::open(
            "vm1",
            delayed.clone(),
            Arc::new(MemEpochStore::default()),
            DiskOptions {
                auto_advance: true,
                fence_timeout: Some(Duration::from_millis(150)),
            },
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let io = |w: &crate::handoff::Writer, tag: u64, offset: u64, byte: u8| {
            let tx = tx.clone();
            disk.submit(
                w,
                tag,
                StorageIo::Write {
                    offset,
                    buf: AlignedBuf::from_slice(&[byte; 4096]),
                    fua: false,
                },
                Box::new(move |o| {
                    let _ = tx.send((tag, o.result.err().and_then(|e| e.raw_os_error())));
                }),
            );
        };
        let x = disk.register(Some(5), "X").unwrap();
        io(&x, 1, 0, 5); // held at the storage for 1.5 s
        assert_eq!(delayed.held(), 1);
        std::fs::remove_file(&flag).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while delayed.armed() {
            assert!(Instant::now() < deadline, "never disarmed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Disarmed: the rest would go straight through to the storage.
        let y = disk.register(Some(6), "Y").unwrap();
        io(&y, 2, 0, 6); // overlaps the held write: must wait for it
        io(&y, 3, 8192, 6); // unrelated: lands at once
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (3, None));
        assert_eq!(disk.current_epoch(), 6);
        assert_eq!(mem.read_at(0, 1)[0], 0, "Y's write waits behind X's");
        std::thread::sleep(Duration::from_millis(300)); // past the 150 ms deadline
        assert_eq!(mem.read_at(0, 1)[0], 0, "still held past the deadline");
        // X's write lands (fenced: not acknowledged), then Y's after it.
        let mut got = vec![
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        ];
        got.sort();
        assert_eq!(got, vec![(1, Some(libc::EPERM)), (2, None)]);
        assert_eq!(mem.read_at(0, 1)[0], 6);
        let st = disk.status();
        assert_eq!((st.fenced, st.cancelled, st.in_flight), (1, 0, 0));
    }

    #[test]
    fn dropping_submits_what_is_held() {
        let (mem, disk) = delayed(60_000, None);
        let rx = write(&disk, 0, 7);
        drop(disk);
        assert!(rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .result
            .is_ok());
        assert_eq!(mem.read_at(0, 1)[0], 7);
    }

    #[test]
    fn display_names_what_is_delayed() {
        let d = StorageDelay {
            write: Duration::from_secs(2),
            armed_file: Some("/tmp/x".into()),
            ..StorageDelay::default()
        };
        assert_eq!(d.to_string(), "write=2s,armed-file=/tmp/x");
        assert!(!d.is_zero());
        assert!(StorageDelay::default().is_zero());
    }
}
