//! Both storage engines, driven by the same test functions: every test below
//! runs once for io_uring and once for the thread pool (see `both_engines!`).
//!
//! Images live under the target directory (a real file system, where
//! O_DIRECT works); the buffered fallback is exercised on /dev/shm (tmpfs).

use blkshim::sim::rng::SimRng;
use blkshim::storage::{
    open_storage, AlignedBuf, BlockStorage, EngineKind, IoDone, IoOutcome, OpenOptions, StorageIo,
};
use crossbeam_channel::{bounded, unbounded, Receiver};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

const MIB: u64 = 1 << 20;

/// Generate `mod io_uring` and `mod thread_pool`, each with one #[test] per
/// listed function, calling it with that engine.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name(blkshim::storage::EngineKind::IoUring) } )*
        }
        mod thread_pool {
            $( #[test] fn $name() { super::$name(blkshim::storage::EngineKind::ThreadPool) } )*
        }
    };
}

both_engines!(
    random_writes_and_reads_match_model,
    many_in_flight_complete_each_once,
    fua_write_and_flush,
    discard_reads_back_zeroes,
    write_zeroes_reads_back_zeroes,
    out_of_range_io_is_rejected_without_touching_file,
    misaligned_io_is_rejected,
    zero_length_io_is_a_no_op,
    direct_io_on_real_file_system,
    tmpfs_without_zero_range_still_zeroes,
    buffered_fallback_when_o_direct_refused,
    block_device_through_loop,
    concurrent_submitters,
    drop_with_requests_in_flight_completes_them,
    resubmit_from_completion_callback,
    read_only_refuses_modifications,
    create_size_makes_sparse_file,
);

#[test]
fn engine_kind_parses_and_auto_opens_a_working_engine() {
    assert_eq!("auto".parse(), Ok(EngineKind::Auto));
    assert_eq!("io-uring".parse(), Ok(EngineKind::IoUring));
    assert_eq!("IO_URING".parse(), Ok(EngineKind::IoUring));
    assert_eq!("thread-pool".parse(), Ok(EngineKind::ThreadPool));
    assert!("aio".parse::<EngineKind>().is_err());
    let dir = target_tempdir();
    let storage = open(EngineKind::Auto, &image_path(&dir), MIB, true);
    write(&*storage, 0, &pattern(30, 8192));
    assert!(read(&*storage, 0, 8192) == pattern(30, 8192));
}

/// A fresh image path in a temporary directory under the target directory.
fn image_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("disk.img")
}

fn target_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

fn open(engine: EngineKind, path: &Path, size: u64, direct: bool) -> Arc<dyn BlockStorage> {
    let opts = OpenOptions {
        engine,
        direct,
        create_size: Some(size),
        read_only: false,
    };
    open_storage(path, &opts).expect("open storage")
}

/// Submit and wait for the outcome.
fn run(storage: &dyn BlockStorage, io: StorageIo) -> IoOutcome {
    let (tx, rx) = bounded(1);
    storage.submit(
        io,
        Box::new(move |outcome| {
            let _ = tx.send(outcome);
        }),
    );
    rx.recv().expect("callback ran")
}

/// A callback that sends the outcome, tagged, to a channel.
fn send_to(tx: &crossbeam_channel::Sender<(usize, IoOutcome)>, tag: usize) -> IoDone {
    let tx = tx.clone();
    Box::new(move |outcome| {
        let _ = tx.send((tag, outcome));
    })
}

fn write(storage: &dyn BlockStorage, offset: u64, data: &[u8]) {
    let buf = AlignedBuf::from_slice(data);
    let out = run(
        storage,
        StorageIo::Write {
            offset,
            buf,
            fua: false,
        },
    );
    out.result.expect("write");
}

fn read(storage: &dyn BlockStorage, offset: u64, len: usize) -> Vec<u8> {
    let buf = AlignedBuf::zeroed(len);
    let out = run(storage, StorageIo::Read { offset, buf });
    out.result.expect("read");
    out.buf.expect("read buffer back").as_slice().to_vec()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    SimRng::new(seed).fill(&mut data);
    data
}

fn assert_io_error(out: &IoOutcome, kind: io::ErrorKind) {
    match &out.result {
        Err(e) => assert_eq!(e.kind(), kind, "unexpected error {e}"),
        Ok(()) => panic!("expected {kind:?}, got success"),
    }
}

fn random_writes_and_reads_match_model(engine: EngineKind) {
    let dir = target_tempdir();
    let size = 8 * MIB;
    let storage = open(engine, &image_path(&dir), size, true);
    let align = storage.capabilities().alignment;
    let blocks = size / align;
    let mut model = vec![0u8; size as usize];
    let mut rng = SimRng::new(0x5eed_0001);
    for i in 0..400 {
        let nblocks = 1 + rng.below(32.min(blocks));
        let start = rng.below(blocks - nblocks + 1);
        let (offset, len) = (start * align, (nblocks * align) as usize);
        if i % 3 == 2 {
            let got = read(&*storage, offset, len);
            assert!(
                got == model[offset as usize..offset as usize + len],
                "read {i} at {offset}+{len} differs from the model"
            );
        } else {
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            write(&*storage, offset, &data);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
    }
    assert!(
        read(&*storage, 0, size as usize) == model,
        "whole image differs from the model"
    );
}

fn many_in_flight_complete_each_once(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), 4 * MIB, true);
    // More than the io_uring engine's 256 SQ entries: some wait in its
    // overflow list, and completions can outrun the completion queue.
    const N: usize = 1024;
    const BLOCK: usize = 4096;
    let (tx, rx) = unbounded();
    for i in 0..N {
        let buf = AlignedBuf::from_slice(&pattern(i as u64, BLOCK));
        let io = StorageIo::Write {
            offset: (i * BLOCK) as u64,
            buf,
            fua: false,
        };
        storage.submit(io, send_to(&tx, i));
    }
    let mut seen = [0u32; N];
    for _ in 0..N {
        let (i, out) = rx.recv().expect("completion");
        out.result.expect("write");
        assert_eq!(out.buf.expect("buffer handed back").len(), BLOCK);
        seen[i] += 1;
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "each write completes exactly once"
    );
    // Read them all back, again all in flight at once, in reverse order.
    for i in (0..N).rev() {
        let io = StorageIo::Read {
            offset: (i * BLOCK) as u64,
            buf: AlignedBuf::zeroed(BLOCK),
        };
        storage.submit(io, send_to(&tx, i));
    }
    for _ in 0..N {
        let (i, out) = rx.recv().expect("completion");
        out.result.expect("read");
        assert!(
            out.buf.expect("data").as_slice() == pattern(i as u64, BLOCK),
            "block {i}"
        );
    }
    assert!(rx.try_recv().is_err(), "no extra completions");
}

fn fua_write_and_flush(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), MIB, true);
    let data = pattern(7, 64 * 1024);
    let io = StorageIo::Write {
        offset: 4096,
        buf: AlignedBuf::from_slice(&data),
        fua: true,
    };
    run(&*storage, io).result.expect("FUA write");
    run(&*storage, StorageIo::Flush).result.expect("flush");
    assert!(read(&*storage, 4096, data.len()) == data);
    // The data is in the file itself, as seen by an independent reader.
    let on_disk = std::fs::read(image_path(&dir)).expect("read image");
    assert!(on_disk[4096..4096 + data.len()] == data[..]);
}

fn discard_reads_back_zeroes(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), 2 * MIB, true);
    assert!(storage.capabilities().discard, "ext4 can punch holes");
    let data = pattern(3, MIB as usize);
    write(&*storage, 0, &data);
    run(
        &*storage,
        StorageIo::Discard {
            offset: 64 * 1024,
            len: 128 * 1024,
        },
    )
    .result
    .expect("discard");
    let got = read(&*storage, 0, MIB as usize);
    assert!(
        got[..64 * 1024] == data[..64 * 1024],
        "before the hole unchanged"
    );
    assert!(
        got[64 * 1024..192 * 1024].iter().all(|&b| b == 0),
        "hole reads zeroes"
    );
    assert!(
        got[192 * 1024..] == data[192 * 1024..],
        "after the hole unchanged"
    );
}

fn write_zeroes_reads_back_zeroes(engine: EngineKind) {
    let dir = target_tempdir();
    check_write_zeroes(&*open(engine, &image_path(&dir), 2 * MIB, true));
}

/// Write zeroes with and without may_unmap; only the range becomes zero.
fn check_write_zeroes(storage: &dyn BlockStorage) {
    for (i, may_unmap) in [false, true].into_iter().enumerate() {
        let data = pattern(11 + i as u64, MIB as usize);
        write(storage, 0, &data);
        let io = StorageIo::WriteZeroes {
            offset: 8192,
            len: 3 * 4096 * 4,
            may_unmap,
        };
        run(storage, io).result.expect("write zeroes");
        let got = read(storage, 0, MIB as usize);
        let end = 8192 + 3 * 4096 * 4;
        assert!(
            got[..8192] == data[..8192],
            "may_unmap={may_unmap}: before unchanged"
        );
        assert!(
            got[8192..end].iter().all(|&b| b == 0),
            "may_unmap={may_unmap}: zeroes"
        );
        assert!(
            got[end..] == data[end..],
            "may_unmap={may_unmap}: after unchanged"
        );
    }
}

fn out_of_range_io_is_rejected_without_touching_file(engine: EngineKind) {
    let dir = target_tempdir();
    let path = image_path(&dir);
    let size = MIB;
    let storage = open(engine, &path, size, true);
    let block = storage.capabilities().alignment;
    let bad = [
        StorageIo::Write {
            offset: size,
            buf: AlignedBuf::zeroed(block as usize),
            fua: false,
        },
        StorageIo::Write {
            offset: size - block,
            buf: AlignedBuf::zeroed(2 * block as usize),
            fua: true,
        },
        StorageIo::Read {
            offset: u64::MAX - block + 1,
            buf: AlignedBuf::zeroed(block as usize),
        },
        StorageIo::Discard {
            offset: size - block,
            len: 2 * block,
        },
        StorageIo::WriteZeroes {
            offset: u64::MAX - block + 1,
            len: 2 * block,
            may_unmap: true,
        },
    ];
    for io in bad {
        let is_rw = matches!(io, StorageIo::Read { .. } | StorageIo::Write { .. });
        let out = run(&*storage, io);
        assert_io_error(&out, io::ErrorKind::InvalidInput);
        assert_eq!(out.buf.is_some(), is_rw, "buffers are handed back on error");
    }
    drop(storage);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        size,
        "file not extended"
    );
}

fn misaligned_io_is_rejected(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), MIB, true);
    let align = storage.capabilities().alignment;
    assert!(align >= 512 && align.is_power_of_two());
    let bad = [
        StorageIo::Read {
            offset: align / 2,
            buf: AlignedBuf::zeroed(align as usize),
        },
        StorageIo::Write {
            offset: 0,
            buf: AlignedBuf::zeroed(align as usize + 100),
            fua: false,
        },
        StorageIo::Discard {
            offset: 100,
            len: align,
        },
        StorageIo::WriteZeroes {
            offset: 0,
            len: align + 1,
            may_unmap: false,
        },
    ];
    for io in bad {
        assert_io_error(&run(&*storage, io), io::ErrorKind::InvalidInput);
    }
    // The engine still serves well-formed requests afterwards.
    write(&*storage, align, &pattern(5, align as usize));
    assert!(read(&*storage, align, align as usize) == pattern(5, align as usize));
}

fn zero_length_io_is_a_no_op(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), MIB, true);
    write(&*storage, 0, &pattern(8, 4096));
    let ios = [
        StorageIo::Read {
            offset: 4096,
            buf: AlignedBuf::zeroed(0),
        },
        StorageIo::Write {
            offset: 0,
            buf: AlignedBuf::zeroed(0),
            fua: true,
        },
        StorageIo::Discard { offset: 0, len: 0 },
        StorageIo::WriteZeroes {
            offset: 0,
            len: 0,
            may_unmap: false,
        },
        StorageIo::Read {
            offset: MIB,
            buf: AlignedBuf::zeroed(0),
        }, // at the very end: fine
    ];
    for io in ios {
        run(&*storage, io).result.expect("zero-length I/O succeeds");
    }
    assert!(
        read(&*storage, 0, 4096) == pattern(8, 4096),
        "nothing changed"
    );
}

fn direct_io_on_real_file_system(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), 4 * MIB, true);
    let caps = storage.capabilities();
    assert!(
        caps.direct,
        "the target directory is on a file system with O_DIRECT"
    );
    assert!(caps.alignment >= 512);
    let data = pattern(9, 256 * 1024);
    write(&*storage, caps.alignment * 3, &data);
    assert!(read(&*storage, caps.alignment * 3, data.len()) == data);
    // Without asking for O_DIRECT the engine says so and accepts 512-byte I/O.
    drop(storage);
    let buffered = open(engine, &image_path(&dir), 4 * MIB, false);
    assert!(!buffered.capabilities().direct);
    assert_eq!(buffered.capabilities().alignment, 512);
    assert!(read(&*buffered, caps.alignment * 3, data.len()) == data);
}

fn is_tmpfs(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statfs is plain old data; valid path and out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a writable statfs.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
}

/// Discard and write-zeroes read back zeroes, whatever fallback they took.
fn check_discard_and_write_zeroes(storage: &dyn BlockStorage) {
    check_write_zeroes(storage);
    write(storage, 0, &pattern(4, 64 * 1024));
    run(
        storage,
        StorageIo::Discard {
            offset: 4096,
            len: 8192,
        },
    )
    .result
    .expect("discard");
    let got = read(storage, 0, 64 * 1024);
    assert!(
        got[4096..12288].iter().all(|&b| b == 0),
        "discarded range reads zeroes"
    );
    assert!(
        got[12288..] == pattern(4, 64 * 1024)[12288..],
        "rest unchanged"
    );
}

/// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: write-zeroes must
/// fall back (to punching when it may unmap, to zero buffers otherwise).
fn tmpfs_without_zero_range_still_zeroes(engine: EngineKind) {
    let shm = Path::new("/dev/shm");
    assert!(is_tmpfs(shm), "this test needs /dev/shm to be tmpfs");
    let dir = tempfile::tempdir_in(shm).expect("temp dir");
    let storage = open(engine, &image_path(&dir), 2 * MIB, true);
    let caps = storage.capabilities();
    assert!(caps.discard, "tmpfs punches holes");
    check_discard_and_write_zeroes(&*storage);
}

/// A ramfs mounted for the duration of a test: a file system that refuses
/// O_DIRECT (EINVAL) and has no fallocate at all. Needs root.
struct RamFs(tempfile::TempDir);

impl RamFs {
    fn mount() -> RamFs {
        let dir = target_tempdir();
        let target =
            std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings; no mount data.
        let r = unsafe {
            libc::mount(
                c"ramfs".as_ptr(),
                target.as_ptr(),
                c"ramfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting a ramfs needs root: {}",
            io::Error::last_os_error()
        );
        RamFs(dir)
    }
}

impl Drop for RamFs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.path().as_os_str().as_encoded_bytes());
        if let Ok(target) = target {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn buffered_fallback_when_o_direct_refused(engine: EngineKind) {
    let ramfs = RamFs::mount();
    let storage = open(engine, &ramfs.0.path().join("disk.img"), 2 * MIB, true);
    let caps = storage.capabilities();
    assert!(
        !caps.direct,
        "ramfs refuses O_DIRECT; the engine must say buffered"
    );
    assert_eq!(caps.alignment, 512);
    assert!(!caps.discard && !caps.fast_zero, "ramfs has no fallocate");
    write(&*storage, 512, &pattern(1, 1536));
    assert!(read(&*storage, 512, 1536) == pattern(1, 1536));
    // Discard and write-zeroes fall back to writing zero buffers.
    check_discard_and_write_zeroes(&*storage);
    drop(storage);
}

/// A loop device over a file under the target directory, detached on drop.
/// Needs root (losetup).
struct LoopDevice {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn attach(size: u64) -> LoopDevice {
        let dir = target_tempdir();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let out = std::process::Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDevice { dev, _dir: dir }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

/// A block device: size from BLKGETSIZE64, O_DIRECT at its logical block
/// size, data, discard and write-zeroes all behave as on a file.
fn block_device_through_loop(engine: EngineKind) {
    let size = 16 * MIB;
    let loopdev = LoopDevice::attach(size);
    let opts = OpenOptions {
        engine,
        direct: true,
        create_size: None,
        read_only: false,
    };
    let storage = open_storage(&loopdev.dev, &opts).expect("open loop device");
    assert_eq!(storage.size(), size);
    let caps = storage.capabilities();
    assert!(caps.direct);
    assert_eq!(
        caps.alignment, 512,
        "loop devices have 512-byte logical blocks"
    );
    let data = pattern(21, 3 * 512);
    write(&*storage, size - 3 * 512, &data);
    assert!(
        read(&*storage, size - 3 * 512, 3 * 512) == data,
        "last sectors"
    );
    let past_end = StorageIo::Read {
        offset: size,
        buf: AlignedBuf::zeroed(512),
    };
    assert_io_error(&run(&*storage, past_end), io::ErrorKind::InvalidInput);
    check_discard_and_write_zeroes(&*storage);
    drop(storage);
}

fn concurrent_submitters(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), 8 * MIB, true);
    const THREADS: u64 = 4;
    const BLOCK: usize = 4096;
    let region = 2 * MIB; // each thread owns one region
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let storage = Arc::clone(&storage);
            thread::spawn(move || {
                let (tx, rx) = unbounded();
                let blocks = region as usize / BLOCK;
                let mut inflight = 0;
                for b in 0..blocks {
                    let buf = AlignedBuf::from_slice(&pattern(t * 1000 + b as u64, BLOCK));
                    let offset = t * region + (b * BLOCK) as u64;
                    storage.submit(
                        StorageIo::Write {
                            offset,
                            buf,
                            fua: false,
                        },
                        send_to(&tx, b),
                    );
                    inflight += 1;
                    if inflight == 16 {
                        rx.recv().expect("completion").1.result.expect("write");
                        inflight -= 1;
                    }
                }
                for _ in 0..inflight {
                    rx.recv().expect("completion").1.result.expect("write");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("submitter thread");
    }
    let all = read(&*storage, 0, (THREADS * region) as usize);
    for t in 0..THREADS {
        for b in 0..region as usize / BLOCK {
            let at = (t * region) as usize + b * BLOCK;
            assert!(
                all[at..at + BLOCK] == pattern(t * 1000 + b as u64, BLOCK),
                "thread {t} block {b}"
            );
        }
    }
}

fn drop_with_requests_in_flight_completes_them(engine: EngineKind) {
    let dir = target_tempdir();
    let path = image_path(&dir);
    let storage = open(engine, &path, 4 * MIB, true);
    const N: usize = 256;
    const BLOCK: usize = 16384;
    let completed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    for i in 0..N {
        let buf = AlignedBuf::from_slice(&pattern(100 + i as u64, BLOCK));
        let (completed, failed) = (Arc::clone(&completed), Arc::clone(&failed));
        storage.submit(
            StorageIo::Write {
                offset: (i * BLOCK) as u64,
                buf,
                fua: false,
            },
            Box::new(move |out| {
                if out.result.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                completed.fetch_add(1, Ordering::SeqCst);
            }),
        );
    }
    drop(storage); // the last reference: joins the engine's threads
    assert_eq!(
        completed.load(Ordering::SeqCst),
        N,
        "every request completed by drop"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    let on_disk = std::fs::read(&path).expect("read image");
    for i in 0..N {
        assert!(
            on_disk[i * BLOCK..(i + 1) * BLOCK] == pattern(100 + i as u64, BLOCK),
            "{i}"
        );
    }
}

/// Completions may submit more I/O (from the engine's own thread), and the
/// last reference may be dropped inside a callback without deadlocking.
fn resubmit_from_completion_callback(engine: EngineKind) {
    let dir = target_tempdir();
    let storage = open(engine, &image_path(&dir), MIB, true);
    let (tx, rx) = bounded::<usize>(1);
    fn chain(storage: Arc<dyn BlockStorage>, i: usize, tx: crossbeam_channel::Sender<usize>) {
        if i == 100 {
            drop(storage); // may be the last reference, on an engine thread
            let _ = tx.send(i);
            return;
        }
        let buf = AlignedBuf::from_slice(&pattern(i as u64, 4096));
        let next = Arc::clone(&storage);
        storage.submit(
            StorageIo::Write {
                offset: (i as u64 % 64) * 4096,
                buf,
                fua: false,
            },
            Box::new(move |out| {
                if out.result.is_ok() {
                    chain(next, i + 1, tx);
                }
            }),
        );
    }
    let reader = Arc::clone(&storage);
    chain(storage, 0, tx);
    assert_eq!(recv_done(&rx), 100, "all 100 chained writes completed");
    // Blocks 36..63 were last written by writes 36..63, blocks 0..35 by 64..99.
    assert!(read(&*reader, 40 * 4096, 4096) == pattern(40, 4096));
    assert!(read(&*reader, 4096, 4096) == pattern(65, 4096));
    drop(reader);

    // Now the callback holds the only reference when it runs.
    let storage = open(engine, &image_path(&dir), MIB, true);
    let (tx, rx) = bounded::<usize>(1);
    chain(storage, 99, tx);
    assert_eq!(recv_done(&rx), 100);
}

fn recv_done(rx: &Receiver<usize>) -> usize {
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("chain finished")
}

fn read_only_refuses_modifications(engine: EngineKind) {
    let dir = target_tempdir();
    let path = image_path(&dir);
    let rw = open(engine, &path, MIB, true);
    write(&*rw, 0, &pattern(2, 4096));
    drop(rw);
    let opts = OpenOptions {
        engine,
        direct: true,
        create_size: None,
        read_only: true,
    };
    let ro = open_storage(&path, &opts).expect("open read-only");
    assert!(!ro.capabilities().discard);
    let io = StorageIo::Write {
        offset: 0,
        buf: AlignedBuf::zeroed(4096),
        fua: false,
    };
    let out = run(&*ro, io);
    assert_eq!(
        out.result.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EROFS))
    );
    let out = run(
        &*ro,
        StorageIo::Discard {
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(
        out.result.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EROFS))
    );
    assert!(
        read(&*ro, 0, 4096) == pattern(2, 4096),
        "data intact and readable"
    );
}

fn create_size_makes_sparse_file(engine: EngineKind) {
    let dir = target_tempdir();
    let path = image_path(&dir);
    let size = 64 * MIB;
    let storage = open(engine, &path, size, true);
    assert_eq!(storage.size(), size);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 < MIB,
        "sparse: {} blocks allocated",
        meta.blocks()
    );
    assert!(read(&*storage, size - 4096, 4096).iter().all(|&b| b == 0));
    // A missing file without create_size is an error, not a silent create.
    let opts = OpenOptions {
        engine,
        ..OpenOptions::default()
    };
    let missing = open_storage(&dir.path().join("missing.img"), &opts);
    assert_eq!(
        missing.err().map(|e| e.kind()),
        Some(io::ErrorKind::NotFound)
    );
}
