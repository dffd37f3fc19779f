//! Xen blkif front end: the foundation a blkback-style backend is built on.
//!
//! - [`sys`]: bindgen'd Xen headers (ring ABI, grant/event types, libxen*).
//! - [`abi`]: the three ring ABIs as byte-offset tables.
//! - [`shared`]: memory shared with an untrusted guest (volatile access only).
//! - [`ring`]: the shared request/response ring.
//! - [`blkif`]: requests parsed and validated, responses.
//! - [`grant`], [`evtchn`]: guest memory and notifications (emulated and,
//!   with feature `xen`, real).
//! - [`xenstore`]: the negotiation tree (emulated and real).
//! - [`fuzz`]: the request-path fuzz entry ([`fuzz_blkif_request`]).
//!
//! No Xen hypervisor is needed to test any of it: guest memory, grants and
//! event channels have emulated implementations next to the real ones.

pub mod abi;
pub mod backend;
pub mod blkif;
pub mod daemon;
pub mod dataplane;
pub mod evtchn;
pub mod frontend_emu;
pub mod fuzz;
pub mod grant;
pub mod platform;
pub mod ring;
pub mod shared;
pub mod sys;
pub mod testing;
pub mod xenstore;

/// Xen's page size: grants, ring pages and segments are in these units.
pub const PAGE_SIZE: usize = 4096;
/// blkif sectors are always 512 bytes, whatever the disk's block size.
pub const SECTOR_SIZE: usize = 512;

pub use fuzz::fuzz_blkif_request;
