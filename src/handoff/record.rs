//! The hand-off record: what happened to every request that was in flight
//! when the source suspended. Written by the source, read by the destination
//! (and by people debugging a migration), so it is plain JSON.

use crate::tracking::{Epoch, OpKind, SectorRange};
use serde::{Deserialize, Serialize};

/// How the source gave up the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffMethod {
    /// Everything in flight completed before the deadline.
    Drained,
    /// Fenced at once, as asked.
    Fenced,
    /// A drain whose deadline passed, so the rest was fenced.
    DrainTimedOutThenFenced,
}

/// What became of one request that was in flight at suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestFate {
    /// Reached the storage and completed. The source no longer answers its
    /// frontend, so the frontend will re-send it to the destination.
    CompletedNotAcknowledged,
    /// Never reached the storage.
    Cancelled,
    /// Reached the storage but was fenced: it can never be acknowledged,
    /// and every newer write to its sectors is ordered after it.
    Fenced,
    /// A read or flush still in flight when the record was made: it changes
    /// nothing on the disk, so a hand-off need not wait for it. The source
    /// may still answer it; a frontend that gets no answer re-sends it.
    StillInFlight,
}

/// One request in flight at suspend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffEntry {
    /// The frontend's id for the request (NBD handle, blkif id...).
    pub tag: u64,
    /// The epoch of the writer that issued it (tags of different writers may collide).
    pub epoch: Epoch,
    pub kind: OpKind,
    pub range: SectorRange,
    pub fate: RequestFate,
}

/// The record a source hands to its destination.
///
/// ```
/// use blkshim::handoff::{HandoffMethod, HandoffRecord};
/// let json = r#"{"disk":"vm1","source_epoch":5,"destination_epoch":6,
///               "method":"drain_timed_out_then_fenced",
///               "requests":[{"tag":7,"epoch":5,"kind":"write","range":{"start":0,"count":8},"fate":"fenced"}]}"#;
/// let rec = HandoffRecord::from_json(json).unwrap();
/// assert_eq!(rec.method, HandoffMethod::DrainTimedOutThenFenced);
/// assert_eq!(HandoffRecord::from_json(&rec.to_json()).unwrap(), rec);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRecord {
    pub disk: String,
    /// The epoch the source wrote with.
    pub source_epoch: Epoch,
    /// The epoch the destination will write with (`source_epoch + 1`).
    pub destination_epoch: Epoch,
    pub method: HandoffMethod,
    pub requests: Vec<HandoffEntry>,
}

impl HandoffRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}
