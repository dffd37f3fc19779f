//! Hostile blkif ring bytes and indirect pages through the backend's ring
//! consumer and request parser (see `blkshim::xen::fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blkshim::xen::fuzz_blkif_request(data);
});
