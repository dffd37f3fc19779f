//! blkshim: a userspace block backend that makes live migration and failover
//! of VM disks on shared storage safe.
//!
//! The promise: **no stale write ever lands.** Once a newer writer has been
//! admitted for a disk, no write issued by an older writer reaches the
//! storage, and two writes to overlapping sectors are never in flight at the
//! storage at the same time.
//!
//! The library is three mechanisms and the glue between them:
//! - [`tracking`]: per-sector in-flight tracking ([`tracking::Tracker`]);
//! - [`epoch`]: fencing tokens kept in one crash-safe place ([`epoch::EpochStore`]);
//! - [`handoff`]: a disk that drains or fences at suspend and resumes from a
//!   [`handoff::HandoffRecord`] ([`handoff::Disk`]).
//!
//! Storage engines live in [`storage`]; front ends ([`nbd`], [`xen`]) depend
//! on the core, never the other way round. [`sys`] holds safe wrappers for
//! the few system calls made directly (poll, eventfd, non-blocking
//! send/recv).

pub mod control;
pub mod epoch;
pub mod handoff;
pub mod metrics;
pub mod nbd;
pub mod sim;
pub mod storage;
pub mod sys;
pub mod tracking;
pub mod vhost;
pub mod xen;
