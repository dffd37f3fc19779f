//! Xen blkif front end: the foundation a blkback-style backend is built on.
//!
//! - [`sys`]: bindgen'd Xen headers (ring ABI, grant/event types, libxen*).
//! - [`abi`]: the three ring ABIs as byte-offset tables.
//! - [`shared`]: memory shared with an untrusted guest (volatile access only).
//! - [`ring`]: the shared request/response ring.
//! - [`blkif`]: requests parsed and validated, responses.
//! - [`grant`], [`evtchn`]: guest memory and notifications; [`platform`]
//!   hands them to a back end.
//! - [`xenstore`]: the negotiation tree.
//!
//! Each of [`grant`], [`evtchn`], [`xenstore`] and [`platform`] is a folder:
//! `mod.rs` the trait and shared types, `real.rs` the real Xen libraries
//! (feature `xen`: the production unsafe code), `emulated.rs` an in-process
//! emulation (feature `test-utils`).
//!
//! No Xen hypervisor is needed to test any of it. With feature `test-utils`
//! (tests, benches and fuzz targets enable it; a default build compiles none
//! of it) there are also `frontend_emu` (an emulated blkfront), `fuzz` (the
//! request-path fuzz entry, `fuzz_blkif_request`) and `testing` (an
//! adversarial storage model).

pub mod abi;
pub mod backend;
pub mod blkif;
pub mod daemon;
pub mod dataplane;
pub mod evtchn;
#[cfg(feature = "test-utils")]
pub mod frontend_emu;
#[cfg(feature = "test-utils")]
pub mod fuzz;
pub mod grant;
pub mod platform;
pub mod ring;
pub mod shared;
pub mod sys;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod xenstore;

/// Xen's page size: grants, ring pages and segments are in these units.
pub const PAGE_SIZE: usize = 4096;
/// blkif sectors are always 512 bytes, whatever the disk's block size.
pub const SECTOR_SIZE: usize = 512;

#[cfg(feature = "test-utils")]
pub use fuzz::fuzz_blkif_request;
