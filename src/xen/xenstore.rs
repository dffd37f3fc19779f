//! XenStore: the tree where frontend and backend negotiate (`state`,
//! `ring-ref`, `event-channel`, `protocol`, `feature-*`, `sectors`, ...).
//!
//! [`XenStore`] is the interface a backend state machine needs: read, write,
//! rm, directory, watches with tokens, and transactions that commit or fail
//! with [`XsError::Again`] (retry: see [`transact`]).
//! [`EmulatedXenStore`] is an in-process store with xenstored's semantics
//! (parents created on write, watches firing on changes at or below the
//! watched path and on removal of an ancestor, a watch firing once when
//! set, optimistic transactions). Several connections share one store so a
//! test can play frontend and backend. `XenStoreHandle` (feature `xen`)
//! talks to the real xenstored through libxenstore.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

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

/// Checks a path: absolute, no empty components, xenstore's characters.
fn check_path(path: &str) -> Result<(), XsError> {
    let ok = path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && !path.contains("//")
            && path.len() <= 3072
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-@".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(XsError::Invalid(format!("bad path {path:?}")))
    }
}

/// True if `path` is `base` or below it.
fn is_at_or_below(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.len() > base.len()
            && path.starts_with(base)
            && path.as_bytes()[base.len()] == b'/')
}

fn parent(path: &str) -> Option<&str> {
    match path.rfind('/') {
        _ if path == "/" => None,
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

#[derive(Clone, Debug)]
struct Node {
    value: Vec<u8>,
    /// Generation of the last change to this node or its child list.
    gen: u64,
}

/// The nodes of a store (live or a transaction's snapshot).
#[derive(Clone, Debug, Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Generation at which a removed path was removed.
    removed: HashMap<String, u64>,
}

/// A change, for firing watches: the path and whether it was a removal.
type Change = (String, bool);

impl Tree {
    fn with_root() -> Self {
        let mut t = Tree::default();
        t.nodes.insert(
            "/".to_string(),
            Node {
                value: Vec::new(),
                gen: 0,
            },
        );
        t
    }

    fn gen_of(&self, path: &str) -> u64 {
        self.nodes
            .get(path)
            .map(|n| n.gen)
            .or_else(|| self.removed.get(path).copied())
            .unwrap_or(0)
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        self.nodes
            .get(path)
            .map(|n| n.value.clone())
            .ok_or_else(|| XsError::NotFound(path.to_string()))
    }

    fn children(&self, path: &str) -> Result<Vec<String>, XsError> {
        if !self.nodes.contains_key(path) {
            return Err(XsError::NotFound(path.to_string()));
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Ok(self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = &k[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
            })
            .collect())
    }

    /// Writes, creating parents; returns the paths touched (for conflict
    /// tracking: the node and every parent whose child list changed).
    fn write(&mut self, path: &str, value: &[u8], gen: u64) -> Vec<String> {
        let mut touched = vec![path.to_string()];
        let mut missing = Vec::new();
        let mut p = path;
        while !self.nodes.contains_key(p) {
            missing.push(p.to_string());
            match parent(p) {
                Some(up) => p = up,
                None => break,
            }
        }
        if !missing.is_empty() {
            // `p` gains a child.
            if let Some(n) = self.nodes.get_mut(p) {
                n.gen = gen;
            }
            touched.push(p.to_string());
        }
        for m in missing.iter().rev() {
            self.removed.remove(m);
            self.nodes.insert(
                m.clone(),
                Node {
                    value: Vec::new(),
                    gen,
                },
            );
            touched.push(m.clone());
        }
        if let Some(n) = self.nodes.get_mut(path) {
            n.value = value.to_vec();
            n.gen = gen;
        }
        touched
    }

    /// Removes a subtree; returns the paths touched (removed + parent).
    /// Removing a missing node is fine if its parent exists (xenstored).
    fn rm(&mut self, path: &str, gen: u64) -> Result<Vec<String>, XsError> {
        if path == "/" {
            return Err(XsError::Invalid("cannot remove /".to_string()));
        }
        let up = parent(path).unwrap_or("/").to_string();
        if !self.nodes.contains_key(path) {
            return if self.nodes.contains_key(&up) {
                Ok(vec![path.to_string(), up])
            } else {
                Err(XsError::NotFound(path.to_string()))
            };
        }
        let doomed: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| is_at_or_below(k, path))
            .cloned()
            .collect();
        for d in &doomed {
            self.nodes.remove(d);
            self.removed.insert(d.clone(), gen);
        }
        if let Some(n) = self.nodes.get_mut(&up) {
            n.gen = gen;
        }
        let mut touched = doomed;
        touched.push(up);
        Ok(touched)
    }
}

/// An operation recorded in a transaction, replayed at commit.
#[derive(Clone, Debug)]
enum TxOp {
    Write(String, Vec<u8>),
    Rm(String),
}

struct Transaction {
    start_gen: u64,
    view: Tree,
    /// Every path read, listed, written or removed: a change to any of them
    /// after `start_gen` makes the commit fail with EAGAIN.
    accessed: BTreeSet<String>,
    ops: Vec<TxOp>,
}

/// One connection's watches and pending events.
#[derive(Default)]
struct Conn {
    watches: Mutex<Vec<(String, String)>>,
    events: Mutex<VecDeque<WatchEvent>>,
    ready: Condvar,
}

impl Conn {
    fn push(&self, ev: WatchEvent) {
        self.events.lock().push_back(ev);
        self.ready.notify_all();
    }

    /// Queues events for `changes` matching this connection's watches.
    fn fire(&self, changes: &[Change]) {
        let watches = self.watches.lock().clone();
        for (changed, removal) in changes {
            for (wpath, token) in &watches {
                let path = if is_at_or_below(changed, wpath) {
                    changed.clone()
                } else if *removal && is_at_or_below(wpath, changed) {
                    wpath.clone()
                } else {
                    continue;
                };
                self.push(WatchEvent {
                    path,
                    token: token.clone(),
                });
            }
        }
    }
}

struct StoreState {
    tree: Tree,
    gen: u64,
    conns: Vec<Weak<Conn>>,
    next_tx: TxId,
    txs: HashMap<TxId, Transaction>,
}

impl StoreState {
    fn fire(&mut self, changes: &[Change]) {
        self.conns.retain(|c| c.strong_count() > 0);
        for c in self.conns.iter().filter_map(Weak::upgrade) {
            c.fire(changes);
        }
    }

    fn apply(&mut self, op: &TxOp) -> Result<Vec<Change>, XsError> {
        self.gen += 1;
        let gen = self.gen;
        Ok(match op {
            TxOp::Write(p, v) => {
                self.tree.write(p, v, gen);
                vec![(p.clone(), false)]
            }
            TxOp::Rm(p) => {
                self.tree.rm(p, gen)?;
                vec![(p.clone(), true)]
            }
        })
    }
}

/// An in-process XenStore. Clone-free: make more connections to the same
/// store with [`EmulatedXenStore::connect`].
pub struct EmulatedXenStore {
    state: Arc<Mutex<StoreState>>,
    conn: Arc<Conn>,
}

impl Default for EmulatedXenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EmulatedXenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedXenStore").finish_non_exhaustive()
    }
}

impl EmulatedXenStore {
    /// A new empty store (just `/`) and a first connection to it.
    pub fn new() -> Self {
        let conn = Arc::new(Conn::default());
        let state = StoreState {
            tree: Tree::with_root(),
            gen: 0,
            conns: vec![Arc::downgrade(&conn)],
            next_tx: 1,
            txs: HashMap::new(),
        };
        EmulatedXenStore {
            state: Arc::new(Mutex::new(state)),
            conn,
        }
    }

    /// Another connection to the same store, with its own watches.
    pub fn connect(&self) -> Self {
        let conn = Arc::new(Conn::default());
        self.state.lock().conns.push(Arc::downgrade(&conn));
        EmulatedXenStore {
            state: Arc::clone(&self.state),
            conn,
        }
    }

    /// Runs `f` on the transaction `tx` of this store.
    fn in_tx<T>(
        &self,
        tx: TxId,
        f: impl FnOnce(&mut Transaction, u64) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        let mut st = self.state.lock();
        let gen = st.gen;
        let t = st
            .txs
            .get_mut(&tx)
            .ok_or_else(|| XsError::Invalid(format!("no transaction {tx}")))?;
        f(t, gen)
    }

    /// Reads `path` with `get` from the live tree, or from `tx`'s snapshot,
    /// noting the path so a later change to it fails the commit.
    fn query<T>(
        &self,
        tx: TxId,
        path: &str,
        get: impl Fn(&Tree, &str) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        check_path(path)?;
        if tx == XBT_NULL {
            return get(&self.state.lock().tree, path);
        }
        self.in_tx(tx, |t, _| {
            t.accessed.insert(path.to_string());
            get(&t.view, path)
        })
    }

    /// Applies `op` to the live tree and fires watches, or (in `tx`) to
    /// the snapshot only, recording it for replay at commit.
    fn change(&self, tx: TxId, op: TxOp) -> Result<(), XsError> {
        if tx == XBT_NULL {
            let mut st = self.state.lock();
            let changes = st.apply(&op)?;
            st.fire(&changes);
            return Ok(());
        }
        self.in_tx(tx, |t, gen| {
            let touched = match &op {
                TxOp::Write(path, value) => t.view.write(path, value, gen),
                TxOp::Rm(path) => t.view.rm(path, gen)?,
            };
            t.accessed.extend(touched);
            t.ops.push(op);
            Ok(())
        })
    }
}

impl XenStore for EmulatedXenStore {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        self.query(tx, path, Tree::read)
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        check_path(path)?;
        if path == "/" {
            return Err(XsError::Invalid("cannot write /".to_string()));
        }
        self.change(tx, TxOp::Write(path.to_string(), value.to_vec()))
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        check_path(path)?;
        self.change(tx, TxOp::Rm(path.to_string()))
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        self.query(tx, path, Tree::children)
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        check_path(path)?;
        self.conn
            .watches
            .lock()
            .push((path.to_string(), token.to_string()));
        // xenstored fires every new watch once, so the watcher reads the
        // current state without racing the first change.
        self.conn.push(WatchEvent {
            path: path.to_string(),
            token: token.to_string(),
        });
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let mut w = self.conn.watches.lock();
        let before = w.len();
        w.retain(|(p, t)| !(p == path && t == token));
        if w.len() == before {
            return Err(XsError::NotFound(format!("watch {path} {token}")));
        }
        drop(w);
        // Events already queued for the removed watch are dropped too.
        self.conn
            .events
            .lock()
            .retain(|e| !(e.token == token && is_at_or_below(&e.path, path)));
        Ok(())
    }

    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut q = self.conn.events.lock();
        loop {
            if let Some(ev) = q.pop_front() {
                return Ok(Some(ev));
            }
            match deadline {
                None => self.conn.ready.wait(&mut q),
                Some(d) => {
                    if Instant::now() >= d || self.conn.ready.wait_until(&mut q, d).timed_out() {
                        return Ok(q.pop_front());
                    }
                }
            }
        }
    }

    fn transaction_start(&self) -> Result<TxId, XsError> {
        let mut st = self.state.lock();
        let id = st.next_tx;
        st.next_tx = st.next_tx.wrapping_add(1).max(1);
        let t = Transaction {
            start_gen: st.gen,
            view: st.tree.clone(),
            accessed: BTreeSet::new(),
            ops: Vec::new(),
        };
        st.txs.insert(id, t);
        Ok(id)
    }

    fn transaction_end(&self, tx: TxId, abort: bool) -> Result<(), XsError> {
        let mut st = self.state.lock();
        let t = st
            .txs
            .remove(&tx)
            .ok_or_else(|| XsError::Invalid(format!("no transaction {tx}")))?;
        if abort {
            return Ok(());
        }
        if t.accessed.iter().any(|p| st.tree.gen_of(p) > t.start_gen) {
            return Err(XsError::Again);
        }
        let mut changes = Vec::new();
        for op in &t.ops {
            changes.extend(st.apply(op)?);
        }
        st.fire(&changes);
        Ok(())
    }
}

#[cfg(feature = "xen")]
pub use real::XenStoreHandle;

#[cfg(feature = "xen")]
mod real {
    use super::*;
    use crate::xen::sys;
    use std::ffi::{c_char, c_void, CStr, CString};
    use std::ptr::NonNull;

    /// A connection to xenstored through libxenstore (thread-safe).
    pub struct XenStoreHandle {
        h: NonNull<sys::xs_handle>,
    }

    // SAFETY: libxenstore handles are usable from any thread.
    unsafe impl Send for XenStoreHandle {}
    // SAFETY: as above.
    unsafe impl Sync for XenStoreHandle {}

    impl Drop for XenStoreHandle {
        fn drop(&mut self) {
            // SAFETY: opened by xs_open, closed once.
            unsafe { sys::xs_close(self.h.as_ptr()) };
        }
    }

    fn cpath(path: &str) -> Result<CString, XsError> {
        CString::new(path).map_err(|_| XsError::Invalid(format!("NUL in {path:?}")))
    }

    fn last_error(path: &str) -> XsError {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => XsError::NotFound(path.to_string()),
            Some(libc::EAGAIN) => XsError::Again,
            Some(libc::EINVAL) => XsError::Invalid(path.to_string()),
            _ => XsError::Os(e),
        }
    }

    /// Frees a `char **` vector libxenstore returned (one allocation).
    fn take_strings(v: *mut *mut c_char, n: usize) -> Vec<String> {
        let out = (0..n)
            .map(|i| {
                // SAFETY: libxenstore returned n valid C strings in v.
                let s = unsafe { *v.add(i) };
                if s.is_null() {
                    String::new()
                } else {
                    // SAFETY: non-null NUL-terminated string.
                    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
                }
            })
            .collect();
        // SAFETY: the vector and its strings are one malloc block.
        unsafe { libc::free(v.cast()) };
        out
    }

    impl XenStoreHandle {
        /// Connects to xenstored (socket or /dev/xen/xenbus).
        pub fn open() -> io::Result<Self> {
            // SAFETY: plain call.
            let h = unsafe { sys::xs_open(0) };
            Ok(XenStoreHandle {
                h: NonNull::new(h).ok_or_else(io::Error::last_os_error)?,
            })
        }

        fn watch_event(&self, v: *mut *mut c_char, n: u32) -> Option<WatchEvent> {
            if v.is_null() {
                return None;
            }
            let s = take_strings(v, n as usize);
            let path = s.get(sys::xs_watch_type_XS_WATCH_PATH as usize)?.clone();
            let token = s.get(sys::xs_watch_type_XS_WATCH_TOKEN as usize)?.clone();
            Some(WatchEvent { path, token })
        }
    }

    impl XenStore for XenStoreHandle {
        fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
            let c = cpath(path)?;
            let mut len: u32 = 0;
            // SAFETY: valid handle, C string, out pointer.
            let p = unsafe { sys::xs_read(self.h.as_ptr(), tx, c.as_ptr(), &mut len) };
            if p.is_null() {
                return Err(last_error(path));
            }
            // SAFETY: libxenstore returned len bytes at p (malloc'd).
            let v = unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) }.to_vec();
            // SAFETY: malloc'd by libxenstore.
            unsafe { libc::free(p) };
            Ok(v)
        }

        fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
            let c = cpath(path)?;
            let len = u32::try_from(value.len())
                .map_err(|_| XsError::Invalid("value too long".to_string()))?;
            // SAFETY: valid handle, C string, value buffer of len bytes.
            let ok = unsafe {
                sys::xs_write(
                    self.h.as_ptr(),
                    tx,
                    c.as_ptr(),
                    value.as_ptr() as *const c_void,
                    len,
                )
            };
            if ok {
                Ok(())
            } else {
                Err(last_error(path))
            }
        }

        fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
            let c = cpath(path)?;
            // SAFETY: valid handle and C string.
            if unsafe { sys::xs_rm(self.h.as_ptr(), tx, c.as_ptr()) } {
                Ok(())
            } else {
                Err(last_error(path))
            }
        }

        fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
            let c = cpath(path)?;
            let mut n: u32 = 0;
            // SAFETY: valid handle, C string, out pointer.
            let v = unsafe { sys::xs_directory(self.h.as_ptr(), tx, c.as_ptr(), &mut n) };
            if v.is_null() {
                return Err(last_error(path));
            }
            Ok(take_strings(v, n as usize))
        }

        fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
            let (p, t) = (cpath(path)?, cpath(token)?);
            // SAFETY: valid handle and C strings.
            if unsafe { sys::xs_watch(self.h.as_ptr(), p.as_ptr(), t.as_ptr()) } {
                Ok(())
            } else {
                Err(last_error(path))
            }
        }

        fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
            let (p, t) = (cpath(path)?, cpath(token)?);
            // SAFETY: valid handle and C strings.
            if unsafe { sys::xs_unwatch(self.h.as_ptr(), p.as_ptr(), t.as_ptr()) } {
                Ok(())
            } else {
                Err(last_error(path))
            }
        }

        fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
            if timeout.is_none() {
                let mut n: u32 = 0;
                // SAFETY: valid handle; blocks until an event.
                let v = unsafe { sys::xs_read_watch(self.h.as_ptr(), &mut n) };
                if v.is_null() {
                    return Err(last_error("watch"));
                }
                return Ok(self.watch_event(v, n));
            }
            let deadline = timeout.map(|t| Instant::now() + t);
            loop {
                // SAFETY: valid handle; non-blocking check.
                let v = unsafe { sys::xs_check_watch(self.h.as_ptr()) };
                if !v.is_null() {
                    return Ok(self.watch_event(v, 2));
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    return Err(XsError::Os(e));
                }
                let left = deadline
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or_default();
                if left.is_zero() {
                    return Ok(None);
                }
                let mut pfd = libc::pollfd {
                    // SAFETY: valid handle.
                    fd: unsafe { sys::xs_fileno(self.h.as_ptr()) },
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
        }

        fn transaction_start(&self) -> Result<TxId, XsError> {
            // SAFETY: valid handle.
            let t = unsafe { sys::xs_transaction_start(self.h.as_ptr()) };
            if t == XBT_NULL {
                return Err(last_error("transaction"));
            }
            Ok(t)
        }

        fn transaction_end(&self, tx: TxId, abort: bool) -> Result<(), XsError> {
            // SAFETY: valid handle.
            if unsafe { sys::xs_transaction_end(self.h.as_ptr(), tx, abort) } {
                Ok(())
            } else {
                Err(last_error("transaction"))
            }
        }
    }
}

#[cfg(test)]
mod tests;
