//! A linearizability checker for one compare-and-advance register (an
//! epoch), in the style of Wing & Gong with Lowe's memoisation (what
//! Porcupine and Knossos do): search for an order of the operations that
//! respects real time (an operation that returned before another was
//! invoked comes first) and that the sequential register allows.
//!
//! An operation whose outcome is unknown never returned: it may take effect
//! at any point after its invocation, or never.
#![allow(dead_code)]

use std::collections::HashSet;

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Read the epoch.
    Read,
    /// Advance from `expected` to `expected + 1`.
    Advance { expected: u64 },
}

/// What came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// A read's value.
    Value(u64),
    /// An advance succeeded, to this epoch.
    Advanced(u64),
    /// An advance lost: the epoch was this.
    Conflict(u64),
    /// An advance whose outcome is unknown (never returned).
    Unknown,
}

/// One operation of a history, with its real-time window (nanoseconds on
/// one monotonic clock). `returned` is `None` for an unknown outcome.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub client: usize,
    pub call: Call,
    pub ret: Ret,
    pub invoked: u64,
    pub returned: Option<u64>,
}

/// The register's sequential specification: the states after `op` from
/// `state` (none: not allowed).
fn step(state: u64, op: &Op) -> Vec<u64> {
    match (op.call, op.ret) {
        (Call::Read, Ret::Value(v)) if v == state => vec![state],
        (Call::Advance { expected }, Ret::Advanced(new))
            if state == expected && new == expected + 1 =>
        {
            vec![new]
        }
        (Call::Advance { expected }, Ret::Conflict(cur)) if cur == state && cur != expected => {
            vec![state]
        }
        (Call::Advance { expected }, Ret::Unknown) => {
            if state == expected {
                vec![state, expected + 1]
            } else {
                vec![state]
            }
        }
        _ => vec![],
    }
}

/// Whether `history` (one register, initially `initial`) is linearizable.
pub fn check(history: &[Op], initial: u64) -> bool {
    let n = history.len();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, u64)> = HashSet::new();
    search(history, &mut done, initial, &mut seen)
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn search(h: &[Op], done: &mut [u64], state: u64, seen: &mut HashSet<(Vec<u64>, u64)>) -> bool {
    // The earliest return among the operations not yet placed: every
    // operation placed next must have been invoked before it.
    let min_ret = (0..h.len())
        .filter(|&i| !is_done(done, i))
        .filter_map(|i| h[i].returned)
        .min();
    let Some(min_ret) = min_ret else {
        // Only unknown outcomes left: each may simply never take effect.
        return true;
    };
    for i in 0..h.len() {
        if is_done(done, i) || h[i].invoked > min_ret {
            continue;
        }
        for next in step(state, &h[i]) {
            done[i / 64] |= 1 << (i % 64);
            let fresh = seen.insert((done.to_vec(), next));
            if fresh && search(h, done, next, seen) {
                return true;
            }
            done[i / 64] &= !(1 << (i % 64));
        }
    }
    false
}

/// The checks beyond linearizability; a description of each violation.
pub fn extra_checks(history: &[Op]) -> Vec<String> {
    let mut bad = Vec::new();
    let oks: Vec<&Op> = history
        .iter()
        .filter(|o| matches!(o.ret, Ret::Advanced(_)))
        .collect();
    let mut epochs = HashSet::new();
    for o in &oks {
        let Ret::Advanced(e) = o.ret else { continue };
        if !epochs.insert(e) {
            bad.push(format!("epoch {e} reported as won twice"));
        }
        if o.returned.is_none() {
            bad.push(format!("{o:?}: a success without a return"));
        }
    }
    for a in &oks {
        for b in &oks {
            let (Ret::Advanced(ea), Ret::Advanced(eb)) = (a.ret, b.ret) else {
                continue;
            };
            if a.returned.is_some_and(|r| r < b.invoked) && ea >= eb {
                bad.push(format!(
                    "epoch {ea} returned before epoch {eb} was asked for, yet is not smaller"
                ));
            }
        }
    }
    for o in history {
        if o.ret == Ret::Unknown && o.returned.is_some() {
            bad.push(format!("{o:?}: an unknown outcome with a return"));
        }
    }
    bad
}
