//! The vhost-user-blk export (`blkshim serve --vhost-user-blk DISK[@EPOCH]=SOCKET`),
//! on the rust-vmm crates (`vhost-user-backend`, `virtio-queue`, `vm-memory`).
//!
//! qemu's fastest userspace disk path: the guest's virtqueues are served from
//! shared memory, with no socket copy of the data. Every request still goes
//! through the core [`Disk`](crate::handoff::Disk), as an NBD connection's: a
//! socket carries a writer epoch (vhost-user has no export name), each
//! frontend connection is a [`Writer`](crate::handoff::Writer) at that epoch,
//! and a migration destination's first write on its own socket (epoch N+1)
//! fences the source's (epoch N): the source's later writes are answered
//! `VIRTIO_BLK_S_IOERR` and never reach the storage.
//!
//! - [`request`]: the pure descriptor-chain parser (fuzzed: `fuzz/`),
//! - [`ring`]: the virtqueue's rings and descriptor chains, read and
//!   written in place in guest memory (the walk fuzzed against
//!   virtio-queue's),
//! - [`device`]: the virtio-blk device of one connection,
//! - [`export`]: the sockets, one frontend at a time, listening again
//!   when it leaves.

pub mod device;
pub mod export;
pub mod request;
pub mod ring;

pub use device::{BlkDevice, DeviceOptions};
pub use export::{VhostExports, VhostSpec};
