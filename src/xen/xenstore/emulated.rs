//! The emulated XenStore (feature `test-utils`): [`EmulatedXenStore`], an
//! in-process store with xenstored's semantics.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{TxId, WatchEvent, XenStore, XsError, XBT_NULL};

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
    /// Reads, writes, removals and listings so far, over every connection.
    requests: u64,
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
            requests: 0,
            conns: vec![Arc::downgrade(&conn)],
            next_tx: 1,
            txs: HashMap::new(),
        };
        EmulatedXenStore {
            state: Arc::new(Mutex::new(state)),
            conn,
        }
    }

    /// Reads, writes, removals and listings the store has answered, over
    /// every connection: what a back end costs xenstored.
    pub fn requests(&self) -> u64 {
        self.state.lock().requests
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

    /// Runs `f` on the transaction `tx` of this store (a request).
    fn in_tx<T>(
        &self,
        tx: TxId,
        f: impl FnOnce(&mut Transaction, u64) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        let mut st = self.state.lock();
        st.requests += 1;
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
            let mut st = self.state.lock();
            st.requests += 1;
            return get(&st.tree, path);
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
            st.requests += 1;
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
