use super::*;
use crate::epoch::{EpochStore, FileEpochStore, MemEpochStore};
use crate::storage::{AlignedBuf, MemStorage};
use std::sync::mpsc;

/// A storage that holds every I/O until the test releases it, so tests
/// control exactly what is "at the storage".
#[derive(Default)]
struct HeldStorage {
    inner: Mutex<Vec<(StorageIo, IoDone)>>,
    mem: Mutex<Vec<u8>>,
}

impl HeldStorage {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(HeldStorage {
            inner: Mutex::new(Vec::new()),
            mem: Mutex::new(vec![0; size]),
        })
    }

    fn held(&self) -> usize {
        self.inner.lock().len()
    }

    /// Complete the `i`-th held I/O (applying it to memory).
    fn release(&self, i: usize) {
        let (io, done) = self.inner.lock().remove(i);
        let outcome = crate::storage::apply_io(&mut self.mem.lock(), io);
        done(outcome);
    }

    fn byte(&self, offset: usize) -> u8 {
        self.mem.lock()[offset]
    }
}

impl BlockStorage for HeldStorage {
    fn size(&self) -> u64 {
        self.mem.lock().len() as u64
    }
    fn capabilities(&self) -> Capabilities {
        crate::storage::MemStorage::CAPABILITIES
    }
    fn submit(&self, io: StorageIo, done: IoDone) {
        self.inner.lock().push((io, done));
    }
}

type Results = mpsc::Receiver<(u64, io::Result<()>)>;
type ResultTx = mpsc::Sender<(u64, io::Result<()>)>;

fn writer_io(disk: &Arc<Disk>, w: &Writer, tag: u64, sector: u64, byte: u8, tx: &ResultTx) {
    let tx = tx.clone();
    disk.submit(
        w,
        tag,
        StorageIo::Write {
            offset: sector * 512,
            buf: AlignedBuf::from_slice(&[byte; 512]),
            fua: false,
        },
        Box::new(move |o| {
            let _ = tx.send((tag, o.result));
        }),
    );
}

fn gateway(opts: DiskOptions) -> (Arc<HeldStorage>, Arc<Disk>, ResultTx, Results) {
    let storage = HeldStorage::new(1 << 20);
    let disk = Disk::open(
        "vm1",
        storage.clone(),
        Arc::new(MemEpochStore::default()),
        opts,
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    (storage, disk, tx, rx)
}

fn errno_of(r: &io::Result<()>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// seeds/003 through the gateway: A from the source is at the storage; the
/// destination's replay of A and its new A' must not reach the storage
/// until A completed, and the block ends with A'.
#[test]
fn destination_write_ordered_after_source_in_flight_write() {
    let (storage, disk, tx, rx) = gateway(DiskOptions {
        auto_advance: true,
        fence_timeout: None,
    });
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 0xA, &tx); // A at the storage
    assert_eq!(storage.held(), 1);
    let y = disk.register(Some(2), "Y").unwrap();
    writer_io(&disk, &y, 2, 0, 0xA, &tx); // replay of A
    writer_io(&disk, &y, 3, 0, 0xB, &tx); // A'
    assert_eq!(
        disk.current_epoch(),
        2,
        "Y's first write advanced the epoch"
    );
    assert_eq!(storage.held(), 1, "Y's writes wait behind X's A");
    // X can no longer write.
    writer_io(&disk, &x, 4, 8, 0xC, &tx);
    let (tag, res) = rx.recv().unwrap();
    assert_eq!((tag, errno_of(&res)), (4, Some(libc::EPERM)));
    storage.release(0); // X's A lands (drained, not yet fenced: acknowledged to X)
    assert_eq!(rx.recv().unwrap().0, 1);
    storage.release(0); // replay
    storage.release(0); // A'
    assert_eq!(storage.byte(0), 0xB);
    let mut tags: Vec<u64> = rx
        .try_iter()
        .map(|(t, r)| if r.is_ok() { t } else { 0 })
        .collect();
    tags.sort();
    assert_eq!(tags, vec![2, 3]);
    let st = disk.status();
    assert_eq!(st.refused_stale, 1);
    assert_eq!(st.current_epoch, 2);
    assert!(st.writers.iter().any(|w| w.label == "X" && w.fenced));
}

#[test]
fn fence_timeout_cancels_waiting_stale_writes() {
    let (storage, disk, tx, rx) = gateway(DiskOptions {
        auto_advance: true,
        fence_timeout: Some(Duration::from_millis(30)),
    });
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 1, &tx); // at storage
    writer_io(&disk, &x, 2, 0, 2, &tx); // waiting behind 1
    let y = disk.register(Some(2), "Y").unwrap();
    writer_io(&disk, &y, 3, 100, 3, &tx); // unrelated sector: goes straight to storage
    assert_eq!(storage.held(), 2);
    // After the timeout, 2 is cancelled (never reaches storage) and 1 is fenced.
    let (tag, res) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((tag, errno_of(&res)), (2, Some(libc::EPERM)));
    storage.release(0); // 1 completes at storage, but fenced: not acknowledged as success
    let (tag, res) = rx.recv().unwrap();
    assert_eq!((tag, errno_of(&res)), (1, Some(libc::EPERM)));
    storage.release(0);
    assert_eq!(rx.recv().unwrap().0, 3);
    assert_eq!(storage.byte(0), 1);
    let st = disk.status();
    assert_eq!((st.cancelled, st.fenced), (1, 1));
}

#[test]
fn stale_registration_refused() {
    let (_s, disk, _tx, _rx) = gateway(DiskOptions::default());
    disk.advance_to(3).unwrap();
    assert!(matches!(
        disk.register(Some(2), "old"),
        Err(DiskError::StaleEpoch {
            requested: 2,
            current: 3
        })
    ));
    assert_eq!(disk.register(None, "bare").unwrap().epoch(), 3);
    assert!(matches!(
        disk.advance_to(2),
        Err(DiskError::StaleEpoch { .. })
    ));
}

#[test]
fn misaligned_and_out_of_range_io_refused() {
    let (storage, disk, tx, rx) = gateway(DiskOptions::default());
    let x = disk.register(None, "X").unwrap();
    for (tag, offset, len) in [
        (1u64, 1u64, 512usize),
        (2, 0, 100),
        (3, (1 << 20) - 512, 1024),
    ] {
        let tx = tx.clone();
        disk.submit(
            &x,
            tag,
            StorageIo::Write {
                offset,
                buf: AlignedBuf::zeroed(len),
                fua: false,
            },
            Box::new(move |o| tx.send((tag, o.result)).unwrap()),
        );
        let (t, r) = rx.recv().unwrap();
        assert_eq!((t, errno_of(&r)), (tag, Some(libc::EINVAL)));
    }
    assert_eq!(storage.held(), 0);
}

#[test]
fn suspend_drain_record_and_resume() {
    let storage = HeldStorage::new(1 << 20);
    let epochs: Arc<dyn EpochStore> = Arc::new(MemEpochStore::default());
    let opts = DiskOptions {
        auto_advance: false,
        fence_timeout: None,
    };
    let src = Disk::open("vm1", storage.clone(), epochs.clone(), opts.clone()).unwrap();
    src.advance_to(1).unwrap();
    let x = src.register(Some(1), "X").unwrap();
    let (tx, rx) = mpsc::channel();
    writer_io(&src, &x, 10, 0, 1, &tx);
    writer_io(&src, &x, 11, 0, 2, &tx); // queued behind 10
    let mut s = src.begin_suspend(
        1,
        SuspendMode::Drain {
            timeout: Duration::from_secs(1),
        },
    );
    // Suspended: no further request from X is taken, not even a read.
    writer_io(&src, &x, 12, 50, 3, &tx);
    assert_eq!(errno_of(&rx.recv().unwrap().1), Some(libc::ESHUTDOWN));
    assert!(s.try_finish(false).is_none(), "still draining");
    storage.release(0);
    assert!(s.try_finish(false).is_none(), "11 still in flight");
    storage.release(0);
    let rec = s.try_finish(false).expect("drained");
    let acked: Vec<u64> = rx
        .try_iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| t)
        .collect();
    assert_eq!(acked, vec![10, 11]);
    assert_eq!(rec.method, HandoffMethod::Drained);
    assert_eq!((rec.source_epoch, rec.destination_epoch), (1, 2));
    assert_eq!(rec.requests.len(), 2);
    assert!(rec
        .requests
        .iter()
        .all(|e| e.fate == RequestFate::CompletedNotAcknowledged));
    // Round-trips through JSON.
    let rec = HandoffRecord::from_json(&rec.to_json()).unwrap();

    // The destination host: its own Disk over the same storage and epochs.
    let dst = Disk::open("vm1", storage.clone(), epochs.clone(), opts).unwrap();
    let y = dst.register(Some(2), "Y").unwrap();
    writer_io(&dst, &y, 20, 0, 9, &tx);
    assert_eq!(
        errno_of(&rx.recv().unwrap().1),
        Some(libc::EAGAIN),
        "not admitted before resume"
    );
    assert_eq!(dst.resume(&rec).unwrap(), 2);
    writer_io(&dst, &y, 21, 0, 9, &tx);
    storage.release(0);
    assert_eq!(storage.byte(0), 9);
    // The same record cannot be used twice.
    assert!(matches!(
        dst.resume(&rec),
        Err(DiskError::StaleRecord { current: 2, .. })
    ));
    let mut wrong = rec.clone();
    wrong.disk = "vm2".into();
    assert!(matches!(
        dst.resume(&wrong),
        Err(DiskError::WrongDisk { .. })
    ));
}

#[test]
fn suspend_fence_record() {
    let (storage, disk, tx, rx) = gateway(DiskOptions {
        auto_advance: true,
        fence_timeout: None,
    });
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 1, &tx); // at storage
    writer_io(&disk, &x, 2, 0, 2, &tx); // waiting
    let mut s = disk.begin_suspend(1, SuspendMode::Fence);
    assert_eq!(
        errno_of(&rx.recv().unwrap().1),
        Some(libc::EPERM),
        "2 cancelled"
    );
    let rec = s.try_finish(false).expect("fence finishes at once");
    assert_eq!(rec.method, HandoffMethod::Fenced);
    let fate = |tag| rec.requests.iter().find(|e| e.tag == tag).unwrap().fate;
    assert_eq!(fate(1), RequestFate::Fenced);
    assert_eq!(fate(2), RequestFate::Cancelled);
    disk.resume(&rec).unwrap();
    let y = disk.register(Some(2), "Y").unwrap();
    writer_io(&disk, &y, 3, 0, 3, &tx);
    assert_eq!(
        storage.held(),
        1,
        "Y waits behind the fenced write still at storage"
    );
    storage.release(0);
    assert_eq!(
        errno_of(&rx.recv().unwrap().1),
        Some(libc::EPERM),
        "fenced write not acknowledged"
    );
    storage.release(0);
    assert_eq!(storage.byte(0), 3);
}

/// `suspend` in fence mode returns at once even though a write hangs at the
/// storage (it used to wait for it forever: a hung storage is exactly when
/// one fences).
#[test]
fn blocking_fence_suspend_does_not_wait_for_hung_storage() {
    let (storage, disk, tx, rx) = gateway(DiskOptions {
        auto_advance: true,
        fence_timeout: None,
    });
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 1, &tx); // hangs at the storage
    let rec = disk.suspend(1, SuspendMode::Fence).unwrap();
    assert_eq!(rec.method, HandoffMethod::Fenced);
    assert_eq!(rec.requests[0].fate, RequestFate::Fenced);
    assert_eq!(storage.held(), 1);
    storage.release(0);
    assert_eq!(errno_of(&rx.recv().unwrap().1), Some(libc::EPERM));
}

/// Reads are never fenced or cancelled: one still at the storage when the
/// record is made says so, and still completes (it cannot harm the disk).
#[test]
fn read_in_flight_at_suspend_is_recorded_as_still_in_flight() {
    let (storage, disk, tx, rx) = gateway(DiskOptions {
        auto_advance: true,
        fence_timeout: None,
    });
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 1, &tx);
    storage.release(0);
    assert!(rx.recv().unwrap().1.is_ok());
    let tx2 = tx.clone();
    disk.submit(
        &x,
        7,
        StorageIo::Read {
            offset: 0,
            buf: AlignedBuf::zeroed(512),
        },
        Box::new(move |o| {
            let _ = tx2.send((7, o.result));
        }),
    );
    writer_io(&disk, &x, 8, 64, 2, &tx); // a write, at storage too
    for mode in [
        SuspendMode::Fence,
        SuspendMode::Drain {
            timeout: Duration::from_millis(20),
        },
    ] {
        let rec = disk.suspend(1, mode).unwrap();
        let fate = |tag| rec.requests.iter().find(|e| e.tag == tag).unwrap().fate;
        assert_eq!(fate(7), RequestFate::StillInFlight, "{mode:?}");
        assert_eq!(fate(8), RequestFate::Fenced, "{mode:?}");
    }
    storage.release(0);
    storage.release(0);
    let mut got: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
    got.sort_by_key(|(tag, _)| *tag);
    assert!(got[0].1.is_ok(), "the read completes");
    assert_eq!(
        errno_of(&got[1].1),
        Some(libc::EPERM),
        "the fenced write is refused"
    );
}

#[test]
fn drain_deadline_falls_back_to_fence() {
    let (storage, disk, tx, _rx) = gateway(DiskOptions {
        auto_advance: false,
        fence_timeout: None,
    });
    disk.advance_to(1).unwrap();
    let x = disk.register(Some(1), "X").unwrap();
    writer_io(&disk, &x, 1, 0, 1, &tx); // hangs at the storage
    let rec = disk
        .suspend(
            1,
            SuspendMode::Drain {
                timeout: Duration::from_millis(20),
            },
        )
        .unwrap();
    assert_eq!(rec.method, HandoffMethod::DrainTimedOutThenFenced);
    assert_eq!(rec.requests[0].fate, RequestFate::Fenced);
    assert_eq!(storage.held(), 1);
}

#[test]
fn mem_storage_round_trip_through_disk() {
    let disk = Disk::open(
        "d",
        Arc::new(MemStorage::new(4096)),
        Arc::new(MemEpochStore::default()),
        DiskOptions::default(),
    )
    .unwrap();
    let w = disk.register(None, "w").unwrap();
    let (tx, rx) = mpsc::channel();
    writer_io(&disk, &w, 1, 2, 0x5a, &tx);
    assert!(rx.recv().unwrap().1.is_ok());
    let (dtx, drx) = mpsc::channel();
    disk.submit(
        &w,
        2,
        StorageIo::Read {
            offset: 1024,
            buf: AlignedBuf::zeroed(512),
        },
        Box::new(move |o| dtx.send(o.buf.unwrap().as_slice().to_vec()).unwrap()),
    );
    assert_eq!(drx.recv().unwrap(), vec![0x5a; 512]);
}

/// The epoch survives a restart of the gateway: a writer of the old epoch
/// cannot come back after the process (and its in-memory floor) is gone.
#[test]
fn epoch_persists_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let epochs = Arc::new(FileEpochStore::open(dir.path()).unwrap());
        let disk = Disk::open(
            "vm1",
            Arc::new(MemStorage::new(4096)),
            epochs,
            DiskOptions::default(),
        )
        .unwrap();
        let y = disk.register(Some(6), "Y").unwrap();
        let (tx, rx) = mpsc::channel();
        writer_io(&disk, &y, 1, 0, 6, &tx);
        assert!(rx.recv().unwrap().1.is_ok());
    }
    let epochs = Arc::new(FileEpochStore::open(dir.path()).unwrap());
    let disk = Disk::open(
        "vm1",
        Arc::new(MemStorage::new(4096)),
        epochs,
        DiskOptions::default(),
    )
    .unwrap();
    assert_eq!(disk.current_epoch(), 6);
    assert!(disk.register(Some(5), "X").is_err());
}

/// Host-side, found by the simulation's epoch-aware checker: host X's
/// writer at epoch 1 has A at the storage and A2 queued behind it; host Y
/// takes epoch 2 and writes; then X takes the disk back at epoch 3. X's
/// queued A2 is older than Y's data and X's tracker never saw Y's writes:
/// it must be cancelled, never started through X's (now reserved) path.
#[test]
fn advancing_over_an_epoch_taken_elsewhere_cancels_older_queued_writes() {
    let epochs: Arc<dyn EpochStore> = Arc::new(MemEpochStore::default());
    let storage = HeldStorage::new(1 << 20);
    let opts = DiskOptions {
        auto_advance: false,
        fence_timeout: None,
    };
    let x = Disk::open("vm1", storage.clone(), Arc::clone(&epochs), opts.clone()).unwrap();
    let y = Disk::open("vm1", storage.clone(), Arc::clone(&epochs), opts).unwrap();
    x.advance_to(1).unwrap();
    let xw = x.register(Some(1), "X").unwrap();
    let (tx, rx) = mpsc::channel();
    writer_io(&x, &xw, 1, 0, 0xA, &tx); // A at the storage
    writer_io(&x, &xw, 2, 0, 0xB, &tx); // A2 queued behind it
    assert_eq!(storage.held(), 1);
    // Y takes the disk (its own tracker) and writes.
    assert_eq!(y.advance_to(2).unwrap().to, 2);
    // X takes it back: 1 -> (2 elsewhere) -> 3.
    let adv = x.advance_to(3).unwrap();
    assert_eq!((adv.from, adv.to), (1, 3));
    let (tag, res) = rx.recv().unwrap();
    assert_eq!(
        (tag, errno_of(&res)),
        (2, Some(libc::EPERM)),
        "A2 cancelled"
    );
    storage.release(0); // A completes: fenced, not acknowledged
    let (tag, res) = rx.recv().unwrap();
    assert_eq!((tag, errno_of(&res)), (1, Some(libc::EPERM)));
    assert_eq!(storage.held(), 0, "A2 never reached the storage");
    assert_eq!(x.status().cancelled, 1);
}
