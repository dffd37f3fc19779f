//! Fuzz the NBD option and request parsers (`blkshim::nbd::proto`): any
//! byte stream must parse or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blkshim::nbd::proto::fuzz_nbd_input(data);
});
