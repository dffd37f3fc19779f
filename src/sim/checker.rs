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
    pub violations: Vec<Violation>,
}

impl Checker {
    /// A checker for a zero-filled disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Checker {
            allowed: vec![vec![Content::Zero]; sectors as usize],
            violations: Vec::new(),
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

    /// `landed` just reached `sector` at the storage. Write ids grow in the
    /// guest's issue order and the guest never overlaps its own writes, so
    /// a write id below every allowed one is a stale write landing.
    pub fn landed(&mut self, time: Time, sector: u64, landed: Content) {
        let Content::Write(k) = landed else {
            return;
        };
        let Some(a) = self.allowed.get(sector as usize) else {
            return;
        };
        let newer = |c: &Content| matches!(c, Content::Write(j) if *j > k);
        if !a.is_empty() && a.iter().all(newer) {
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
