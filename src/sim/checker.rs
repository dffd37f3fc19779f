//! The checker: every block must hold the last write the guest was told had
//! completed, and every read must return completed data only.
//!
//! Per sector it keeps the set of contents the guest may legitimately see.
//! Normally that is exactly one: the last acknowledged write. After a crash,
//! a write that was in flight may or may not have landed, so both are
//! allowed until the guest reads the sector (then it must keep what it saw)
//! or writes it again.

use super::payload::{decode, Content};
use super::sched::Time;
use crate::storage::SECTOR_SIZE;
use std::fmt;

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A read returned data that was not the sector's completed contents.
    StaleRead {
        time: Time,
        sector: u64,
        got: Content,
        allowed: Vec<Content>,
    },
    /// After the run, a sector holds something else than its last completed write.
    FinalMismatch {
        sector: u64,
        got: Content,
        allowed: Vec<Content>,
    },
    /// The guest saw an I/O error (the hand-off must be invisible to it).
    GuestIoError {
        time: Time,
        request: u64,
        errno: i32,
    },
    /// A write landed that is older than a write the guest had already been
    /// told completed on that sector (even if something overwrote it later).
    StaleLanding {
        time: Time,
        sector: u64,
        landed: Content,
        allowed: Vec<Content>,
    },
    /// An older writer's write, trim or write-zeroes landed on a sector
    /// after a newer writer's data had landed there.
    OlderWriterLanded {
        time: Time,
        sector: u64,
        landed: Content,
        epoch: u64,
        newer_epoch: u64,
    },
    /// A guest request never completed.
    Stuck { request: u64 },
    /// A takeover that must have been refused was admitted.
    StaleTakeoverAdmitted { what: String },
    /// A hand-off step that must succeed failed.
    HandoffFailed { what: String },
}

fn set(v: &[Content]) -> String {
    v.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("|")
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::StaleRead {
                time,
                sector,
                got,
                allowed,
            } => write!(
                f,
                "t={time}: read of sector {sector} returned {got}, completed data is {}",
                set(allowed)
            ),
            Violation::FinalMismatch {
                sector,
                got,
                allowed,
            } => write!(
                f,
                "sector {sector} holds {got}, the guest's last completed write is {}",
                set(allowed)
            ),
            Violation::GuestIoError {
                time,
                request,
                errno,
            } => write!(
                f,
                "t={time}: guest request {request} failed with errno {errno}"
            ),
            Violation::StaleLanding {
                time,
                sector,
                landed,
                allowed,
            } => write!(
                f,
                "t={time}: {landed} landed on sector {sector} after the newer {} completed",
                set(allowed)
            ),
            Violation::OlderWriterLanded {
                time,
                sector,
                landed,
                epoch,
                newer_epoch,
            } => write!(
                f,
                "t={time}: {landed} from epoch {epoch} landed on sector {sector} after epoch {newer_epoch}'s data"
            ),
            Violation::Stuck { request } => write!(f, "guest request {request} never completed"),
            Violation::StaleTakeoverAdmitted { what } => {
                write!(f, "stale takeover admitted: {what}")
            }
            Violation::HandoffFailed { what } => write!(f, "hand-off failed: {what}"),
        }
    }
}

/// Expected contents and the violations found so far.
#[derive(Debug, Clone)]
pub struct Checker {
    allowed: Vec<Vec<Content>>,
    /// Per sector, the newest writer epoch whose data landed there.
    newest_landed: Vec<u64>,
    pub violations: Vec<Violation>,
    /// Landings of an older writer's write, trim or write-zeroes after a
    /// newer writer's had landed on the sector (each is also a
    /// [`Violation::StaleLanding`]).
    pub stale_landings: u64,
}

impl Checker {
    /// A checker for a zero-filled disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Checker {
            allowed: vec![vec![Content::Zero]; sectors as usize],
            newest_landed: vec![0; sectors as usize],
            violations: Vec::new(),
            stale_landings: 0,
        }
    }

    /// The guest was told that `content` is now in `sector`.
    pub fn completed(&mut self, sector: u64, content: Content) {
        if let Some(a) = self.allowed.get_mut(sector as usize) {
            a.clear();
            a.push(content);
        }
    }

    /// `content` may or may not have reached `sector` (a write in flight at
    /// a crash, or one that failed).
    pub fn maybe(&mut self, sector: u64, content: Content) {
        if let Some(a) = self.allowed.get_mut(sector as usize) {
            if !a.contains(&content) {
                a.push(content);
            }
        }
    }

    /// A completed read returned `got` for `sector`.
    pub fn read(&mut self, time: Time, sector: u64, got: Content) {
        let Some(a) = self.allowed.get_mut(sector as usize) else {
            return;
        };
        if a.contains(&got) {
            // From now on the sector must keep what the guest saw.
            a.clear();
            a.push(got);
        } else {
            self.violations.push(Violation::StaleRead {
                time,
                sector,
                got,
                allowed: a.clone(),
            });
        }
    }

    /// `landed` just reached `sector` at the storage, from a writer of
    /// `epoch` (when the path says). Two rules, whatever the content (a
    /// write of the guest's, a stale node's, a trim or write-zeroes):
    /// - a writer's data landing after a newer writer's data landed on the
    ///   sector is stale: seeds/003's A after A';
    /// - write ids grow in the guest's issue order and the guest never
    ///   overlaps its own writes, so a write id below every allowed one is
    ///   a stale write landing too (an older write re-sent and landing late).
    pub fn landed(&mut self, time: Time, sector: u64, landed: Content, epoch: Option<u64>) {
        let Some(a) = self.allowed.get(sector as usize) else {
            return;
        };
        if let (Some(e), Some(newest)) = (epoch, self.newest_landed.get_mut(sector as usize)) {
            if e < *newest {
                self.stale_landings += 1;
                self.violations.push(Violation::OlderWriterLanded {
                    time,
                    sector,
                    landed,
                    epoch: e,
                    newer_epoch: *newest,
                });
                return;
            }
            *newest = e;
        }
        let Content::Write(k) = landed else {
            return;
        };
        let newer = |c: &Content| matches!(c, Content::Write(j) if *j > k);
        if !a.is_empty() && a.iter().all(newer) {
            self.stale_landings += 1;
            self.violations.push(Violation::StaleLanding {
                time,
                sector,
                landed,
                allowed: a.clone(),
            });
        }
    }

    pub fn violation(&mut self, v: Violation) {
        self.violations.push(v);
    }

    /// Compare the whole medium with the expected contents.
    pub fn final_check(&mut self, medium: &[u8]) {
        let n = SECTOR_SIZE as usize;
        for (i, chunk) in medium.chunks_exact(n).enumerate() {
            let got = decode(chunk, i as u64);
            if let Some(a) = self.allowed.get(i) {
                if !a.contains(&got) {
                    self.violations.push(Violation::FinalMismatch {
                        sector: i as u64,
                        got,
                        allowed: a.clone(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newer writer's data landed, then an older writer's lands: a
    /// violation whatever it carries.
    fn older_after_newer(older: Content) -> Checker {
        let mut c = Checker::new(4);
        c.completed(1, Content::Write(7));
        c.landed(10, 1, Content::Write(7), Some(2));
        c.landed(11, 1, older, Some(1));
        c
    }

    #[test]
    fn an_older_writers_write_landing_after_newer_data_fires() {
        // Even with an id above the newer write's (a stale node's ids).
        for content in [
            Content::Write(3),
            Content::Write(7),
            Content::Write(1 << 62),
        ] {
            let c = older_after_newer(content);
            assert_eq!(c.stale_landings, 1, "{content}");
            assert!(matches!(
                c.violations[0],
                Violation::OlderWriterLanded {
                    epoch: 1,
                    newer_epoch: 2,
                    ..
                }
            ));
        }
    }

    #[test]
    fn an_older_writers_trim_or_write_zeroes_landing_after_newer_data_fires() {
        // Discard and write-zeroes land as zeroes.
        let c = older_after_newer(Content::Zero);
        assert_eq!(c.stale_landings, 1);
    }

    #[test]
    fn same_or_newer_writers_in_order_do_not_fire() {
        let mut c = Checker::new(4);
        c.landed(1, 0, Content::Write(1), Some(1));
        c.completed(0, Content::Write(1));
        c.landed(2, 0, Content::Write(2), Some(1));
        c.completed(0, Content::Write(2));
        c.landed(3, 0, Content::Write(3), Some(2));
        c.landed(4, 0, Content::Zero, Some(3));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        // Untagged landings are judged by id only.
        c.landed(5, 1, Content::Write(9), None);
        assert!(c.violations.is_empty());
    }

    #[test]
    fn a_stale_write_of_the_same_writer_landing_late_fires() {
        let mut c = Checker::new(4);
        c.completed(2, Content::Write(9));
        c.landed(5, 2, Content::Write(4), Some(1));
        assert_eq!(c.stale_landings, 1);
        assert!(matches!(c.violations[0], Violation::StaleLanding { .. }));
    }
}
