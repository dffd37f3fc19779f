//! Fuzz the persistent-reservation response parsers
//! (`blkshim::storage::fencing::parse`): SCSI READ KEYS / READ RESERVATION
//! parameter data, NVMe Reservation Reports (both formats), SCSI sense
//! data, PR ioctl statuses and key arguments. Any bytes a device sends must
//! parse, ask for a larger buffer, or be refused; never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blkshim::storage::fencing::parse::fuzz_pr_input(data);
});
