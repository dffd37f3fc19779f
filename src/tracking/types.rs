//! The vocabulary every layer shares: epochs, operation kinds, sector ranges.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A writer's fencing token. Only grows; never a wall-clock time.
pub type Epoch = u64;

/// What a request does to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Read,
    Write,
    Trim,
    WriteZeroes,
    /// Covers every write completed before it; holds no range.
    Flush,
    /// A write barrier (Xen's WRITE_BARRIER): waits for everything before it
    /// and holds back everything after it, whatever the ranges.
    Barrier,
}

impl OpKind {
    /// Changes the disk's contents: subject to ordering and to fencing.
    pub fn modifies(self) -> bool {
        matches!(
            self,
            OpKind::Write | OpKind::Trim | OpKind::WriteZeroes | OpKind::Barrier
        )
    }

    /// Must name at least one sector.
    pub fn needs_range(self) -> bool {
        !matches!(self, OpKind::Flush | OpKind::Barrier)
    }

    /// Takes part in overlap checks.
    pub fn has_range(self) -> bool {
        !matches!(self, OpKind::Flush)
    }
}

/// `count` sectors starting at sector `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SectorRange {
    pub start: u64,
    pub count: u64,
}

impl SectorRange {
    pub const fn new(start: u64, count: u64) -> Self {
        SectorRange { start, count }
    }

    /// One past the last sector; `None` when it overflows.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.count)
    }

    pub fn overlaps(&self, other: &SectorRange) -> bool {
        match (self.end(), other.end()) {
            (Some(a), Some(b)) => self.start < b && other.start < a,
            _ => false,
        }
    }
}

impl fmt::Display for SectorRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}+{}]", self.start, self.count)
    }
}

/// One request as the tracker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Request {
    pub kind: OpKind,
    pub range: SectorRange,
    /// The epoch of the writer that issued it.
    pub epoch: Epoch,
}

impl Request {
    pub const fn new(kind: OpKind, range: SectorRange, epoch: Epoch) -> Self {
        Request { kind, range, epoch }
    }

    /// Half-open span used for conflict checks, rounded out to blocks of
    /// `2^grain_shift` sectors: a barrier spans everything.
    #[inline]
    pub(crate) fn span(&self, grain_shift: u32) -> (u64, u64) {
        match self.kind {
            OpKind::Barrier => (0, u64::MAX),
            _ => {
                let start = (self.range.start >> grain_shift) << grain_shift;
                let end = self.range.start.saturating_add(self.range.count);
                let mask = (1u64 << grain_shift) - 1;
                (start, end.checked_add(mask).map_or(u64::MAX, |e| e & !mask))
            }
        }
    }
}
