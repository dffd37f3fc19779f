//! The NBD gateway: listeners, the export table, the control socket, and
//! an orderly stop on SIGTERM (stop accepting, finish or fail what is in
//! flight, flush, exit 0).

use super::allocation::AllocationMap;
use super::authz::Authz;
use super::config::open_disk_storage;
use super::config::ServeConfig;
use super::config::{DiskSpec, HostSideConfig};
use super::connection::{self, ConnStats, Sock};
use super::handshake::{handshake, Access, Exports};
use super::tls::{TlsEngine, TlsMode, TlsPolicy};
use crate::control::ctl::{self, CtlRequest};
use crate::epoch::EpochStore;
use crate::handoff::{Disk, DiskOptions, HandoffLedger, HostSide, HostSidePolicy};
use crate::storage::fencing::{
    FenceMode, PrFencing, PrOptions, PrWriterFence, SanlockFence, WriterFence,
};
use crate::storage::{BlockStorage, StorageIo};
use crate::sys::{self, PollFd};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::{Shutdown, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a client may take over the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

struct ConnEntry {
    sock: Sock,
    stats: Option<Arc<ConnStats>>,
}

struct Server {
    /// A host-side hand-over's drain deadline.
    fence_timeout: Duration,
    exports: Exports,
    storages: Vec<(String, Arc<dyn BlockStorage>)>,
    conns: Mutex<BTreeMap<u64, ConnEntry>>,
    next_id: AtomicU64,
    /// Per-disk request metrics (`--metrics`); empty when off.
    metrics: BTreeMap<String, Arc<crate::metrics::DiskMetrics>>,
    /// The TCP listener's and the unix socket's TLS policies.
    tcp_tls: TlsPolicy,
    unix_tls: TlsPolicy,
    authz: Authz,
    /// The vhost-user-blk sockets (`--vhost-user-blk`, `ctl vhost-add`).
    vhost: crate::vhost::VhostExports,
}

/// Write end of the self-pipe the signal handler pokes.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; fd is our pipe.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

/// Install SIGTERM/SIGINT handlers that write to a pipe; returns its read end.
fn install_signal_pipe() -> std::io::Result<i32> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // A client vanishing must not kill the process.
    // SAFETY: ignoring SIGPIPE is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(fds[0])
}

/// Let the process hold as many descriptors as the hard limit allows
/// (thousands of idle clients).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                log::warn!("cannot raise RLIMIT_NOFILE");
            }
        }
    }
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The fence a host-side disk takes before its first write.
fn writer_fence(
    hs: &HostSideConfig,
    d: &DiskSpec,
    sanlock: &mut Option<Arc<SanlockFence>>,
) -> Result<Option<Arc<dyn WriterFence>>, String> {
    match hs.fence {
        FenceMode::None => Ok(None),
        FenceMode::Pr => {
            let dev = hs.pr_device(d);
            let pr = PrFencing::open(
                dev,
                PrOptions {
                    preempt: hs.pr_preempt,
                    ..PrOptions::default()
                },
            )
            .map_err(|e| format!("disk {:?}: --fence pr on {}: {e}", d.name, dev.display()))?;
            Ok(Some(Arc::new(PrWriterFence::new(pr))))
        }
        FenceMode::Sanlock => {
            if sanlock.is_none() {
                let opts = hs
                    .sanlock
                    .to_options()
                    .map_err(|e| format!("--fence sanlock: {e}"))?;
                // Joins the lockspace (seconds) and registers this process:
                // sanlock kills it if this host's lease renewal fails.
                let fence =
                    SanlockFence::open(opts).map_err(|e| format!("--fence sanlock: {e}"))?;
                *sanlock = Some(Arc::new(fence));
            }
            Ok(sanlock.clone().map(|f| f as Arc<dyn WriterFence>))
        }
    }
}

/// Serve until SIGTERM/SIGINT.
pub fn run(cfg: ServeConfig) -> Result<(), String> {
    if cfg.disks.is_empty() {
        return Err("no disk to serve (give DISK arguments or a config file)".into());
    }
    // TLS and authorization first: a bad certificate or rule stops the
    // server before it touches a disk.
    let (tcp_mode, unix_mode) = cfg.tls_modes()?;
    let tls_wanted = tcp_mode.unwrap_or(TlsMode::Off) != TlsMode::Off || unix_mode != TlsMode::Off;
    let tls_config = match (&cfg.tls_certificates, &cfg.tls_psk) {
        _ if !tls_wanted => None,
        (Some(dir), _) => Some(TlsEngine::X509(
            super::tls::server_config(dir, cfg.tls_verify_peer).map_err(|e| format!("TLS: {e}"))?,
        )),
        (None, Some(file)) => Some(TlsEngine::Psk(
            super::tls::PskServer::from_file(file).map_err(|e| format!("TLS-PSK: {e}"))?,
        )),
        (None, None) => None,
    };
    let policy = |mode: TlsMode| TlsPolicy {
        mode,
        config: if mode == TlsMode::Off {
            None
        } else {
            tls_config.clone()
        },
    };
    let tcp_tls = policy(tcp_mode.unwrap_or(TlsMode::Off));
    let unix_tls = policy(unix_mode);
    let authz = Authz::new(cfg.clients.clone()).map_err(|e| format!("config: {e}"))?;
    for r in authz.rules() {
        for d in &r.disks {
            if d != "*" && !cfg.disks.iter().any(|s| &s.name == d) {
                log::warn!("[[client]] {:?}: no disk named {d:?} is served", r.identity);
            }
        }
    }
    if tls_config.is_some() && authz.is_empty() {
        log::warn!(
            "TLS without [[client]] entries: clients with a certificate may open no disk{}",
            if cfg.tls_verify_peer {
                ""
            } else {
                ", clients without one every disk"
            }
        );
    }
    if tcp_mode == Some(TlsMode::Off) {
        log::warn!("--tls off: NBD over TCP in the clear; anyone who reaches the port may open and take over the disks");
    }
    raise_fd_limit();
    let epoch_dir = cfg.epoch_dir();
    let store_url = cfg.store_url();
    let epochs: Arc<dyn EpochStore> = store_url
        .open()
        .map_err(|e| format!("epoch store {store_url}: {e}"))?;
    // A gateway advances at a newer writer's first write; a host-side
    // server only by admission (HostSide), never by an epoch a client asks.
    let options = DiskOptions {
        auto_advance: cfg.host_side.is_none(),
        fence_timeout: Some(cfg.fence_timeout),
    };
    let ledger = match &cfg.host_side {
        Some(hs) => {
            std::fs::create_dir_all(&epoch_dir)
                .map_err(|e| format!("hand-off ledger {}: {e}", epoch_dir.display()))?;
            let l = HandoffLedger::open(&epoch_dir)
                .map_err(|e| format!("hand-off ledger {}: {e}", epoch_dir.display()))?;
            Some(Arc::new(match &hs.host_id {
                Some(id) => l.as_host(id),
                None => l,
            }))
        }
        None => None,
    };
    // Host-side on etcd: this host's liveness lease, renewed while serving.
    let registration = match (&cfg.host_side, &ledger) {
        (Some(hs), Some(ledger)) => store_url
            .register_host(ledger.host(), hs.host_lease_ttl)
            .map_err(|e| format!("epoch store {store_url}: registering host liveness: {e}"))?,
        _ => None,
    };
    // One sanlock registration for the process, shared by its disks.
    let mut sanlock: Option<Arc<SanlockFence>> = None;
    let mut exports = Exports::default();
    let mut storages = Vec::new();
    for d in &cfg.disks {
        if exports.disks.contains_key(&d.name) {
            return Err(format!("disk name {:?} given twice", d.name));
        }
        let mut storage = open_disk_storage(&d.path, d.size, cfg.cache, cfg.engine)
            .map_err(|e| format!("disk {:?}: {e}", d.name))?;
        if let Some(delay) = &cfg.storage_delay {
            storage = Arc::new(
                crate::storage::DelayStorage::new(storage, delay.clone())
                    .map_err(|e| format!("disk {:?}: storage delay: {e}", d.name))?,
            );
        }
        let disk = Disk::open(
            &d.name,
            Arc::clone(&storage),
            Arc::clone(&epochs),
            options.clone(),
        )
        .map_err(|e| format!("disk {:?}: {e}", d.name))?;
        if let (Some(hs), Some(ledger)) = (&cfg.host_side, &ledger) {
            let policy = HostSidePolicy {
                ledger: Arc::clone(ledger),
                fence: writer_fence(hs, d, &mut sanlock)?,
                resume_wait: hs.resume_wait,
                liveness: registration.as_ref().map(|r| Arc::clone(&r.liveness)),
            };
            log::info!("disk {:?}: host-side, {policy:?}", d.name);
            let _ = disk.attach_host_side(Arc::new(HostSide::new(
                policy,
                &format!("serve {}", d.name),
            )));
        }
        match AllocationMap::open(&d.path, disk.size()) {
            Ok(Some(m)) => {
                exports.allocation.insert(d.name.clone(), Arc::new(m));
            }
            Ok(None) => {}
            Err(e) => log::warn!("disk {:?}: no block status: {e}", d.name),
        }
        storages.push((d.name.clone(), storage));
        exports.disks.insert(d.name.clone(), disk);
    }
    // Bound before anything is served, so a bad address stops the start.
    let mut disk_metrics = BTreeMap::new();
    let mut metrics_at = None;
    if let Some(addr) = &cfg.metrics {
        let m = Arc::new(crate::metrics::Metrics::new());
        for (name, disk) in &exports.disks {
            disk_metrics.insert(name.clone(), m.add_disk(disk));
        }
        let bound = crate::metrics::http::serve(addr, m)?;
        log::info!("metrics on http://{bound}/metrics");
        metrics_at = Some(bound);
    }
    let vhost = crate::vhost::VhostExports::new(
        exports.disks.clone(),
        disk_metrics.clone(),
        crate::vhost::DeviceOptions {
            num_queues: cfg.vhost_queues.max(1),
            ..Default::default()
        },
    );
    for spec in &cfg.vhost_user_blk {
        vhost
            .add(spec.clone())
            .map_err(|e| format!("--vhost-user-blk {}: {e}", spec.socket.display()))?;
    }
    let server = Arc::new(Server {
        vhost,
        metrics: disk_metrics,
        fence_timeout: cfg.fence_timeout,
        exports,
        storages,
        conns: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        tcp_tls,
        unix_tls,
        authz,
    });

    let srv = Arc::clone(&server);
    let control_group = cfg
        .control_group
        .as_deref()
        .map(ctl::ControlGroup::resolve)
        .transpose()?;
    ctl::serve(
        &cfg.control,
        control_group,
        Arc::new(move |req| control(&srv, req)),
    )
    .map_err(|e| format!("control socket {}: {e}", cfg.control.display()))?;

    let socket = cfg
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from("blkshim.sock"));
    ctl::remove_stale_socket(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let unix = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    unix.set_nonblocking(true).map_err(|e| e.to_string())?;
    let tcp = match &cfg.listen {
        Some(addr) => {
            // A bare port (or ":PORT") binds the loopback address only.
            let addr = match addr.strip_prefix(':') {
                Some(port) => format!("127.0.0.1:{port}"),
                None if !addr.contains(':') => format!("127.0.0.1:{addr}"),
                None => addr.clone(),
            };
            let l = TcpListener::bind(&addr).map_err(|e| format!("listen {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            Some(l)
        }
        None => None,
    };
    let sig = install_signal_pipe().map_err(|e| format!("signal handler: {e}"))?;
    print_banner(&server, &cfg, &abs(&socket), tcp.as_ref());
    if let Some(a) = metrics_at {
        println!("metrics: http://{a}/metrics");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    // Listeners bound, disks open, SIGTERM handled: a Type=notify unit may
    // now start what depends on it.
    crate::control::systemd::ready(&format!(
        "serving {} disk(s) on {}",
        server.exports.disks.len(),
        abs(&socket).display()
    ));

    // Accept until a signal arrives.
    loop {
        let mut fds = vec![PollFd::readable(sig), PollFd::readable(unix.as_raw_fd())];
        if let Some(t) = &tcp {
            fds.push(PollFd::readable(t.as_raw_fd()));
        }
        match sys::poll(&mut fds, 1000) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        if fds[0].is_ready() {
            break;
        }
        while let Ok((s, _)) = unix.accept() {
            let peer = "unix".to_string();
            if s.set_nonblocking(false).is_ok() {
                spawn_connection(&server, Sock::Unix(s), peer, false);
            }
        }
        if let Some(t) = &tcp {
            while let Ok((s, addr)) = t.accept() {
                let _ = s.set_nodelay(true);
                if s.set_nonblocking(false).is_ok() {
                    spawn_connection(&server, Sock::Tcp(s), addr.to_string(), true);
                }
            }
        }
    }

    // Stop: no new connections; no new requests; let what is in flight finish.
    log::info!("signal received: stopping");
    crate::control::systemd::stopping("draining in-flight requests, then flushing");
    drop(unix);
    drop(tcp);
    server.vhost.remove_all();
    let _ = std::fs::remove_file(&socket);
    for e in server.conns.lock().values() {
        let _ = e.sock.shutdown(Shutdown::Read);
    }
    let deadline = Instant::now() + cfg.fence_timeout + Duration::from_secs(5);
    while !server.conns.lock().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !server.conns.lock().is_empty() {
        log::warn!("requests still in flight at the deadline: failing them");
        for disk in server.exports.disks.values() {
            disk.fence_below(disk.current_epoch().saturating_add(1));
        }
        for e in server.conns.lock().values() {
            let _ = e.sock.shutdown(Shutdown::Both);
        }
    }
    for (name, storage) in &server.storages {
        let (tx, rx) = crossbeam_channel::bounded(1);
        storage.submit(
            StorageIo::Flush,
            Box::new(move |o| {
                let _ = tx.send(o.result);
            }),
        );
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => log::info!("disk {name:?}: flushed"),
            Ok(Err(e)) => log::error!("disk {name:?}: flush failed: {e}"),
            Err(_) => log::error!("disk {name:?}: flush timed out"),
        }
    }
    let _ = std::fs::remove_file(&cfg.control);
    log::info!("stopped");
    Ok(())
}

fn print_banner(server: &Server, cfg: &ServeConfig, socket: &Path, tcp: Option<&TcpListener>) {
    let sock = socket.display();
    println!(
        "blkshim: serving NBD on {sock}{} (control: {}, epochs: {}, cache: {:?})",
        tcp.and_then(|t| t.local_addr().ok())
            .map(|a| format!(" and {a}"))
            .unwrap_or_default(),
        abs(&cfg.control).display(),
        match cfg.store_url() {
            crate::epoch::StoreUrl::File(d) => format!("file:{}", abs(&d).display()),
            other => other.to_string(),
        },
        cfg.cache
    );
    for (name, disk) in &server.exports.disks {
        let e = disk.current_epoch();
        let export = match disk.host_side() {
            Some(hs) => {
                println!(
                    "disk {name}: {} bytes, epoch {e}, host-side (fence {}): the first write admits this host",
                    disk.size(),
                    hs.policy().fence_mode().name()
                );
                name.clone()
            }
            None => {
                println!(
                    "disk {name}: {} bytes, epoch {e} (connect as {name}@{} to take over)",
                    disk.size(),
                    e + 1
                );
                format!("{name}@{}", e + 1)
            }
        };
        println!(
            "  qemu:    -drive driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export={export},if=virtio"
        );
        println!("  qemu-img/qemu-io: nbd+unix:///{name}?socket={sock}");
        println!(
            "  fio:     fio --name={name} --ioengine=nbd --uri='nbd+unix:///{name}?socket={sock}' --rw=randwrite --bs=4k --iodepth=32"
        );
        if let Some(a) = tcp.and_then(|t| t.local_addr().ok()) {
            if server.tcp_tls.mode == TlsMode::Off {
                println!("  tcp:     nbd://{a}/{name}");
            } else {
                println!("  tcp:     nbds://{a}/{name}?tls-certificates=CLIENT-DIR");
            }
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

fn spawn_connection(server: &Arc<Server>, sock: Sock, peer: String, tcp: bool) {
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let Ok(clone) = sock.try_clone() else {
        return;
    };
    server.conns.lock().insert(
        id,
        ConnEntry {
            sock: clone,
            stats: None,
        },
    );
    let srv = Arc::clone(server);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .stack_size(512 << 10)
        .spawn(move || {
            run_connection(&srv, id, sock, peer, tcp);
            srv.conns.lock().remove(&id);
        });
    if let Err(e) = spawned {
        log::error!("cannot start a connection thread: {e}");
        server.conns.lock().remove(&id);
    }
}

fn run_connection(server: &Arc<Server>, id: u64, mut sock: Sock, peer: String, tcp: bool) {
    let label = format!("conn {id} ({peer})");
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let access = Access {
        tls: if tcp {
            &server.tcp_tls
        } else {
            &server.unix_tls
        },
        authz: &server.authz,
    };
    let neg = match handshake(&mut sock, &server.exports, &access, &label) {
        Ok(Some(n)) => n,
        Ok(None) => {
            log::debug!("{label}: left during the handshake");
            return;
        }
        Err(e) => {
            log::warn!("{label}: handshake failed: {e}");
            return;
        }
    };
    let _ = sock.set_read_timeout(None);
    let peer = match (&neg.identity, neg.tls) {
        (Some(who), _) => format!("{peer}, {who}"),
        (None, true) => format!("{peer}, TLS without certificate"),
        (None, false) => peer,
    };
    let label = format!("conn {id} ({peer})");
    let stats = Arc::new(ConnStats {
        id,
        peer: peer.clone(),
        disk: neg.disk.name().to_string(),
        epoch: neg.writer.epoch(),
        metrics: server.metrics.get(neg.disk.name()).cloned(),
        ..Default::default()
    });
    if let Some(e) = server.conns.lock().get_mut(&id) {
        e.stats = Some(Arc::clone(&stats));
    }
    log::info!(
        "{label}: serving {:?} at epoch {} (disk at {}, structured replies: {}, {})",
        stats.disk,
        stats.epoch,
        neg.disk.current_epoch(),
        neg.structured,
        if neg.read_only {
            "read-only"
        } else {
            "read-write"
        }
    );
    connection::serve(sock, neg, stats);
}

/// Answer a control request.
fn control(server: &Server, req: CtlRequest) -> Result<serde_json::Value, String> {
    let disk_named = |name: &str| -> Result<&Arc<Disk>, String> {
        server
            .exports
            .disks
            .get(name)
            .ok_or_else(|| format!("no disk named {name:?}"))
    };
    match req {
        CtlRequest::Status => {
            let conns: Vec<Arc<ConnStats>> = server
                .conns
                .lock()
                .values()
                .filter_map(|e| e.stats.clone())
                .collect();
            let disks: Vec<serde_json::Value> = server
                .exports
                .disks
                .values()
                .map(|d| {
                    let st = d.status();
                    let mut v = serde_json::to_value(&st).unwrap_or_default();
                    let cs: Vec<serde_json::Value> = conns
                        .iter()
                        .filter(|c| c.disk == st.name)
                        .map(|c| {
                            serde_json::json!({
                                "id": c.id,
                                "peer": c.peer,
                                "epoch": c.epoch,
                                "fenced": c.epoch < st.current_epoch,
                                "in_flight": c.in_flight.load(Ordering::Relaxed),
                                "requests": c.requests.load(Ordering::Relaxed),
                                "refused_stale": c.refused_stale.load(Ordering::Relaxed),
                            })
                        })
                        .collect();
                    let vs: Vec<serde_json::Value> = server
                        .vhost
                        .status()
                        .into_iter()
                        .filter(|s| s.disk == st.name)
                        .filter_map(|s| serde_json::to_value(s).ok())
                        .collect();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("connections".into(), cs.into());
                        o.insert("vhost_user_blk".into(), vs.into());
                        if let Some(hs) = d.host_side() {
                            o.insert(
                                "host_side".into(),
                                serde_json::json!({
                                    "fence": hs.policy().fence_mode(),
                                    "tenure": hs.tenure(),
                                }),
                            );
                        }
                    }
                    v
                })
                .collect();
            Ok(serde_json::json!({ "disks": disks }))
        }
        CtlRequest::Suspend { disk } => {
            let d = disk_named(&disk)?;
            let hs = d
                .host_side()
                .ok_or_else(|| format!("disk {disk:?} is not served host-side (--fence): nothing to hand over; use handoff"))?;
            let record = hs
                .hand_over(d, server.fence_timeout)
                .map_err(|e| format!("disk {disk:?}: {e}"))?;
            serde_json::to_value(&record).map_err(|e| e.to_string())
        }
        CtlRequest::VhostAdd {
            disk,
            epoch,
            socket,
        } => {
            let spec = crate::vhost::VhostSpec {
                disk,
                epoch,
                socket,
            };
            server.vhost.add(spec.clone())?;
            Ok(serde_json::json!({
                "action": "serving", "disk": spec.disk, "epoch": spec.epoch, "socket": spec.socket
            }))
        }
        CtlRequest::VhostRemove { socket } => {
            let spec = server.vhost.remove(&socket)?;
            Ok(serde_json::json!({
                "action": "stopped", "disk": spec.disk, "epoch": spec.epoch, "socket": spec.socket
            }))
        }
        CtlRequest::Fence { disk } => {
            let d = disk_named(&disk)?;
            let floor = d.current_epoch();
            let (cancelled, fenced) = d.fence_below(floor);
            Ok(serde_json::json!({
                "disk": disk, "epoch": floor, "cancelled": cancelled, "fenced": fenced
            }))
        }
        CtlRequest::Handoff { disk, to } => {
            let d = disk_named(&disk)?;
            let current = d.current_epoch();
            let target = to.unwrap_or_else(|| {
                let highest = d.status().writers.iter().map(|w| w.epoch).max();
                match highest {
                    Some(h) if h > current => h,
                    _ => current + 1,
                }
            });
            let adv = d.advance_to(target).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "disk": disk, "from": adv.from, "to": adv.to }))
        }
    }
}
