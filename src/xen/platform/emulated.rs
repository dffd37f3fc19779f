//! The emulated platform (feature `test-utils`): emulated guests register
//! here, and their frontends offer the back-end ends of their event
//! channels.

use super::Platform;
use crate::xen::evtchn::{EmulatedEventChannel, EventChannel, Port};
use crate::xen::grant::{DomId, EmulatedGrantMapper, EmulatedGuest, GrantMapper};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

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
