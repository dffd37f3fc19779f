//! The epoch store on etcd: every host of a cluster shares one consistent
//! store without a shared directory, and a store that survives the loss of
//! a minority of its members.
//!
//! # Layout
//!
//! Under a prefix (default `/blkshim`), a disk's epoch is the key
//! `PREFIX/epoch/DISK`, its value the epoch in decimal ASCII. Each advance
//! also writes `PREFIX/claim/DISK/EPOCH` (20 digits), whose value is a
//! nonce of the advance that produced `EPOCH`: it is what tells, after a
//! doubtful outcome, whether our advance won (one small key per advance;
//! advances are hand-offs, rare).
//!
//! # Compare-and-advance
//!
//! One txn, compared on the key's `mod_revision` as just read (on
//! `create_revision == 0` when the key is absent: create-if-absent), never
//! on the value: etcd compares values bytewise ("10" < "9"). Success puts
//! the new epoch and the claim; failure reads both back in the same txn.
//! The txn applies at most once however often it is sent (the mod_revision
//! it compares moves when it applies), so the client sends it again on
//! another endpoint after a failure, and an outcome that stays unknown
//! (a timeout after the request left, a cut connection, an error for a
//! proposal etcd may still commit) is resolved by sending it again: it
//! then either applies now, or fails and the claim shows who won. If etcd
//! cannot be reached to find out, the advance is reported as
//! [`EpochError::Unknown`], never as a success. Without quorum, every call
//! fails within its timeout: a disk cannot change hands then, and writers
//! already admitted are not affected.
//!
//! # Why the JSON gateway over `ureq`, not the `etcd-client` crate
//!
//! `etcd-client` is async (tokio, tonic, prost: about 70 more crates, and
//! `protoc` at build time, since it generates its gRPC code in `build.rs`).
//! blkshim is synchronous and threaded; this store needs one txn and one
//! range call. etcd's gRPC gateway (`POST /v3/kv/range`, `/v3/kv/txn`; the
//! same on etcd 3.4 and later) does that over plain HTTP/1.1 in a couple of
//! hundred lines with `ureq` (no TLS feature yet), `serde_json` and
//! `base64`. The price is JSON's traps, handled and tested in
//! [`gateway`]: base64 keys and values, int64s as strings, and proto3's
//! missing defaults (a failed txn has no `succeeded`). Choose `etcd-client`
//! if blkshim ever goes async.

pub mod gateway;
pub mod lease;

use super::{validate_disk_name, EpochError, EpochStore};
use crate::tracking::Epoch;
use gateway::{Compare, Gateway, KeyValue, Op};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Timeouts of an [`EtcdEpochStore`].
#[derive(Debug, Clone, Copy)]
pub struct EtcdTimeouts {
    /// One HTTP request to one endpoint.
    pub request: Duration,
    /// One call, across endpoints and retries (an election takes ~1-2 s).
    pub call: Duration,
}

impl Default for EtcdTimeouts {
    fn default() -> Self {
        EtcdTimeouts {
            request: Duration::from_secs(5),
            call: Duration::from_secs(15),
        }
    }
}

/// Epochs in an etcd cluster (see the module doc).
///
/// ```no_run
/// use blkshim::epoch::{EpochStore, EtcdEpochStore};
/// let s = EtcdEpochStore::new(&["127.0.0.1:2379".to_string()], "/blkshim").unwrap();
/// let e = s.current("vm1").unwrap();
/// s.compare_and_advance("vm1", e).unwrap();
/// ```
pub struct EtcdEpochStore {
    gw: Gateway,
    prefix: String,
    nonce_base: String,
    counter: AtomicU64,
    /// Advances found won by an earlier, doubtful send of the same txn.
    won_by_earlier_send: AtomicU64,
}

fn etcd_err(gw: &Gateway, what: &str, e: impl std::fmt::Display) -> EpochError {
    EpochError::Io(io::Error::other(format!(
        "etcd {}: {what}: {e}",
        gw.endpoints().join(",")
    )))
}

/// The epoch in a value: decimal ASCII digits only.
pub fn parse_epoch(value: &[u8]) -> Option<Epoch> {
    if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl EtcdEpochStore {
    /// A store on `endpoints` (`host:port`), keys under `prefix`, with the
    /// default timeouts. Contacts no endpoint yet.
    pub fn new(endpoints: &[String], prefix: &str) -> Result<Self, EpochError> {
        Self::with_timeouts(endpoints, prefix, EtcdTimeouts::default())
    }

    /// Like [`EtcdEpochStore::new`], with explicit timeouts.
    pub fn with_timeouts(
        endpoints: &[String],
        prefix: &str,
        t: EtcdTimeouts,
    ) -> Result<Self, EpochError> {
        if endpoints.is_empty() {
            return Err(EpochError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "etcd: no endpoints",
            )));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A per-process random part too: two hosts' clocks may agree.
        let rand = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.finish()
        };
        Ok(EtcdEpochStore {
            gw: Gateway::new(endpoints, t.request, t.call),
            prefix: prefix.trim_end_matches('/').to_string(),
            nonce_base: format!("{}-{nanos:x}-{rand:016x}", std::process::id()),
            counter: AtomicU64::new(0),
            won_by_earlier_send: AtomicU64::new(0),
        })
    }

    /// Statistics of doubtful outcomes so far: (HTTP attempts whose outcome
    /// was doubtful, advances that a resend showed to have been won by an
    /// earlier send).
    pub fn doubtful_stats(&self) -> (u64, u64) {
        (
            self.gw.doubtful_attempts(),
            self.won_by_earlier_send.load(Ordering::Relaxed),
        )
    }

    fn epoch_key(&self, disk: &str) -> Vec<u8> {
        format!("{}/epoch/{disk}", self.prefix).into_bytes()
    }

    fn claim_key(&self, disk: &str, epoch: Epoch) -> Vec<u8> {
        format!("{}/claim/{disk}/{epoch:020}", self.prefix).into_bytes()
    }

    fn epoch_of(&self, disk: &str, kv: Option<&KeyValue>) -> Result<Epoch, EpochError> {
        match kv {
            None => Ok(0),
            Some(kv) => parse_epoch(&kv.value).ok_or_else(|| {
                EpochError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "etcd: the epoch of disk {disk:?} is {:?}, not a decimal number",
                        String::from_utf8_lossy(&kv.value)
                    ),
                ))
            }),
        }
    }
}

impl EpochStore for EtcdEpochStore {
    fn current(&self, disk: &str) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        let kv = self
            .gw
            .get(&self.epoch_key(disk))
            .map_err(|e| etcd_err(&self.gw, &format!("reading the epoch of {disk:?}"), e))?;
        self.epoch_of(disk, kv.as_ref())
    }

    fn compare_and_advance(&self, disk: &str, expected: Epoch) -> Result<Epoch, EpochError> {
        validate_disk_name(disk)?;
        let key = self.epoch_key(disk);
        let kv = self
            .gw
            .get(&key)
            .map_err(|e| etcd_err(&self.gw, &format!("reading the epoch of {disk:?}"), e))?;
        let cur = self.epoch_of(disk, kv.as_ref())?;
        if cur != expected {
            return Err(EpochError::Conflict {
                disk: disk.to_string(),
                expected,
                current: cur,
            });
        }
        let new = expected + 1;
        let cmp = match &kv {
            None => Compare::CreateRevision(key.clone(), 0),
            Some(kv) => Compare::ModRevision(key.clone(), kv.mod_revision),
        };
        let claim = self.claim_key(disk, new);
        let nonce = format!(
            "{}-{}",
            self.nonce_base,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let success = [
            Op::Put(key.clone(), new.to_string().into_bytes()),
            Op::Put(claim.clone(), nonce.clone().into_bytes()),
        ];
        let failure = [Op::Range(key), Op::Range(claim)];
        let cmp = [cmp];
        let mut first_error = None;
        // The first send, and at most one resolving resend of the same txn.
        for _ in 0..2 {
            match self.gw.txn(&cmp, &success, &failure) {
                Ok(r) if r.succeeded => return Ok(new),
                Ok(r) => {
                    let won = r
                        .ranges
                        .get(1)
                        .and_then(|c| c.first())
                        .is_some_and(|c| c.value == nonce.as_bytes());
                    if won {
                        // An earlier send of ours applied.
                        self.won_by_earlier_send.fetch_add(1, Ordering::Relaxed);
                        return Ok(new);
                    }
                    let now = self.epoch_of(disk, r.ranges.first().and_then(|k| k.first()))?;
                    if now == expected {
                        return Err(etcd_err(
                            &self.gw,
                            &format!("advancing {disk:?}"),
                            "the key changed without its epoch advancing (written by something else?)",
                        ));
                    }
                    return Err(EpochError::Conflict {
                        disk: disk.to_string(),
                        expected,
                        current: now,
                    });
                }
                Err(e) if !e.maybe_applied && first_error.is_none() => {
                    return Err(etcd_err(&self.gw, &format!("advancing {disk:?}"), e));
                }
                Err(e) => {
                    // Doubtful: send it again to find out.
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(EpochError::Unknown {
            disk: disk.to_string(),
            expected,
            why: format!(
                "etcd {}: {}",
                self.gw.endpoints().join(","),
                first_error.map(|e| e.to_string()).unwrap_or_default()
            ),
        })
    }
}

#[cfg(test)]
mod tests;
