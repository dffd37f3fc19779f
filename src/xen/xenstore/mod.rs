//! XenStore: the tree where frontend and backend negotiate (`state`,
//! `ring-ref`, `event-channel`, `protocol`, `feature-*`, `sectors`, ...).
//!
//! [`XenStore`] is the interface a backend state machine needs: read, write,
//! rm, directory, watches with tokens, and transactions that commit or fail
//! with [`XsError::Again`] (retry: see [`transact`]).
//! - `real.rs` (feature `xen`): `XenStoreHandle` talks to the real
//!   xenstored through libxenstore.
//! - `emulated.rs` (feature `test-utils`): `EmulatedXenStore` is an
//!   in-process store with xenstored's semantics (parents created on write,
//!   watches firing on changes at or below the watched path and on removal
//!   of an ancestor, a watch firing once when set, optimistic
//!   transactions). Several connections share one store so a test can play
//!   frontend and backend.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::Duration;

#[cfg(feature = "test-utils")]
mod emulated;
#[cfg(feature = "xen")]
mod real;

#[cfg(feature = "test-utils")]
pub use emulated::EmulatedXenStore;
#[cfg(feature = "xen")]
pub use real::XenStoreHandle;

/// A transaction id (`xs_transaction_t`).
pub type TxId = u32;
/// "No transaction" (`XBT_NULL`).
pub const XBT_NULL: TxId = 0;

/// XenStore failures.
#[derive(Debug)]
pub enum XsError {
    /// No such node (`ENOENT`).
    NotFound(String),
    /// The transaction conflicted with another change (`EAGAIN`): retry it.
    Again,
    /// A malformed path, unknown transaction or unparsable value (`EINVAL`).
    Invalid(String),
    /// Any other failure from xenstored or the OS.
    Os(io::Error),
}

impl fmt::Display for XsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsError::NotFound(p) => write!(f, "xenstore: {p}: no such node"),
            XsError::Again => write!(f, "xenstore: transaction conflict, retry"),
            XsError::Invalid(why) => write!(f, "xenstore: invalid: {why}"),
            XsError::Os(e) => write!(f, "xenstore: {e}"),
        }
    }
}

impl std::error::Error for XsError {}

/// A watch fired: something at or below a watched path changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (or the watched path, when it is set or an
    /// ancestor was removed).
    pub path: String,
    /// The token given to [`XenStore::watch`].
    pub token: String,
}

/// A connection to XenStore.
pub trait XenStore: Send + Sync {
    /// The value at `path`.
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError>;
    /// Sets `path` (creating missing parents).
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError>;
    /// Removes `path` and everything below it.
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError>;
    /// Names of the children of `path`.
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError>;
    /// Watches `path` and below; events carry `token`. Fires once at once.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Removes a watch set with the same path and token.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// The next watch event, waiting up to `timeout` (`None`: forever).
    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError>;
    /// Starts a transaction.
    fn transaction_start(&self) -> Result<TxId, XsError>;
    /// Commits (or with `abort`, drops) a transaction. [`XsError::Again`]
    /// means it conflicted and nothing was applied.
    fn transaction_end(&self, tx: TxId, abort: bool) -> Result<(), XsError>;

    /// The value at `path` as UTF-8 text.
    fn read_string(&self, tx: TxId, path: &str) -> Result<String, XsError> {
        let v = self.read(tx, path)?;
        String::from_utf8(v).map_err(|_| XsError::Invalid(format!("{path}: not UTF-8")))
    }

    /// The value at `path` parsed (numbers, states).
    fn read_parsed<T: FromStr>(&self, tx: TxId, path: &str) -> Result<T, XsError>
    where
        Self: Sized,
    {
        let s = self.read_string(tx, path)?;
        s.trim()
            .parse()
            .map_err(|_| XsError::Invalid(format!("{path}: cannot parse {s:?}")))
    }

    /// The value at `path`, or `None` if it does not exist.
    fn read_optional(&self, tx: TxId, path: &str) -> Result<Option<String>, XsError> {
        match self.read_string(tx, path) {
            Ok(s) => Ok(Some(s)),
            Err(XsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `value` as text.
    fn write_str(&self, tx: TxId, path: &str, value: &str) -> Result<(), XsError> {
        self.write(tx, path, value.as_bytes())
    }
}

/// Runs `body` in a transaction, retrying on [`XsError::Again`] up to
/// `max_attempts` times. Any other error aborts the transaction.
pub fn transact<S, T, F>(xs: &S, max_attempts: usize, mut body: F) -> Result<T, XsError>
where
    S: XenStore + ?Sized,
    F: FnMut(TxId) -> Result<T, XsError>,
{
    for _ in 0..max_attempts.max(1) {
        let tx = xs.transaction_start()?;
        let value = match body(tx) {
            Ok(v) => v,
            Err(e) => {
                let _ = xs.transaction_end(tx, true);
                return Err(e);
            }
        };
        match xs.transaction_end(tx, false) {
            Ok(()) => return Ok(value),
            Err(XsError::Again) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(XsError::Again)
}

#[cfg(all(test, feature = "test-utils"))]
mod tests;
