//! Verifiable sector contents: every written sector says which write put it
//! there (and at which sector), so the checker can tell exactly which write
//! a block holds.

use crate::storage::SECTOR_SIZE;

const MAGIC: u64 = 0xB1C5_417D_0000_0000;
const SECTOR: usize = SECTOR_SIZE as usize;

/// What one sector holds, as far as the checker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Content {
    /// All zeroes: never written, or discarded.
    Zero,
    /// The data of write number `.0`.
    Write(u64),
    /// Anything else: a torn or misplaced sector.
    Garbage,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Zero => write!(f, "zero"),
            Content::Write(id) if *id >= ROGUE_BASE => write!(f, "rogue#{}", id - ROGUE_BASE),
            Content::Write(id) => write!(f, "write#{id}"),
            Content::Garbage => write!(f, "garbage"),
        }
    }
}

/// Write ids at and above this belong to the stale node of the
/// stale-promote scenario, never to the guest.
pub const ROGUE_BASE: u64 = 1 << 62;

fn check(sector: u64, id: u64) -> u64 {
    (sector ^ id.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ MAGIC
}

/// Fill `out` (one sector) with write `id`'s data for `sector`.
pub fn encode(out: &mut [u8], sector: u64, id: u64) {
    out.fill(0);
    out[0..8].copy_from_slice(&(MAGIC | (sector & 0xFFFF_FFFF)).to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    out[16..24].copy_from_slice(&check(sector, id).to_le_bytes());
    out[SECTOR - 8..SECTOR].copy_from_slice(&check(sector, id).to_le_bytes());
}

/// What `data` (one sector, read at `sector`) holds.
pub fn decode(data: &[u8], sector: u64) -> Content {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if data.len() != SECTOR {
        return Content::Garbage;
    }
    let head = word(0);
    if head == MAGIC | (sector & 0xFFFF_FFFF) {
        let id = word(8);
        let c = check(sector, id);
        if word(16) == c && word(SECTOR - 8) == c && data[24..SECTOR - 8].iter().all(|&b| b == 0) {
            return Content::Write(id);
        }
        return Content::Garbage;
    }
    if data.iter().all(|&b| b == 0) {
        Content::Zero
    } else {
        Content::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_misplacement() {
        let mut s = vec![0u8; SECTOR];
        assert_eq!(decode(&s, 3), Content::Zero);
        encode(&mut s, 3, 42);
        assert_eq!(decode(&s, 3), Content::Write(42));
        // The same data read at another sector is not a valid write there.
        assert_eq!(decode(&s, 4), Content::Garbage);
        s[100] = 1;
        assert_eq!(decode(&s, 3), Content::Garbage);
    }
}
