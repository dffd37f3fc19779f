//! Fuzz the etcd JSON gateway's response decoders
//! (`blkshim::epoch::etcd::gateway`): any bytes an endpoint (or something
//! posing as one) sends must decode or be refused; never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkshim::epoch::etcd::gateway::parse_txn_response(data);
    let _ = blkshim::epoch::etcd::gateway::parse_range_response(data);
    let _ = blkshim::epoch::etcd::parse_epoch(data);
});
