//! The index of active requests: per tracked block, how many modifying and
//! how many reading requests hold it.
//!
//! An open-addressing table (linear probing, backward-shift deletion, no
//! tombstones) keyed by block number: a 4 KiB write costs one probe to
//! check, one to insert and one to remove, whatever is in flight. Requests
//! that span many blocks (large I/O, barriers) go to a short list instead,
//! so no request costs more than a bounded number of probes.

/// Requests spanning more blocks than this are kept in the wide list.
const WIDE_BLOCKS: u64 = 64;
const EMPTY: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Wide {
    /// Half-open block range.
    first: u64,
    end: u64,
    is_mod: bool,
    slot: u32,
}

pub(super) struct BlockIndex {
    keys: Vec<u64>,
    mods: Vec<u32>,
    reads: Vec<u32>,
    len: usize,
    mask: usize,
    wide: Vec<Wide>,
}

impl BlockIndex {
    pub(super) fn with_capacity(requests: usize) -> Self {
        let cap = (requests * 2).max(16).next_power_of_two();
        BlockIndex {
            keys: vec![EMPTY; cap],
            mods: vec![0; cap],
            reads: vec![0; cap],
            len: 0,
            mask: cap - 1,
            wide: Vec::with_capacity(8),
        }
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    fn block_conflicts(&self, key: u64, is_mod: bool) -> bool {
        self.find(key)
            .is_some_and(|i| self.mods[i] > 0 || (is_mod && self.reads[i] > 0))
    }

    /// Does any active request conflict with blocks `[first, end)`?
    #[inline]
    pub(super) fn conflicts(&self, first: u64, end: u64, is_mod: bool) -> bool {
        if self
            .wide
            .iter()
            .any(|w| w.first < end && first < w.end && (is_mod || w.is_mod))
        {
            return true;
        }
        if self.len == 0 {
            return false;
        }
        if end - first <= self.keys.len() as u64 {
            (first..end).any(|b| self.block_conflicts(b, is_mod))
        } else {
            // Wider than the table: scan the table instead of the range.
            (0..self.keys.len()).any(|i| {
                let k = self.keys[i];
                k != EMPTY
                    && k >= first
                    && k < end
                    && (self.mods[i] > 0 || (is_mod && self.reads[i] > 0))
            })
        }
    }

    pub(super) fn insert(&mut self, first: u64, end: u64, is_mod: bool, slot: u32) {
        if end - first > WIDE_BLOCKS {
            self.wide.push(Wide {
                first,
                end,
                is_mod,
                slot,
            });
            return;
        }
        for b in first..end {
            self.add(b, is_mod);
        }
    }

    pub(super) fn remove(&mut self, first: u64, end: u64, is_mod: bool, slot: u32) {
        if end - first > WIDE_BLOCKS {
            if let Some(i) = self.wide.iter().position(|w| w.slot == slot) {
                self.wide.swap_remove(i);
            }
            return;
        }
        for b in first..end {
            self.sub(b, is_mod);
        }
    }

    fn add(&mut self, key: u64, is_mod: bool) {
        if (self.len + 1) * 2 > self.keys.len() {
            self.grow();
        }
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == key || k == EMPTY {
                if k == EMPTY {
                    self.keys[i] = key;
                    self.len += 1;
                }
                if is_mod {
                    self.mods[i] += 1;
                } else {
                    self.reads[i] += 1;
                }
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn sub(&mut self, key: u64, is_mod: bool) {
        let Some(i) = self.find(key) else {
            debug_assert!(false, "block {key} not in the index");
            return;
        };
        if is_mod {
            self.mods[i] -= 1;
        } else {
            self.reads[i] -= 1;
        }
        if self.mods[i] == 0 && self.reads[i] == 0 {
            self.delete(i);
        }
    }

    /// Backward-shift deletion keeps every probe chain unbroken.
    fn delete(&mut self, mut hole: usize) {
        self.keys[hole] = EMPTY;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let k = self.keys[j];
            if k == EMPTY {
                return;
            }
            let h = self.home(k);
            // Entry j may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.keys[hole] = k;
                self.mods[hole] = self.mods[j];
                self.reads[hole] = self.reads[j];
                self.keys[j] = EMPTY;
                self.mods[j] = 0;
                self.reads[j] = 0;
                hole = j;
            }
        }
    }

    fn grow(&mut self) {
        let old_keys = std::mem::take(&mut self.keys);
        let old_mods = std::mem::take(&mut self.mods);
        let old_reads = std::mem::take(&mut self.reads);
        let cap = old_keys.len() * 2;
        self.keys = vec![EMPTY; cap];
        self.mods = vec![0; cap];
        self.reads = vec![0; cap];
        self.mask = cap - 1;
        for i in 0..old_keys.len() {
            let k = old_keys[i];
            if k != EMPTY {
                let mut j = self.home(k);
                while self.keys[j] != EMPTY {
                    j = (j + 1) & self.mask;
                }
                self.keys[j] = k;
                self.mods[j] = old_mods[i];
                self.reads[j] = old_reads[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inserts and removes against a brute-force multiset, with a
    /// tiny table so chains wrap around and deletions shift entries back.
    #[test]
    fn matches_a_brute_force_model() {
        let mut idx = BlockIndex::with_capacity(4);
        let mut live: Vec<(u64, u64, bool, u32)> = Vec::new();
        let mut x = 12345u64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if live.len() < 40 && (x % 3 != 0 || live.is_empty()) {
                let first = (x >> 8) % 200;
                let len = if x % 17 == 0 { 100 } else { 1 + (x >> 20) % 4 };
                let is_mod = x % 2 == 0;
                idx.insert(first, first + len, is_mod, step);
                live.push((first, first + len, is_mod, step));
            } else {
                let (f, e, m, s) = live.swap_remove((x >> 5) as usize % live.len());
                idx.remove(f, e, m, s);
            }
            if step % 50 == 0 {
                // A query wider than the table scans the table instead.
                let want = live.iter().any(|&(f, e, m, _)| f < 5000 && 0 < e && m);
                assert_eq!(
                    idx.conflicts(0, 5000, false),
                    want,
                    "wide query, step {step}"
                );
            }
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = (x >> 8) % 210;
                let end = first + 1 + (x >> 30) % 8;
                let is_mod = x % 2 == 0;
                let want = live
                    .iter()
                    .any(|&(f, e, m, _)| f < end && first < e && (is_mod || m));
                assert_eq!(idx.conflicts(first, end, is_mod), want, "step {step}");
            }
        }
        for (f, e, m, s) in live.drain(..) {
            idx.remove(f, e, m, s);
        }
        assert_eq!(idx.len, 0);
        assert!(idx.wide.is_empty());
    }
}
