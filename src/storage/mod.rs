//! Storage engines: where tracked requests finally meet the disk image.
//!
//! Every engine implements [`BlockStorage`]: a request is submitted with a
//! completion callback and finishes later, possibly out of order. The core
//! (tracker, epochs, hand-off) never sees an engine's internals, so the
//! io_uring engine, the portable thread-pool engine and the simulation's
//! adversarial storage model are interchangeable.

mod buffer;
pub mod delay;
pub mod fencing;
mod file;
pub mod identity;
mod mem;
pub mod threadpool;
pub mod uring;

pub use buffer::AlignedBuf;
pub use delay::{DelayStorage, StorageDelay};
pub use mem::{apply_io, MemStorage};
pub use threadpool::ThreadPoolStorage;
pub use uring::{UringStats, UringStorage};

use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

/// Bytes per sector: the unit of every range the core tracks.
pub const SECTOR_SIZE: u64 = 512;

/// One I/O as the storage sees it. Offsets and lengths are in bytes and are
/// multiples of [`SECTOR_SIZE`] (the front ends enforce that before submitting).
#[derive(Debug)]
pub enum StorageIo {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read { offset: u64, buf: AlignedBuf },
    /// Write `buf` at `offset`; with `fua` the data is durable when it completes.
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard (punch a hole); reads of the range then return zeroes.
    Discard { offset: u64, len: u64 },
    /// Write zeroes; with `may_unmap` the engine may deallocate instead.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl StorageIo {
    /// Byte range `(offset, len)` this I/O touches; `None` for a flush.
    pub fn byte_range(&self) -> Option<(u64, u64)> {
        match self {
            StorageIo::Read { offset, buf } => Some((*offset, buf.len() as u64)),
            StorageIo::Write { offset, buf, .. } => Some((*offset, buf.len() as u64)),
            StorageIo::Flush => None,
            StorageIo::Discard { offset, len } => Some((*offset, *len)),
            StorageIo::WriteZeroes { offset, len, .. } => Some((*offset, *len)),
        }
    }
}

/// What comes back when an I/O finishes: the result, and the buffer (holding
/// the data for a read; handed back for reuse after a write).
#[derive(Debug)]
pub struct IoOutcome {
    pub result: io::Result<()>,
    pub buf: Option<AlignedBuf>,
}

/// Completion callback. Called exactly once, from any thread.
pub type IoDone = Box<dyn FnOnce(IoOutcome) + Send>;

/// What an engine can honestly do; front ends advertise only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Data bypasses the page cache (O_DIRECT).
    pub direct: bool,
    /// Discard really deallocates.
    pub discard: bool,
    /// Write-zeroes is done without writing zero buffers (fallocate).
    pub fast_zero: bool,
    /// Required alignment of buffers, offsets and lengths in bytes.
    pub alignment: u64,
}

/// A block device or image file that accepts asynchronous I/O.
pub trait BlockStorage: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What the engine supports.
    fn capabilities(&self) -> Capabilities;
    /// Start `io`; `done` runs exactly once when it finishes (possibly before
    /// `submit` returns).
    fn submit(&self, io: StorageIo, done: IoDone);
    /// A queue the calling thread drives itself (see [`LocalQueue`]), for
    /// engines that have one.
    fn local_queue(&self) -> io::Result<Option<Box<dyn LocalQueue>>> {
        Ok(None)
    }
}

/// A completion queue owned by one thread: while it lives, that thread's
/// submissions to the engine that made it go here, and their callbacks run
/// on that thread when it calls [`LocalQueue::reap`] or
/// [`LocalQueue::wait`]. A server thread that reads requests, submits them
/// and answers them then needs no other thread per request: no wakeups,
/// and one syscall covers many requests (the model of qemu's event loop).
///
/// The owner must not block on anything else while [`LocalQueue::in_flight`]
/// is above zero: callbacks running here may have put other clients'
/// requests in the queue. Dropping the queue waits for what is in it.
pub trait LocalQueue {
    /// Requests submitted through this queue and not finished yet.
    fn in_flight(&self) -> usize;
    /// Submit what is queued and run the callbacks of what has finished,
    /// without waiting.
    fn reap(&self) -> io::Result<()>;
    /// Submit what is queued, then sleep until something finishes or
    /// `readable` (a socket, say) has data, and run the callbacks.
    fn wait(&self, readable: Option<std::os::fd::RawFd>) -> io::Result<()>;
    /// Signal the eventfd `fd` whenever requests of this queue finish, so
    /// an owner sleeping in its own event loop (epoll) knows when to
    /// [`LocalQueue::reap`]. Unsupported by default.
    fn notify_eventfd(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        let _ = fd;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Which engine [`open_storage`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else the thread pool.
    #[default]
    Auto,
    IoUring,
    ThreadPool,
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(EngineKind::Auto),
            "io-uring" | "io_uring" | "iouring" | "uring" => Ok(EngineKind::IoUring),
            "thread-pool" | "threadpool" | "threads" => Ok(EngineKind::ThreadPool),
            other => Err(format!(
                "unknown storage engine {other:?} (auto, io-uring, thread-pool)"
            )),
        }
    }
}

/// How to open a disk image or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    pub engine: EngineKind,
    /// Try O_DIRECT; falls back to buffered I/O where the file system refuses
    /// it ([`Capabilities::direct`] then says false).
    pub direct: bool,
    /// Create a sparse file of this size when the path does not exist.
    pub create_size: Option<u64>,
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            engine: EngineKind::Auto,
            direct: true,
            create_size: None,
            read_only: false,
        }
    }
}

/// Open `path` with the engine `opts` asks for (`Auto`: io_uring when it
/// works here, the thread pool otherwise).
///
/// ```
/// use blkshim::storage::{open_storage, AlignedBuf, EngineKind, OpenOptions, StorageIo};
/// let dir = tempfile::tempdir().unwrap();
/// for engine in [EngineKind::IoUring, EngineKind::ThreadPool] {
///     let path = dir.path().join(format!("{engine:?}.img"));
///     let opts = OpenOptions { engine, direct: false, create_size: Some(1 << 20), read_only: false };
///     let disk = open_storage(&path, &opts).unwrap();
///     let (tx, rx) = std::sync::mpsc::channel();
///     let buf = AlignedBuf::from_slice(&[0xab; 4096]);
///     disk.submit(StorageIo::Write { offset: 8192, buf, fua: true }, Box::new(move |o| tx.send(o).unwrap()));
///     assert!(rx.recv().unwrap().result.is_ok());
///     assert_eq!(std::fs::read(&path).unwrap()[8192], 0xab);
/// }
/// ```
pub fn open_storage(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn BlockStorage>> {
    let use_uring = match opts.engine {
        EngineKind::IoUring => true,
        EngineKind::ThreadPool => false,
        EngineKind::Auto => uring::supported(),
    };
    let storage: Arc<dyn BlockStorage> = if use_uring {
        Arc::new(UringStorage::open(path, opts)?)
    } else {
        Arc::new(ThreadPoolStorage::open(
            path,
            opts,
            threadpool::DEFAULT_THREADS,
        )?)
    };
    let caps = storage.capabilities();
    log::info!(
        "{}: {} engine, {} bytes, direct={} discard={} fast_zero={} alignment={}",
        path.display(),
        if use_uring { "io_uring" } else { "thread-pool" },
        storage.size(),
        caps.direct,
        caps.discard,
        caps.fast_zero,
        caps.alignment
    );
    Ok(storage)
}
