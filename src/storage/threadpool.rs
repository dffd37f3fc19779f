//! The portable engine: a few worker threads doing blocking
//! pread/pwrite/fdatasync/fallocate. Works wherever io_uring does not
//! (old kernels, sandboxes that forbid it).

use super::file::{take_buf, ImageFile};
use super::{BlockStorage, Capabilities, IoDone, IoOutcome, OpenOptions, StorageIo};
use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};

/// Workers used by [`super::open_storage`]: enough to keep a queue depth of
/// 32 busy on a disk while blocking syscalls wait.
pub const DEFAULT_THREADS: usize = 32;

type Job = (StorageIo, IoDone);

/// Blocking I/O on `threads` workers fed from one channel.
pub struct ThreadPoolStorage {
    image: Arc<ImageFile>,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    worker_ids: Vec<ThreadId>,
}

impl ThreadPoolStorage {
    /// Open `path` and start `threads` workers (at least one).
    pub fn open(path: &Path, opts: &OpenOptions, threads: usize) -> io::Result<Self> {
        let image = Arc::new(ImageFile::open(path, opts)?);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let image = Arc::clone(&image);
            let rx: Receiver<Job> = rx.clone();
            let handle = thread::Builder::new()
                .name(format!("blkshim-io-{i}"))
                .spawn(move || {
                    for (io, done) in rx.iter() {
                        let (result, buf) = image.execute(io);
                        done(IoOutcome { result, buf });
                    }
                })?;
            workers.push(handle);
        }
        let worker_ids = workers.iter().map(|w| w.thread().id()).collect();
        Ok(ThreadPoolStorage {
            image,
            jobs: Some(tx),
            workers,
            worker_ids,
        })
    }
}

impl BlockStorage for ThreadPoolStorage {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.image.capabilities()
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        if let Err(e) = self.image.validate(&io) {
            done(IoOutcome {
                result: Err(e),
                buf: take_buf(io),
            });
            return;
        }
        let io = match self.image.try_cached_read(io) {
            Ok(out) => return done(out),
            Err(io) => io,
        };
        let Some(jobs) = &self.jobs else {
            return refuse_shut_down(io, done);
        };
        if let Err(crossbeam_channel::SendError((io, done))) = jobs.send((io, done)) {
            refuse_shut_down(io, done);
        }
    }
}

fn refuse_shut_down(io: StorageIo, done: IoDone) {
    done(IoOutcome {
        result: Err(io::Error::other("storage engine shut down")),
        buf: take_buf(io),
    });
}

impl Drop for ThreadPoolStorage {
    /// Closing the channel lets the workers finish every queued request and
    /// exit; join them unless the last reference was dropped by a worker
    /// itself (from inside a completion callback), which then exits on its own.
    fn drop(&mut self) {
        self.jobs = None;
        let me = thread::current().id();
        for (worker, id) in self.workers.drain(..).zip(&self.worker_ids) {
            if *id != me {
                let _ = worker.join();
            }
        }
    }
}
