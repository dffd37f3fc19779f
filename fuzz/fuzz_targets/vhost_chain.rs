//! Fuzz blkshim's in-place descriptor-chain walk
//! (`blkshim::vhost::ring::fuzz_walk`): over any descriptor table and any
//! indirect tables a guest writes, it must yield exactly the chain
//! virtio-queue's `DescriptorChain` yields (the same loop, indirection and
//! length rules), by host pointer and through vm-memory alike; never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkshim::vhost::ring::fuzz_walk(data);
});
