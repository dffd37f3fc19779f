//! The device side of [`PrFencing`](super::PrFencing): the raw
//! persistent-reservation commands, over a Linux block device
//! ([`BlockDevice`]) or, in tests, over a model of a logical unit.

use super::ioctl::{self, PrClear, PrPreempt, PrRegistration, PrReservation};
use super::parse::{
    parse_nvme_report, parse_read_keys, parse_read_reservation, KeyList, NvmeReport, Parsed,
    ReservationType, ScsiReservation,
};
use super::status::{PrStatus, StatusKind, Transport};
use super::FenceError;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// One path's persistent-reservation commands, as the device answers them.
pub(crate) trait PrDevice: Send + Sync {
    fn transport(&self) -> Transport;
    /// REGISTER (or REGISTER AND IGNORE EXISTING KEY).
    fn register_key(&self, old: u64, new: u64, ignore_existing: bool) -> Result<(), FenceError>;
    fn reserve_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError>;
    fn release_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError>;
    /// PREEMPT (AND ABORT): `own` is this path's key, `victim` the key
    /// whose registrations go.
    fn preempt_key(
        &self,
        own: u64,
        victim: u64,
        rtype: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError>;
    fn clear_key(&self, key: u64) -> Result<(), FenceError>;
    fn read_keys(&self) -> Result<KeyList, FenceError>;
    fn read_reservation_full(&self) -> Result<ScsiReservation, FenceError>;
}

/// Attempts of a command the device did not perform (UNIT ATTENTION after
/// another path changed the reservation, BUSY, NOT READY).
const ATTEMPTS: u32 = 4;
/// PERSISTENT RESERVE IN's allocation length is 16 bits.
const MAX_SCSI_IN: usize = 0xffff;
/// Largest NVMe report read (about 2700 registrants).
const MAX_NVME_REPORT: usize = 1 << 16;

fn retry_pause(attempt: u32) {
    std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
}

/// A block device opened read-write: `IOC_PR_*` for PERSISTENT RESERVE
/// OUT, SG_IO or the NVMe passthrough for reading.
pub(crate) struct BlockDevice {
    file: File,
    path: PathBuf,
    transport: Transport,
    /// NVMe report format: 0 not known yet, 1 compact, 2 extended.
    nvme_format: AtomicU8,
}

impl BlockDevice {
    /// Open `path` read-write (the PR ioctls need it) and find out whether
    /// it speaks SCSI or NVMe.
    pub(crate) fn open(path: &Path) -> Result<BlockDevice, FenceError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.file_type().is_block_device() {
            return Err(FenceError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: not a block device (persistent reservations need a SCSI, NVMe or \
                     multipath device)",
                    path.display()
                ),
            )));
        }
        let fd = file.as_raw_fd();
        let transport = if ioctl::sg_version(fd).is_some() {
            Transport::Scsi
        } else if let Some(nsid) = ioctl::nvme_nsid(fd) {
            Transport::Nvme { nsid }
        } else {
            Transport::Unknown
        };
        log::debug!(
            "{}: persistent reservations over {transport:?}",
            path.display()
        );
        Ok(BlockDevice {
            file,
            path: path.to_path_buf(),
            transport,
            nvme_format: AtomicU8::new(0),
        })
    }

    /// One PERSISTENT RESERVE OUT through `linux/pr.h`, retried while the
    /// device says it did not perform it.
    fn out<T>(&self, command: &'static str, req: u64, arg: &mut T) -> Result<(), FenceError> {
        let fd = self.file.as_raw_fd();
        let mut attempt = 0;
        loop {
            let raw = ioctl::pr_out(fd, req, arg)?;
            if raw == 0 {
                return Ok(());
            }
            let status = PrStatus::decode(raw, self.transport);
            if status.is_conflict() {
                return Err(FenceError::Conflict {
                    command,
                    status: raw,
                });
            }
            attempt += 1;
            if !status.may_retry() || attempt >= ATTEMPTS {
                return Err(FenceError::Device { command, status });
            }
            log::debug!("{}: {command}: {status}, again", self.path.display());
            retry_pause(attempt);
        }
    }

    /// REGISTER (`old` 0: a path not registered yet; `new` 0: unregister),
    /// or REGISTER AND IGNORE EXISTING KEY.
    fn register_key(&self, old: u64, new: u64, ignore_existing: bool) -> Result<(), FenceError> {
        let mut a = PrRegistration {
            old_key: old,
            new_key: new,
            flags: if ignore_existing {
                ioctl::PR_FL_IGNORE_KEY
            } else {
                0
            },
            pad: 0,
        };
        self.out("register", ioctl::IOC_PR_REGISTER, &mut a)
    }

    /// RESERVE with `key` (registered through this path).
    fn reserve_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        let mut a = PrReservation {
            key,
            rtype: rtype.linux(),
            flags: 0,
        };
        self.out("reserve", ioctl::IOC_PR_RESERVE, &mut a)
    }

    /// RELEASE the reservation this path holds with `key`.
    fn release_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        let mut a = PrReservation {
            key,
            rtype: rtype.linux(),
            flags: 0,
        };
        self.out("release", ioctl::IOC_PR_RELEASE, &mut a)
    }

    /// PREEMPT (AND ABORT): this path, registered with `own`, removes every
    /// registration with `victim` and takes their reservation with `rtype`.
    fn preempt_key(
        &self,
        own: u64,
        victim: u64,
        rtype: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError> {
        // The key-order trap: old_key is the caller's own key.
        let mut a = PrPreempt {
            old_key: own,
            new_key: victim,
            rtype: rtype.linux(),
            flags: 0,
        };
        if abort {
            self.out("preempt-and-abort", ioctl::IOC_PR_PREEMPT_ABORT, &mut a)
        } else {
            self.out("preempt", ioctl::IOC_PR_PREEMPT, &mut a)
        }
    }

    /// CLEAR: remove every registration and the reservation (`key` must be
    /// registered through this path).
    fn clear_key(&self, key: u64) -> Result<(), FenceError> {
        let mut a = PrClear {
            key,
            flags: 0,
            pad: 0,
        };
        self.out("clear", ioctl::IOC_PR_CLEAR, &mut a)
    }

    /// PERSISTENT RESERVE IN through SG_IO, growing the buffer until the
    /// whole answer fits; `parse` is one of the parsers of [`super::parse`].
    fn scsi_in<T>(
        &self,
        what: &'static str,
        service_action: u8,
        first: usize,
        parse: fn(&[u8]) -> Result<Parsed<T>, super::parse::ParseError>,
    ) -> Result<T, FenceError> {
        let fd = self.file.as_raw_fd();
        let mut size = first;
        for _ in 0..3 {
            let mut buf = vec![0u8; size];
            let mut attempt = 0;
            let ans = loop {
                let ans = ioctl::scsi_pr_in(fd, service_action, &mut buf)?;
                let again = ans.status == 0x02
                    && ans
                        .sense
                        .is_some_and(|s| s.is_unit_attention() || s.is_not_ready())
                    || matches!(ans.status, 0x08 | 0x28);
                attempt += 1;
                if again && attempt < ATTEMPTS {
                    retry_pause(attempt);
                    continue;
                }
                break ans;
            };
            if ans.status == 0x18 {
                return Err(FenceError::Conflict {
                    command: what,
                    status: 0x18,
                });
            }
            if ans.status != 0 || ans.host_status != 0 {
                let raw = ((ans.host_status as u32) << 16) | ans.status as u32;
                let mut status = PrStatus::decode(raw, Transport::Scsi);
                if ans.sense.is_some_and(|s| s.is_unsupported()) {
                    status.kind = StatusKind::NotSupported;
                }
                log::debug!(
                    "{}: {what}: {status}, driver status {:#x}, {:?}",
                    self.path.display(),
                    ans.driver_status,
                    ans.sense
                );
                return Err(FenceError::Device {
                    command: what,
                    status,
                });
            }
            match parse(&buf[..ans.len.min(buf.len())]) {
                Ok(Parsed::Complete(v)) => return Ok(v),
                Ok(Parsed::Truncated { needed }) if needed > size && needed <= MAX_SCSI_IN => {
                    size = needed;
                }
                Ok(Parsed::Truncated { needed }) => {
                    return Err(FenceError::BadResponse(format!(
                        "{what}: the device says {needed} bytes, sent {} of the {size} asked",
                        ans.len
                    )))
                }
                Err(e) => return Err(FenceError::BadResponse(format!("{what}: {e}"))),
            }
        }
        Err(FenceError::BadResponse(format!(
            "{what}: the answer kept growing"
        )))
    }

    /// NVMe Reservation Report, compact format first, extended when the
    /// controller wants 128-bit host identifiers. **Untested on real
    /// hardware** (qemu 7.2's NVMe has no reservations, Debian's 6.1 nvmet
    /// neither).
    fn nvme_report(&self, nsid: u32) -> Result<NvmeReport, FenceError> {
        let fd = self.file.as_raw_fd();
        let formats: &[bool] = match self.nvme_format.load(Ordering::Relaxed) {
            1 => &[false],
            2 => &[true],
            _ => &[false, true],
        };
        let mut last = None;
        for &extended in formats {
            let mut size = 4096;
            for _ in 0..3 {
                let mut buf = vec![0u8; size];
                let raw = ioctl::nvme_resv_report(fd, nsid, &mut buf, extended)?;
                if raw != 0 {
                    last = Some(PrStatus::decode(raw, self.transport));
                    break;
                }
                self.nvme_format
                    .store(if extended { 2 } else { 1 }, Ordering::Relaxed);
                match parse_nvme_report(&buf, extended) {
                    Ok(Parsed::Complete(r)) => return Ok(r),
                    Ok(Parsed::Truncated { needed })
                        if needed > size && needed <= MAX_NVME_REPORT =>
                    {
                        size = needed.next_multiple_of(4);
                    }
                    Ok(Parsed::Truncated { needed }) => {
                        return Err(FenceError::BadResponse(format!(
                            "reservation report of {needed} bytes (at most {MAX_NVME_REPORT} read)"
                        )))
                    }
                    Err(e) => {
                        return Err(FenceError::BadResponse(format!("reservation report: {e}")))
                    }
                }
            }
        }
        Err(match last {
            Some(status) if status.is_conflict() => FenceError::Conflict {
                command: "reservation report",
                status: status.raw,
            },
            Some(status) => FenceError::Device {
                command: "reservation report",
                status,
            },
            None => FenceError::BadResponse("reservation report kept growing".into()),
        })
    }

    /// Every registered key (one entry per registered path).
    fn read_keys(&self) -> Result<KeyList, FenceError> {
        match self.transport {
            Transport::Nvme { nsid } => Ok(self.nvme_report(nsid)?.key_list()),
            Transport::Scsi | Transport::Unknown => {
                self.scsi_in("read keys", 0x00, 8 + 8 * 64, parse_read_keys)
            }
        }
    }

    /// The reservation and its generation.
    fn read_reservation_full(&self) -> Result<ScsiReservation, FenceError> {
        match self.transport {
            Transport::Nvme { nsid } => Ok(self.nvme_report(nsid)?.reservation()),
            Transport::Scsi | Transport::Unknown => {
                self.scsi_in("read reservation", 0x01, 24, parse_read_reservation)
            }
        }
    }
}

impl PrDevice for BlockDevice {
    fn transport(&self) -> Transport {
        self.transport
    }
    fn register_key(&self, old: u64, new: u64, ignore_existing: bool) -> Result<(), FenceError> {
        BlockDevice::register_key(self, old, new, ignore_existing)
    }
    fn reserve_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        BlockDevice::reserve_key(self, key, rtype)
    }
    fn release_key(&self, key: u64, rtype: ReservationType) -> Result<(), FenceError> {
        BlockDevice::release_key(self, key, rtype)
    }
    fn preempt_key(
        &self,
        own: u64,
        victim: u64,
        rtype: ReservationType,
        abort: bool,
    ) -> Result<(), FenceError> {
        BlockDevice::preempt_key(self, own, victim, rtype, abort)
    }
    fn clear_key(&self, key: u64) -> Result<(), FenceError> {
        BlockDevice::clear_key(self, key)
    }
    fn read_keys(&self) -> Result<KeyList, FenceError> {
        BlockDevice::read_keys(self)
    }
    fn read_reservation_full(&self) -> Result<ScsiReservation, FenceError> {
        BlockDevice::read_reservation_full(self)
    }
}
