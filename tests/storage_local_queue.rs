//! The io_uring engine's per-thread queue (`BlockStorage::local_queue`):
//! while a thread owns one, that thread's submissions complete on that
//! thread, when it reaps or waits, and nowhere else; other threads and
//! other engines are untouched; dropping it finishes what it holds.
//! Also the buffered engine's inline small writes.

use blkshim::storage::{
    open_storage, AlignedBuf, BlockStorage, EngineKind, IoOutcome, LocalQueue, OpenOptions,
    StorageIo,
};
use crossbeam_channel::unbounded;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn open(
    engine: EngineKind,
    dir: &tempfile::TempDir,
    name: &str,
    direct: bool,
) -> Arc<dyn BlockStorage> {
    let opts = OpenOptions {
        engine,
        direct,
        create_size: Some(8 * MIB),
        read_only: false,
    };
    open_storage(&dir.path().join(name), &opts).expect("open storage")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

fn queue(storage: &dyn BlockStorage) -> Box<dyn LocalQueue> {
    storage
        .local_queue()
        .expect("create queue")
        .expect("io_uring offers a local queue")
}

fn block(seed: u8) -> AlignedBuf {
    AlignedBuf::from_slice(&[seed; 4096])
}

/// Submit one I/O whose callback reports (tag, thread, outcome).
fn submit(
    storage: &dyn BlockStorage,
    io: StorageIo,
    tag: usize,
    tx: &crossbeam_channel::Sender<(usize, ThreadId, IoOutcome)>,
) {
    let tx = tx.clone();
    storage.submit(
        io,
        Box::new(move |out| {
            let _ = tx.send((tag, thread::current().id(), out));
        }),
    );
}

fn wait_all(q: &dyn LocalQueue) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while q.in_flight() > 0 {
        assert!(Instant::now() < deadline, "requests never completed");
        q.wait(None).expect("wait");
    }
}

#[test]
fn requests_complete_on_the_owning_thread_only_when_it_reaps() {
    let dir = tempdir();
    let storage = open(EngineKind::IoUring, &dir, "a.img", true);
    let q = queue(&*storage);
    let (tx, rx) = unbounded();
    for i in 0..64usize {
        let io = StorageIo::Write {
            offset: i as u64 * 4096,
            buf: block(i as u8),
            fua: false,
        };
        submit(&*storage, io, i, &tx);
    }
    assert_eq!(q.in_flight(), 64);
    // Nothing was even submitted to the kernel: no callback can have run.
    thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err(), "a callback ran before any reap");
    wait_all(&*q);
    let me = thread::current().id();
    let mut seen = [false; 64];
    for (tag, who, out) in rx.try_iter() {
        out.result.expect("write");
        assert_eq!(who, me, "completion ran on another thread");
        assert!(!seen[tag], "request {tag} completed twice");
        seen[tag] = true;
    }
    assert!(seen.iter().all(|&s| s), "a request never completed");
    // Read back through the queue.
    for i in 0..64usize {
        let io = StorageIo::Read {
            offset: i as u64 * 4096,
            buf: AlignedBuf::zeroed(4096),
        };
        submit(&*storage, io, i, &tx);
    }
    wait_all(&*q);
    for (tag, who, out) in rx.try_iter() {
        assert_eq!(who, me);
        out.result.expect("read");
        assert!(out
            .buf
            .expect("buffer")
            .as_slice()
            .iter()
            .all(|&b| b == tag as u8));
    }
}

#[test]
fn other_threads_and_other_storages_keep_the_shared_ring() {
    let dir = tempdir();
    let a = open(EngineKind::IoUring, &dir, "a.img", true);
    let b = open(EngineKind::IoUring, &dir, "b.img", true);
    let q = queue(&*a);
    let (tx, rx) = unbounded();
    // Another storage from this thread: completes without this queue.
    let io = StorageIo::Write {
        offset: 0,
        buf: block(1),
        fua: false,
    };
    submit(&*b, io, 1, &tx);
    let (tag, _, out) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("b completes");
    assert_eq!(tag, 1);
    out.result.expect("write b");
    assert_eq!(q.in_flight(), 0);
    // The same storage from another thread: also without this queue.
    let (a2, tx2) = (Arc::clone(&a), tx.clone());
    thread::spawn(move || {
        let io = StorageIo::Write {
            offset: 4096,
            buf: block(2),
            fua: false,
        };
        submit(&*a2, io, 2, &tx2);
    })
    .join()
    .expect("submitter");
    let (tag, _, out) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a completes");
    assert_eq!(tag, 2);
    out.result.expect("write a");
    assert_eq!(q.in_flight(), 0);
    // Once the queue is gone, this thread uses the shared ring again.
    drop(q);
    let io = StorageIo::Read {
        offset: 4096,
        buf: AlignedBuf::zeroed(4096),
    };
    submit(&*a, io, 3, &tx);
    let (_, _, out) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("read completes");
    assert!(out.buf.expect("buffer").as_slice().iter().all(|&b| b == 2));
}

#[test]
fn dropping_the_queue_finishes_what_it_holds() {
    let dir = tempdir();
    let storage = open(EngineKind::IoUring, &dir, "a.img", true);
    let q = queue(&*storage);
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..100u64 {
        let d = Arc::clone(&done);
        storage.submit(
            StorageIo::Write {
                offset: i * 4096,
                buf: block(7),
                fua: i % 10 == 0,
            },
            Box::new(move |out| {
                out.result.expect("write");
                d.fetch_add(1, Ordering::SeqCst);
            }),
        );
    }
    assert_eq!(
        q.in_flight(),
        100,
        "more than the ring holds waits in overflow"
    );
    drop(q);
    assert_eq!(done.load(Ordering::SeqCst), 100);
    drop(storage);
    let img = std::fs::read(dir.path().join("a.img")).expect("image");
    assert!(img[..100 * 4096].iter().all(|&b| b == 7));
}

#[test]
fn callbacks_that_submit_stay_on_the_queue() {
    let dir = tempdir();
    let storage = open(EngineKind::IoUring, &dir, "a.img", true);
    let q = queue(&*storage);
    let (tx, rx) = unbounded();
    let (s2, tx2) = (Arc::clone(&storage), tx.clone());
    storage.submit(
        StorageIo::Write {
            offset: 0,
            buf: block(9),
            fua: false,
        },
        Box::new(move |out| {
            out.result.expect("write");
            // Like the tracker starting a request this one was blocking.
            let io = StorageIo::Read {
                offset: 0,
                buf: AlignedBuf::zeroed(4096),
            };
            submit(&*s2, io, 2, &tx2);
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.is_empty() {
        assert!(Instant::now() < deadline, "follow-up never completed");
        q.wait(None).expect("wait");
    }
    let (_, who, out) = rx.recv().expect("follow-up");
    assert_eq!(who, thread::current().id());
    assert!(out.buf.expect("buffer").as_slice().iter().all(|&b| b == 9));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn wait_wakes_for_socket_data_and_for_completions() {
    let dir = tempdir();
    let storage = open(EngineKind::IoUring, &dir, "a.img", true);
    let q = queue(&*storage);
    let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
    // Nothing in flight: only the socket can wake it.
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        theirs.write_all(b"x").expect("write");
        theirs
    });
    let t0 = Instant::now();
    q.wait(Some(ours.as_raw_fd())).expect("wait");
    assert!(
        t0.elapsed() >= Duration::from_millis(90),
        "woke before the data came"
    );
    let theirs = writer.join().expect("writer");
    let mut byte = [0u8; 1];
    (&ours).read_exact(&mut byte).expect("the byte");
    // A completion wakes it while the socket stays quiet...
    let (tx, rx) = unbounded();
    let io = StorageIo::Write {
        offset: 0,
        buf: block(3),
        fua: true,
    };
    submit(&*storage, io, 1, &tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.in_flight() > 0 {
        assert!(Instant::now() < deadline);
        q.wait(Some(ours.as_raw_fd())).expect("wait");
    }
    rx.try_recv().expect("completed").2.result.expect("write");
    // ... and a hang-up wakes it too.
    drop(theirs);
    q.wait(Some(ours.as_raw_fd())).expect("wait");
}

#[test]
fn engines_without_a_local_queue_say_so() {
    let dir = tempdir();
    let pool = open(EngineKind::ThreadPool, &dir, "a.img", true);
    assert!(pool.local_queue().expect("no error").is_none());
    let mem = blkshim::storage::MemStorage::new(MIB);
    assert!(mem.local_queue().expect("no error").is_none());
}

#[test]
fn buffered_small_writes_complete_inline_and_fua_does_not() {
    let dir = tempdir();
    let storage = open(EngineKind::IoUring, &dir, "a.img", false);
    let me = thread::current().id();
    let (tx, rx) = unbounded();
    let io = StorageIo::Write {
        offset: 8192,
        buf: block(5),
        fua: false,
    };
    submit(&*storage, io, 1, &tx);
    let (_, who, out) = rx.try_recv().expect("completed before submit returned");
    out.result.expect("write");
    assert_eq!(who, me);
    // FUA goes to the kernel with RWF_DSYNC, completed by the reaper.
    let io = StorageIo::Write {
        offset: 12288,
        buf: block(6),
        fua: true,
    };
    submit(&*storage, io, 2, &tx);
    let (_, who, out) = rx.recv_timeout(Duration::from_secs(10)).expect("fua write");
    out.result.expect("fua write");
    assert_ne!(who, me);
    drop(storage);
    let img = std::fs::read(dir.path().join("a.img")).expect("image");
    assert!(img[8192..12288].iter().all(|&b| b == 5));
    assert!(img[12288..16384].iter().all(|&b| b == 6));
}
