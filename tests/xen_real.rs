//! With feature `xen`, the real implementations link against libxenstore,
//! libxengnttab and libxenevtchn. On a machine without a hypervisor (CI,
//! this one) opening them must fail with an error, never crash; on a Xen
//! host with a backend domain they open.
#![cfg(feature = "xen")]

use blkshim::xen::evtchn::XenEventChannel;
use blkshim::xen::grant::XenGrantMapper;
use blkshim::xen::xenstore::XenStoreHandle;

fn on_xen() -> bool {
    std::path::Path::new("/proc/xen/capabilities").exists()
}

#[test]
fn real_handles_open_only_under_xen() {
    let gnt = XenGrantMapper::open();
    let xs = XenStoreHandle::open();
    // Binding needs a real remote port; domain 0x7ff0 (DOMID_FIRST_RESERVED)
    // is never a guest, so this fails everywhere.
    let ev = XenEventChannel::bind_interdomain(0x7ff0, 1);
    assert!(ev.is_err());
    if on_xen() {
        eprintln!(
            "running under Xen: gntdev {:?}, xenstore {:?}",
            gnt.is_ok(),
            xs.is_ok()
        );
    } else {
        assert!(gnt.is_err(), "gntdev opened without Xen");
        assert!(xs.is_err(), "xenstore opened without Xen");
    }
}
