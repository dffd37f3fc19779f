//! The guest and the requests it issues.

use super::{errno_of, wire_io, ActState, Done, EpKind, Part, Wire, World, ROGUE_TAG, SECTOR};
use crate::sim::checker::Violation;
use crate::sim::payload::{decode, Content};
use crate::sim::rng::SimRng;
use crate::sim::sched::{Event, Time};
use crate::storage::{IoOutcome, StorageIo};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl GKind {
    pub(super) fn modifies(self) -> bool {
        matches!(self, GKind::Write | GKind::Discard | GKind::WriteZeroes)
    }
}

/// A request as the guest issued it.
pub(super) struct GReq {
    pub(super) kind: GKind,
    pub(super) start: u64,
    pub(super) count: u64,
    /// Wire pieces still outstanding.
    pub(super) parts_left: u32,
    pub(super) read: Vec<Content>,
    pub(super) failed: Option<i32>,
}

/// The guest: writes, reads, flushes and discards with verifiable
/// contents. Like a page cache, it never has two requests in flight that
/// overlap when one of them modifies the disk.
pub(super) struct Guest {
    pub(super) rng: SimRng,
    pub(super) sectors: u64,
    pub(super) hot: Vec<u64>,
    pub(super) depth: usize,
    /// Percent of requests that are writes (the rest mostly reads).
    pub(super) write_percent: u64,
    pub(super) budget: u64,
    pub(super) issued: u64,
    pub(super) since_action: u64,
    pub(super) running: bool,
    pub(super) tick_scheduled: bool,
    pub(super) reqs: BTreeMap<u64, GReq>,
    pub(super) next_id: u64,
}

impl World {
    pub(super) fn schedule_tick(&mut self, delay: Time) {
        if !self.guest.tick_scheduled {
            self.guest.tick_scheduled = true;
            self.after(delay, Event::GuestTick);
        }
    }

    pub(super) fn guest_finished(&self) -> bool {
        let g = &self.guest;
        g.issued >= g.budget
            && self.states.iter().all(|s| matches!(s, ActState::Done))
            && self.fences.iter().all(Option::is_none)
            && g.since_action >= 40
    }

    pub(super) fn guest_tick(&mut self) {
        self.guest.tick_scheduled = false;
        if !self.guest.running || self.guest_finished() {
            return;
        }
        if self.guest.reqs.len() < self.guest.depth {
            if let Some(id) = self.pick() {
                self.send_new(id);
            }
        }
        let d = self.guest.rng.range(1, 4);
        self.schedule_tick(d);
    }

    /// Choose the guest's next request, avoiding overlap with its own
    /// conflicting requests in flight.
    pub(super) fn pick(&mut self) -> Option<u64> {
        let g = &mut self.guest;
        let r = g.rng.below(100);
        let w = g.write_percent;
        let kind = if r < w {
            GKind::Write
        } else if r < 80 {
            GKind::Read
        } else {
            match r {
                80..=89 => GKind::Flush,
                90..=94 => GKind::Discard,
                _ => GKind::WriteZeroes,
            }
        };
        let (mut start, mut count) = (0, 0);
        if kind != GKind::Flush {
            let mut found = false;
            for _ in 0..4 {
                count = g.rng.range(1, 4).min(g.sectors);
                let s = if g.rng.chance(60) {
                    g.hot[g.rng.below(g.hot.len() as u64) as usize]
                } else {
                    g.rng.below(g.sectors)
                };
                start = s.min(g.sectors - count);
                let end = start + count;
                let clash = g.reqs.values().any(|q| {
                    q.kind != GKind::Flush
                        && (kind.modifies() || q.kind.modifies())
                        && q.start < end
                        && start < q.start + q.count
                });
                if !clash {
                    found = true;
                    break;
                }
            }
            if !found {
                return None;
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        g.issued += 1;
        g.since_action += 1;
        g.reqs.insert(
            id,
            GReq {
                kind,
                start,
                count,
                parts_left: 1,
                read: vec![Content::Garbage; count as usize],
                failed: None,
            },
        );
        Some(id)
    }

    pub(super) fn send_new(&mut self, id: u64) {
        let Some(q) = self.guest.reqs.get(&id) else {
            return;
        };
        let wire = Wire {
            kind: q.kind,
            start: q.start,
            count: q.count,
            parts: vec![Part {
                greq: id,
                start: q.start,
                count: q.count,
            }],
        };
        self.send_wire(wire);
    }

    /// Put a request on the ring of the connected backend.
    pub(super) fn send_wire(&mut self, wire: Wire) {
        let Some(ep) = self.front.endpoint else {
            return;
        };
        let tag = self.front.next_wire;
        self.front.next_wire += 1;
        self.wire_ep.push(ep);
        let io = wire_io(&wire);
        self.front.wires.insert(tag, wire);
        self.submit(ep, tag, io);
    }

    pub(super) fn submit(&mut self, ep: usize, tag: u64, io: StorageIo) {
        let inbox = Arc::clone(&self.inbox);
        let done = Box::new(move |o: IoOutcome| {
            inbox.lock().push(Done {
                ep,
                tag,
                result: errno_of(&o.result),
                buf: o.buf,
            })
        });
        match &self.endpoints[ep].kind {
            EpKind::Disk {
                disk,
                writer: Some(w),
            } => disk.submit(w, tag, io, done),
            EpKind::Disk { writer: None, .. } => done(IoOutcome {
                result: Err(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)),
                buf: None,
            }),
            EpKind::Raw { path } => path.submit(io, done),
        }
    }

    pub(super) fn on_done(&mut self, d: Done) {
        if d.tag >= ROGUE_TAG {
            if d.result.is_ok() {
                self.report.rogue_landed += 1;
            }
            return;
        }
        if self.front.paused || self.front.endpoint != Some(d.ep) {
            // The ring this answer was meant for is gone (suspended or dead).
            return;
        }
        let Some(w) = self.front.wires.remove(&d.tag) else {
            return;
        };
        let now = self.now();
        for p in &w.parts {
            let Some(q) = self.guest.reqs.get_mut(&p.greq) else {
                continue;
            };
            match d.result {
                Err(errno) => {
                    if q.failed.is_none() {
                        q.failed = Some(errno);
                        self.checker.violation(Violation::GuestIoError {
                            time: now,
                            request: p.greq,
                            errno,
                        });
                    }
                }
                Ok(()) => {
                    if let (GKind::Read, Some(buf)) = (w.kind, &d.buf) {
                        let data = buf.as_slice();
                        for s in p.start..p.start + p.count {
                            let o = ((s - w.start) as usize) * SECTOR;
                            if let Some(chunk) = data.get(o..o + SECTOR) {
                                q.read[(s - q.start) as usize] = decode(chunk, s);
                            }
                        }
                    }
                }
            }
            q.parts_left -= 1;
            if q.parts_left == 0 {
                self.guest_complete(p.greq);
            }
        }
    }

    pub(super) fn guest_complete(&mut self, id: u64) {
        let Some(q) = self.guest.reqs.remove(&id) else {
            return;
        };
        self.report.requests += 1;
        let now = self.now();
        let content = match q.kind {
            GKind::Write => Content::Write(id),
            _ => Content::Zero,
        };
        for s in q.start..q.start + q.count {
            match (q.kind, q.failed) {
                (_, None) if q.kind.modifies() => self.checker.completed(s, content),
                (_, Some(_)) if q.kind.modifies() => self.checker.maybe(s, content),
                (GKind::Read, None) => self.checker.read(now, s, q.read[(s - q.start) as usize]),
                _ => {}
            }
        }
    }
}
