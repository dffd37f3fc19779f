//! Core bugs the simulation found, each as the smallest sequence of public
//! library calls that shows it (storage: the simulation's model, so I/O
//! stays in flight until the test lets it finish).

use blkshim::epoch::MemEpochStore;
use blkshim::handoff::{Disk, DiskOptions, HandoffMethod, RequestFate, SuspendMode};
use blkshim::sim::rng::SimRng;
use blkshim::sim::sched::{Event, Sched, SharedSched};
use blkshim::sim::storage_model::{StorageModel, StorageParams};
use blkshim::storage::{AlignedBuf, StorageIo};
use std::sync::Arc;
use std::time::Duration;

fn gateway() -> (SharedSched, Arc<StorageModel>, Arc<Disk>) {
    let sched = Sched::shared();
    let params = StorageParams {
        sectors: 64,
        min_delay: 10,
        max_delay: 10,
        tail_percent: 0,
        tail: 0,
        ignore_overlapping: true,
    };
    let model = StorageModel::new(params, Arc::clone(&sched), SimRng::new(1));
    let disk = Disk::open(
        "vm1",
        model.path(),
        Arc::new(MemEpochStore::default()),
        DiskOptions {
            auto_advance: true,
            fence_timeout: None,
        },
    )
    .unwrap();
    (sched, model, disk)
}

fn run(sched: &SharedSched, m: &StorageModel) {
    loop {
        let ev = sched.lock().pop();
        match ev {
            Some((_, Event::Storage(id))) => m.deliver(id),
            Some(_) => {}
            None => break,
        }
    }
}

fn write(sector: u64) -> StorageIo {
    StorageIo::Write {
        offset: sector * 512,
        buf: AlignedBuf::from_slice(&[1; 512]),
        fua: false,
    }
}

const DRAIN: SuspendMode = SuspendMode::Drain {
    timeout: Duration::from_secs(1),
};

/// A gateway writer registered above the current epoch advances it only
/// with its first write. Suspended before writing (it only read), its
/// record says "epoch 2 -> 3" while the store is still at 1, and resume
/// refused that legitimate record as stale: the VM could not move on.
/// Found by `blkshim sim --seed 2992 --scenario ping-pong/gateway`.
#[test]
fn resume_accepts_record_of_a_writer_that_never_wrote() {
    let (sched, model, disk) = gateway();
    disk.advance_to(1).unwrap();
    let _x = disk.register(Some(1), "X").unwrap();
    // Y takes over the gateway way: registered at 2, and only reads.
    let y = disk.register(Some(2), "Y").unwrap();
    let read = StorageIo::Read {
        offset: 0,
        buf: AlignedBuf::zeroed(512),
    };
    disk.submit(&y, 1, read, Box::new(|o| assert!(o.result.is_ok())));
    run(&sched, &model);
    assert_eq!(disk.current_epoch(), 1);
    // Y migrates on.
    let mut s = disk.begin_suspend(2, DRAIN);
    let record = s.try_finish(false).expect("nothing in flight");
    assert_eq!((record.source_epoch, record.destination_epoch), (2, 3));
    assert_eq!(disk.resume(&record).unwrap(), 3);
    // Everything older is fenced.
    let x_again = disk.register(Some(1), "X again");
    assert!(x_again.is_err());
}

/// A suspend whose source connection died is still finished by the
/// gateway at its deadline. If a newer writer's suspend began meanwhile,
/// finishing the old one cleared the disk's (newer) suspension log, so the
/// newer record listed requests that completed as "cancelled".
/// Found by `blkshim sim --seed 706 --scenario ping-pong/gateway`.
#[test]
fn finishing_an_old_suspension_does_not_clobber_a_newer_one() {
    let (sched, model, disk) = gateway();
    disk.advance_to(1).unwrap();
    let x = disk.register(Some(1), "X").unwrap();
    disk.submit(&x, 10, write(0), Box::new(|_| {}));
    let mut old = disk.begin_suspend(1, DRAIN);
    // X's connection dies; Y takes over at epoch 2 and writes.
    disk.advance_to(2).unwrap();
    let y = disk.register(Some(2), "Y").unwrap();
    disk.submit(&y, 20, write(8), Box::new(|_| {}));
    let mut newer = disk.begin_suspend(2, DRAIN);
    // The old suspend's deadline passes.
    assert!(old.try_finish(true).is_some());
    run(&sched, &model);
    let record = newer.try_finish(false).expect("drained");
    assert_eq!(record.method, HandoffMethod::Drained);
    let entry = record
        .requests
        .iter()
        .find(|e| e.tag == 20)
        .expect("Y's write is listed");
    assert_eq!(entry.fate, RequestFate::CompletedNotAcknowledged);
}
