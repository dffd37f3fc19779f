//! Rogue writers: the stale node (seeds/004), its takeover attempts, and
//! the writes it (or the zombie, the VM's previous host) keeps sending.

use super::{Protection, World, DISK_NAME, ROGUE_TAG, SECTOR};
use crate::epoch::EpochStore;
use crate::handoff::{HandoffMethod, HandoffRecord};
use crate::sim::checker::Violation;
use crate::sim::payload::{encode, ROGUE_BASE};
use crate::sim::sched::Event;
use crate::storage::fencing::{take_over, FenceMode};
use crate::storage::{AlignedBuf, StorageIo, SECTOR_SIZE};

pub(super) struct Rogue {
    pub(super) ep: usize,
    pub(super) left: u32,
    pub(super) next_id: u64,
}

impl World {
    /// seeds/004: node `host` last had the disk at epoch 1; its wall clock
    /// is the newest, and it promotes itself.
    pub(super) fn stale_promote(&mut self, host: usize, writes: u32) {
        let ep = if self.protected() {
            let Some(ep) = self.stale_ep else {
                self.fail("stale node was not set up".into());
                return;
            };
            self.try_stale_takeovers(host);
            ep
        } else {
            // "Last writer wins": the newest wall clock takes the disk.
            let newest = (0..self.hosts.len())
                .max_by_key(|&h| self.hosts[h].wall_clock)
                .unwrap_or(host);
            if newest != host {
                return;
            }
            // The node last had the disk at epoch 1.
            self.raw_endpoint_at(host, 1)
        };
        self.rogue = Some(Rogue {
            ep,
            left: writes,
            next_id: ROGUE_BASE,
        });
        self.after(1, Event::RogueTick);
    }

    pub(super) fn try_stale_takeovers(&mut self, host: usize) {
        let stale = HandoffRecord {
            disk: DISK_NAME.to_string(),
            source_epoch: 1,
            destination_epoch: 2,
            method: HandoffMethod::Drained,
            requests: Vec::new(),
        };
        let disk = match self.disk_of(host) {
            Ok(d) => d,
            Err(e) => return self.fail(e.to_string()),
        };
        let attempt = |ok: bool, what: &str, w: &mut World| {
            if ok {
                w.checker
                    .violation(Violation::StaleTakeoverAdmitted { what: what.into() });
            } else {
                w.report.takeovers_refused += 1;
            }
            let verdict = if ok { "ADMITTED" } else { "refused" };
            w.note(|| format!("stale node: {what}: {verdict}"));
        };
        let r = disk.resume(&stale).is_ok();
        attempt(r, "resume from an epoch-1 hand-off record", self);
        let r = self.epochs.compare_and_advance(DISK_NAME, 1).is_ok();
        attempt(r, "epoch store advanced from 1", self);
        let r = disk.register(Some(1), "stale").is_ok();
        attempt(r, "writer registered at epoch 1", self);
        if self.host_side() && self.protection == Protection::On {
            match self.fence.mode {
                FenceMode::Pr => {
                    let path = self.path_of(host);
                    let r = take_over(&*path, 1).is_ok();
                    attempt(r, "storage reservation taken with key 1", self);
                }
                FenceMode::Sanlock => {
                    let r = self.lease_free_for(host);
                    attempt(r, "sanlock lease acquired from its live holder", self);
                }
                FenceMode::None => {
                    // Nobody confirms it (the holder is alive), and the
                    // holder handed no current record to it.
                    let r = self.holder.as_ref().is_none_or(|h| {
                        h.crashed || (h.handed_over && self.storage.in_flight_on(h.path) == 0)
                    });
                    attempt(r, "fence none: takeover without a current record", self);
                }
            }
        }
    }

    pub(super) fn rogue_tick(&mut self) {
        let sectors = self.guest.sectors;
        let Some(r) = self.rogue.as_mut() else {
            return;
        };
        if r.left == 0 {
            return;
        }
        r.left -= 1;
        let id = r.next_id;
        r.next_id += 1;
        let ep = r.ep;
        let g = &mut self.guest;
        let count = g.rng.range(1, 2).min(sectors);
        let s = if g.rng.chance(50) {
            g.hot[g.rng.below(g.hot.len() as u64) as usize]
        } else {
            g.rng.below(sectors)
        };
        let start = s.min(sectors - count);
        let mut buf = AlignedBuf::zeroed(count as usize * SECTOR);
        for (k, chunk) in buf.as_mut_slice().chunks_exact_mut(SECTOR).enumerate() {
            encode(chunk, start + k as u64, id);
        }
        let tag = ROGUE_TAG + u64::from(r.left);
        self.submit(
            ep,
            tag,
            StorageIo::Write {
                offset: start * SECTOR_SIZE,
                buf,
                fua: false,
            },
        );
        let d = self.rng.range(5, 40);
        self.after(d, Event::RogueTick);
    }
}
