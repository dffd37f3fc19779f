//! Test support for the Xen back end: a small adversarial storage model.
//!
//! [`AdversarialStorage`] behaves like the shared storage of seeds/003: a
//! write to a block that already has a write in flight is completed at once
//! and ignored; other I/O completes after a random delay, in random order.
//! [`AdversarialStorage::stall`] holds every pending completion for a while,
//! which is how a test puts writes "in flight at the source" at migration.
//! (The deterministic simulation elsewhere has a richer model; this one is
//! small and thread-based so the real back-end threads can run against it.)

use crate::sim::rng::SimRng;
use crate::storage::MemStorage;
use crate::storage::{BlockStorage, Capabilities, IoDone, IoOutcome, StorageIo};
use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Granularity at which the model detects "a write already in flight".
pub const ADVERSARIAL_BLOCK: u64 = 4096;

struct PendingIo {
    due: Instant,
    io: StorageIo,
    done: IoDone,
    blocks: Option<(u64, u64)>,
}

struct Model {
    data: Vec<u8>,
    pending: Vec<PendingIo>,
    /// Blocks with a write in flight (count per block).
    writing: std::collections::HashMap<u64, u32>,
    rng: SimRng,
    stall_until: Option<Instant>,
}

/// Counters a test can assert on.
#[derive(Default, Debug)]
pub struct AdversarialStats {
    /// Writes completed at once and ignored because one was in flight.
    pub ignored_writes: AtomicU64,
    /// I/Os completed normally.
    pub completed: AtomicU64,
}

/// Shared storage that ignores overlapping writes and reorders completions.
pub struct AdversarialStorage {
    model: Arc<(Mutex<Model>, Condvar)>,
    max_delay: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<AdversarialStats>,
    pump: Mutex<Option<thread::JoinHandle<()>>>,
}

impl AdversarialStorage {
    /// `size` bytes of zeroes; completions delayed up to `max_delay`.
    pub fn new(size: u64, seed: u64, max_delay: Duration) -> Arc<Self> {
        let model = Arc::new((
            Mutex::new(Model {
                data: vec![0; size as usize],
                pending: Vec::new(),
                writing: Default::default(),
                rng: SimRng::new(seed),
                stall_until: None,
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(AdversarialStats::default());
        let s = Arc::new(AdversarialStorage {
            model: Arc::clone(&model),
            max_delay,
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            pump: Mutex::new(None),
        });
        let handle = thread::Builder::new()
            .name("adversarial-storage".into())
            .spawn(move || pump(model, stop, stats))
            .ok();
        *s.pump.lock() = handle;
        s
    }

    /// Hold every completion (pending and new) for `d` from now.
    pub fn stall(&self, d: Duration) {
        let (m, cv) = &*self.model;
        m.lock().stall_until = Some(Instant::now() + d);
        cv.notify_all();
    }

    /// End a stall now: held completions proceed.
    pub fn release_stall(&self) {
        let (m, cv) = &*self.model;
        m.lock().stall_until = None;
        cv.notify_all();
    }

    /// I/Os not yet completed.
    pub fn pending(&self) -> usize {
        self.model.0.lock().pending.len()
    }

    /// Waits until nothing is pending (or `timeout`); true if idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.pending() == 0 {
                return true;
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.pending() == 0
    }

    /// A copy of `len` bytes at `offset` as they are now.
    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let m = self.model.0.lock();
        let o = (offset as usize).min(m.data.len());
        let e = (o + len).min(m.data.len());
        m.data[o..e].to_vec()
    }

    pub fn stats(&self) -> &AdversarialStats {
        &self.stats
    }
}

impl Drop for AdversarialStorage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.model.1.notify_all();
        if let Some(h) = self.pump.lock().take() {
            let _ = h.join();
        }
    }
}

fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / ADVERSARIAL_BLOCK;
    let last = (offset + len.max(1) - 1) / ADVERSARIAL_BLOCK;
    (first, last)
}

fn pump(model: Arc<(Mutex<Model>, Condvar)>, stop: Arc<AtomicBool>, stats: Arc<AdversarialStats>) {
    let (m, cv) = &*model;
    loop {
        let mut g = m.lock();
        if stop.load(Ordering::Acquire) {
            // Complete the rest so no caller waits forever.
            let rest: Vec<PendingIo> = g.pending.drain(..).collect();
            drop(g);
            for p in rest {
                (p.done)(IoOutcome {
                    result: Err(io::Error::from_raw_os_error(libc::EIO)),
                    buf: None,
                });
            }
            return;
        }
        let now = Instant::now();
        if let Some(s) = g.stall_until {
            if now < s {
                cv.wait_until(&mut g, s);
                continue;
            }
            g.stall_until = None;
        }
        let due: Vec<usize> = (0..g.pending.len())
            .filter(|&i| g.pending[i].due <= now)
            .collect();
        if due.is_empty() {
            let next = g.pending.iter().map(|p| p.due).min();
            match next {
                Some(t) => {
                    cv.wait_until(&mut g, t);
                }
                None => {
                    cv.wait_for(&mut g, Duration::from_millis(50));
                }
            }
            continue;
        }
        // Pick one due I/O at random: completions come in any order.
        let r = g.rng.below(due.len() as u64) as usize;
        let p = g.pending.swap_remove(due[r]);
        if let Some((a, b)) = p.blocks {
            for blk in a..=b {
                if let Some(c) = g.writing.get_mut(&blk) {
                    *c -= 1;
                    if *c == 0 {
                        g.writing.remove(&blk);
                    }
                }
            }
        }
        let outcome = crate::storage::apply_io(&mut g.data, p.io);
        drop(g);
        stats.completed.fetch_add(1, Ordering::Relaxed);
        (p.done)(outcome);
    }
}

impl BlockStorage for AdversarialStorage {
    fn size(&self) -> u64 {
        self.model.0.lock().data.len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        MemStorage::CAPABILITIES
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        let (m, cv) = &*self.model;
        let mut g = m.lock();
        let modifies = !matches!(io, StorageIo::Read { .. } | StorageIo::Flush);
        let blocks = if modifies {
            io.byte_range().map(|(o, l)| blocks_of(o, l))
        } else {
            None
        };
        if let Some((a, b)) = blocks {
            if (a..=b).any(|blk| g.writing.contains_key(&blk)) {
                // seeds/003: already a write in flight there; "complete" this
                // one at once and ignore it.
                drop(g);
                self.stats.ignored_writes.fetch_add(1, Ordering::Relaxed);
                let buf = match io {
                    StorageIo::Write { buf, .. } => Some(buf),
                    _ => None,
                };
                return done(IoOutcome {
                    result: Ok(()),
                    buf,
                });
            }
            for blk in a..=b {
                *g.writing.entry(blk).or_insert(0) += 1;
            }
        }
        let max = self.max_delay.as_micros() as u64;
        let delay = g.rng.range(0, max);
        g.pending.push(PendingIo {
            due: Instant::now() + Duration::from_micros(delay),
            io,
            done,
            blocks,
        });
        cv.notify_all();
    }
}
