//! The adversarial storage model: shared block storage that behaves the way
//! seeds/003's storage did, and worse.
//!
//! - A write (or discard / write-zeroes) to a sector that already has a
//!   write in flight is completed at once, successfully, and **ignored**.
//! - Every I/O finishes after a random delay with a long tail, so
//!   completions are reordered; data lands when the I/O finishes.
//! - A path (one host's connection) can **hang**: its I/O finishes only
//!   after a long time, then lands late (a source that is cut off but not
//!   dead). A dead host's completions are lost, but its writes still land.
//! - It offers persistent-reservation fencing ([`StorageFencing`], type
//!   Write Exclusive, keys = epochs): a preempt aborts the older
//!   registrants' I/O in flight and the storage refuses their later writes.
//!
//! Completions are never delivered inside `submit`: each I/O becomes an
//! [`Event::Storage`] on the shared clock and is delivered by the
//! simulation loop through [`StorageModel::deliver`], so the order is
//! seeded and the call stack flat.

use super::rng::SimRng;
use super::sched::{Event, SharedSched, Time};
use crate::storage::fencing::{FenceError, Preempted, ReservationKey, StorageFencing};
use crate::storage::{
    AlignedBuf, BlockStorage, Capabilities, IoDone, IoOutcome, StorageIo, SECTOR_SIZE,
};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

/// How adversarial the storage is.
#[derive(Debug, Clone)]
pub struct StorageParams {
    pub sectors: u64,
    /// Every I/O takes `min_delay..=max_delay` ticks...
    pub min_delay: Time,
    pub max_delay: Time,
    /// ...plus, with this probability (percent), up to `tail` more.
    pub tail_percent: u64,
    pub tail: Time,
    /// seeds/003's rule: ignore a write overlapping a write in flight.
    pub ignore_overlapping: bool,
}

impl Default for StorageParams {
    fn default() -> Self {
        StorageParams {
            sectors: 64,
            min_delay: 1,
            max_delay: 30,
            tail_percent: 10,
            tail: 300,
            ignore_overlapping: true,
        }
    }
}

/// What the storage did, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageStats {
    pub submitted: u64,
    /// Writes, discards and write-zeroes whose data reached the medium.
    pub landed: u64,
    /// Writes completed at once and ignored (seeds/003).
    pub ignored_overlapping: u64,
    /// Writes refused because another path holds the reservation.
    pub refused_reservation: u64,
    /// I/O aborted by a preempt (never landed).
    pub aborted: u64,
    /// Writes that landed after a preempt had fenced their path's key
    /// (zero unless fencing is broken or unused).
    pub landed_after_preempt: u64,
    /// I/O dropped because its host was powered off or reset before it
    /// landed ([`StorageModel::drop_in_flight`]).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Normal,
    Ignored,
    Aborted,
    Refused,
    BadRange,
}

struct Pending {
    path: u32,
    io: StorageIo,
    done: IoDone,
    fate: Fate,
    hold_until: Time,
    /// Sector range of a modifying I/O (for the overlap rule).
    writes: Option<(u64, u64)>,
    /// Highest preempting key when it was submitted.
    preempt_gen: u64,
    /// The submitting writer's epoch, when its path says.
    epoch: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct PathState {
    registered: Option<ReservationKey>,
    hang_until: Time,
    dead: bool,
}

struct Inner {
    data: Vec<u8>,
    rng: SimRng,
    params: StorageParams,
    ios: BTreeMap<u64, Pending>,
    next_io: u64,
    paths: Vec<PathState>,
    holder: Option<(u32, ReservationKey)>,
    /// Bumped by every preempt.
    preempt_gen: u64,
    /// What landed since the last [`StorageModel::take_landed`].
    landed: Vec<Landed>,
    stats: StorageStats,
}

/// Data that reached the medium: a sector range and the epoch of the
/// writer whose write, trim or write-zeroes put it there (`None` for I/O
/// submitted without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub start: u64,
    pub count: u64,
    pub epoch: Option<u64>,
}

/// The shared storage. Hand each host a [`StoragePath`].
pub struct StorageModel {
    inner: Mutex<Inner>,
    sched: SharedSched,
}

/// One host's connection to the storage (an I_T nexus, in SCSI terms).
pub struct StoragePath {
    model: Arc<StorageModel>,
    id: u32,
}

fn modifies(io: &StorageIo) -> bool {
    matches!(
        io,
        StorageIo::Write { .. } | StorageIo::Discard { .. } | StorageIo::WriteZeroes { .. }
    )
}

impl StorageModel {
    pub fn new(params: StorageParams, sched: SharedSched, rng: SimRng) -> Arc<Self> {
        let size = (params.sectors * SECTOR_SIZE) as usize;
        Arc::new(StorageModel {
            inner: Mutex::new(Inner {
                data: vec![0; size],
                rng,
                params,
                ios: BTreeMap::new(),
                next_io: 1,
                paths: Vec::new(),
                holder: None,
                preempt_gen: 0,
                landed: Vec::new(),
                stats: StorageStats::default(),
            }),
            sched,
        })
    }

    /// A new path (a new host, or the gateway's single connection).
    pub fn path(self: &Arc<Self>) -> Arc<StoragePath> {
        let mut g = self.inner.lock();
        g.paths.push(PathState::default());
        Arc::new(StoragePath {
            model: Arc::clone(self),
            id: (g.paths.len() - 1) as u32,
        })
    }

    pub fn stats(&self) -> StorageStats {
        self.inner.lock().stats.clone()
    }

    /// A copy of the whole medium.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.lock().data.clone()
    }

    /// The ranges (and their writers' epochs) that landed since the last
    /// call, in landing order.
    pub fn take_landed(&self) -> Vec<Landed> {
        std::mem::take(&mut self.inner.lock().landed)
    }

    /// A copy of `count` sectors from `start` (clipped to the medium).
    pub fn read_sectors(&self, start: u64, count: u64) -> Vec<u8> {
        let g = self.inner.lock();
        let n = g.data.len() as u64;
        let a = (start * SECTOR_SIZE).min(n) as usize;
        let b = ((start + count) * SECTOR_SIZE).min(n) as usize;
        g.data[a..b].to_vec()
    }

    /// I/Os submitted and not yet delivered.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().ios.len()
    }

    /// Every I/O of `path`, in flight now or submitted before `until`,
    /// finishes no earlier than `until`.
    pub fn hang_path(&self, path: u32, until: Time) {
        let mut g = self.inner.lock();
        if let Some(p) = g.paths.get_mut(path as usize) {
            p.hang_until = p.hang_until.max(until);
        }
    }

    /// Only the I/Os of `path` in flight now finish no earlier than `until`.
    pub fn hang_in_flight(&self, path: u32, until: Time) {
        let mut g = self.inner.lock();
        for p in g.ios.values_mut().filter(|p| p.path == path) {
            p.hold_until = p.hold_until.max(until);
        }
    }

    /// The host behind `path` died: its completions are lost from now on
    /// (its writes in flight still land).
    pub fn kill_path(&self, path: u32) {
        if let Some(p) = self.inner.lock().paths.get_mut(path as usize) {
            p.dead = true;
        }
    }

    /// I/O of `path` still in flight that may yet land or be read (aborted,
    /// refused and ignored I/O is not counted).
    pub fn in_flight_on(&self, path: u32) -> usize {
        self.inner
            .lock()
            .ios
            .values()
            .filter(|p| p.path == path && p.fate == Fate::Normal)
            .count()
    }

    /// Whether `path` is hung at `now` (its I/O, and a host's lease I/O
    /// over it, cannot get through).
    pub fn path_hung(&self, path: u32, now: Time) -> bool {
        self.inner
            .lock()
            .paths
            .get(path as usize)
            .is_some_and(|p| p.hang_until > now)
    }

    /// The host behind `path` was powered off or reset: every I/O of it
    /// that has not landed yet never will (its completions are lost).
    /// Returns how many were dropped.
    pub fn drop_in_flight(&self, path: u32) -> usize {
        let mut g = self.inner.lock();
        let ids: Vec<u64> = g
            .ios
            .iter()
            .filter(|(_, p)| p.path == path)
            .map(|(&id, _)| id)
            .collect();
        let gone: Vec<Pending> = ids.iter().filter_map(|id| g.ios.remove(id)).collect();
        g.stats.dropped += gone.len() as u64;
        if let Some(p) = g.paths.get_mut(path as usize) {
            p.dead = true;
        }
        drop(g);
        // Their completions are dropped uncalled, outside the lock.
        gone.len()
    }

    fn submit(&self, path: u32, epoch: Option<u64>, io: StorageIo, done: IoDone) {
        let now = self.sched.lock().now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.stats.submitted += 1;
        let id = inner.next_io;
        inner.next_io += 1;
        let size = inner.params.sectors * SECTOR_SIZE;
        let in_range = io
            .byte_range()
            .is_none_or(|(o, l)| l > 0 && o.checked_add(l).is_some_and(|e| e <= size));
        let writes = if modifies(&io) {
            io.byte_range()
                .map(|(o, l)| (o / SECTOR_SIZE, (o + l).div_ceil(SECTOR_SIZE)))
        } else {
            None
        };
        let is_mod = modifies(&io);
        let fate = if !in_range {
            Fate::BadRange
        } else if is_mod && inner.holder.is_some_and(|(h, _)| h != path) {
            inner.stats.refused_reservation += 1;
            Fate::Refused
        } else if let (true, Some((s, e))) = (inner.params.ignore_overlapping, writes) {
            let busy = inner.ios.values().any(|p| {
                p.fate == Fate::Normal && p.writes.is_some_and(|(ps, pe)| ps < e && s < pe)
            });
            if busy {
                inner.stats.ignored_overlapping += 1;
                Fate::Ignored
            } else {
                Fate::Normal
            }
        } else {
            Fate::Normal
        };
        let delay = match fate {
            Fate::Normal => {
                let p = &inner.params;
                let (lo, hi, tp, tail) = (p.min_delay, p.max_delay, p.tail_percent, p.tail);
                let mut d = inner.rng.range(lo, hi);
                if inner.rng.chance(tp) {
                    d += inner.rng.range(0, tail);
                }
                d
            }
            _ => inner.rng.range(0, 1),
        };
        let hold_until = inner.paths.get(path as usize).map_or(0, |p| p.hang_until);
        let preempt_gen = inner.preempt_gen;
        inner.ios.insert(
            id,
            Pending {
                path,
                io,
                done,
                fate,
                hold_until,
                writes: if fate == Fate::Normal { writes } else { None },
                preempt_gen,
                epoch,
            },
        );
        drop(g);
        self.sched.lock().at(now + delay, Event::Storage(id));
    }

    /// Finish I/O `id` (the simulation loop calls this for
    /// [`Event::Storage`]): land its data and run its completion.
    pub fn deliver(&self, id: u64) {
        if let Some((done, outcome)) = self.finish(id) {
            done(outcome);
        }
    }

    fn finish(&self, id: u64) -> Option<(IoDone, IoOutcome)> {
        let now = self.sched.lock().now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let p = inner.ios.get_mut(&id)?;
        let hang = inner
            .paths
            .get(p.path as usize)
            .map_or(0, |s| s.hang_until)
            .max(p.hold_until);
        if hang > now && p.fate != Fate::Aborted {
            // Still hung: land a little after the hang ends, in random order.
            let at = hang + inner.rng.range(0, 40);
            p.hold_until = at;
            drop(g);
            self.sched.lock().at(at, Event::Storage(id));
            return None;
        }
        let p = inner.ios.remove(&id)?;
        let result = match p.fate {
            Fate::Normal => Ok(()),
            Fate::Ignored => Ok(()),
            Fate::Aborted => Err(io::Error::from_raw_os_error(libc::ECANCELED)),
            Fate::Refused => Err(io::Error::from_raw_os_error(libc::EACCES)),
            Fate::BadRange => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let who = (p.path, p.preempt_gen, p.epoch);
        let buf: Option<AlignedBuf> = match p.io {
            StorageIo::Read { offset, mut buf } => {
                if p.fate == Fate::Normal {
                    let o = offset as usize;
                    let n = buf.len();
                    buf.as_mut_slice().copy_from_slice(&inner.data[o..o + n]);
                }
                Some(buf)
            }
            StorageIo::Write { offset, buf, .. } => {
                if p.fate == Fate::Normal {
                    let o = offset as usize;
                    inner.data[o..o + buf.len()].copy_from_slice(buf.as_slice());
                    inner.note_landed(who, offset, buf.len() as u64);
                }
                Some(buf)
            }
            StorageIo::Discard { offset, len } | StorageIo::WriteZeroes { offset, len, .. } => {
                if p.fate == Fate::Normal {
                    inner.data[offset as usize..(offset + len) as usize].fill(0);
                    inner.note_landed(who, offset, len);
                }
                None
            }
            StorageIo::Flush => None,
        };
        let dead = inner.paths.get(p.path as usize).is_some_and(|s| s.dead);
        drop(g);
        if dead {
            return None;
        }
        Some((p.done, IoOutcome { result, buf }))
    }

    fn register(&self, path: u32, key: ReservationKey) -> Result<(), FenceError> {
        let mut g = self.inner.lock();
        let p = g
            .paths
            .get_mut(path as usize)
            .ok_or_else(|| FenceError::Io(io::Error::from_raw_os_error(libc::ENODEV)))?;
        p.registered = Some(key);
        Ok(())
    }

    fn preempt_and_abort(&self, path: u32, key: ReservationKey) -> Result<Preempted, FenceError> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if inner.paths.get(path as usize).and_then(|p| p.registered) != Some(key) {
            return Err(FenceError::NotRegistered { key });
        }
        if let Some((hp, hk)) = inner.holder {
            if hk > key || (hk == key && hp != path) {
                return Err(FenceError::HeldByNewer { key, holder: hk });
            }
        }
        let mut keys = Vec::new();
        for (i, p) in inner.paths.iter_mut().enumerate() {
            if i as u32 != path {
                if let Some(k) = p.registered.filter(|&k| k < key) {
                    keys.push(k);
                    p.registered = None;
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let mut aborted = 0;
        for p in inner.ios.values_mut() {
            let stale = p.path != path
                && inner
                    .paths
                    .get(p.path as usize)
                    .is_none_or(|s| s.registered.is_none_or(|k| k < key));
            if stale && p.fate == Fate::Normal {
                p.fate = Fate::Aborted;
                p.writes = None;
                aborted += 1;
            }
        }
        inner.stats.aborted += aborted as u64;
        inner.preempt_gen += 1;
        inner.holder = Some((path, key));
        Ok(Preempted { keys, aborted })
    }
}

impl Inner {
    fn note_landed(&mut self, who: (u32, u64, Option<u64>), offset: u64, len: u64) {
        let (path, submitted_gen, epoch) = who;
        self.stats.landed += 1;
        self.landed.push(Landed {
            start: offset / SECTOR_SIZE,
            count: len.div_ceil(SECTOR_SIZE),
            epoch,
        });
        // A write submitted before a preempt by another path, landing after it.
        if submitted_gen < self.preempt_gen && self.holder.is_some_and(|(h, _)| h != path) {
            self.stats.landed_after_preempt += 1;
        }
    }
}

impl StoragePath {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn model(&self) -> &Arc<StorageModel> {
        &self.model
    }

    /// This path as one writer uses it: its I/O carries the writer's
    /// epoch, so the checker can tell whose data landed.
    pub fn tagged(self: &Arc<Self>, epoch: u64) -> Arc<dyn BlockStorage> {
        Arc::new(TaggedPath {
            path: Arc::clone(self),
            epoch,
        })
    }
}

/// A [`StoragePath`] whose I/O is stamped with a writer's epoch.
struct TaggedPath {
    path: Arc<StoragePath>,
    epoch: u64,
}

impl BlockStorage for TaggedPath {
    fn size(&self) -> u64 {
        self.path.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.path.capabilities()
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        self.path
            .model
            .submit(self.path.id, Some(self.epoch), io, done);
    }
}

impl BlockStorage for StoragePath {
    fn size(&self) -> u64 {
        self.model.inner.lock().params.sectors * SECTOR_SIZE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            direct: true,
            discard: true,
            fast_zero: true,
            alignment: SECTOR_SIZE,
        }
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        self.model.submit(self.id, None, io, done);
    }
}

impl StorageFencing for StoragePath {
    fn register(&self, key: ReservationKey) -> Result<(), FenceError> {
        self.model.register(self.id, key)
    }

    fn preempt_and_abort(&self, key: ReservationKey) -> Result<Preempted, FenceError> {
        self.model.preempt_and_abort(self.id, key)
    }

    fn reservation(&self) -> Option<ReservationKey> {
        self.model.inner.lock().holder.map(|(_, k)| k)
    }
}
