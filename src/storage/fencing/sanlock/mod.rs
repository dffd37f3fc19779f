//! [`FenceMode::Sanlock`](super::FenceMode::Sanlock): host-side writer
//! fencing with sanlock paxos leases, for shared storage without
//! persistent reservations.
//!
//! # Why a lease fences
//!
//! Every host runs the sanlock daemon (with wdmd and a watchdog device) and
//! joins one *lockspace* on a small shared lease device: a delta lease per
//! host id that the daemon renews every 2 × io_timeout. Each blkshim disk
//! has a *paxos lease* (a 1 MiB area) in that lockspace; a writer holds its
//! disk's lease before its first write. If a host cannot renew its delta
//! lease (cut off from the lease device, hung), its daemon kills the
//! processes holding leases (this registered process: SIGKILL, see below)
//! once renewal has failed for 8 × io_timeout; if that does not work, wdmd
//! stops petting `/dev/watchdog` and the host is reset 60 s after the last
//! renewal. Another host may acquire a lease whose owner stopped renewing
//! only host_dead_seconds after the owner's last renewal, when the owner
//! is dead in one of those two ways. So once `acquire` returns, no older
//! writer is still running anywhere.
//!
//! # Timings (`src/timeouts.h` of sanlock 3.8; [`Timings`])
//!
//! | io_timeout | renewal | kill (renewal fail) | watchdog / host_dead |
//! |---|---|---|---|
//! | 10 s (default) | 20 s | 80 s | 140 s |
//! | 1 s (tests) | 2 s | 8 s | 68 s |
//!
//! The 60 s of the watchdog stay whatever io_timeout is. A takeover from a
//! failed host waits up to host_dead_seconds; a clean hand-off (the source
//! released its lease) does not wait.
//!
//! **Use io_timeout ≥ 3 with wdmd.** wdmd (3.8.5) checks its clients every
//! 10 s and closes `/dev/watchdog` uncleanly (so it fires 60 s later) as
//! soon as a client's expiry (last renewal + 8 × io_timeout) is less than
//! about 10 s away; it reopens it when the failing client is gone. With
//! io_timeout 1 the expiry is never more than 8 s away, so a perfectly
//! healthy host is reset ~60 s after joining (observed in the qemu guest);
//! 2 leaves a margin of ~2 s. The guest test runs with 3: renewal 6 s,
//! kill 24 s, host_dead 84 s (measured: cut-off → writer SIGKILLed 22.7 s,
//! last renewal → the other host acquires ≈ 88 s under TCG).
//!
//! # lver = epoch
//!
//! sanlock advances a lease's version (`lver`) by one at each acquisition
//! and, with `SANLK_RES_LVER`, acquires only if the lease is still at the
//! version the caller read: compare-and-advance. blkshim keeps the lease's
//! lver equal to the epoch of the writer that last acquired it
//! ([`plan_acquire`]): a writer at epoch E reads lver, refuses if lver ≥ E
//! (a writer at least as new took the lease: this one is stale, whatever
//! the epoch store said), advances a lagging lease with acquire/release
//! cycles, and acquires expecting E − 1, then checks with
//! `sanlock_inquire` that it holds lver = E. So the lease itself records
//! which epoch last owned the disk and refuses every older one, even if
//! the epoch store were wrong or rolled back.
//!
//! # The process sanlock kills
//!
//! [`SanlockFence::open`] registers the calling process with the daemon
//! (`sanlock_register`; the leases belong to that connection and are
//! dropped when the process exits) and restricts it to SIGKILL
//! (`SANLK_RESTRICT_SIGTERM`), so a SIGTERM handler (a graceful shutdown)
//! cannot delay the kill. Children do not inherit the registration
//! (FD_CLOEXEC). Writes a killed process queued in the kernel can still
//! complete: the path to the *data* must not queue I/O for longer than
//! host_dead_seconds (no multipath `queue_if_no_path` without a
//! `no_path_retry` bound).
//!
//! # Two daemons on one machine (tests)
//!
//! The client library finds its daemon at `$SANLOCK_RUN_DIR/sanlock.sock`
//! (default `/run/sanlock`); a daemon started with another `SANLOCK_RUN_DIR`
//! is another "host" (its own host id) for the same lockspace, sharing one
//! wdmd. `qemu-harness/hostside-sanlock.sh` runs two that way.
//!
//! Without feature `sanlock` (no `libsanlock_client` linked) only the pure
//! parts exist and [`SanlockFence::open`] fails with a clear error.

mod inquire;
mod options;
mod plan;

#[cfg(feature = "sanlock")]
pub mod cli;
#[cfg(feature = "sanlock")]
mod fence;
#[cfg(feature = "sanlock")]
mod ffi;

pub use inquire::{fuzz_inquire_input, parse_resource, parse_state, HeldResource};
pub use options::{parse_resource_arg, SanlockArgs, SanlockOptions, MAX_HOST_ID};
pub use plan::{
    check_lockspace_name, fill_field, plan_acquire, resource_name, LverPlan, SanlockRv, Timings,
    LEASE_AREA, WATCHDOG_FIRE_SECONDS,
};

#[cfg(feature = "sanlock")]
pub use fence::SanlockFence;

/// Without feature `sanlock`: the type exists so that callers can name it,
/// but opening one fails.
#[cfg(not(feature = "sanlock"))]
#[derive(Debug)]
pub struct SanlockFence {
    _private: (),
}

#[cfg(not(feature = "sanlock"))]
impl SanlockFence {
    pub fn open(opts: SanlockOptions) -> Result<SanlockFence, super::FenceError> {
        opts.validate()?;
        Err(super::FenceError::Config(
            "this blkshim was built without the `sanlock` feature (cargo build --features sanlock)"
                .to_string(),
        ))
    }
}

#[cfg(not(feature = "sanlock"))]
impl super::WriterFence for SanlockFence {
    fn mode(&self) -> super::FenceMode {
        super::FenceMode::Sanlock
    }
    fn acquire(
        &self,
        _disk: &str,
        _epoch: crate::tracking::Epoch,
    ) -> Result<(), super::FenceError> {
        Err(super::FenceError::Config(
            "built without sanlock".to_string(),
        ))
    }
    fn release(
        &self,
        _disk: &str,
        _epoch: crate::tracking::Epoch,
    ) -> Result<(), super::FenceError> {
        Ok(())
    }
}
