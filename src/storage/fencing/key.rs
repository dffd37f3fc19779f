//! How a writer's epoch becomes a 64-bit persistent-reservation key.
//!
//! ```text
//!  63            40 39                                          0
//! +----------------+---------------------------------------------+
//! |  0x62 0x6b 0x73 |                 epoch (40 bits)             |
//! |   'b'  'k'  's' |                                             |
//! +----------------+---------------------------------------------+
//! ```
//!
//! - **Bits 63..40: the marker `"bks"` (`0x626b73`).** A key without it was
//!   not made by blkshim and is never preempted, replaced or counted as a
//!   writer's epoch. Other cluster software picks keys that never carry it:
//!   Pacemaker's `fence_scsi` builds its key from 4 hex digits of the md5 of
//!   the cluster name and 4 digits of the node id (or of the node name's
//!   md5), 8 hex digits in all, so its keys are below 2^32 and their top 32
//!   bits are zero; Windows failover clustering keeps its signature in the
//!   low 32 bits; `sg_persist` users and `fence_mpath` configurations use
//!   small hand-written keys. The marker is printable, so `sg_persist -k`
//!   shows `0x626b73000000002a` for epoch 42.
//! - **Bits 39..0: the epoch**, so the numeric order of two blkshim keys is
//!   the order of their epochs. 2^40 hand-offs (one a millisecond for 34
//!   years) is the most a disk can see; a larger epoch is refused rather
//!   than wrapped.
//! - **Never zero**, which SCSI reserves for "no key" (a REGISTER with a
//!   service action key of 0 unregisters).

use std::fmt;

/// The top 24 bits of every key blkshim registers: ASCII `"bks"`.
pub const BLKSHIM_KEY_MARKER: u64 = 0x0062_6b73 << EPOCH_BITS;
/// Bits of the key that carry the epoch.
pub const EPOCH_BITS: u32 = 40;
/// The largest epoch a key can carry.
pub const MAX_KEY_EPOCH: u64 = (1 << EPOCH_BITS) - 1;
const MARKER_MASK: u64 = !MAX_KEY_EPOCH;

/// An epoch too large for [`encode_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochTooLarge(pub u64);

impl fmt::Display for EpochTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {} does not fit in a reservation key (at most {MAX_KEY_EPOCH})",
            self.0
        )
    }
}

impl std::error::Error for EpochTooLarge {}

/// The reservation key of the writer at `epoch`.
///
/// ```
/// use blkshim::storage::fencing::{decode_key, encode_key};
/// assert_eq!(encode_key(42).unwrap(), 0x626b_7300_0000_002a);
/// assert_eq!(decode_key(0x626b_7300_0000_002a), Some(42));
/// assert_eq!(decode_key(0x1234_0002), None); // a fence_scsi key
/// assert!(encode_key(1 << 40).is_err());
/// ```
pub fn encode_key(epoch: u64) -> Result<u64, EpochTooLarge> {
    if epoch > MAX_KEY_EPOCH {
        return Err(EpochTooLarge(epoch));
    }
    Ok(BLKSHIM_KEY_MARKER | epoch)
}

/// The epoch a key carries, if blkshim made it.
pub fn decode_key(key: u64) -> Option<u64> {
    (key & MARKER_MASK == BLKSHIM_KEY_MARKER).then_some(key & MAX_KEY_EPOCH)
}

/// Who a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOwner {
    /// A blkshim writer at this epoch.
    Blkshim { epoch: u64 },
    /// Zero: no key (SCSI reports it for an all-registrants reservation).
    None,
    /// Anybody else (another cluster manager, an operator's `sg_persist`).
    Foreign,
}

impl KeyOwner {
    pub fn of(key: u64) -> KeyOwner {
        match decode_key(key) {
            Some(epoch) => KeyOwner::Blkshim { epoch },
            None if key == 0 => KeyOwner::None,
            None => KeyOwner::Foreign,
        }
    }
}

/// `0x` and 16 hex digits, as `sg_persist` prints keys.
pub fn key_hex(key: u64) -> String {
    format!("{key:#018x}")
}

/// Parse a key as an operator writes it: `0x...` hex, a decimal number, or
/// `epoch:N` / `e:N` for blkshim's key of epoch N.
pub fn parse_key_arg(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(e) = t.strip_prefix("epoch:").or_else(|| t.strip_prefix("e:")) {
        let epoch: u64 = e.parse().map_err(|_| format!("bad epoch in key {s:?}"))?;
        return encode_key(epoch).map_err(|e| e.to_string());
    }
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("bad key {s:?}: 0x-hex, decimal or epoch:N"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        for e in [0, 1, 2, 41, 1 << 20, MAX_KEY_EPOCH - 1, MAX_KEY_EPOCH] {
            let k = encode_key(e).unwrap();
            assert_ne!(k, 0);
            assert_eq!(decode_key(k), Some(e));
            assert_eq!(KeyOwner::of(k), KeyOwner::Blkshim { epoch: e });
        }
        assert!(encode_key(3).unwrap() < encode_key(4).unwrap());
        assert_eq!(encode_key(MAX_KEY_EPOCH + 1), Err(EpochTooLarge(1 << 40)));
        assert_eq!(encode_key(u64::MAX), Err(EpochTooLarge(u64::MAX)));
        assert_eq!(&encode_key(7).unwrap().to_be_bytes()[..3], b"bks");
    }

    #[test]
    fn other_software_keys_are_foreign() {
        // fence_scsi: "%.4s%.4d" % (md5(cluster)[:4], nodeid) -> 8 hex digits.
        for k in [0xa1b2_0001u64, 0xffff_9999, 0xffff_ffff, 1, 0x123] {
            assert_eq!(KeyOwner::of(k), KeyOwner::Foreign, "{k:#x}");
        }
        // Neighbours of the marker.
        assert_eq!(KeyOwner::of(0x626b_7200_0000_0001), KeyOwner::Foreign);
        assert_eq!(KeyOwner::of(0x626b_7400_0000_0001), KeyOwner::Foreign);
        assert_eq!(KeyOwner::of(0xe26b_7300_0000_0001), KeyOwner::Foreign);
        assert_eq!(KeyOwner::of(u64::MAX), KeyOwner::Foreign);
        assert_eq!(KeyOwner::of(0), KeyOwner::None);
    }

    #[test]
    fn key_arguments() {
        assert_eq!(
            parse_key_arg("0x626b73000000002a"),
            Ok(0x626b_7300_0000_002a)
        );
        assert_eq!(parse_key_arg("epoch:42"), Ok(0x626b_7300_0000_002a));
        assert_eq!(parse_key_arg("e:0"), Ok(BLKSHIM_KEY_MARKER));
        assert_eq!(parse_key_arg("305419896"), Ok(0x1234_5678));
        assert_eq!(parse_key_arg("0X1f"), Ok(0x1f));
        for bad in [
            "",
            "0x",
            "epoch:",
            "epoch:-1",
            "epoch:1099511627776",
            "0x1_0000_0000_0000_0000",
            "abc",
            "0x10000000000000000",
        ] {
            assert!(parse_key_arg(bad).is_err(), "{bad:?}");
        }
        assert_eq!(key_hex(0x2a), "0x000000000000002a");
    }
}
