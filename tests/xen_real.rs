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

// ---------------------------------------------------------------------------
// In a real dom0 (qemu-harness/xen.sh runs this binary there with
// BLKSHIM_REQUIRE_XEN=1): the back end serves a frontend played by dom0
// itself, through the real XenStore, grant table and event channels. Dom0
// grants pages to itself with /dev/xen/gntalloc and binds a loopback
// event channel, so every real code path of the back end runs: xenbus
// negotiation, ring mapping, grant copy and persistent maps, notifications,
// a request with a bad grant, suspend and its record, and teardown.

use blkshim::epoch::MemEpochStore;
use blkshim::handoff::HandoffLedger;
use blkshim::storage::{open_storage, EngineKind, OpenOptions};
use blkshim::xen::abi::BlkifAbi;
use blkshim::xen::backend::{self, BackendConfig, OpenedDisk, Phase};
use blkshim::xen::blkif::{encode, Segment, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE};
use blkshim::xen::platform::{Platform, XenPlatform};
use blkshim::xen::ring::FrontRing;
use blkshim::xen::shared::SharedMem;
use blkshim::xen::sys;
use blkshim::xen::xenstore::{XenStore, XBT_NULL};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn require_xen() -> bool {
    if on_xen() {
        return true;
    }
    assert!(
        std::env::var_os("BLKSHIM_REQUIRE_XEN").is_none(),
        "BLKSHIM_REQUIRE_XEN is set but this is not a Xen domain"
    );
    eprintln!("not under Xen: the dom0 loopback tests run in qemu-harness/xen.sh");
    false
}

/// `struct ioctl_gntalloc_alloc_gref` for one page (linux/xen/gntalloc.h).
#[repr(C)]
struct GntallocAlloc {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref: u32,
    _pad: u32,
}
const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong = (24 << 16) | ((b'G' as libc::c_ulong) << 8) | 5;
const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// A page dom0 grants to itself, mapped here as the "guest's" memory.
struct GrantedPage {
    _dev: std::fs::File,
    ptr: NonNull<u8>,
    gref: u32,
}

// SAFETY: a plain shared mapping, accessed through SharedMem's volatile API.
unsafe impl Send for GrantedPage {}
// SAFETY: as above.
unsafe impl Sync for GrantedPage {}

impl GrantedPage {
    fn new() -> GrantedPage {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/gntalloc")
            .expect("open /dev/xen/gntalloc (module xen-gntalloc)");
        let mut a = GntallocAlloc {
            domid: 0,
            flags: GNTALLOC_FLAG_WRITABLE,
            count: 1,
            index: 0,
            gref: 0,
            _pad: 0,
        };
        // SAFETY: valid fd, argument of the size the ioctl number encodes.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_GNTALLOC_ALLOC_GREF, &mut a) };
        assert_eq!(rc, 0, "gntalloc: {}", std::io::Error::last_os_error());
        // SAFETY: mapping the page gntalloc just allocated at `index`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.as_raw_fd(),
                a.index as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap gntalloc");
        GrantedPage {
            _dev: dev,
            ptr: NonNull::new(p.cast()).unwrap(),
            gref: a.gref,
        }
    }

    fn shared(self: &Arc<Self>) -> SharedMem {
        // SAFETY: the page stays mapped until the last SharedMem drops the
        // Arc that owns it.
        unsafe { SharedMem::from_raw_parts(self.ptr, 4096, true, Box::new(Arc::clone(self))) }
    }
}

impl Drop for GrantedPage {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the grant is freed when the device closes.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), 4096) };
    }
}

/// The frontend's end of a loopback event channel.
struct FrontendPort {
    xce: *mut sys::xenevtchn_handle,
    port: u32,
}

impl FrontendPort {
    fn new() -> FrontendPort {
        // SAFETY: plain library calls; errors checked.
        unsafe {
            let xce = sys::xenevtchn_open(std::ptr::null_mut(), 0);
            assert!(!xce.is_null(), "xenevtchn_open");
            let port = sys::xenevtchn_bind_unbound_port(xce, 0);
            assert!(port >= 0, "bind_unbound_port");
            FrontendPort {
                xce,
                port: port as u32,
            }
        }
    }

    fn notify(&self) {
        // SAFETY: our bound port.
        assert_eq!(unsafe { sys::xenevtchn_notify(self.xce, self.port) }, 0);
    }

    /// Waits up to `t` for the back end's notification.
    fn wait(&self, t: Duration) -> bool {
        // SAFETY: our handle's fd.
        let fd = unsafe { sys::xenevtchn_fd(self.xce) };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, t.as_millis() as i32) };
        if n <= 0 {
            return false;
        }
        // SAFETY: pending port of our handle, unmasked after reading.
        unsafe {
            let p = sys::xenevtchn_pending(self.xce);
            if p >= 0 {
                sys::xenevtchn_unmask(self.xce, p as u32);
            }
        }
        true
    }
}

impl Drop for FrontendPort {
    fn drop(&mut self) {
        // SAFETY: closing our own handle and port.
        unsafe {
            sys::xenevtchn_unbind(self.xce, self.port);
            sys::xenevtchn_close(self.xce);
        }
    }
}

fn xs_wait(xs: &impl XenStore, path: &str, want: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let v = xs.read_optional(XBT_NULL, path).unwrap();
        if v.as_deref().map(str::trim) == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "{path} is {v:?}, waited for {want}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mappings of the grant device this process still holds.
fn gntdev_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/dev/xen/gntdev"))
        .count()
}

fn loopback(persistent: bool, devid: u32) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let storage = open_storage(
        &img,
        &OpenOptions {
            engine: EngineKind::ThreadPool,
            direct: false,
            create_size: Some(16 << 20),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let epochs = Arc::new(MemEpochStore::default());
    let opener: backend::DiskOpener = Arc::new(move |_p: &str| {
        Ok(OpenedDisk {
            name: "loop".into(),
            storage: Arc::clone(&storage),
            epochs: epochs.clone(),
        })
    });
    let be = format!("/local/domain/0/backend/vbd/0/{devid}");
    let fe = format!("/local/domain/0/device/vbd/{devid}");
    let xs = XenStoreHandle::open().unwrap();
    let w = |p: &str, v: &str| xs.write_str(XBT_NULL, p, v).unwrap();
    w(&format!("{be}/params"), &img.display().to_string());
    w(&format!("{be}/mode"), "w");
    w(&format!("{be}/frontend"), &fe);
    w(&format!("{be}/frontend-id"), "0");
    w(&format!("{be}/state"), "1");
    w(&format!("{fe}/backend"), &be);
    w(&format!("{fe}/backend-id"), "0");
    w(&format!("{fe}/state"), "1");
    let platform: Arc<dyn Platform> = XenPlatform::open().unwrap();
    let config = BackendConfig {
        max_queues: 1,
        persistent,
        ledger: Some(Arc::new(HandoffLedger::open(dir.path()).unwrap())),
        ..BackendConfig::default()
    };
    let mut vbd = backend::spawn(
        XenStoreHandle::open().unwrap(),
        platform,
        &be,
        opener,
        config,
    )
    .unwrap();
    xs_wait(&xs, &format!("{be}/state"), "2");
    assert_eq!(
        xs.read_string(XBT_NULL, &format!("{be}/sectors")).unwrap(),
        (32768).to_string()
    );

    // The frontend: a one-page ring, 16 data pages, a loopback channel.
    let ring_page = Arc::new(GrantedPage::new());
    let mut ring = FrontRing::init(ring_page.shared(), BlkifAbi::X86_64).unwrap();
    let pages: Vec<Arc<GrantedPage>> = (0..16).map(|_| Arc::new(GrantedPage::new())).collect();
    let port = FrontendPort::new();
    w(&format!("{fe}/ring-ref"), &ring_page.gref.to_string());
    w(&format!("{fe}/event-channel"), &port.port.to_string());
    w(&format!("{fe}/protocol"), "x86_64-abi");
    w(
        &format!("{fe}/feature-persistent"),
        if persistent { "1" } else { "0" },
    );
    w(&format!("{fe}/state"), "3");
    xs_wait(&xs, &format!("{be}/state"), "4");
    assert!(vbd.wait_phase(Phase::Connected, Duration::from_secs(5)));
    w(&format!("{fe}/state"), "4");

    let seg = |p: &GrantedPage| Segment {
        gref: p.gref,
        first_sect: 0,
        last_sect: 7,
    };
    let run = |ring: &mut FrontRing, reqs: Vec<Vec<u8>>| -> Vec<(u64, i16)> {
        let n = reqs.len();
        for r in reqs {
            ring.put_request(&r).unwrap();
        }
        if ring.push_requests().unwrap() {
            port.notify();
        }
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(20);
        while out.len() < n {
            while let Some(r) = ring.next_response().unwrap() {
                out.push((r.id, r.status));
            }
            if out.len() < n {
                assert!(Instant::now() < end, "only {} of {n} responses", out.len());
                port.wait(Duration::from_millis(50));
            }
        }
        out.sort();
        out
    };

    // 8 writes of 4 KiB, each page stamped with its block.
    let mut reqs = Vec::new();
    for (i, p) in pages.iter().take(8).enumerate() {
        let mem = p.shared();
        let stamp = vec![0x40 + i as u8; 4096];
        mem.write_from(0, &stamp).unwrap();
        reqs.push(encode::rw(
            BlkifAbi::X86_64,
            OP_WRITE,
            i as u64,
            0,
            (i as u64) * 64,
            &[seg(p)],
        ));
    }
    let got = run(&mut ring, reqs);
    assert_eq!(got, (0..8).map(|i| (i, 0)).collect::<Vec<_>>(), "writes");
    // A flush, then the data is in the image.
    let got = run(
        &mut ring,
        vec![encode::rw(
            BlkifAbi::X86_64,
            OP_FLUSH_DISKCACHE,
            100,
            0,
            0,
            &[],
        )],
    );
    assert_eq!(got, vec![(100, 0)]);
    let data = std::fs::read(&img).unwrap();
    for i in 0..8usize {
        let at = i * 64 * 512;
        assert!(
            data[at..at + 4096].iter().all(|&b| b == 0x40 + i as u8),
            "block {i}"
        );
    }
    // Reads into the other 8 pages come back with the same stamps.
    let reqs = (0..8)
        .map(|i| {
            encode::rw(
                BlkifAbi::X86_64,
                OP_READ,
                200 + i as u64,
                0,
                (i as u64) * 64,
                &[seg(&pages[8 + i])],
            )
        })
        .collect();
    let got = run(&mut ring, reqs);
    assert!(got.iter().all(|&(_, s)| s == 0), "reads {got:?}");
    for i in 0..8usize {
        let mut buf = vec![0u8; 4096];
        pages[8 + i].shared().read_into(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0x40 + i as u8),
            "read back block {i}"
        );
    }
    // A bad grant gets BLKIF_RSP_ERROR and the ring keeps serving.
    let bad = Segment {
        gref: 0x00ff_fff0,
        first_sect: 0,
        last_sect: 7,
    };
    let got = run(
        &mut ring,
        vec![
            encode::rw(BlkifAbi::X86_64, OP_WRITE, 300, 0, 0, &[bad]),
            encode::rw(BlkifAbi::X86_64, OP_READ, 301, 0, 64, &[seg(&pages[9])]),
        ],
    );
    assert_eq!(got, vec![(300, -1), (301, 0)]);
    assert!(gntdev_mappings() > 0, "the ring is mapped through gntdev");

    // The frontend goes away: suspend, record, Closed, every mapping gone.
    w(&format!("{fe}/state"), "5");
    assert!(
        vbd.wait_phase(Phase::Suspended, Duration::from_secs(10))
            || vbd.status().phase == Phase::Closing
    );
    let record = vbd.status().record.expect("no hand-off record");
    assert_eq!(record.source_epoch, 1);
    assert!(dir.path().join("loop.handoff.json").exists());
    w(&format!("{fe}/state"), "6");
    xs_wait(&xs, &format!("{be}/state"), "6");
    vbd.stop();
    assert_eq!(gntdev_mappings(), 0, "grant mappings left behind");
    xs.rm(XBT_NULL, &be).unwrap();
    xs.rm(XBT_NULL, &fe).unwrap();
}

#[test]
fn dom0_loopback_vbd_over_real_grants_grant_copy() {
    if require_xen() {
        loopback(false, 51900);
    }
}

#[test]
fn dom0_loopback_vbd_over_real_grants_persistent() {
    if require_xen() {
        loopback(true, 51916);
    }
}

#[test]
fn real_xenstore_transactions_and_watches() {
    if !require_xen() {
        return;
    }
    let a = XenStoreHandle::open().unwrap();
    let b = XenStoreHandle::open().unwrap();
    let base = format!("/local/domain/0/blkshim-test-{}", std::process::id());
    a.watch(&base, "t").unwrap();
    // Registering fires the watch once: drain that first.
    while a
        .read_watch(Some(Duration::from_millis(200)))
        .unwrap()
        .is_some()
    {}
    b.write_str(XBT_NULL, &format!("{base}/k"), "v1").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut fired = false;
    while Instant::now() < end && !fired {
        fired = a
            .read_watch(Some(Duration::from_millis(100)))
            .unwrap()
            .is_some();
    }
    assert!(fired, "watch did not fire");
    assert_eq!(a.read_string(XBT_NULL, &format!("{base}/k")).unwrap(), "v1");
    assert_eq!(a.directory(XBT_NULL, &base).unwrap(), vec!["k".to_string()]);
    let n = blkshim::xen::xenstore::transact(&a, 5, |tx| {
        a.write_str(tx, &format!("{base}/k"), "v2")?;
        a.write_str(tx, &format!("{base}/j"), "w")?;
        Ok(2)
    })
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(b.read_string(XBT_NULL, &format!("{base}/k")).unwrap(), "v2");
    assert!(a
        .read_optional(XBT_NULL, &format!("{base}/none"))
        .unwrap()
        .is_none());
    a.rm(XBT_NULL, &base).unwrap();
    assert!(b.read_optional(XBT_NULL, &base).unwrap().is_none());
}
