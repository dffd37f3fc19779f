//! [`PrFencing`]: [`StorageFencing`] over a Linux block device's persistent
//! reservations (SCSI `sd`, NVMe namespaces, device-mapper multipath maps).
//!
//! # Which reservation type, and why
//!
//! The contract ([`StorageFencing`]): a new writer at epoch *e* registers,
//! then preempts every older blkshim key; from then on only it may write.
//! blkshim reserves **Write Exclusive** (SCSI type 1, `PR_WRITE_EXCLUSIVE`)
//! by default:
//!
//! - Under *Write Exclusive* the right to write is one token, the
//!   reservation, held by one path; a registration alone grants nothing.
//!   It moves only by a PREEMPT sent by a *registered* path naming the
//!   holder's key. A stale writer that was preempted has lost its
//!   registration, so it cannot preempt back without registering again,
//!   and a fresh registration still lets it write nothing:
//!   [`StorageFencing::register`] is documented as granting no write
//!   access, and here that is the storage's rule, not only blkshim's.
//! - Under *Write Exclusive – Registrants Only* (what Pacemaker's
//!   `fence_scsi` and Windows clustering use) every registered path may
//!   write. A REGISTER needs no permission, so a fenced host that registers
//!   again (a restarted stale process, a re-queued hung request behind it)
//!   can write at once until somebody notices and preempts it again: the
//!   fence is then only as good as the stale side's restraint, which is
//!   what storage fencing must not depend on. Its one advantage is
//!   multipath: under Write Exclusive only the path that reserved may
//!   write, so a host writing through several paths of a dm-multipath map
//!   must reserve through the map's current path (dm does) and loses write
//!   access on path failover until it takes over again. [`PrOptions`]
//!   allows it for such deployments, with that weakness.
//! - *All Registrants* types make every registrant a holder (and report
//!   key 0): no single writer, so no epoch order; not offered. Exclusive
//!   Access types would also block reads from other paths (monitoring, the
//!   destination's reads before take-over); not offered.
//!
//! # PREEMPT or PREEMPT AND ABORT
//!
//! PREEMPT removes the victim's registrations (and moves its reservation)
//! but lets commands the target has already queued from the victim finish;
//! PREEMPT AND ABORT also aborts those, so none of them lands after the
//! take-over. [`PreemptMode::PreemptAndAbort`] is the default.
//! [`PreemptMode::Preempt`] exists because PREEMPT AND ABORT deadlocks
//! Linux's own target (LIO) over `tcm_loop` on Debian's 6.1 kernel: the
//! ioctl hangs in D state (`core_tmr_lun_reset` flushes the work item that
//! is running it). The test in `qemu-harness/hostside.sh` therefore runs
//! plain PREEMPT.
//!
//! # Keys, and other software's keys
//!
//! An epoch becomes a key with [`encode_key`] (a
//! blkshim marker in the top 24 bits). Keys without it are never preempted,
//! replaced or taken for an epoch: a reservation held by such a key of type
//! Write Exclusive or Exclusive Access is refused ([`FenceError::Foreign`])
//! since nobody but its holder may write; one of a registrants type (e.g.
//! `fence_scsi`'s) is left in place, blkshim's paths being registrants too,
//! and blkshim only removes its own older keys.

use super::device::{BlockDevice, PrDevice};
use super::key::{decode_key, encode_key, key_hex, KeyOwner};
use super::parse::{KeyList, Reservation, ReservationType, ScsiReservation};
use super::status::Transport;
use super::{FenceError, Preempted, ReservationKey, StorageFencing};
use std::io;
use std::path::{Path, PathBuf};

/// How a take-over removes older writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreemptMode {
    /// PREEMPT: registrations removed; commands already queued at the
    /// target from the victim may still complete.
    Preempt,
    /// PREEMPT AND ABORT: the victim's queued commands are aborted too.
    #[default]
    PreemptAndAbort,
}

impl PreemptMode {
    pub fn name(self) -> &'static str {
        match self {
            PreemptMode::Preempt => "preempt",
            PreemptMode::PreemptAndAbort => "preempt-and-abort",
        }
    }
}

/// How [`PrFencing`] fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrOptions {
    pub preempt: PreemptMode,
    /// [`ReservationType::WriteExclusive`] (default) or
    /// [`ReservationType::WriteExclusiveRegistrantsOnly`] (multipath; see
    /// the module documentation for what it gives up).
    pub rtype: ReservationType,
}

impl Default for PrOptions {
    fn default() -> Self {
        PrOptions {
            preempt: PreemptMode::PreemptAndAbort,
            rtype: ReservationType::WriteExclusive,
        }
    }
}

/// Persistent-reservation fencing of one host's path to a shared disk.
pub struct PrFencing {
    dev: Box<dyn PrDevice>,
    path: PathBuf,
    opts: PrOptions,
}

fn invalid(msg: String) -> FenceError {
    FenceError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl PrFencing {
    /// Open the block device `path` read-write (the PR ioctls need it) and
    /// find out whether it speaks SCSI or NVMe.
    pub fn open(path: impl AsRef<Path>, opts: PrOptions) -> Result<PrFencing, FenceError> {
        let path = path.as_ref();
        let dev = BlockDevice::open(path)?;
        Self::with_device(Box::new(dev), path, opts)
    }

    /// Over any [`PrDevice`] (a model of a logical unit, in tests).
    pub(crate) fn with_device(
        dev: Box<dyn PrDevice>,
        path: &Path,
        opts: PrOptions,
    ) -> Result<PrFencing, FenceError> {
        if !matches!(
            opts.rtype,
            ReservationType::WriteExclusive | ReservationType::WriteExclusiveRegistrantsOnly
        ) {
            return Err(invalid(format!(
                "reservation type {} cannot fence by epoch (write-exclusive or \
                 write-exclusive-registrants-only)",
                opts.rtype
            )));
        }
        Ok(PrFencing {
            dev,
            path: path.to_path_buf(),
            opts,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn transport(&self) -> Transport {
        self.dev.transport()
    }

    pub fn options(&self) -> PrOptions {
        self.opts
    }

    fn key_of(&self, epoch: u64) -> Result<u64, FenceError> {
        encode_key(epoch).map_err(|e| invalid(e.to_string()))
    }

    /// REGISTER (`old` 0: a path not registered yet; `new` 0: unregister),
    /// or REGISTER AND IGNORE EXISTING KEY.
    pub fn register_key(
        &self,
        old: u64,
        new: u64,
        ignore_existing: bool,
    ) -> Result<(), FenceError> {
        self.dev.register_key(old, new, ignore_existing)
    }

    /// RESERVE with `key` (registered through this path).
    pub fn reserve_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        self.dev.reserve_key(key, rtype)
    }

    /// RELEASE the reservation this path holds with `key`.
    pub fn release_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        self.dev.release_key(key, rtype)
    }

    /// PREEMPT (AND ABORT): this path, registered with `own`, removes every
    /// registration with `victim` and takes their reservation with `rtype`.
    /// (`linux/pr.h` calls `own` old_key and `victim` new_key.)
    pub fn preempt_key(
        &self,
        own: u64,
        victim: u64,
        rtype: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError> {
        self.dev.preempt_key(own, victim, rtype, abort)
    }

    /// CLEAR: remove every registration and the reservation (`key` must be
    /// registered through this path).
    pub fn clear_key(&self, key: u64) -> Result<(), FenceError> {
        self.dev.clear_key(key)
    }

    /// Every registered key (one entry per registered path).
    pub fn read_keys(&self) -> Result<KeyList, FenceError> {
        self.dev.read_keys()
    }

    /// The reservation and its generation.
    pub fn read_reservation_full(&self) -> Result<ScsiReservation, FenceError> {
        self.dev.read_reservation_full()
    }

    /// The reservation, if any.
    pub fn read_reservation(&self) -> Result<Option<Reservation>, FenceError> {
        Ok(self.read_reservation_full()?.reservation)
    }

    /// Unregister this path's key of `epoch`.
    pub fn unregister(&self, epoch: ReservationKey) -> Result<(), FenceError> {
        self.register_key(self.key_of(epoch)?, 0, false)
    }

    /// Release the reservation this path holds at `epoch` (its
    /// registration stays).
    pub fn release(&self, epoch: ReservationKey) -> Result<(), FenceError> {
        self.release_key(self.key_of(epoch)?, self.opts.rtype)
    }

    /// Clear every registration and the reservation, as the writer at
    /// `epoch` (registered through this path).
    pub fn clear(&self, epoch: ReservationKey) -> Result<(), FenceError> {
        self.clear_key(self.key_of(epoch)?)
    }

    /// The highest blkshim epoch among `keys` above `epoch`.
    fn newer_than(keys: &KeyList, epoch: u64) -> Option<u64> {
        keys.keys
            .iter()
            .filter_map(|&k| decode_key(k))
            .filter(|&e| e > epoch)
            .max()
    }

    /// One round of a take-over (see [`StorageFencing::preempt_and_abort`]);
    /// `Ok(false)`: the state moved under it, look again.
    fn take_round(
        &self,
        epoch: u64,
        key: u64,
        preempted: &mut Vec<u64>,
    ) -> Result<bool, FenceError> {
        let keys = self.read_keys()?;
        if let Some(holder) = Self::newer_than(&keys, epoch) {
            return Err(FenceError::HeldByNewer { key: epoch, holder });
        }
        if !keys.keys.contains(&key) {
            return Err(FenceError::NotRegistered { key: epoch });
        }
        let resv = self.read_reservation()?;
        let mut coexist = false;
        if let Some(r) = resv {
            match r.owner() {
                KeyOwner::Blkshim { epoch: h } if h > epoch => {
                    return Err(FenceError::HeldByNewer {
                        key: epoch,
                        holder: h,
                    })
                }
                KeyOwner::Blkshim { .. } => {}
                KeyOwner::Foreign | KeyOwner::None => {
                    if r.rtype.is_some_and(|t| t.registrants_may_write()) {
                        coexist = true;
                    } else {
                        return Err(FenceError::Foreign { key: r.key });
                    }
                }
            }
        }
        let mut victims: Vec<u64> = keys
            .keys
            .iter()
            .copied()
            .filter(|&k| decode_key(k).is_some_and(|e| e < epoch))
            .collect();
        victims.sort_unstable();
        victims.dedup();
        let abort = self.opts.preempt == PreemptMode::PreemptAndAbort;
        for &v in &victims {
            match self.preempt_key(key, v, self.opts.rtype, abort) {
                Ok(()) => {
                    log::info!(
                        "{}: epoch {epoch} preempted key {} ({})",
                        self.path.display(),
                        key_hex(v),
                        self.opts.preempt.name()
                    );
                    preempted.extend(decode_key(v));
                }
                Err(FenceError::Conflict { .. }) => {
                    // Either the victim is gone already (PREEMPT naming no
                    // registration is a conflict) or we were preempted.
                    let now = self.read_keys()?;
                    if let Some(holder) = Self::newer_than(&now, epoch) {
                        return Err(FenceError::HeldByNewer { key: epoch, holder });
                    }
                    if !now.keys.contains(&key) {
                        return Err(FenceError::NotRegistered { key: epoch });
                    }
                    if now.keys.contains(&v) {
                        return Err(FenceError::Conflict {
                            command: "preempt",
                            status: 0x18,
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        match self.read_reservation()? {
            Some(r) if r.key == key => Ok(true),
            Some(r) => match r.owner() {
                KeyOwner::Blkshim { epoch: h } if h > epoch => Err(FenceError::HeldByNewer {
                    key: epoch,
                    holder: h,
                }),
                KeyOwner::Blkshim { .. } => Ok(false), // an older one slipped in: again
                _ if coexist && r.rtype.is_some_and(|t| t.registrants_may_write()) => Ok(true),
                _ => Err(FenceError::Foreign { key: r.key }),
            },
            None => {
                match self.reserve_key(key, self.opts.rtype) {
                    Ok(()) => {}
                    Err(FenceError::Conflict { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
                Ok(matches!(self.read_reservation()?, Some(r) if r.key == key))
            }
        }
    }
}

impl StorageFencing for PrFencing {
    /// Register the key of `epoch` through this path. Refused
    /// ([`FenceError::HeldByNewer`]) when a newer blkshim key is registered.
    /// A path registered already with an older blkshim key of this host
    /// moves to the new key (REGISTER with the old one, which succeeds only
    /// for the path that holds it); a path registered with another
    /// software's key is left alone ([`FenceError::Foreign`]).
    fn register(&self, epoch: ReservationKey) -> Result<(), FenceError> {
        let key = self.key_of(epoch)?;
        let keys = self.read_keys()?;
        if let Some(holder) = Self::newer_than(&keys, epoch) {
            return Err(FenceError::HeldByNewer { key: epoch, holder });
        }
        let conflict = match self.register_key(0, key, false) {
            Ok(()) => return Ok(()),
            Err(e @ FenceError::Conflict { .. }) => e,
            Err(e) => return Err(e),
        };
        // This path is registered already: with this key?
        if keys.keys.contains(&key) && self.register_key(key, key, false).is_ok() {
            return Ok(());
        }
        let mut mine: Vec<u64> = keys.keys.clone();
        mine.sort_unstable_by(|a, b| b.cmp(a));
        mine.dedup();
        for &k in &mine {
            match KeyOwner::of(k) {
                KeyOwner::Blkshim { epoch: e }
                    if e < epoch && self.register_key(k, key, false).is_ok() =>
                {
                    log::info!(
                        "{}: this path's key {} replaced by epoch {epoch}'s",
                        self.path.display(),
                        key_hex(k)
                    );
                    return Ok(());
                }
                KeyOwner::Foreign if self.register_key(k, k, false).is_ok() => {
                    return Err(FenceError::Foreign { key: k });
                }
                _ => {}
            }
        }
        Err(conflict)
    }

    /// Take the reservation at `epoch`: refused when a newer blkshim key is
    /// registered or holds it, or another software's key holds it
    /// exclusively; PREEMPT (AND ABORT, per [`PrOptions::preempt`]) every
    /// older blkshim key; RESERVE when nobody holds the reservation. Keys
    /// without blkshim's marker are never touched. `aborted` is always 0:
    /// targets do not say how many commands an abort ended.
    fn preempt_and_abort(&self, epoch: ReservationKey) -> Result<Preempted, FenceError> {
        let key = self.key_of(epoch)?;
        let mut keys = Vec::new();
        for _ in 0..4 {
            if self.take_round(epoch, key, &mut keys)? {
                keys.sort_unstable();
                keys.dedup();
                return Ok(Preempted { keys, aborted: 0 });
            }
        }
        Err(FenceError::Conflict {
            command: "reserve",
            status: 0x18,
        })
    }

    /// The epoch of the blkshim key holding the reservation; `None` when
    /// nobody, another software, or an unreadable device holds it (logged).
    fn reservation(&self) -> Option<ReservationKey> {
        match self.read_reservation() {
            Ok(r) => r.and_then(|r| decode_key(r.key)),
            Err(e) => {
                log::warn!("{}: reading the reservation: {e}", self.path.display());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_cannot_fence_with() {
        let f = tempfile::NamedTempFile::new().unwrap();
        match PrFencing::open(f.path(), PrOptions::default()) {
            Err(FenceError::Io(e)) => assert!(e.to_string().contains("not a block device"), "{e}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a regular file opened as a PR device"),
        }
        for rtype in [
            ReservationType::ExclusiveAccess,
            ReservationType::WriteExclusiveAllRegistrants,
            ReservationType::ExclusiveAccessAllRegistrants,
            ReservationType::ExclusiveAccessRegistrantsOnly,
        ] {
            let opts = PrOptions {
                rtype,
                ..PrOptions::default()
            };
            assert!(matches!(
                PrFencing::open(f.path(), opts),
                Err(FenceError::Io(_))
            ));
        }
        assert!(matches!(
            PrFencing::open("/nonexistent/blkshim-pr", PrOptions::default()),
            Err(FenceError::Io(_))
        ));
    }

    #[test]
    fn newer_keys() {
        let k = |e| encode_key(e).unwrap();
        let keys = KeyList {
            generation: 1,
            keys: vec![k(3), 0xffff_ffff_ffff_ffff, k(7), 0x1234_0001, k(5)],
        };
        assert_eq!(PrFencing::newer_than(&keys, 5), Some(7));
        assert_eq!(PrFencing::newer_than(&keys, 7), None);
        assert_eq!(PrFencing::newer_than(&keys, 0), Some(7));
    }

    mod on_a_model {
        use super::super::super::model::{Lu, ModelPath, Op};
        use super::super::super::take_over;
        use super::*;
        use parking_lot::Mutex;
        use std::sync::Arc;

        const WE: ReservationType = ReservationType::WriteExclusive;
        const WE_RO: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;
        const FOREIGN: u64 = 0xa1b2_0001;

        fn k(e: u64) -> u64 {
            encode_key(e).unwrap()
        }

        fn fencings(n: usize, opts: PrOptions) -> (Arc<Mutex<Lu>>, Vec<PrFencing>) {
            let (lu, paths) = ModelPath::paths(n);
            let f = paths
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    PrFencing::with_device(Box::new(p), Path::new(&format!("model{i}")), opts)
                        .unwrap()
                })
                .collect();
            (lu, f)
        }

        fn plain() -> PrOptions {
            PrOptions {
                preempt: PreemptMode::Preempt,
                rtype: WE,
            }
        }

        #[test]
        fn the_handoff_sequence() {
            let (lu, f) = fencings(2, plain());
            let (a, b) = (&f[0], &f[1]);
            assert_eq!(take_over(a, 1).unwrap(), Preempted::default());
            assert!(lu.lock().may_write(0) && !lu.lock().may_write(1));
            assert_eq!(b.reservation(), Some(1));
            let p = take_over(b, 2).unwrap();
            assert_eq!(p.keys, vec![1]);
            assert!(!lu.lock().may_write(0) && lu.lock().may_write(1));
            assert_eq!(lu.lock().regs, vec![None, Some(k(2))]);
            // The stale writer is refused by blkshim and by the storage.
            assert!(matches!(
                take_over(a, 1),
                Err(FenceError::HeldByNewer { key: 1, holder: 2 })
            ));
            assert!(matches!(
                a.register_key(k(1), k(1), false),
                Err(FenceError::Conflict { .. })
            ));
            assert!(matches!(
                a.preempt_and_abort(1),
                Err(FenceError::HeldByNewer { .. })
            ));
            // The PREEMPT named our key first, the victim's second.
            assert_eq!(lu.lock().preempts, vec![(1, k(2), k(1), false)]);
            b.release(2).unwrap();
            assert_eq!(a.reservation(), None);
            b.clear(2).unwrap();
            assert!(a.read_keys().unwrap().keys.is_empty());
        }

        #[test]
        fn take_over_is_idempotent_and_abort_is_the_default() {
            let (lu, f) = fencings(3, PrOptions::default());
            take_over(&f[0], 4).unwrap();
            take_over(&f[1], 3).unwrap_err();
            assert_eq!(take_over(&f[0], 4).unwrap(), Preempted::default());
            take_over(&f[2], 9).unwrap();
            assert_eq!(lu.lock().preempts, vec![(2, k(9), k(4), true)]);
            assert_eq!(f[1].reservation(), Some(9));
        }

        #[test]
        fn the_same_path_moves_its_own_key_forward() {
            let (lu, f) = fencings(2, plain());
            take_over(&f[0], 3).unwrap();
            // A local hand-off: the same path at epoch 4 re-registers (its
            // old key goes, the reservation follows the path).
            assert_eq!(take_over(&f[0], 4).unwrap(), Preempted::default());
            let g = lu.lock();
            assert_eq!(g.regs, vec![Some(k(4)), None]);
            assert_eq!(g.resv, Some((0, k(4), WE)));
            assert!(g.preempts.is_empty());
        }

        #[test]
        fn a_newer_registration_wins_before_it_reserves() {
            let (lu, f) = fencings(2, plain());
            take_over(&f[0], 1).unwrap();
            f[1].register(5).unwrap();
            // The holder at 1 can no longer defend against 5.
            assert!(matches!(
                f[0].preempt_and_abort(1),
                Err(FenceError::HeldByNewer { key: 1, holder: 5 })
            ));
            // ... and a stale 3 cannot even register.
            assert!(matches!(
                f[0].register(3),
                Err(FenceError::HeldByNewer { key: 3, holder: 5 })
            ));
            assert_eq!(f[1].preempt_and_abort(5).unwrap().keys, vec![1]);
            assert!(lu.lock().may_write(1));
        }

        #[test]
        fn several_older_keys_go_at_once() {
            let (lu, f) = fencings(4, plain());
            for (i, e) in [(0, 1), (1, 2), (2, 3)] {
                f[i].register(e).unwrap();
            }
            f[0].preempt_and_abort(1).unwrap_err(); // 2 and 3 are newer
            let p = take_over(&f[3], 7).unwrap();
            assert_eq!(p.keys, vec![1, 2, 3]);
            assert_eq!(lu.lock().regs, vec![None, None, None, Some(k(7))]);
        }

        #[test]
        fn a_victim_that_vanishes_is_skipped() {
            let (lu, f) = fencings(3, plain());
            take_over(&f[0], 1).unwrap();
            f[1].register(0).unwrap_err(); // 1 is newer
            lu.lock().register(1, 0, k(0), false).unwrap(); // behind blkshim's back
                                                            // Between our READ KEYS and our PREEMPT of key 0, its path unregisters.
            lu.lock().before(Op::Preempt, |lu| lu.regs[1] = None);
            let p = take_over(&f[2], 2).unwrap();
            assert_eq!(p.keys, vec![1]);
            assert_eq!(lu.lock().resv, Some((2, k(2), WE)));
        }

        #[test]
        fn preempted_during_its_own_take_over() {
            let (lu, f) = fencings(3, plain());
            take_over(&f[0], 1).unwrap();
            // Just before path 1 (epoch 2) preempts 1, path 2 at epoch 3
            // registers and preempts everything older.
            lu.lock().before(Op::Preempt, |lu| {
                lu.register(2, 0, k(3), false).unwrap();
                lu.preempt(2, k(3), k(1), WE, false).unwrap();
                lu.preempt(2, k(3), k(2), WE, false).unwrap();
            });
            assert!(matches!(
                take_over(&f[1], 2),
                Err(FenceError::HeldByNewer { key: 2, holder: 3 })
            ));
            assert_eq!(lu.lock().resv, Some((2, k(3), WE)));
        }

        #[test]
        fn other_software_is_left_alone() {
            let (lu, f) = fencings(2, plain());
            // A foreign registrant only: kept, blkshim reserves.
            lu.lock().register(0, 0, FOREIGN, false).unwrap();
            assert_eq!(take_over(&f[1], 1).unwrap(), Preempted::default());
            assert_eq!(lu.lock().regs, vec![Some(FOREIGN), Some(k(1))]);
            // This path registered by other software: not replaced.
            assert!(matches!(
                f[0].register(2),
                Err(FenceError::Foreign { key: FOREIGN })
            ));
            assert_eq!(lu.lock().regs[0], Some(FOREIGN));
            f[1].clear(1).unwrap();
            // A foreign exclusive reservation: refused, nothing preempted.
            lu.lock().register(0, 0, FOREIGN, false).unwrap();
            lu.lock().reserve(0, FOREIGN, WE).unwrap();
            assert!(matches!(
                take_over(&f[1], 5),
                Err(FenceError::Foreign { key: FOREIGN })
            ));
            assert!(lu.lock().preempts.is_empty());
            assert_eq!(f[1].reservation(), None); // held, but not by blkshim
                                                  // A foreign registrants-only reservation: shared.
            lu.lock().resv = Some((0, FOREIGN, WE_RO));
            assert_eq!(take_over(&f[1], 5).unwrap(), Preempted::default());
            assert_eq!(lu.lock().resv, Some((0, FOREIGN, WE_RO)));
            assert!(lu.lock().may_write(1));
        }

        #[test]
        fn registrants_only_when_asked() {
            let opts = PrOptions {
                preempt: PreemptMode::Preempt,
                rtype: WE_RO,
            };
            let (lu, f) = fencings(2, opts);
            take_over(&f[0], 1).unwrap();
            assert_eq!(lu.lock().resv, Some((0, k(1), WE_RO)));
            take_over(&f[1], 2).unwrap();
            assert_eq!(lu.lock().resv, Some((1, k(2), WE_RO)));
            assert!(!lu.lock().may_write(0));
        }

        #[test]
        fn an_unreadable_device_changes_nothing() {
            let (lu, f) = fencings(2, plain());
            take_over(&f[0], 1).unwrap();
            lu.lock().fail_reads = true;
            assert!(matches!(
                take_over(&f[1], 2),
                Err(FenceError::BadResponse(_))
            ));
            lu.lock().fail_reads = false;
            assert_eq!(lu.lock().regs, vec![Some(k(1)), None]);
            assert!(lu.lock().preempts.is_empty());
            assert_eq!(f[1].reservation(), Some(1));
        }

        #[test]
        fn epochs_beyond_the_key_are_refused() {
            let (lu, f) = fencings(1, plain());
            assert!(matches!(take_over(&f[0], 1 << 40), Err(FenceError::Io(_))));
            assert_eq!(lu.lock().regs, vec![None]);
        }
    }
}
