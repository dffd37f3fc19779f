//! Grant tables: how a backend reaches guest memory. A guest grants a page
//! to a domain under a grant ref; the backend maps the ref (or copies
//! through it) and must never touch memory it was not granted.
//!
//! [`GrantMapper`] is what the backend uses; this module holds it and the
//! types every implementation shares.
//! - `real.rs` (feature `xen`): `XenGrantMapper`, the real thing over
//!   libxengnttab.
//! - `emulated.rs` (feature `test-utils`): `EmulatedGuest` stands in for a
//!   guest without a hypervisor: its RAM is a memfd, its grant table says
//!   which refs are valid and writable, and `EmulatedGrantMapper` maps refs
//!   by mmapping the memfd's pages, so guest and backend really share pages.

use std::fmt;
use std::io;

use super::shared::SharedMem;
#[cfg(any(feature = "xen", feature = "test-utils"))]
use super::PAGE_SIZE;

#[cfg(feature = "test-utils")]
mod emulated;
#[cfg(feature = "xen")]
mod real;

#[cfg(feature = "test-utils")]
pub use emulated::{EmulatedGrantMapper, EmulatedGuest};
#[cfg(feature = "xen")]
pub use real::XenGrantMapper;

/// A grant reference (`grant_ref_t`).
pub type GrantRef = u32;
/// A domain id (`domid_t`).
pub type DomId = u16;

/// Grant failures.
#[derive(Debug)]
pub enum GrantError {
    /// The domain has not granted this ref (or the domain is unknown).
    InvalidRef {
        /// Granting domain.
        domid: DomId,
        /// The ref.
        gref: GrantRef,
    },
    /// A write mapping or copy into a ref granted read-only.
    ReadOnly {
        /// Granting domain.
        domid: DomId,
        /// The ref.
        gref: GrantRef,
    },
    /// A copy that does not fit inside one page.
    OutOfPage {
        /// Offset in the page.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// Nothing to map.
    Empty,
    /// The grant is still mapped and cannot be revoked.
    Busy(GrantRef),
    /// The OS or hypervisor refused.
    Os(io::Error),
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantError::InvalidRef { domid, gref } => {
                write!(f, "domain {domid} has not granted ref {gref}")
            }
            GrantError::ReadOnly { domid, gref } => {
                write!(f, "domain {domid} granted ref {gref} read-only")
            }
            GrantError::OutOfPage { offset, len } => {
                write!(f, "grant copy of {len} bytes at {offset} crosses a page")
            }
            GrantError::Empty => write!(f, "no grant refs to map"),
            GrantError::Busy(gref) => write!(f, "grant ref {gref} is still mapped"),
            GrantError::Os(e) => write!(f, "grant operation failed: {e}"),
        }
    }
}

impl std::error::Error for GrantError {}

/// Access to pages other domains granted us.
pub trait GrantMapper: Send + Sync {
    /// Maps `refs` of `domid`, in order, as one contiguous region (a
    /// multi-page ring, a data buffer). Unmapped when the last handle drops.
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool)
        -> Result<SharedMem, GrantError>;

    /// Grant copy out of a page: `dst.len()` bytes at `offset` of `gref`.
    fn copy_from_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), GrantError>;

    /// Grant copy into a page (the ref must be writable).
    fn copy_to_guest(
        &self,
        domid: DomId,
        gref: GrantRef,
        offset: usize,
        src: &[u8],
    ) -> Result<(), GrantError>;
}

/// Whether a copy of `len` bytes at `offset` stays inside one page.
#[cfg(any(feature = "xen", feature = "test-utils"))]
fn check_in_page(offset: usize, len: usize) -> Result<(), GrantError> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_SIZE => Ok(()),
        _ => Err(GrantError::OutOfPage { offset, len }),
    }
}
