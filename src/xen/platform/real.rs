//! The real platform (feature `xen`): libxengnttab and libxenevtchn.

use super::Platform;
use crate::xen::evtchn::{EventChannel, Port, XenEventChannel};
use crate::xen::grant::{DomId, GrantMapper, XenGrantMapper};
use std::io;
use std::sync::Arc;

/// The real thing: libxengnttab and libxenevtchn.
pub struct XenPlatform {
    mapper: Arc<XenGrantMapper>,
}

impl XenPlatform {
    pub fn open() -> io::Result<Arc<Self>> {
        Ok(Arc::new(XenPlatform {
            mapper: Arc::new(XenGrantMapper::open()?),
        }))
    }
}

impl Platform for XenPlatform {
    fn grant_mapper(&self) -> Arc<dyn GrantMapper> {
        self.mapper.clone()
    }

    fn bind_event_channel(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> io::Result<Arc<dyn EventChannel>> {
        Ok(Arc::new(XenEventChannel::bind_interdomain(
            domid,
            remote_port,
        )?))
    }
}
