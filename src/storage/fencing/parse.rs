//! Parsers of what a device answers about its reservations.
//!
//! Everything here reads **untrusted bytes**: a device (or a target
//! emulating one) may send a report shorter than it says, lengths that do
//! not add up, or more than was asked for. A parser either returns what the
//! bytes say for sure, asks for a larger buffer ([`Parsed::Truncated`]), or
//! refuses ([`ParseError`]); it never guesses and never panics (fuzzed by
//! `fuzz/fuzz_targets/pr_response.rs`, see [`fuzz_pr_input`]). Fencing
//! decisions need the *whole* key list: a key missing from a truncated list
//! could be a newer writer's.
//!
//! - SCSI PERSISTENT RESERVE IN (SPC-4 6.16), READ KEYS and READ
//!   RESERVATION: big-endian, an 8-byte header (PRGENERATION, ADDITIONAL
//!   LENGTH) and the data.
//! - NVMe Reservation Report (NVMe base spec, "Reservation Status Data
//!   Structure"): little-endian, a 24-byte header and 24-byte registrant
//!   entries, or 64 and 64 with the extended data structure (128-bit host
//!   identifiers).

use super::key::{key_hex, KeyOwner};
use super::status::{PrStatus, Sense, Transport};
use std::fmt;

/// A reservation type, in the words of `linux/pr.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

use ReservationType::*;

const ALL_TYPES: [ReservationType; 6] = [
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
];

impl ReservationType {
    /// `enum pr_type` of `linux/pr.h` (what the ioctls take).
    pub fn linux(self) -> u32 {
        match self {
            WriteExclusive => 1,
            ExclusiveAccess => 2,
            WriteExclusiveRegistrantsOnly => 3,
            ExclusiveAccessRegistrantsOnly => 4,
            WriteExclusiveAllRegistrants => 5,
            ExclusiveAccessAllRegistrants => 6,
        }
    }

    /// The SCSI TYPE code (SPC-4 table 206; what `sg_persist -T` takes).
    pub fn scsi_code(self) -> u8 {
        match self {
            WriteExclusive => 1,
            ExclusiveAccess => 3,
            WriteExclusiveRegistrantsOnly => 5,
            ExclusiveAccessRegistrantsOnly => 6,
            WriteExclusiveAllRegistrants => 7,
            ExclusiveAccessAllRegistrants => 8,
        }
    }

    pub fn from_scsi(code: u8) -> Option<ReservationType> {
        ALL_TYPES.into_iter().find(|t| t.scsi_code() == code)
    }

    /// The NVMe RTYPE code (the same numbers as `linux/pr.h`).
    pub fn from_nvme(code: u8) -> Option<ReservationType> {
        ALL_TYPES.into_iter().find(|t| t.linux() == code as u32)
    }

    /// The name `blkshim pr` prints and accepts.
    pub fn name(self) -> &'static str {
        match self {
            WriteExclusive => "write-exclusive",
            ExclusiveAccess => "exclusive-access",
            WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
            ExclusiveAccessRegistrantsOnly => "exclusive-access-registrants-only",
            WriteExclusiveAllRegistrants => "write-exclusive-all-registrants",
            ExclusiveAccessAllRegistrants => "exclusive-access-all-registrants",
        }
    }

    /// Every registered path may write (not only the holder): the
    /// registrants-only and all-registrants types.
    pub fn registrants_may_write(self) -> bool {
        !matches!(self, WriteExclusive | ExclusiveAccess)
    }
}

impl fmt::Display for ReservationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReservationType {
    type Err = String;

    /// The names of [`ReservationType::name`], or the short forms `we`,
    /// `ea`, `we-ro`, `ea-ro`, `we-ar`, `ea-ar`.
    fn from_str(s: &str) -> Result<Self, String> {
        let short = ["we", "ea", "we-ro", "ea-ro", "we-ar", "ea-ar"];
        let l = s.to_ascii_lowercase().replace('_', "-");
        ALL_TYPES
            .into_iter()
            .zip(short)
            .find(|(t, sh)| l == t.name() || l == *sh)
            .map(|(t, _)| t)
            .ok_or_else(|| format!("unknown reservation type {s:?} ({})", short.join(", ")))
    }
}

/// Bytes that cannot be a valid report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the fixed header.
    Short { need: usize, got: usize },
    /// A length field that no valid report has.
    BadLength { field: &'static str, value: u64 },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Short { need, got } => {
                write!(f, "report of {got} bytes, the header alone is {need}")
            }
            ParseError::BadLength { field, value } => write!(f, "impossible {field} {value}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// A parse that either has everything or knows how much it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Complete(T),
    /// The report says it is `needed` bytes long; fewer were there.
    Truncated {
        needed: usize,
    },
}

/// The registered keys (SCSI READ KEYS, or the keys of an NVMe report).
/// One entry per registered path, so a key may appear more than once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyList {
    pub generation: u32,
    pub keys: Vec<u64>,
}

/// The reservation, if any (SCSI READ RESERVATION).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiReservation {
    pub generation: u32,
    pub reservation: Option<Reservation>,
}

/// Who holds the reservation, and of which type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The holder's key (0 for an all-registrants reservation on SCSI).
    pub key: u64,
    /// `None`: a type code this code does not know (`type_code`).
    pub rtype: Option<ReservationType>,
    pub type_code: u8,
    /// SCSI SCOPE (0: logical unit); 0 for NVMe.
    pub scope: u8,
}

impl Reservation {
    pub fn owner(&self) -> KeyOwner {
        KeyOwner::of(self.key)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parse a PERSISTENT RESERVE IN / READ KEYS parameter list.
///
/// ```
/// use blkshim::storage::fencing::parse::{parse_read_keys, Parsed};
/// let b = [0, 0, 0, 7, 0, 0, 0, 8, 0x62, 0x6b, 0x73, 0, 0, 0, 0, 5];
/// let Parsed::Complete(k) = parse_read_keys(&b).unwrap() else { panic!() };
/// assert_eq!((k.generation, k.keys), (7, vec![0x626b_7300_0000_0005]));
/// assert_eq!(parse_read_keys(&b[..12]).unwrap(), Parsed::Truncated { needed: 16 });
/// ```
pub fn parse_read_keys(b: &[u8]) -> Result<Parsed<KeyList>, ParseError> {
    if b.len() < 8 {
        return Err(ParseError::Short {
            need: 8,
            got: b.len(),
        });
    }
    let additional = be32(b, 4);
    if additional % 8 != 0 {
        return Err(ParseError::BadLength {
            field: "READ KEYS additional length",
            value: additional as u64,
        });
    }
    let needed = 8usize.saturating_add(additional as usize);
    if needed > b.len() {
        return Ok(Parsed::Truncated { needed });
    }
    Ok(Parsed::Complete(KeyList {
        generation: be32(b, 0),
        keys: b[8..needed].chunks_exact(8).map(|c| be64(c, 0)).collect(),
    }))
}

/// Parse a PERSISTENT RESERVE IN / READ RESERVATION parameter data.
///
/// ```
/// use blkshim::storage::fencing::parse::{parse_read_reservation, Parsed};
/// use blkshim::storage::fencing::ReservationType;
/// let mut b = vec![0, 0, 0, 9, 0, 0, 0, 16];
/// b.extend_from_slice(&0x626b_7300_0000_0005u64.to_be_bytes());
/// b.extend_from_slice(&[0, 0, 0, 0, 0, 0x01, 0, 0]); // scope 0, type 1
/// let Parsed::Complete(r) = parse_read_reservation(&b).unwrap() else { panic!() };
/// let r = r.reservation.unwrap();
/// assert_eq!((r.key, r.rtype), (0x626b_7300_0000_0005, Some(ReservationType::WriteExclusive)));
/// let none = [0, 0, 0, 9, 0, 0, 0, 0];
/// let Parsed::Complete(r) = parse_read_reservation(&none).unwrap() else { panic!() };
/// assert_eq!((r.generation, r.reservation), (9, None));
/// ```
pub fn parse_read_reservation(b: &[u8]) -> Result<Parsed<ScsiReservation>, ParseError> {
    if b.len() < 8 {
        return Err(ParseError::Short {
            need: 8,
            got: b.len(),
        });
    }
    let generation = be32(b, 0);
    let additional = be32(b, 4);
    if additional == 0 {
        return Ok(Parsed::Complete(ScsiReservation {
            generation,
            reservation: None,
        }));
    }
    if additional < 16 {
        return Err(ParseError::BadLength {
            field: "READ RESERVATION additional length",
            value: additional as u64,
        });
    }
    if b.len() < 24 {
        return Ok(Parsed::Truncated { needed: 24 });
    }
    let code = b[21] & 0x0f;
    Ok(Parsed::Complete(ScsiReservation {
        generation,
        reservation: Some(Reservation {
            key: be64(b, 8),
            rtype: ReservationType::from_scsi(code),
            type_code: code,
            scope: b[21] >> 4,
        }),
    }))
}

/// One registrant of an NVMe Reservation Report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeRegistrant {
    pub cntlid: u16,
    /// RCSTS bit 0: this controller holds the reservation.
    pub holds: bool,
    /// The host identifier (8 bytes, or 16 in the extended format).
    pub host_id: Vec<u8>,
    pub key: u64,
}

/// An NVMe Reservation Report (Reservation Status data structure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeReport {
    pub generation: u32,
    /// RTYPE: 0 when nothing is reserved.
    pub type_code: u8,
    pub ptpls: u8,
    pub registrants: Vec<NvmeRegistrant>,
}

/// Header and entry sizes of the two report formats.
pub const NVME_HEADER: usize = 24;
pub const NVME_ENTRY: usize = 24;
pub const NVME_EXT_HEADER: usize = 64;
pub const NVME_EXT_ENTRY: usize = 64;

/// Parse an NVMe Reservation Report; `extended`: the 64-byte format asked
/// for with EDS=1.
pub fn parse_nvme_report(b: &[u8], extended: bool) -> Result<Parsed<NvmeReport>, ParseError> {
    let (header, entry) = if extended {
        (NVME_EXT_HEADER, NVME_EXT_ENTRY)
    } else {
        (NVME_HEADER, NVME_ENTRY)
    };
    if b.len() < header {
        return Err(ParseError::Short {
            need: header,
            got: b.len(),
        });
    }
    let regctl = u16::from_le_bytes([b[5], b[6]]) as usize;
    let needed = header + regctl * entry;
    if needed > b.len() {
        return Ok(Parsed::Truncated { needed });
    }
    let registrants = b[header..needed]
        .chunks_exact(entry)
        .map(|e| {
            let (key, host_id) = if extended {
                (le64(e, 8), e[16..32].to_vec())
            } else {
                (le64(e, 16), e[8..16].to_vec())
            };
            NvmeRegistrant {
                cntlid: u16::from_le_bytes([e[0], e[1]]),
                holds: e[2] & 1 == 1,
                host_id,
                key,
            }
        })
        .collect();
    Ok(Parsed::Complete(NvmeReport {
        generation: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        type_code: b[4],
        ptpls: b[9],
        registrants,
    }))
}

impl NvmeReport {
    /// The registered keys, as READ KEYS would list them.
    pub fn key_list(&self) -> KeyList {
        KeyList {
            generation: self.generation,
            keys: self.registrants.iter().map(|r| r.key).collect(),
        }
    }

    /// The reservation, as READ RESERVATION would report it: the key of the
    /// (first) controller that holds it, 0 when none says so (an
    /// all-registrants reservation). A type of 0 is no reservation,
    /// whatever the entries claim.
    pub fn reservation(&self) -> ScsiReservation {
        let reservation = (self.type_code != 0).then(|| Reservation {
            key: self
                .registrants
                .iter()
                .find(|r| r.holds)
                .map_or(0, |r| r.key),
            rtype: ReservationType::from_nvme(self.type_code),
            type_code: self.type_code,
            scope: 0,
        });
        ScsiReservation {
            generation: self.generation,
            reservation,
        }
    }
}

/// JSON of a key, with its epoch when blkshim made it.
pub fn key_json(key: u64) -> serde_json::Value {
    match KeyOwner::of(key) {
        KeyOwner::Blkshim { epoch } => {
            serde_json::json!({ "key": key_hex(key), "owner": "blkshim", "epoch": epoch })
        }
        KeyOwner::None => serde_json::json!({ "key": key_hex(key), "owner": "none" }),
        KeyOwner::Foreign => serde_json::json!({ "key": key_hex(key), "owner": "foreign" }),
    }
}

/// Run every parser of this module over `data` and check what they
/// promise (the body of the `pr_response` fuzz target).
pub fn fuzz_pr_input(data: &[u8]) {
    match parse_read_keys(data) {
        Ok(Parsed::Complete(k)) => assert!(8 + k.keys.len() * 8 <= data.len()),
        Ok(Parsed::Truncated { needed }) => assert!(needed > data.len()),
        Err(_) => {}
    }
    match parse_read_reservation(data) {
        Ok(Parsed::Complete(r)) => {
            if let Some(res) = r.reservation {
                assert!(data.len() >= 24);
                assert!(res.type_code < 16 && res.scope < 16);
                if let Some(t) = res.rtype {
                    assert_eq!(t.scsi_code(), res.type_code);
                }
            }
        }
        Ok(Parsed::Truncated { needed }) => assert!(needed > data.len()),
        Err(_) => {}
    }
    for extended in [false, true] {
        match parse_nvme_report(data, extended) {
            Ok(Parsed::Complete(r)) => {
                let (h, e) = if extended {
                    (NVME_EXT_HEADER, NVME_EXT_ENTRY)
                } else {
                    (NVME_HEADER, NVME_ENTRY)
                };
                assert!(h + r.registrants.len() * e <= data.len());
                assert_eq!(r.key_list().keys.len(), r.registrants.len());
                let res = r.reservation();
                assert_eq!(res.reservation.is_some(), r.type_code != 0);
            }
            Ok(Parsed::Truncated { needed }) => assert!(needed > data.len()),
            Err(_) => {}
        }
    }
    let _ = Sense::parse(data);
    if data.len() >= 4 {
        let raw = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        for t in [
            Transport::Scsi,
            Transport::Nvme { nsid: 1 },
            Transport::Unknown,
        ] {
            let s = PrStatus::decode(raw, t);
            let _ = s.to_string();
            assert!(!(s.is_conflict() && s.may_retry()));
        }
    }
    if data.len() >= 8 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&data[..8]);
        let key = u64::from_be_bytes(a);
        if let Some(epoch) = super::key::decode_key(key) {
            assert_eq!(super::key::encode_key(epoch), Ok(key));
        }
        let _ = key_json(key);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = s.parse::<ReservationType>() {
            assert_eq!(s.parse::<ReservationType>(), Ok(t));
        }
        let _ = super::key::parse_key_arg(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_report(generation: u32, additional: u32, keys: &[u64]) -> Vec<u8> {
        let mut b = generation.to_be_bytes().to_vec();
        b.extend_from_slice(&additional.to_be_bytes());
        for k in keys {
            b.extend_from_slice(&k.to_be_bytes());
        }
        b
    }

    #[test]
    fn read_keys_well_formed() {
        let b = keys_report(3, 16, &[1, 0x626b_7300_0000_0002]);
        assert_eq!(
            parse_read_keys(&b).unwrap(),
            Parsed::Complete(KeyList {
                generation: 3,
                keys: vec![1, 0x626b_7300_0000_0002]
            })
        );
        // No keys.
        let b = keys_report(0, 0, &[]);
        assert_eq!(
            parse_read_keys(&b).unwrap(),
            Parsed::Complete(KeyList::default())
        );
        // Trailing bytes beyond the additional length are not keys.
        let mut b = keys_report(1, 8, &[5]);
        b.extend_from_slice(&[0xff; 11]);
        let Parsed::Complete(k) = parse_read_keys(&b).unwrap() else {
            panic!()
        };
        assert_eq!(k.keys, vec![5]);
    }

    #[test]
    fn read_keys_truncated_and_hostile() {
        // The device has more keys than the buffer held.
        let b = keys_report(1, 24, &[1, 2]);
        assert_eq!(
            parse_read_keys(&b).unwrap(),
            Parsed::Truncated { needed: 32 }
        );
        // A header alone claiming 4 GiB of keys.
        let b = keys_report(1, 0xffff_fff8, &[]);
        assert_eq!(
            parse_read_keys(&b).unwrap(),
            Parsed::Truncated {
                needed: 8 + 0xffff_fff8
            }
        );
        // Not a whole number of keys.
        for bad in [1, 7, 9, 0xffff_ffff] {
            let b = keys_report(1, bad, &[1, 2]);
            assert!(
                matches!(parse_read_keys(&b), Err(ParseError::BadLength { .. })),
                "{bad}"
            );
        }
        // Shorter than the header.
        for n in 0..8 {
            assert_eq!(
                parse_read_keys(&[0u8; 8][..n]),
                Err(ParseError::Short { need: 8, got: n })
            );
        }
    }

    fn resv_report(additional: u32, key: u64, scope_type: u8) -> Vec<u8> {
        let mut b = 4u32.to_be_bytes().to_vec();
        b.extend_from_slice(&additional.to_be_bytes());
        b.extend_from_slice(&key.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, scope_type, 0, 0]);
        b
    }

    #[test]
    fn read_reservation_all_types() {
        for t in ALL_TYPES {
            let b = resv_report(16, 0x626b_7300_0000_0009, t.scsi_code());
            let Parsed::Complete(r) = parse_read_reservation(&b).unwrap() else {
                panic!()
            };
            let r = r.reservation.unwrap();
            assert_eq!(r.rtype, Some(t));
            assert_eq!(r.owner(), KeyOwner::Blkshim { epoch: 9 });
            assert_eq!(t.to_string().parse::<ReservationType>(), Ok(t));
            assert_eq!(ReservationType::from_nvme(t.linux() as u8), Some(t));
        }
        // Unknown type codes and a non-zero scope are reported as such.
        let b = resv_report(16, 1, 0x2f);
        let Parsed::Complete(r) = parse_read_reservation(&b).unwrap() else {
            panic!()
        };
        let r = r.reservation.unwrap();
        assert_eq!(
            (r.rtype, r.type_code, r.scope, r.owner()),
            (None, 0xf, 2, KeyOwner::Foreign)
        );
        // A longer descriptor than SPC's 16 bytes: the first 16 are read.
        let b = resv_report(32, 1, 1);
        assert!(matches!(
            parse_read_reservation(&b),
            Ok(Parsed::Complete(_))
        ));
    }

    #[test]
    fn read_reservation_truncated_and_hostile() {
        let b = resv_report(0, 0, 0);
        assert_eq!(
            parse_read_reservation(&b[..8]).unwrap(),
            Parsed::Complete(ScsiReservation {
                generation: 4,
                reservation: None
            })
        );
        let b = resv_report(16, 7, 1);
        for n in 8..24 {
            assert_eq!(
                parse_read_reservation(&b[..n]).unwrap(),
                Parsed::Truncated { needed: 24 }
            );
        }
        for bad in [1, 8, 15] {
            let b = resv_report(bad, 7, 1);
            assert!(matches!(
                parse_read_reservation(&b),
                Err(ParseError::BadLength { .. })
            ));
        }
        for n in 0..8 {
            assert!(matches!(
                parse_read_reservation(&b[..n]),
                Err(ParseError::Short { .. })
            ));
        }
        assert!(matches!(
            parse_read_reservation(&resv_report(u32::MAX, 7, 1)),
            Ok(Parsed::Complete(_))
        ));
    }

    fn nvme_report(
        extended: bool,
        rtype: u8,
        regctl: u16,
        entries: &[(u16, bool, u64)],
    ) -> Vec<u8> {
        let (h, e) = if extended { (64, 64) } else { (24, 24) };
        let mut b = vec![0u8; h];
        b[0..4].copy_from_slice(&11u32.to_le_bytes());
        b[4] = rtype;
        b[5..7].copy_from_slice(&regctl.to_le_bytes());
        b[9] = 1;
        for &(cntlid, holds, key) in entries {
            let mut x = vec![0u8; e];
            x[0..2].copy_from_slice(&cntlid.to_le_bytes());
            x[2] = holds as u8;
            if extended {
                x[8..16].copy_from_slice(&key.to_le_bytes());
                x[16..32].copy_from_slice(&[0xab; 16]);
            } else {
                x[8..16].copy_from_slice(&[0xcd; 8]);
                x[16..24].copy_from_slice(&key.to_le_bytes());
            }
            b.extend_from_slice(&x);
        }
        b
    }

    #[test]
    fn nvme_reports() {
        for ext in [false, true] {
            let b = nvme_report(
                ext,
                1,
                2,
                &[
                    (1, false, 0x626b_7300_0000_0001),
                    (2, true, 0x626b_7300_0000_0002),
                ],
            );
            let Parsed::Complete(r) = parse_nvme_report(&b, ext).unwrap() else {
                panic!()
            };
            assert_eq!(r.generation, 11);
            assert_eq!(
                r.key_list().keys,
                vec![0x626b_7300_0000_0001, 0x626b_7300_0000_0002]
            );
            let res = r.reservation().reservation.unwrap();
            assert_eq!(
                (res.key, res.rtype),
                (0x626b_7300_0000_0002, Some(ReservationType::WriteExclusive))
            );
            assert_eq!(r.registrants[0].host_id.len(), if ext { 16 } else { 8 });
            // No reservation: type 0, whatever an entry claims.
            let b = nvme_report(ext, 0, 1, &[(1, true, 5)]);
            let Parsed::Complete(r) = parse_nvme_report(&b, ext).unwrap() else {
                panic!()
            };
            assert_eq!(r.reservation().reservation, None);
            // All registrants: nobody flagged -> key 0.
            let b = nvme_report(ext, 5, 1, &[(1, false, 5)]);
            let Parsed::Complete(r) = parse_nvme_report(&b, ext).unwrap() else {
                panic!()
            };
            assert_eq!(r.reservation().reservation.unwrap().key, 0);
        }
    }

    #[test]
    fn nvme_truncated_and_hostile() {
        // REGCTL says 3, two entries there.
        let b = nvme_report(false, 1, 3, &[(1, true, 1), (2, false, 2)]);
        assert_eq!(
            parse_nvme_report(&b, false).unwrap(),
            Parsed::Truncated { needed: 24 + 72 }
        );
        // REGCTL at its maximum with an empty body.
        let b = nvme_report(true, 1, u16::MAX, &[]);
        assert_eq!(
            parse_nvme_report(&b, true).unwrap(),
            Parsed::Truncated {
                needed: 64 + 64 * 65535
            }
        );
        for n in 0..24 {
            assert!(matches!(
                parse_nvme_report(&b[..n], false),
                Err(ParseError::Short { .. })
            ));
        }
        // A compact report read as extended is too short.
        let b = nvme_report(false, 1, 0, &[]);
        assert!(matches!(
            parse_nvme_report(&b, true),
            Err(ParseError::Short { need: 64, got: 24 })
        ));
        // An unknown RTYPE is a reservation of unknown type.
        let b = nvme_report(false, 9, 0, &[]);
        let Parsed::Complete(r) = parse_nvme_report(&b, false).unwrap() else {
            panic!()
        };
        assert_eq!(r.reservation().reservation.unwrap().rtype, None);
    }

    #[test]
    fn fuzz_body_on_edge_inputs() {
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 7],
            vec![0xff; 8],
            vec![0xff; 64],
            vec![0; 4096],
        ];
        inputs.push(keys_report(1, 8, &[5]));
        inputs.push(resv_report(16, 1, 0x11));
        inputs.push(nvme_report(true, 3, 1, &[(1, true, 1)]));
        inputs.push(b"we-ro".to_vec());
        inputs.push(b"epoch:5".to_vec());
        for i in &inputs {
            for n in 0..=i.len().min(80) {
                fuzz_pr_input(&i[..n]);
            }
        }
    }

    #[test]
    fn type_names() {
        assert_eq!("we".parse(), Ok(WriteExclusive));
        assert_eq!("WE_RO".parse(), Ok(WriteExclusiveRegistrantsOnly));
        assert_eq!(
            "exclusive-access-all-registrants".parse(),
            Ok(ExclusiveAccessAllRegistrants)
        );
        assert!("w".parse::<ReservationType>().is_err());
        assert!(!WriteExclusive.registrants_may_write());
        assert!(WriteExclusiveRegistrantsOnly.registrants_may_write());
        assert_eq!(ReservationType::from_scsi(2), None); // obsolete code
        assert_eq!(ReservationType::from_scsi(0), None);
        assert_eq!(ReservationType::from_nvme(0), None);
    }
}
