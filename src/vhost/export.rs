//! vhost-user-blk sockets: each serves one disk at one writer epoch, one
//! frontend at a time, and listens again when it leaves (reconnect).

use super::device::{BlkDevice, DeviceOptions, DeviceStats};
use crate::handoff::Disk;
use crate::metrics::DiskMetrics;
use crate::tracking::Epoch;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// How long a departed frontend's requests may take to complete before the
/// socket listens again.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `DISK[@EPOCH]=SOCKET`: serve `disk` on `socket`, its frontends writing at
/// `epoch` (`None`: the disk's current epoch when each frontend connects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VhostSpec {
    pub disk: String,
    pub epoch: Option<Epoch>,
    pub socket: PathBuf,
}

impl VhostSpec {
    /// Parse `DISK[@EPOCH]=SOCKET`.
    pub fn parse(s: &str) -> Result<VhostSpec, String> {
        let (export, socket) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected DISK[@EPOCH]=SOCKET"))?;
        let (disk, epoch) = parse_export(export)?;
        if socket.is_empty() {
            return Err(format!("{s:?}: empty socket path"));
        }
        Ok(VhostSpec {
            disk,
            epoch,
            socket: PathBuf::from(socket),
        })
    }
}

/// `DISK` or `DISK@EPOCH`.
pub fn parse_export(s: &str) -> Result<(String, Option<Epoch>), String> {
    let (disk, epoch) = match s.split_once('@') {
        Some((d, e)) => (
            d,
            Some(
                e.parse::<Epoch>()
                    .map_err(|_| format!("{s:?}: bad epoch {e:?}"))?,
            ),
        ),
        None => (s, None),
    };
    if disk.is_empty() {
        return Err(format!("{s:?}: no disk name"));
    }
    Ok((disk.to_string(), epoch))
}

/// A socket as `ctl status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SocketStatus {
    pub disk: String,
    pub epoch: Option<Epoch>,
    pub socket: PathBuf,
    pub connected: bool,
    pub connections: u64,
    pub requests: u64,
    pub refused_stale: u64,
    pub malformed: u64,
    pub errors: u64,
}

struct Shared {
    stop: AtomicBool,
    /// The connected frontend's daemon, to cut it at removal.
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// Counters of the current (or last) connection.
    stats: Mutex<Arc<DeviceStats>>,
    /// The connected frontend's device, to quiesce it before the cut.
    device: Mutex<Option<Arc<BlkDevice>>>,
    connections: Mutex<u64>,
    /// A duplicate of the listening socket: shutting it down wakes an
    /// `accept()` blocked on the original (the same socket), even when the
    /// socket's path is gone, and the duplicate cannot be closed and its
    /// number reused while we hold it.
    wake: std::os::fd::OwnedFd,
}

struct Entry {
    spec: VhostSpec,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Every vhost-user-blk socket of the server.
pub struct VhostExports {
    disks: BTreeMap<String, Arc<Disk>>,
    metrics: BTreeMap<String, Arc<DiskMetrics>>,
    opts: DeviceOptions,
    sockets: Mutex<BTreeMap<PathBuf, Entry>>,
}

impl VhostExports {
    /// `metrics`: the disks' request metrics (`--metrics`; empty when off).
    pub fn new(
        disks: BTreeMap<String, Arc<Disk>>,
        metrics: BTreeMap<String, Arc<DiskMetrics>>,
        opts: DeviceOptions,
    ) -> VhostExports {
        VhostExports {
            disks,
            metrics,
            opts,
            sockets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Bind `spec.socket` (replacing a stale socket file) and serve it on a
    /// thread of its own.
    pub fn add(&self, spec: VhostSpec) -> Result<(), String> {
        let disk = self
            .disks
            .get(&spec.disk)
            .cloned()
            .ok_or_else(|| format!("no disk named {:?}", spec.disk))?;
        if let Some(e) = spec.epoch {
            if disk.host_side().is_some() {
                return Err(format!(
                    "disk {:?} is served host-side (--fence): its writers take the host's epoch; give {}={} without @{e}",
                    spec.disk,
                    spec.disk,
                    spec.socket.display()
                ));
            }
            if e < disk.current_epoch() {
                return Err(format!(
                    "disk {:?} is at epoch {}: epoch {e} is fenced",
                    spec.disk,
                    disk.current_epoch()
                ));
            }
        }
        let mut sockets = self.sockets.lock();
        if sockets.contains_key(&spec.socket) {
            return Err(format!("{} is served already", spec.socket.display()));
        }
        crate::control::ctl::remove_stale_socket(&spec.socket)
            .map_err(|e| format!("{}: {e}", spec.socket.display()))?;
        let listener = Listener::new(&spec.socket, false)
            .map_err(|e| format!("{}: {e}", spec.socket.display()))?;
        // SAFETY: the listener's fd is open for the duration of this borrow.
        let wake = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|e| format!("{}: {e}", spec.socket.display()))?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            stats: Mutex::new(Arc::new(DeviceStats::default())),
            device: Mutex::new(None),
            connections: Mutex::new(0),
            wake,
        });
        let sh = Arc::clone(&shared);
        let sp = spec.clone();
        let opts = self.opts;
        let metrics = self.metrics.get(&spec.disk).cloned();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", spec.disk))
            .spawn(move || serve_socket(disk, sp, opts, metrics, listener, &sh))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        log::info!(
            "vhost-user-blk: serving disk {:?} at epoch {} on {}",
            spec.disk,
            spec.epoch.map_or("current".into(), |e| e.to_string()),
            spec.socket.display()
        );
        sockets.insert(
            spec.socket.clone(),
            Entry {
                spec,
                shared,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Stop serving `socket`: cut its frontend, remove the file.
    pub fn remove(&self, socket: &Path) -> Result<VhostSpec, String> {
        let mut entry = self.sockets.lock().remove(socket).ok_or_else(|| {
            format!(
                "{} is not a vhost-user-blk socket of this server",
                socket.display()
            )
        })?;
        entry.shared.stop.store(true, Ordering::Release);
        // Every popped request in the used ring before the cut, so that a
        // frontend that reconnects (qemu's `reconnect=`) resumes exactly
        // after them (see `BlkDevice::quiesce`).
        let device = entry.shared.device.lock().clone();
        if let Some(dev) = device {
            if !dev.quiesce(DRAIN_TIMEOUT) {
                log::warn!(
                    "{}: requests still in flight {DRAIN_TIMEOUT:?} after the socket was removed; cutting the frontend anyway",
                    socket.display()
                );
            }
        }
        if let Some(h) = entry.shared.shutdown.lock().take() {
            h.shutdown();
        }
        // Wake an accept() blocked on the socket: shutting a listening
        // socket down makes accept() fail at once (connecting to the path
        // would hang here if the file had been removed behind our back).
        // SAFETY: shutdown(2) on a descriptor we own; no memory involved.
        unsafe { libc::shutdown(entry.shared.wake.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = entry.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(socket);
        log::info!("vhost-user-blk: stopped serving {}", socket.display());
        Ok(entry.spec)
    }

    /// Stop every socket.
    pub fn remove_all(&self) {
        let all: Vec<PathBuf> = self.sockets.lock().keys().cloned().collect();
        for s in all {
            let _ = self.remove(&s);
        }
    }

    pub fn status(&self) -> Vec<SocketStatus> {
        self.sockets
            .lock()
            .values()
            .map(|e| {
                let st = Arc::clone(&e.shared.stats.lock());
                SocketStatus {
                    disk: e.spec.disk.clone(),
                    epoch: e.spec.epoch,
                    socket: e.spec.socket.clone(),
                    connected: e.shared.shutdown.lock().is_some(),
                    connections: *e.shared.connections.lock(),
                    requests: st.requests.load(Ordering::Relaxed),
                    refused_stale: st.refused_stale.load(Ordering::Relaxed),
                    malformed: st.malformed.load(Ordering::Relaxed),
                    errors: st.errors.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

impl Drop for VhostExports {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// Accept one frontend at a time until stopped.
fn serve_socket(
    disk: Arc<Disk>,
    spec: VhostSpec,
    opts: DeviceOptions,
    metrics: Option<Arc<DiskMetrics>>,
    mut listener: Listener,
    shared: &Shared,
) {
    let sock = spec.socket.display().to_string();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        n += 1;
        let label = format!("vhost {sock} #{n}");
        // The writer exists while the socket waits for its frontend, as an
        // NBD client's does from its handshake on: `ctl handoff` sees it.
        let writer = match disk.register(spec.epoch, &label) {
            Ok(w) => Some(w),
            Err(e) => {
                // Expected after a migration away from this socket's epoch:
                // the socket stays (until `ctl vhost-remove`) but is fenced.
                log::warn!(
                    "{label}: disk {:?}: {e}: a frontend connecting here gets IOERR for every request",
                    spec.disk
                );
                None
            }
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(BlkDevice::new(
            Arc::clone(&disk),
            writer,
            label.clone(),
            opts,
            mem.clone(),
            metrics.clone(),
        ));
        *shared.stats.lock() = Arc::clone(&device.stats);
        let mut daemon = match VhostUserDaemon::new(label.clone(), Arc::clone(&device), mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("{label}: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        device.attach(&daemon);
        if let Err(e) = daemon.start(&mut listener) {
            log::error!("{label}: accept: {e}");
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        *shared.connections.lock() += 1;
        *shared.device.lock() = Some(Arc::clone(&device));
        *shared.shutdown.lock() = daemon.shutdown_handle();
        log::info!(
            "{label}: frontend connected (disk {:?}, epoch {})",
            spec.disk,
            device.epoch().map_or("fenced".into(), |e| e.to_string())
        );
        match daemon.wait() {
            Ok(()) => log::info!("{label}: frontend left"),
            Err(e) => log::info!("{label}: frontend left: {e}"),
        }
        *shared.shutdown.lock() = None;
        *shared.device.lock() = None;
        drop(daemon);
        if !device.drain(DRAIN_TIMEOUT) {
            log::warn!(
                "{label}: requests still in flight {DRAIN_TIMEOUT:?} after the frontend left"
            );
        }
    }
}
