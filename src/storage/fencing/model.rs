//! A model of one logical unit's persistent reservations (SPC-4 5.13,
//! simplified: one LU, scope LU, no APTPL, no ALL_TG_PT), seen through
//! several paths, for host tests of [`PrFencing`](super::PrFencing)'s
//! decisions without a device. Every path is one I_T nexus.

use super::device::PrDevice;
use super::parse::{KeyList, Reservation, ReservationType, ScsiReservation};
use super::status::{PrStatus, StatusKind, Transport};
use super::FenceError;
use parking_lot::Mutex;
use std::sync::Arc;

/// A command, for hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Register,
    Reserve,
    Release,
    Preempt,
    Clear,
    ReadKeys,
    ReadReservation,
}

type Hook = Box<dyn FnOnce(&mut Lu) + Send>;

/// The logical unit's state.
#[derive(Default)]
pub(crate) struct Lu {
    /// Registration of each nexus.
    pub regs: Vec<Option<u64>>,
    /// (holder nexus, key, type).
    pub resv: Option<(usize, u64, ReservationType)>,
    pub generation: u32,
    /// Every PREEMPT: (nexus, own, victim, abort).
    pub preempts: Vec<(usize, u64, u64, bool)>,
    hooks: Vec<(Op, Hook)>,
    /// Make READ KEYS fail (an unreadable report).
    pub fail_reads: bool,
}

const CONFLICT: u32 = 0x118;

fn conflict(command: &'static str) -> FenceError {
    FenceError::Conflict {
        command,
        status: CONFLICT,
    }
}

impl Lu {
    /// Whether nexus `n` may write now.
    pub fn may_write(&self, n: usize) -> bool {
        match self.resv {
            None => true,
            Some((h, _, t)) if !t.registrants_may_write() => h == n,
            Some(_) => self.regs[n].is_some(),
        }
    }

    /// Run `hook` just before the next `op` (from any path).
    pub fn before(&mut self, op: Op, hook: impl FnOnce(&mut Lu) + Send + 'static) {
        self.hooks.push((op, Box::new(hook)));
    }

    fn fire(&mut self, op: Op) {
        if let Some(i) = self.hooks.iter().position(|(o, _)| *o == op) {
            let (_, h) = self.hooks.remove(i);
            h(self);
        }
    }

    pub fn register(
        &mut self,
        n: usize,
        old: u64,
        new: u64,
        ignore: bool,
    ) -> Result<(), FenceError> {
        let cur = self.regs[n];
        if !ignore && cur.unwrap_or(0) != old {
            return Err(conflict("register"));
        }
        if new == 0 {
            if cur.is_some() {
                self.regs[n] = None;
                if self.resv.is_some_and(|(h, _, _)| h == n) {
                    self.resv = None;
                }
            }
        } else {
            self.regs[n] = Some(new);
            if let Some((h, k, _)) = self.resv.as_mut() {
                if *h == n {
                    *k = new;
                }
            }
        }
        self.generation += 1;
        Ok(())
    }

    pub fn reserve(&mut self, n: usize, key: u64, t: ReservationType) -> Result<(), FenceError> {
        if self.regs[n] != Some(key) {
            return Err(conflict("reserve"));
        }
        match self.resv {
            None => {
                self.resv = Some((n, key, t));
                Ok(())
            }
            Some((h, _, ht)) if h == n && ht == t => Ok(()),
            Some(_) => Err(conflict("reserve")),
        }
    }

    pub fn preempt(
        &mut self,
        n: usize,
        own: u64,
        victim: u64,
        t: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError> {
        if self.regs[n] != Some(own) {
            return Err(conflict("preempt"));
        }
        if !self.regs.contains(&Some(victim)) || victim == 0 {
            return Err(conflict("preempt"));
        }
        self.preempts.push((n, own, victim, abort));
        let takes = self.resv.is_some_and(|(_, k, _)| k == victim);
        for (i, r) in self.regs.iter_mut().enumerate() {
            if i != n && *r == Some(victim) {
                *r = None;
            }
        }
        if takes {
            self.resv = Some((n, own, t));
        }
        self.generation += 1;
        Ok(())
    }
}

/// One path (I_T nexus) to a shared [`Lu`].
pub(crate) struct ModelPath {
    pub lu: Arc<Mutex<Lu>>,
    pub nexus: usize,
}

impl ModelPath {
    /// `n` paths to one new logical unit.
    pub fn paths(n: usize) -> (Arc<Mutex<Lu>>, Vec<ModelPath>) {
        let lu = Arc::new(Mutex::new(Lu {
            regs: vec![None; n],
            ..Lu::default()
        }));
        let paths = (0..n)
            .map(|nexus| ModelPath {
                lu: lu.clone(),
                nexus,
            })
            .collect();
        (lu, paths)
    }

    fn with<T>(&self, op: Op, f: impl FnOnce(&mut Lu) -> T) -> T {
        let mut g = self.lu.lock();
        g.fire(op);
        f(&mut g)
    }
}

impl PrDevice for ModelPath {
    fn transport(&self) -> Transport {
        Transport::Scsi
    }

    fn register_key(&self, old: u64, new: u64, ignore: bool) -> Result<(), FenceError> {
        self.with(Op::Register, |lu| lu.register(self.nexus, old, new, ignore))
    }

    fn reserve_key(&self, key: u64, t: ReservationType) -> Result<(), FenceError> {
        self.with(Op::Reserve, |lu| lu.reserve(self.nexus, key, t))
    }

    fn release_key(&self, key: u64, t: ReservationType) -> Result<(), FenceError> {
        self.with(Op::Release, |lu| {
            if lu.regs[self.nexus] != Some(key) {
                return Err(conflict("release"));
            }
            match lu.resv {
                Some((h, _, ht)) if h == self.nexus => {
                    if ht != t {
                        return Err(FenceError::Device {
                            command: "release",
                            status: PrStatus {
                                raw: 2,
                                kind: StatusKind::CheckCondition,
                            },
                        });
                    }
                    lu.resv = None;
                    Ok(())
                }
                _ => Ok(()),
            }
        })
    }

    fn preempt_key(
        &self,
        own: u64,
        victim: u64,
        t: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError> {
        self.with(Op::Preempt, |lu| {
            lu.preempt(self.nexus, own, victim, t, abort)
        })
    }

    fn clear_key(&self, key: u64) -> Result<(), FenceError> {
        self.with(Op::Clear, |lu| {
            if lu.regs[self.nexus] != Some(key) {
                return Err(conflict("clear"));
            }
            lu.regs.iter_mut().for_each(|r| *r = None);
            lu.resv = None;
            lu.generation += 1;
            Ok(())
        })
    }

    fn read_keys(&self) -> Result<KeyList, FenceError> {
        self.with(Op::ReadKeys, |lu| {
            if lu.fail_reads {
                return Err(FenceError::BadResponse("model: unreadable".into()));
            }
            Ok(KeyList {
                generation: lu.generation,
                keys: lu.regs.iter().flatten().copied().collect(),
            })
        })
    }

    fn read_reservation_full(&self) -> Result<ScsiReservation, FenceError> {
        self.with(Op::ReadReservation, |lu| {
            Ok(ScsiReservation {
                generation: lu.generation,
                reservation: lu.resv.map(|(_, key, t)| Reservation {
                    key,
                    rtype: Some(t),
                    type_code: t.scsi_code(),
                    scope: 0,
                }),
            })
        })
    }
}
