//! Linux blkfront: pause, re-send on resume, the VM crashing.

use super::{GKind, World, SECTOR};
use crate::sim::payload::{encode, Content};
use crate::sim::rng::SimRng;
use crate::storage::{AlignedBuf, StorageIo, SECTOR_SIZE};
use std::collections::BTreeMap;

/// A piece of a guest request inside a wire request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Part {
    pub(super) greq: u64,
    pub(super) start: u64,
    pub(super) count: u64,
}

/// A request on the ring (blkif), as the backend sees it.
pub(super) struct Wire {
    pub(super) kind: GKind,
    pub(super) start: u64,
    pub(super) count: u64,
    pub(super) parts: Vec<Part>,
}

/// Linux blkfront: on resume it re-sends every unfinished request under a
/// new id, possibly split or merged differently; flush and discard whole.
pub(super) struct Front {
    pub(super) rng: SimRng,
    pub(super) endpoint: Option<usize>,
    pub(super) paused: bool,
    pub(super) wires: BTreeMap<u64, Wire>,
    pub(super) next_wire: u64,
}

impl World {
    pub(super) fn pause(&mut self) {
        self.front.paused = true;
        self.guest.running = false;
    }

    /// blkfront's recovery on the new backend: re-send every unfinished
    /// request under a new id, reads and writes possibly split or merged.
    pub(super) fn recover(&mut self, ep: usize) {
        let n = self.front.wires.len();
        self.note(|| format!("blkfront reconnects to endpoint {ep}, re-sending {n} requests"));
        self.front.paused = false;
        self.front.endpoint = Some(ep);
        let old = std::mem::take(&mut self.front.wires);
        let mut pieces: Vec<(GKind, Vec<Part>)> = Vec::new();
        for (_, w) in old {
            let splittable = matches!(w.kind, GKind::Read | GKind::Write);
            if splittable && w.count > 1 && self.front.rng.chance(30) {
                let at = w.start + self.front.rng.range(1, w.count - 1);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for p in w.parts {
                    let end = p.start + p.count;
                    if end <= at {
                        a.push(p);
                    } else if p.start >= at {
                        b.push(p);
                    } else {
                        a.push(Part {
                            count: at - p.start,
                            ..p
                        });
                        b.push(Part {
                            start: at,
                            count: end - at,
                            ..p
                        });
                        if let Some(q) = self.guest.reqs.get_mut(&p.greq) {
                            q.parts_left += 1;
                        }
                    }
                }
                pieces.push((w.kind, a));
                pieces.push((w.kind, b));
            } else {
                pieces.push((w.kind, w.parts));
            }
        }
        if self.front.rng.chance(50) {
            // The block layer's elevator sorts before merging.
            pieces.sort_by_key(|(_, parts)| parts.first().map_or(0, |p| p.start));
        }
        let mut merged: Vec<(GKind, Vec<Part>)> = Vec::new();
        for (kind, parts) in pieces {
            if let Some((pk, pp)) = merged.last_mut() {
                let mergeable = *pk == kind && matches!(kind, GKind::Read | GKind::Write);
                let contiguous = match (pp.last(), parts.first()) {
                    (Some(a), Some(b)) => a.start + a.count == b.start,
                    _ => false,
                };
                if mergeable && contiguous && self.front.rng.chance(60) {
                    pp.extend(parts);
                    continue;
                }
            }
            merged.push((kind, parts));
        }
        for (kind, parts) in merged {
            let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
                continue;
            };
            let (start, count) = match kind {
                GKind::Flush => (0, 0),
                _ => (first.start, last.start + last.count - first.start),
            };
            self.report.replays += 1;
            self.send_wire(Wire {
                kind,
                start,
                count,
                parts,
            });
        }
        self.guest.running = true;
        self.schedule_tick(1);
    }

    /// The VM dies with its host: whatever it had in flight may or may not
    /// land.
    pub(super) fn crash_vm(&mut self) {
        let n = self.guest.reqs.len();
        self.note(|| format!("VM dies with {n} requests in flight"));
        let reqs = std::mem::take(&mut self.guest.reqs);
        for (id, q) in reqs {
            let content = match q.kind {
                GKind::Write => Content::Write(id),
                GKind::Discard | GKind::WriteZeroes => Content::Zero,
                _ => continue,
            };
            for s in q.start..q.start + q.count {
                self.checker.maybe(s, content);
            }
        }
        self.front.wires.clear();
        self.front.endpoint = None;
        self.front.paused = false;
        self.guest.running = false;
    }
}

/// The storage I/O of a wire request.
pub(super) fn wire_io(w: &Wire) -> StorageIo {
    let offset = w.start * SECTOR_SIZE;
    match w.kind {
        GKind::Write => {
            let mut buf = AlignedBuf::zeroed(w.count as usize * SECTOR);
            let data = buf.as_mut_slice();
            for p in &w.parts {
                for s in p.start..p.start + p.count {
                    let o = ((s - w.start) as usize) * SECTOR;
                    encode(&mut data[o..o + SECTOR], s, p.greq);
                }
            }
            StorageIo::Write {
                offset,
                buf,
                fua: false,
            }
        }
        GKind::Read => StorageIo::Read {
            offset,
            buf: AlignedBuf::zeroed(w.count as usize * SECTOR),
        },
        GKind::Flush => StorageIo::Flush,
        GKind::WriteZeroes => StorageIo::WriteZeroes {
            offset,
            len: w.count * SECTOR_SIZE,
            may_unmap: w.start % 2 == 0,
        },
        GKind::Discard => StorageIo::Discard {
            offset,
            len: w.count * SECTOR_SIZE,
        },
    }
}
