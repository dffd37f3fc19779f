//! The raw ioctls: `linux/pr.h` (PERSISTENT RESERVE OUT through the block
//! layer), SG_IO (SCSI PERSISTENT RESERVE IN) and the NVMe passthrough
//! (Reservation Report). Layouts and numbers are checked against the C
//! headers in the tests below (values from `linux/pr.h`, `scsi/sg.h`,
//! `linux/nvme_ioctl.h` on x86_64 and every other Linux architecture with
//! the generic `_IOC` encoding).

use super::status::Sense;
use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct PrRegistration {
    pub old_key: u64,
    pub new_key: u64,
    pub flags: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct PrReservation {
    pub key: u64,
    pub rtype: u32,
    pub flags: u32,
}

/// `old_key` is the caller's own registered key, `new_key` the victim's
/// (sd sends `old_key` as RESERVATION KEY and `new_key` as SERVICE ACTION
/// RESERVATION KEY; NVMe as CRKEY and PRKEY).
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct PrPreempt {
    pub old_key: u64,
    pub new_key: u64,
    pub rtype: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct PrClear {
    pub key: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `PR_FL_IGNORE_KEY`: REGISTER AND IGNORE EXISTING KEY.
pub(super) const PR_FL_IGNORE_KEY: u32 = 1;

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const fn iow(ty: u8, nr: u8, size: usize) -> u64 {
    ioc(1, ty, nr, size)
}

pub(super) const IOC_PR_REGISTER: u64 = iow(b'p', 200, size_of::<PrRegistration>());
pub(super) const IOC_PR_RESERVE: u64 = iow(b'p', 201, size_of::<PrReservation>());
pub(super) const IOC_PR_RELEASE: u64 = iow(b'p', 202, size_of::<PrReservation>());
pub(super) const IOC_PR_PREEMPT: u64 = iow(b'p', 203, size_of::<PrPreempt>());
pub(super) const IOC_PR_PREEMPT_ABORT: u64 = iow(b'p', 204, size_of::<PrPreempt>());
pub(super) const IOC_PR_CLEAR: u64 = iow(b'p', 205, size_of::<PrClear>());

const SG_IO: u64 = 0x2285;
const SG_GET_VERSION_NUM: u64 = 0x2282;
const SG_DXFER_FROM_DEV: i32 = -3;
const NVME_IOCTL_ID: u64 = ioc(0, b'N', 0x40, 0);
const NVME_IOCTL_IO_CMD: u64 = ioc(3, b'N', 0x43, size_of::<NvmePassthruCmd>());

fn ioctl<T>(fd: RawFd, req: u64, arg: *mut T) -> io::Result<i32> {
    loop {
        // SAFETY: `arg` points to a live value of the layout `req` expects
        // (or is null for the argument-less ones), for the whole call.
        let r = unsafe { libc::ioctl(fd, req as _, arg) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Send one `IOC_PR_*`: `Ok(0)` done, `Ok(status)` the device's error
/// (positive), `Err` the kernel did not send it.
pub(super) fn pr_out<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<u32> {
    ioctl(fd, req, arg as *mut T).map(|r| r as u32)
}

#[repr(C)]
struct SgIoHdr {
    interface_id: i32,
    dxfer_direction: i32,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: i32,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: i32,
    duration: u32,
    info: u32,
}

/// What a SCSI command through SG_IO came back with.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScsiAnswer {
    /// SCSI status byte (0 GOOD, 2 CHECK CONDITION, 0x18 RESERVATION CONFLICT).
    pub status: u8,
    pub host_status: u16,
    pub driver_status: u16,
    pub sense: Option<Sense>,
    /// Bytes the device transferred into the buffer.
    pub len: usize,
}

/// Whether SG_IO works on `fd` (SCSI disks, device-mapper over them).
pub(super) fn sg_version(fd: RawFd) -> Option<i32> {
    let mut v: libc::c_int = 0;
    ioctl(fd, SG_GET_VERSION_NUM, &mut v as *mut libc::c_int).ok()?;
    Some(v)
}

/// PERSISTENT RESERVE IN with `service_action` (0 READ KEYS, 1 READ
/// RESERVATION) into `buf` (at most 65535 bytes are asked for).
pub(super) fn scsi_pr_in(fd: RawFd, service_action: u8, buf: &mut [u8]) -> io::Result<ScsiAnswer> {
    let alloc = buf.len().min(0xffff);
    let cdb: [u8; 10] = [
        0x5e,
        service_action & 0x1f,
        0,
        0,
        0,
        0,
        0,
        (alloc >> 8) as u8,
        alloc as u8,
        0,
    ];
    let mut sense = [0u8; 64];
    let mut h = SgIoHdr {
        interface_id: b'S' as i32,
        dxfer_direction: SG_DXFER_FROM_DEV,
        cmd_len: cdb.len() as u8,
        mx_sb_len: sense.len() as u8,
        iovec_count: 0,
        dxfer_len: alloc as u32,
        dxferp: buf.as_mut_ptr().cast(),
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: 30_000,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    ioctl(fd, SG_IO, &mut h as *mut SgIoHdr)?;
    let resid = h.resid.clamp(0, alloc as i32) as usize;
    let sense_len = (h.sb_len_wr as usize).min(sense.len());
    Ok(ScsiAnswer {
        status: h.status,
        host_status: h.host_status,
        driver_status: h.driver_status,
        sense: Sense::parse(&sense[..sense_len]),
        len: alloc - resid,
    })
}

#[repr(C)]
#[derive(Default)]
struct NvmePassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

/// The namespace id of an NVMe namespace block device; `None` for
/// anything else.
pub(super) fn nvme_nsid(fd: RawFd) -> Option<u32> {
    match ioctl(fd, NVME_IOCTL_ID, std::ptr::null_mut::<u8>()) {
        Ok(n) if n > 0 => Some(n as u32),
        _ => None,
    }
}

/// NVMe Reservation Report (I/O opcode 0x0e) into `buf` (a multiple of 4
/// bytes); `extended`: EDS=1, 128-bit host identifiers. `Ok(0)` done,
/// `Ok(status)` the controller's error.
pub(super) fn nvme_resv_report(
    fd: RawFd,
    nsid: u32,
    buf: &mut [u8],
    extended: bool,
) -> io::Result<u32> {
    let len = (buf.len() & !3) as u32;
    if len == 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut c = NvmePassthruCmd {
        opcode: 0x0e,
        nsid,
        addr: buf.as_mut_ptr() as u64,
        data_len: len,
        cdw10: len / 4 - 1,
        cdw11: extended as u32,
        timeout_ms: 30_000,
        ..Default::default()
    };
    ioctl(fd, NVME_IOCTL_IO_CMD, &mut c as *mut NvmePassthruCmd).map(|r| r as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layouts_match_the_c_headers() {
        // Values printed by a C program including linux/pr.h, scsi/sg.h and
        // linux/nvme_ioctl.h (x86_64).
        assert_eq!(IOC_PR_REGISTER, 0x4018_70c8);
        assert_eq!(IOC_PR_RESERVE, 0x4010_70c9);
        assert_eq!(IOC_PR_RELEASE, 0x4010_70ca);
        assert_eq!(IOC_PR_PREEMPT, 0x4018_70cb);
        assert_eq!(IOC_PR_PREEMPT_ABORT, 0x4018_70cc);
        assert_eq!(IOC_PR_CLEAR, 0x4010_70cd);
        assert_eq!(NVME_IOCTL_ID, 0x4e40);
        assert_eq!(NVME_IOCTL_IO_CMD, 0xc048_4e43);
        assert_eq!(size_of::<PrRegistration>(), 24);
        assert_eq!(size_of::<PrReservation>(), 16);
        assert_eq!(size_of::<PrPreempt>(), 24);
        assert_eq!(size_of::<PrClear>(), 16);
        assert_eq!(size_of::<NvmePassthruCmd>(), 72);
        assert_eq!(offset_of!(NvmePassthruCmd, addr), 24);
        assert_eq!(offset_of!(NvmePassthruCmd, data_len), 36);
        assert_eq!(offset_of!(NvmePassthruCmd, cdw10), 40);
        assert_eq!(offset_of!(NvmePassthruCmd, timeout_ms), 64);
        assert_eq!(offset_of!(NvmePassthruCmd, result), 68);
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(size_of::<SgIoHdr>(), 88);
            assert_eq!(offset_of!(SgIoHdr, usr_ptr), 56);
            assert_eq!(offset_of!(SgIoHdr, status), 64);
            assert_eq!(offset_of!(SgIoHdr, resid), 72);
            assert_eq!(offset_of!(SgIoHdr, info), 80);
        }
    }

    #[test]
    fn ioctls_on_a_regular_file_fail_cleanly() {
        use std::os::fd::AsRawFd;
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        assert!(sg_version(fd).is_none());
        assert!(nvme_nsid(fd).is_none());
        let mut r = PrRegistration::default();
        assert!(pr_out(fd, IOC_PR_REGISTER, &mut r).is_err());
        let mut buf = [0u8; 64];
        assert!(scsi_pr_in(fd, 0, &mut buf).is_err());
        assert!(nvme_resv_report(fd, 1, &mut buf, false).is_err());
        assert!(nvme_resv_report(fd, 1, &mut buf[..3], false).is_err());
    }
}
