//! Fuzz the parser of sanlock's resource strings
//! (`blkshim::storage::fencing::sanlock::parse_state`, what
//! `sanlock_inquire` returns over the daemon's socket): any bytes must
//! parse within bounds or be refused; never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blkshim::storage::fencing::sanlock::fuzz_inquire_input(data);
});
