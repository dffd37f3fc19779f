//! What a Linux persistent-reservation ioctl's return value means.
//!
//! `IOC_PR_*` return 0, or -1 with errno when the kernel did not send the
//! command (no `pr_ops`: EOPNOTSUPP; not opened for writing: EBADF; no
//! CAP_SYS_ADMIN: EACCES), or **a positive status** when the device answered
//! with an error. Which status depends on the kernel and the transport:
//!
//! | kernel, transport | value | example |
//! |---|---|---|
//! | ≤ 6.4, SCSI (`sd`) | the SCSI result: host byte << 16, status byte in bits 0..7 | `0x118`: RESERVATION CONFLICT (verified on Debian's 6.1 with LIO) |
//! | ≤ 6.4, NVMe | the NVMe status: DNR `0x4000`, MORE `0x2000`, SCT << 8, SC | `0x4083`: Reservation Conflict, `0x4001`: Invalid Opcode |
//! | ≥ 6.5, both | `enum pr_status` of `linux/pr.h` | `0x18` conflict, `0x2` I/O error, `0x10000`.. path failures |
//!
//! A RESERVATION CONFLICT is the same answer in every row: the low byte
//! 0x18 (SCSI status and `PR_STS_RESERVATION_CONFLICT`), host byte 0x11
//! (`DID_NEXUS_FAILURE`), or NVMe status code 0x83.

use std::fmt;

/// The device's side of a reservation command, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// RESERVATION CONFLICT: the path is not registered with the key the
    /// command named, or another path holds the reservation.
    ReservationConflict,
    /// SCSI CHECK CONDITION (most often a UNIT ATTENTION after another
    /// path changed the reservation: the command was not performed), or
    /// `PR_STS_IOERR` on newer kernels.
    CheckCondition,
    /// BUSY or TASK SET FULL: not performed, try again.
    Busy,
    /// The transport failed (a SCSI host byte, `PR_STS_PATH_*`).
    PathFailed,
    /// NVMe Invalid Opcode / Invalid Field: reservations not supported.
    NotSupported,
    /// Anything else.
    Other,
}

/// Which command set a device speaks (decides how a status is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// SCSI (`sd`, device-mapper over SCSI): SG_IO answers.
    Scsi,
    /// NVMe (namespace `nsid`): the passthrough ioctl answers.
    Nvme { nsid: u32 },
    /// Neither probe answered: only the `IOC_PR_*` ioctls are tried.
    Unknown,
}

/// A positive return value of a PR ioctl, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrStatus {
    pub raw: u32,
    pub kind: StatusKind,
}

impl PrStatus {
    /// Decode the positive value `raw` an `IOC_PR_*` ioctl returned for a
    /// device of `transport`.
    pub fn decode(raw: u32, transport: Transport) -> PrStatus {
        let kind = match transport {
            Transport::Nvme { .. } => {
                let sc = raw & 0x7ff;
                if sc == 0x83 || raw == 0x18 {
                    StatusKind::ReservationConflict
                } else if raw >= 0x10000 {
                    StatusKind::PathFailed
                } else if sc == 0x01 {
                    StatusKind::NotSupported
                } else {
                    StatusKind::Other
                }
            }
            Transport::Scsi | Transport::Unknown => {
                let status = raw & 0xff;
                let host = (raw >> 16) & 0xff;
                if status == 0x18 || host == 0x11 {
                    StatusKind::ReservationConflict
                } else if raw >= 0x10000 {
                    StatusKind::PathFailed
                } else {
                    match status {
                        0x02 => StatusKind::CheckCondition,
                        0x08 | 0x28 => StatusKind::Busy,
                        _ => StatusKind::Other,
                    }
                }
            }
        };
        PrStatus { raw, kind }
    }

    /// The command was not performed and may be sent again.
    pub fn may_retry(&self) -> bool {
        matches!(self.kind, StatusKind::CheckCondition | StatusKind::Busy)
    }

    pub fn is_conflict(&self) -> bool {
        self.kind == StatusKind::ReservationConflict
    }
}

impl fmt::Display for PrStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StatusKind::ReservationConflict => "RESERVATION CONFLICT",
            StatusKind::CheckCondition => "CHECK CONDITION (or I/O error)",
            StatusKind::Busy => "BUSY",
            StatusKind::PathFailed => "path failure",
            StatusKind::NotSupported => "reservations not supported",
            StatusKind::Other => "error status",
        };
        write!(f, "{what} ({:#x})", self.raw)
    }
}

/// SCSI sense data, as far as fencing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    /// Parse fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data
    /// (untrusted bytes: anything shorter or unknown gives `None`).
    pub fn parse(b: &[u8]) -> Option<Sense> {
        match b.first()? & 0x7f {
            0x70 | 0x71 => Some(Sense {
                key: b.get(2)? & 0x0f,
                asc: b.get(12).copied().unwrap_or(0),
                ascq: b.get(13).copied().unwrap_or(0),
            }),
            0x72 | 0x73 => Some(Sense {
                key: b.get(1)? & 0x0f,
                asc: b.get(2).copied().unwrap_or(0),
                ascq: b.get(3).copied().unwrap_or(0),
            }),
            _ => None,
        }
    }

    /// UNIT ATTENTION (e.g. 2A/03 RESERVATIONS PREEMPTED, 2A/05
    /// REGISTRATIONS PREEMPTED, 29/xx reset): the command was not performed.
    pub fn is_unit_attention(&self) -> bool {
        self.key == 0x6
    }

    /// NOT READY (e.g. 04/01 becoming ready): try again.
    pub fn is_not_ready(&self) -> bool {
        self.key == 0x2
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20/00) or INVALID
    /// FIELD IN CDB (24/00): the device does not do persistent reservations.
    pub fn is_unsupported(&self) -> bool {
        self.key == 0x5 && (self.asc == 0x20 || self.asc == 0x24)
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sense key {:#x} asc/ascq {:02x}/{:02x}",
            self.key, self.asc, self.ascq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StatusKind::*;

    fn scsi(raw: u32) -> StatusKind {
        PrStatus::decode(raw, Transport::Scsi).kind
    }
    fn nvme(raw: u32) -> StatusKind {
        PrStatus::decode(raw, Transport::Nvme { nsid: 1 }).kind
    }

    #[test]
    fn reservation_conflict_in_every_form() {
        // sd on Debian's 6.1 against LIO (verified), the bare SAM status,
        // PR_STS_RESERVATION_CONFLICT, DID_NEXUS_FAILURE.
        for raw in [0x118, 0x18, 0x11_0018, 0x11_0000] {
            assert_eq!(scsi(raw), ReservationConflict, "{raw:#x}");
            assert!(PrStatus::decode(raw, Transport::Unknown).is_conflict());
        }
        // NVMe Reservation Conflict with and without DNR/MORE, and PR_STS.
        for raw in [0x83, 0x4083, 0x6083, 0x18] {
            assert_eq!(nvme(raw), ReservationConflict, "{raw:#x}");
        }
        assert!(!PrStatus::decode(0x118, Transport::Scsi).may_retry());
    }

    #[test]
    fn other_statuses() {
        assert_eq!(scsi(0x2), CheckCondition);
        assert_eq!(scsi(0x402), CheckCondition); // qemu scsi-hd (verified)
        assert_eq!(scsi(0x8), Busy);
        assert_eq!(scsi(0x28), Busy);
        assert_eq!(scsi(0x1_0000), PathFailed); // DID_NO_CONNECT / PR_STS_PATH_FAILED
        assert_eq!(scsi(0xe_0000), PathFailed);
        assert_eq!(scsi(0x3_0002), PathFailed);
        assert_eq!(scsi(0x40), Other);
        assert_eq!(nvme(0x4001), NotSupported); // qemu nvme (verified)
        assert_eq!(nvme(0x2), Other);
        assert_eq!(nvme(0x1_0000), PathFailed);
        assert!(PrStatus::decode(0x2, Transport::Scsi).may_retry());
        assert!(!PrStatus::decode(0x4001, Transport::Nvme { nsid: 1 }).may_retry());
        assert_eq!(
            PrStatus::decode(0x118, Transport::Scsi).to_string(),
            "RESERVATION CONFLICT (0x118)"
        );
        for raw in [0, 1, 0xff, 0xffff, u32::MAX, 0x8000_0018] {
            let _ = PrStatus::decode(raw, Transport::Scsi).to_string();
            let _ = PrStatus::decode(raw, Transport::Nvme { nsid: 0 }).to_string();
        }
    }

    #[test]
    fn sense_data() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x2a;
        fixed[13] = 0x03;
        let s = Sense::parse(&fixed).unwrap();
        assert!(s.is_unit_attention());
        assert_eq!((s.asc, s.ascq), (0x2a, 0x03));
        assert_eq!(
            Sense::parse(&[0x72, 0x05, 0x20, 0x00]).map(|s| s.is_unsupported()),
            Some(true)
        );
        assert_eq!(
            Sense::parse(&[0xf0, 0, 0x02]).map(|s| s.is_not_ready()),
            Some(true)
        );
        // Short or unknown: as much as is there, or nothing.
        assert_eq!(Sense::parse(&[]), None);
        assert_eq!(Sense::parse(&[0x70]), None);
        assert_eq!(
            Sense::parse(&[0x70, 0, 0x06]).map(|s| (s.key, s.asc)),
            Some((6, 0))
        );
        assert_eq!(Sense::parse(&[0x72]), None);
        assert_eq!(Sense::parse(&[0x00, 0x06, 0x2a]), None);
    }
}
