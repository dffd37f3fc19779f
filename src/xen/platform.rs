//! Where a back end gets guest memory and event channels: the real Xen
//! libraries (feature `xen`), or the in-process emulation tests use.

use crate::xen::evtchn::{EmulatedEventChannel, EventChannel, Port};
use crate::xen::grant::{DomId, EmulatedGrantMapper, EmulatedGuest, GrantMapper};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

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

/// A host without a hypervisor: emulated guests register here, and their
/// frontends offer the back-end ends of their event channels.
#[derive(Default)]
pub struct EmulatedPlatform {
    mapper: Arc<EmulatedGrantMapper>,
    offered: Mutex<HashMap<(DomId, Port), EmulatedEventChannel>>,
}

impl EmulatedPlatform {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `guest`'s grants mappable from this host.
    pub fn add_guest(&self, guest: Arc<EmulatedGuest>) {
        self.mapper.add_guest(guest);
    }

    /// The frontend side of `xenbus_alloc_evtchn`: `backend_end` waits for
    /// a back end to bind to (`domid`, `frontend_port`).
    pub fn offer_event_channel(
        &self,
        domid: DomId,
        frontend_port: Port,
        backend_end: EmulatedEventChannel,
    ) {
        self.offered
            .lock()
            .insert((domid, frontend_port), backend_end);
    }
}

impl Platform for EmulatedPlatform {
    fn grant_mapper(&self) -> Arc<dyn GrantMapper> {
        self.mapper.clone()
    }

    fn bind_event_channel(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Arc<dyn EventChannel>> {
        self.offered
            .lock()
            .remove(&(domid, remote_port))
            .map(|c| Arc::new(c) as Arc<dyn EventChannel>)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("domain {domid} has no unbound event channel {remote_port}"),
                )
            })
    }
}

/// The real thing: libxengnttab and libxenevtchn.
#[cfg(feature = "xen")]
pub struct XenPlatform {
    mapper: Arc<crate::xen::grant::XenGrantMapper>,
}

#[cfg(feature = "xen")]
impl XenPlatform {
    pub fn open() -> io::Result<Arc<Self>> {
        Ok(Arc::new(XenPlatform {
            mapper: Arc::new(crate::xen::grant::XenGrantMapper::open()?),
        }))
    }
}

#[cfg(feature = "xen")]
impl Platform for XenPlatform {
    fn grant_mapper(&self) -> Arc<dyn GrantMapper> {
        self.mapper.clone()
    }

    fn bind_event_channel(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Arc<dyn EventChannel>> {
        Ok(Arc::new(
            crate::xen::evtchn::XenEventChannel::bind_interdomain(domid, remote_port)?,
        ))
    }
}
