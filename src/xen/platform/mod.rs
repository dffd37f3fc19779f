//! Where a back end gets guest memory and event channels.
//! - `real.rs` (feature `xen`): `XenPlatform`, the real Xen libraries.
//! - `emulated.rs` (feature `test-utils`): `EmulatedPlatform`, the
//!   in-process emulation tests use.

use crate::xen::evtchn::{EventChannel, Port};
use crate::xen::grant::{DomId, GrantMapper};
use std::io;
use std::sync::Arc;

#[cfg(feature = "test-utils")]
mod emulated;
#[cfg(feature = "xen")]
mod real;

#[cfg(feature = "test-utils")]
pub use emulated::EmulatedPlatform;
#[cfg(feature = "xen")]
pub use real::XenPlatform;

/// Grants and event channels of one host.
pub trait Platform: Send + Sync {
    /// The grant mapper for this host's back ends.
    fn grant_mapper(&self) -> Arc<dyn GrantMapper>;
    /// Binds to the frontend's unbound port `remote_port` of `domid`.
    fn bind_event_channel(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Arc<dyn EventChannel>>;
}
