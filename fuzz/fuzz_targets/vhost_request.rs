//! Fuzz the vhost-user-blk descriptor-chain parser
//! (`blkshim::vhost::request::parse`): any chain a guest builds (any
//! addresses, lengths, flags, header, discard segments) over any memory
//! must parse into a request within the disk, or be refused with a status
//! to write or none; never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blkshim::vhost::request::fuzz_input(data);
});
