//! The scenario's actions: migrations, takeovers, crashes and restarts.

use super::{Endpoint, EpKind, Rogue, World, DISK_NAME};
use crate::epoch::EpochStore;
use crate::handoff::{HandoffMethod, HandoffRecord, RequestFate, SuspendMode};
use crate::sim::payload::ROGUE_BASE;
use crate::sim::scenario::{ActionKind, Deployment, MigrationMode};
use crate::sim::sched::{Event, Time};
use crate::storage::fencing::FenceMode;
use std::sync::Arc;
use std::time::Duration;

pub(super) enum ActState {
    Idle,
    Draining {
        deadline: Time,
        to: usize,
        dies_at: Option<Time>,
    },
    Restarting {
        to: usize,
    },
    /// The destination waits for its fence (see [`Starting`]).
    Acquiring,
    Done,
}

impl World {
    pub(super) fn action_done(&mut self, i: usize) {
        self.states[i] = ActState::Done;
        self.guest.since_action = 0;
        if let Some(a) = self.actions.get(i + 1) {
            let gap = a.gap;
            self.after(gap, Event::Control(i + 1));
        }
    }

    pub(super) fn source_ep(&self) -> Option<usize> {
        self.front.endpoint
    }

    /// The VM's current writer's epoch is the disk's epoch (always true
    /// without protection: nothing to wait for).
    pub(super) fn destination_admitted(&self) -> bool {
        let Some(ep) = self.front.endpoint else {
            return true;
        };
        match self.endpoints.get(ep).map(|e| &e.kind) {
            Some(EpKind::Disk {
                writer: Some(w), ..
            }) => self
                .epochs
                .current(DISK_NAME)
                .is_ok_and(|cur| cur >= w.epoch()),
            _ => true,
        }
    }

    pub(super) fn close_endpoint(&mut self, ep: usize) {
        if let Some(Endpoint {
            kind: EpKind::Disk { writer, .. },
        }) = self.endpoints.get_mut(ep)
        {
            *writer = None;
        }
    }

    pub(super) fn control(&mut self, i: usize) {
        let Some(action) = self.actions.get(i).copied() else {
            return;
        };
        let state = std::mem::replace(&mut self.states[i], ActState::Done);
        if matches!(state, ActState::Idle) {
            let host = self.vm_host;
            self.note(|| format!("action {i}: {:?} (VM on host {host})", action.kind));
        }
        if let (ActState::Idle, ActionKind::Migrate { to, .. } | ActionKind::Takeover { to, .. }) =
            (&state, action.kind)
        {
            if to == self.vm_host {
                // Only after a refused takeover: the VM never left.
                self.note(|| format!("action {i}: the VM is already on host {to}: nothing to do"));
                self.action_done(i);
                return;
            }
        }
        match (state, action.kind) {
            (ActState::Acquiring, _) => self.poll_start(i),
            (
                ActState::Idle,
                ActionKind::Migrate {
                    to,
                    mode,
                    cut_off,
                    source_dies,
                },
            ) => {
                let dies_at = source_dies.map(|d| self.now() + d);
                self.migrate_start(i, to, mode, cut_off, dies_at)
            }
            (
                ActState::Draining {
                    deadline,
                    to,
                    dies_at,
                },
                ActionKind::Migrate { .. },
            ) => self.migrate_poll(i, deadline, to, dies_at),
            (
                ActState::Idle,
                ActionKind::Crash {
                    restart_on,
                    downtime,
                    hang,
                },
            ) => {
                self.crash_host(hang);
                self.states[i] = ActState::Restarting { to: restart_on };
                self.after(downtime, Event::Control(i));
            }
            (ActState::Restarting { to }, ActionKind::Crash { .. }) => self.restart(i, to),
            (
                ActState::Idle,
                ActionKind::Takeover {
                    to,
                    fence_after,
                    cut_off,
                },
            ) => self.takeover(i, to, fence_after, cut_off),
            (ActState::Idle, ActionKind::Zombie { .. }) if !self.destination_admitted() => {
                // The promise starts when the destination is admitted (its
                // epoch is current; with the gateway's auto-advance, at its
                // first write or flush): wait for that.
                self.states[i] = ActState::Idle;
                self.after(5, Event::Control(i));
            }
            (ActState::Idle, ActionKind::Zombie { .. })
                if self.retired.is_none() && self.report.fence_refused > 0 =>
            {
                self.note(|| {
                    "the VM never moved (its takeover was refused): no old copy to write".into()
                });
                self.action_done(i);
            }
            (ActState::Idle, ActionKind::Zombie { writes }) => {
                if let Some(ep) = self.retired {
                    self.rogue = Some(Rogue {
                        ep,
                        left: writes,
                        next_id: ROGUE_BASE,
                    });
                    self.after(1, Event::RogueTick);
                } else {
                    self.fail("no previous connection to write through".into());
                }
                self.action_done(i);
            }
            (ActState::Idle, ActionKind::StalePromote { host, writes }) => {
                self.stale_promote(host, writes);
                self.action_done(i);
            }
            (s, _) => self.states[i] = s,
        }
    }

    pub(super) fn migrate_start(
        &mut self,
        i: usize,
        to: usize,
        mode: MigrationMode,
        cut_off: Option<Time>,
        dies_at: Option<Time>,
    ) {
        let now = self.now();
        let from = self.vm_host;
        self.pause();
        if let Some(h) = cut_off {
            let path = self.path_of(from).id();
            if self.host_side() {
                self.storage.hang_path(path, now + h);
            } else {
                self.storage.hang_in_flight(path, now + h);
            }
        }
        if !self.protected() {
            // blkback just disconnects; the frontend reconnects to Y.
            let downtime = self.rng.range(1, 20);
            self.states[i] = ActState::Draining {
                deadline: now,
                to,
                dies_at: None,
            };
            self.after(downtime, Event::Control(i));
            return;
        }
        let Some(src) = self.source_ep() else {
            self.fail("no source to migrate from".into());
            self.action_done(i);
            return;
        };
        let (disk, epoch) = match &self.endpoints[src].kind {
            EpKind::Disk {
                disk,
                writer: Some(w),
            } => (Arc::clone(disk), w.epoch()),
            _ => {
                self.fail("source has no writer".into());
                self.action_done(i);
                return;
            }
        };
        let (smode, deadline) = match mode {
            MigrationMode::Drain { deadline } => (
                SuspendMode::Drain {
                    timeout: Duration::from_micros(deadline * 10),
                },
                now + deadline,
            ),
            MigrationMode::Fence => (SuspendMode::Fence, now),
        };
        self.suspended_tags = self
            .front
            .wires
            .iter()
            .map(|(&t, w)| (t, w.kind.modifies()))
            .collect();
        self.suspension = Some(disk.begin_suspend(epoch, smode));
        self.migrate_poll(i, deadline, to, dies_at);
    }

    pub(super) fn migrate_poll(
        &mut self,
        i: usize,
        deadline: Time,
        to: usize,
        dies_at: Option<Time>,
    ) {
        let now = self.now();
        if self.protected() && dies_at.is_some_and(|t| now >= t) {
            return self.source_died_mid_migration(i, to, deadline);
        }
        if !self.protected() {
            // The source's connection stays behind, as blkback's does: a
            // zombie can still write through it.
            self.retired = self.source_ep();
            let ep = self.raw_endpoint(to);
            self.vm_host = to;
            self.report.migrations += 1;
            self.recover(ep);
            self.action_done(i);
            return;
        }
        let record = match self.suspension.as_mut() {
            Some(s) => s.try_finish(now >= deadline),
            None => {
                self.fail("no suspension in progress".into());
                self.action_done(i);
                return;
            }
        };
        let Some(record) = record else {
            self.states[i] = ActState::Draining {
                deadline,
                to,
                dies_at,
            };
            self.after(5, Event::Control(i));
            return;
        };
        self.suspension = None;
        self.check_record(&record);
        self.note(|| {
            let fates: Vec<String> = record
                .requests
                .iter()
                .map(|e| format!("{}:{:?}{}={:?}", e.tag, e.kind, e.range, e.fate))
                .collect();
            format!(
                "source (epoch {}) suspended: {:?}; record [{}]",
                record.source_epoch,
                record.method,
                fates.join(", ")
            )
        });
        if record.method == HandoffMethod::DrainTimedOutThenFenced {
            self.report.drains_timed_out += 1;
        }
        self.retired = self.source_ep();
        if self.gated() {
            let from = self.vm_host;
            if let Some(h) = self.holder.as_mut().filter(|h| h.host == from) {
                h.handed_over = true;
            }
            match self.resume_on(to, &record) {
                Ok((ep, epoch)) => self.start_writer(i, to, epoch, ep, false),
                Err(e) => {
                    self.fail(e);
                    self.action_done(i);
                }
            }
            return;
        }
        match self.resume_on(to, &record) {
            Ok((ep, _)) => {
                self.vm_host = to;
                self.report.migrations += 1;
                self.started_at_once();
                self.recover(ep);
            }
            Err(e) => self.fail(e),
        }
        self.action_done(i);
    }

    /// Move the VM without a suspend: the destination takes the next epoch
    /// while the source's requests are in flight.
    pub(super) fn takeover(
        &mut self,
        i: usize,
        to: usize,
        fence_after: Time,
        cut_off: Option<Time>,
    ) {
        let now = self.now();
        let from = self.vm_host;
        self.pause();
        if let Some(h) = cut_off {
            let path = self.path_of(from).id();
            self.storage.hang_in_flight(path, now + h);
        }
        if self.gated() && self.fence.mode == FenceMode::None {
            // No record, a holder that is alive (only cut off, if at all),
            // and nobody may confirm a live host dead: refused. The disk
            // stays with the source and the VM goes on there.
            self.report.fence_refused += 1;
            self.note(|| {
                format!(
                    "fence none: takeover by host {to} REFUSED: holder host {from} is alive and \
                     handed over no record (not confirmed dead); the VM stays on host {from}"
                )
            });
            self.front.paused = false;
            self.guest.running = true;
            self.schedule_tick(1);
            self.action_done(i);
            return;
        }
        let src = self.source_ep();
        let next = if self.protected() {
            self.takeover_protected(from, to)
        } else {
            Ok((self.raw_endpoint(to), 0))
        };
        let (ep, epoch) = match next {
            Ok(x) => x,
            Err(e) => {
                self.fail(e);
                self.action_done(i);
                return;
            }
        };
        self.retired = src;
        if self.gated() {
            // The source's own backend fences its requests in flight
            // `fence_after` from now; sanlock: then, once its I/O has
            // finished, it releases the lease the destination waits for.
            self.fences.push(Some((epoch, from)));
            self.after(fence_after, Event::Fence(self.fences.len() - 1));
            self.start_writer(i, to, epoch, ep, false);
            return;
        }
        self.vm_host = to;
        self.report.migrations += 1;
        self.started_at_once();
        self.recover(ep);
        if self.protected() {
            // The old epoch's requests drain until the fence, on the clock;
            // the source's own backend fences them too (host-side).
            let host = if self.host_side() { from } else { to };
            self.defer_fence(i, epoch, host, fence_after);
        } else {
            self.action_done(i);
        }
    }

    /// The source died while draining: its suspension never finishes and
    /// there is no record. The VM's state already reached the destination,
    /// which takes the next epoch; blkfront re-sends there.
    pub(super) fn source_died_mid_migration(&mut self, i: usize, to: usize, deadline: Time) {
        let from = self.vm_host;
        let orphan = self.suspension.take();
        if let (Some(s), false) = (orphan, self.host_side()) {
            // Only the source's connection died: the gateway's suspend
            // runs on and is finished at its deadline.
            self.orphans.push((deadline, s));
            let now = self.now();
            self.after(deadline.saturating_sub(now), Event::OrphanDeadline);
        }
        // Host-side: dropped unfinished, as a dead process would.
        let path = self.path_of(from).id();
        if let Some(src) = self.source_ep() {
            self.close_endpoint(src);
        }
        if self.host_side() {
            self.storage.kill_path(path);
            self.hosts[from].disk = None;
            self.hosts[from].path = self.storage.path();
        }
        self.holder_crashed(from);
        let (ep, epoch) = match self.takeover_protected(from, to) {
            Ok(x) => x,
            Err(e) => {
                self.fail(e);
                self.action_done(i);
                return;
            }
        };
        if self.gated() {
            self.start_writer(i, to, epoch, ep, false);
            return;
        }
        self.started_at_once();
        self.vm_host = to;
        self.report.migrations += 1;
        self.recover(ep);
        if self.host_side() {
            self.action_done(i);
        } else {
            let delay = self.rng.range(0, 400);
            self.defer_fence(i, epoch, to, delay);
        }
    }

    pub(super) fn takeover_protected(
        &mut self,
        from: usize,
        to: usize,
    ) -> Result<(usize, u64), String> {
        let epoch = self.epochs.current(DISK_NAME).map_err(|e| e.to_string())? + 1;
        if self.host_side() {
            // `blkshim ctl handoff` on the destination host.
            let disk = self.disk_of(to).map_err(|e| e.to_string())?;
            disk.advance_to(epoch)
                .map_err(|e| format!("advance to {epoch} on host {to}: {e}"))?;
            self.fence_storage(to, epoch)?;
        }
        // Gateway: the destination's first write advances the epoch.
        let ep = self.disk_endpoint(to, epoch, "destination")?;
        let _ = from;
        Ok((ep, epoch))
    }

    /// The hand-off record must list exactly the requests the frontend had
    /// outstanding on the source, with fates that fit the method.
    pub(super) fn check_record(&mut self, record: &HandoffRecord) {
        // Older writers' leftovers (fenced at an earlier hand-off, still at
        // the storage) are listed too: the suspend covers every epoch up to
        // the source's. Those must have gone to another endpoint.
        let src = self.source_ep();
        let mut listed: Vec<u64> = record
            .requests
            .iter()
            .map(|e| e.tag)
            .filter(|&t| self.wire_ep.get(t as usize).copied() == src)
            .collect();
        listed.sort_unstable();
        let outstanding: Vec<u64> = self.suspended_tags.iter().map(|&(t, _)| t).collect();
        let unknown = record
            .requests
            .iter()
            .any(|e| self.wire_ep.get(e.tag as usize).is_none());
        if listed != outstanding || unknown {
            self.fail(format!(
                "record lists requests {listed:?}, the frontend had {outstanding:?} outstanding"
            ));
        }
        for e in &record.requests {
            if !e.kind.modifies() || self.wire_ep.get(e.tag as usize).copied() != src {
                continue;
            }
            let ok = match record.method {
                HandoffMethod::Drained => e.fate == RequestFate::CompletedNotAcknowledged,
                HandoffMethod::Fenced => {
                    matches!(e.fate, RequestFate::Cancelled | RequestFate::Fenced)
                }
                HandoffMethod::DrainTimedOutThenFenced => true,
            };
            if !ok {
                self.fail(format!(
                    "record of a {:?} hand-off says {:?} {} (tag {}) was {:?}",
                    record.method, e.kind, e.range, e.tag, e.fate
                ));
            }
        }
    }

    /// The hand-off is done; the older epoch's requests still in flight are
    /// fenced `delay` ticks later, while the next action may already run.
    pub(super) fn defer_fence(&mut self, i: usize, epoch: u64, host: usize, delay: Time) {
        self.fences.push(Some((epoch, host)));
        self.after(delay, Event::Fence(self.fences.len() - 1));
        self.action_done(i);
    }

    pub(super) fn run_fence(&mut self, k: usize) {
        let Some((epoch, host)) = self.fences.get_mut(k).and_then(Option::take) else {
            return;
        };
        let disk = match self.scenario.deployment {
            Deployment::Gateway => self.gateway.clone(),
            Deployment::HostSide => self.hosts[host].disk.clone(),
        };
        if let Some(d) = disk {
            let (c, f) = d.fence_below(epoch);
            self.note(|| {
                format!("fence below epoch {epoch}: {c} cancelled, {f} fenced at the storage")
            });
        }
        if self.gated() {
            // The holder's own fence after a takeover hands its epoch over.
            if let Some(h) = self
                .holder
                .as_mut()
                .filter(|h| h.host == host && h.epoch < epoch)
            {
                h.handed_over = true;
            }
        }
    }

    pub(super) fn finish_orphans(&mut self) {
        let now = self.now();
        let mut kept = Vec::new();
        for (deadline, mut s) in std::mem::take(&mut self.orphans) {
            let record = if deadline > now {
                None
            } else {
                s.try_finish(true)
            };
            match record {
                Some(r) => self.note(|| {
                    format!(
                        "orphaned suspend of epoch {} finished: {:?}",
                        r.source_epoch, r.method
                    )
                }),
                None => kept.push((deadline, s)),
            }
        }
        self.orphans = kept;
    }

    /// The destination's side: resume from the record, fence the storage,
    /// admit the writer.
    pub(super) fn resume_on(
        &mut self,
        to: usize,
        record: &HandoffRecord,
    ) -> Result<(usize, u64), String> {
        let disk = self.disk_of(to).map_err(|e| e.to_string())?;
        let epoch = disk
            .resume(record)
            .map_err(|e| format!("resume on host {to}: {e}"))?;
        self.fence_storage(to, epoch)?;
        let ep = self.disk_endpoint(to, epoch, "destination")?;
        Ok((ep, epoch))
    }

    pub(super) fn crash_host(&mut self, hang: Option<Time>) {
        let now = self.now();
        let dead = self.vm_host;
        let path = self.path_of(dead).id();
        if let Some(h) = hang {
            self.storage.hang_in_flight(path, now + h);
        }
        if let Some(ep) = self.source_ep() {
            self.close_endpoint(ep);
        }
        if self.host_side() {
            // The host and its backend are gone; its writes in flight are not.
            self.storage.kill_path(path);
            self.hosts[dead].disk = None;
            // When the host comes back it has a new connection.
            self.hosts[dead].path = self.storage.path();
        }
        self.holder_crashed(dead);
        self.crash_vm();
    }

    /// Failover: the VM restarts on `to` at the next epoch.
    pub(super) fn restart(&mut self, i: usize, to: usize) {
        self.vm_host = to;
        if !self.protected() {
            let ep = self.raw_endpoint(to);
            self.boot_on(ep);
            self.action_done(i);
            return;
        }
        match self.take_over_after_crash(to) {
            Ok((ep, epoch)) if self.gated() => self.start_writer(i, to, epoch, ep, true),
            Ok((ep, epoch)) => {
                self.started_at_once();
                self.boot_on(ep);
                if self.host_side() {
                    self.action_done(i);
                } else {
                    // The gateway lets the dead writer's requests drain, and
                    // fences them on its own clock.
                    let delay = if self.rng.chance(50) {
                        0
                    } else {
                        self.rng.range(10, 400)
                    };
                    self.defer_fence(i, epoch, to, delay);
                }
            }
            Err(e) => {
                self.fail(e);
                self.action_done(i);
            }
        }
    }

    pub(super) fn take_over_after_crash(&mut self, to: usize) -> Result<(usize, u64), String> {
        let disk = self.disk_of(to).map_err(|e| e.to_string())?;
        let epoch = self.epochs.current(DISK_NAME).map_err(|e| e.to_string())? + 1;
        disk.advance_to(epoch)
            .map_err(|e| format!("advance to {epoch} on host {to}: {e}"))?;
        self.fence_storage(to, epoch)?;
        let ep = self.disk_endpoint(to, epoch, "restarted")?;
        Ok((ep, epoch))
    }

    pub(super) fn boot_on(&mut self, ep: usize) {
        self.note(|| format!("VM restarts on endpoint {ep}"));
        self.report.migrations += 1;
        self.front.endpoint = Some(ep);
        self.front.paused = false;
        self.guest.running = true;
        self.schedule_tick(1);
    }
}
