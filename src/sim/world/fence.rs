//! Host-side fences other than PR: sanlock and none.
//!
//! PR lives in the storage model (register, preempt-and-abort). The other
//! two decide *when* a destination admitted at its epoch may write, which is
//! all they can do: neither stops a write the storage has accepted.
//!
//! sanlock (a paxos lease per disk, [`Fencing`](super::Fencing) for the timing):
//! - the holder renews every renewal period while it reaches the storage
//!   (a hung path blocks its lease I/O as it blocks its writes);
//! - a holder whose epoch is handed over releases the lease once none of
//!   its I/O is left at the storage and it can write the lease; the taker
//!   acquires at once;
//! - otherwise the taker acquires only host_dead after the holder's last
//!   renewal, as its lockspace monitor saw it (monitors read every renewal
//!   period, at their own phase, so up to a period later);
//! - recovery: 8 × io_timeout after its last renewal a cut-off holder's
//!   writer is killed: requests not yet submitted to the storage never are
//!   (its completions are lost, its writers closed). A kill that fails
//!   (drawn per holder), or a writer still waiting on I/O at the storage
//!   (stuck in the kernel, it cannot exit), leaves it to the watchdog,
//!   which resets the host by host_dead;
//! - a crashed host stops renewing at its crash.
//!
//! **The assumption sanlock's safety rests on, modelled exactly:** a host
//! that is reset (or dead) at host_dead has no I/O landing afterwards; every
//! I/O of it the storage model still holds then is dropped. Real storage
//! that completes a dead initiator's accepted write later breaks sanlock;
//! PR aborts such a write at the target instead.
//!
//! none: a destination may write only after a holder that handed over a
//! record that is current (none of the holder's I/O can reach the storage
//! any more: the ledger publishes the record only then), or after an
//! operator confirmed the holder's host dead (`blkshim ctl takeover DISK
//! --source-dead`). The confirmation is modelled as a true statement: it is
//! made only for a host that crashed or lost power (its requests not yet at
//! the storage die with it), and it takes effect only once the storage
//! model holds none of that host's I/O (everything it had accepted landed
//! or failed), so nothing of the dead host lands after the new writer's
//! data. A takeover from a live holder without a record (a cut-off source,
//! a takeover without a suspend) is refused and counted, never allowed: the
//! VM stays where it is.

use super::{ActState, EpKind, World};
use crate::sim::sched::{Event, Time};
use crate::storage::fencing::FenceMode;
use std::sync::Arc;

/// Who has the disk when the host-side fence is sanlock or none (with PR
/// the storage model's reservation says it).
#[derive(Debug, Clone)]
pub(super) struct Holder {
    pub(super) host: usize,
    /// Its writer's epoch.
    pub(super) epoch: u64,
    /// The path its writer's I/O went through (kept after the host dies).
    pub(super) path: u32,
    /// sanlock: its last successful lease renewal.
    pub(super) renewed: Time,
    /// The host crashed or lost power (it renews nothing any more).
    pub(super) crashed: bool,
    /// Its epoch was handed over (a record, or its own fence after a
    /// takeover): it gives the disk up once none of its I/O can still
    /// reach the storage.
    pub(super) handed_over: bool,
    /// sanlock: it released the lease (clean hand-off).
    pub(super) released: bool,
    /// sanlock: its writer was killed (the lease was lost).
    pub(super) killed: bool,
    /// sanlock: dead or reset by its watchdog; nothing of it lands any more.
    pub(super) reset: bool,
    /// sanlock: killing its writer fails (drawn per holder), so the
    /// watchdog resets the host at host_dead.
    pub(super) kill_fails: bool,
}

/// A destination admitted at its epoch that may not write before its fence
/// lets it (sanlock's acquire, or none's record / confirmation).
#[derive(Debug, Clone)]
pub(super) struct Starting {
    pub(super) to: usize,
    pub(super) epoch: u64,
    pub(super) ep: usize,
    pub(super) decided: Time,
    /// A restart after a crash (the VM boots) rather than a migration.
    pub(super) boot: bool,
    pub(super) waiting_noted: bool,
}

impl World {
    pub(super) fn new_holder(&mut self, host: usize, epoch: u64, now: Time) -> Holder {
        Holder {
            host,
            epoch,
            path: self.hosts[host].path.id(),
            renewed: now,
            crashed: false,
            handed_over: false,
            released: false,
            killed: false,
            reset: false,
            kill_fails: self.frng.chance(25),
        }
    }

    /// The holder's host crashed or lost power: it renews nothing more.
    pub(super) fn holder_crashed(&mut self, host: usize) {
        if !self.gated() {
            return;
        }
        let now = self.now();
        if let Some(h) = self.holder.as_mut().filter(|h| h.host == host) {
            h.crashed = true;
            let renewed = h.renewed;
            self.note(|| {
                format!(
                    "holder host {host} is down (last lease renewal t={renewed}, crash t={now})"
                )
            });
        }
    }

    pub(super) fn start_lease_ticks(&mut self) {
        if !self.lease_ticking {
            self.lease_ticking = true;
            let r = self.fence.renewal();
            self.after(r, Event::LeaseTick);
        }
    }

    /// sanlock's renewal period: the holder renews if it can, then
    /// recovery and the watchdog are checked.
    pub(super) fn lease_tick(&mut self) {
        let now = self.now();
        if let Some(h) = self.holder.as_mut() {
            let alive = !h.crashed && !h.killed && !h.released && !h.reset;
            if alive && !self.storage.path_hung(h.path, now) {
                h.renewed = now;
            }
        }
        self.lease_update(now);
        // Tick while anything else may still happen (an event other than
        // this one, or a destination waiting for the lease).
        if self.starting.is_some() || !self.sched.lock().is_empty() {
            let r = self.fence.renewal();
            self.after(r, Event::LeaseTick);
        } else {
            self.lease_ticking = false;
        }
    }

    /// sanlock: bring the holder's lease up to `now`: release, kill,
    /// watchdog reset.
    pub(super) fn lease_update(&mut self, now: Time) {
        if self.fence.mode != FenceMode::Sanlock {
            return;
        }
        let Some(h) = self.holder.clone() else {
            return;
        };
        if h.released || h.reset {
            return;
        }
        let (rec, dead) = (self.fence.recovery(), self.fence.host_dead());
        let host = h.host;
        if h.crashed {
            if now >= h.renewed + dead {
                let n = self.storage.drop_in_flight(h.path);
                self.report.hosts_reset += 1;
                self.set_holder(|h| h.reset = true);
                self.note(|| {
                    format!(
                        "sanlock: host {host} (down) is dead by host_dead (t={}): its {n} I/O \
                         still at the storage never land",
                        h.renewed + dead
                    )
                });
            }
            return;
        }
        if !h.killed && now >= h.renewed + rec {
            self.kill_writer(host, h.path);
            self.report.writers_killed += 1;
            self.set_holder(|h| h.killed = true);
            let left = self.storage.in_flight_on(h.path);
            let fails = h.kill_fails;
            self.note(|| {
                format!(
                    "sanlock: host {host} could not renew since t={} (cut off): lease lost, its \
                     writer KILLED ({left} I/O still at the storage{})",
                    h.renewed,
                    if fails { "; the kill fails" } else { "" }
                )
            });
        }
        if h.killed || now >= h.renewed + rec {
            let left = self.storage.in_flight_on(h.path);
            if now >= h.renewed + dead && (h.kill_fails || left > 0) {
                let n = self.storage.drop_in_flight(h.path);
                self.report.hosts_reset += 1;
                self.set_holder(|h| h.reset = true);
                self.note(|| {
                    format!(
                        "sanlock: the watchdog RESETS host {host} at host_dead (t={}): {n} of its \
                         I/O never land",
                        h.renewed + dead
                    )
                });
            }
            return;
        }
        if h.handed_over
            && !self.storage.path_hung(h.path, now)
            && self.storage.in_flight_on(h.path) == 0
        {
            self.set_holder(|h| h.released = true);
            self.note(|| format!("sanlock: host {host} releases the lease (its epoch is handed over, its I/O done)"));
        }
    }

    pub(super) fn set_holder(&mut self, f: impl FnOnce(&mut Holder)) {
        if let Some(h) = self.holder.as_mut() {
            f(h);
        }
    }

    /// sanlock's recovery: the writer process of `host` is killed. Its
    /// completions are lost (so its backend submits nothing more) and its
    /// writers are closed; what it already put on the storage is not
    /// called back.
    pub(super) fn kill_writer(&mut self, host: usize, path: u32) {
        self.storage.kill_path(path);
        if let Some(d) = self.hosts[host].disk.take() {
            for e in &mut self.endpoints {
                if let EpKind::Disk { disk, writer } = &mut e.kind {
                    if Arc::ptr_eq(disk, &d) {
                        *writer = None;
                    }
                }
            }
        }
        if self.hosts[host].path.id() == path {
            self.hosts[host].path = self.storage.path();
        }
    }

    /// When `host`'s lockspace monitor saw a renewal made at `renewed`.
    pub(super) fn seen_at(&self, host: usize, renewed: Time) -> Time {
        let r = self.fence.renewal();
        let phase = self.monitor_phase.get(host).copied().unwrap_or(0) % r;
        renewed + (phase + r - renewed % r) % r
    }

    /// sanlock: may `host` acquire the lease now?
    pub(super) fn lease_free_for(&mut self, host: usize) -> bool {
        let now = self.now();
        self.lease_update(now);
        let Some(h) = self.holder.as_ref() else {
            return true;
        };
        h.released || now >= self.seen_at(host, h.renewed) + self.fence.host_dead()
    }

    /// The destination at `epoch` (endpoint `ep`) is admitted; it writes
    /// when its fence lets it.
    pub(super) fn start_writer(&mut self, i: usize, to: usize, epoch: u64, ep: usize, boot: bool) {
        let now = self.now();
        self.starting = Some(Starting {
            to,
            epoch,
            ep,
            decided: now,
            boot,
            waiting_noted: false,
        });
        self.poll_start(i);
    }

    pub(super) fn poll_start(&mut self, i: usize) {
        let Some(s) = self.starting.clone() else {
            return;
        };
        let to = s.to;
        let ready = match self.fence.mode {
            FenceMode::Pr => true,
            FenceMode::Sanlock => {
                let free = self.lease_free_for(to);
                if let (true, Some(h)) = (free, self.holder.clone()) {
                    let from = h.host;
                    if h.released {
                        self.note(|| {
                            format!("sanlock: host {to} ACQUIRES the lease host {from} released")
                        });
                    } else {
                        let seen = self.seen_at(to, h.renewed);
                        let dead = self.fence.host_dead();
                        self.report.host_dead_waits += 1;
                        self.note(|| {
                            format!(
                                "sanlock: host {to} ACQUIRES the lease after host_dead: host \
                                 {from} last renewed at t={} (seen t={seen}), +{dead}",
                                h.renewed
                            )
                        });
                    }
                } else if !free && !s.waiting_noted {
                    let from = self.holder.as_ref().map_or(usize::MAX, |h| h.host);
                    self.note(|| {
                        format!("sanlock: host {to} waits for the lease held by host {from}")
                    });
                }
                free
            }
            FenceMode::None => match self.holder.clone() {
                None => true,
                Some(h) => {
                    let left = self.storage.in_flight_on(h.path);
                    let from = h.host;
                    if h.crashed {
                        if left == 0 {
                            self.note(|| {
                                format!(
                                    "fence none: the operator's CONFIRMATION that host {from} is \
                                     dead (powered off) takes effect: none of its I/O is left at the storage"
                                )
                            });
                        } else if !s.waiting_noted {
                            self.note(|| {
                                format!(
                                    "fence none: operator confirms host {from} dead (powered off); \
                                     {left} I/O it had put on the storage must finish first"
                                )
                            });
                        }
                        left == 0
                    } else if h.handed_over {
                        if left == 0 {
                            self.note(|| format!("fence none: host {from}'s record is current (none of its I/O can reach the storage)"));
                        } else if !s.waiting_noted {
                            self.note(|| format!("fence none: host {from}'s record waits for {left} of its I/O at the storage"));
                        }
                        left == 0
                    } else {
                        // Refused up front (takeover()); reaching here is a
                        // bug of the simulation.
                        self.fail(format!(
                            "fence none: host {to} started from live holder {from} without a record"
                        ));
                        true
                    }
                }
            },
        };
        if ready {
            self.finish_start(i);
        } else {
            if let Some(st) = self.starting.as_mut() {
                st.waiting_noted = true;
            }
            self.states[i] = ActState::Acquiring;
            self.after(5, Event::Control(i));
        }
    }

    /// The fence let the destination write: the VM goes on there.
    pub(super) fn finish_start(&mut self, i: usize) {
        let Some(s) = self.starting.take() else {
            return;
        };
        let now = self.now();
        let waited = now - s.decided;
        self.report.failover_times.push(waited);
        let h = self.new_holder(s.to, s.epoch, now);
        self.holder = Some(h);
        if self.fence.mode == FenceMode::Sanlock {
            self.start_lease_ticks();
        }
        let to = s.to;
        self.note(|| {
            format!(
                "host {to} may write at epoch {} ({waited} ticks after the decision)",
                s.epoch
            )
        });
        self.vm_host = s.to;
        if s.boot {
            self.boot_on(s.ep);
        } else {
            self.report.migrations += 1;
            self.recover(s.ep);
        }
        self.action_done(i);
    }
}
