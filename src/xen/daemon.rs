//! `blkshim xen-backend`: the daemon a Xen host (or driver domain) runs.
//! Like tapback for tapdisk, it watches the `backend/vbd` directory and runs
//! one [`backend`] state machine per vbd the toolstack
//! creates there. When the toolstack removes a vbd's node, its back end
//! finishes on its own (a source still draining publishes its hand-off
//! record first); the supervisor never waits for it.

use crate::epoch::{EpochStore, FileEpochStore};
use crate::handoff::HandoffLedger;
use crate::storage::identity::disk_identity;
use crate::storage::{open_storage, EngineKind, OpenOptions};
use crate::xen::backend::{self, params_path, BackendConfig, DiskOpener, OpenedDisk, VbdHandle};
use crate::xen::platform::Platform;
use crate::xen::xenstore::{XenStore, XsError, XBT_NULL};
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `blkshim xen-backend` options.
#[derive(clap::Args, Debug, Clone)]
pub struct XenBackendArgs {
    /// Directory of the hand-off records, and of the epoch store unless
    /// --epoch-store: on the storage every host shares.
    #[arg(long, alias = "state-dir")]
    pub epoch_dir: PathBuf,
    /// Where the epochs live: `file:DIR` or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (default: `file:` --epoch-dir).
    /// The hand-off records stay in --epoch-dir.
    #[arg(long, value_parser = crate::epoch::StoreUrl::parse)]
    pub epoch_store: Option<crate::epoch::StoreUrl>,
    /// The back-end directory to watch.
    #[arg(long, default_value = "/local/domain/0/backend/vbd")]
    pub backend_root: String,
    /// Storage engine.
    #[arg(long, default_value = "auto")]
    pub engine: EngineKind,
    /// Drain deadline at suspend, in milliseconds (then the rest is fenced).
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Most rings per vbd offered (`multi-queue-max-queues`).
    #[arg(long, default_value_t = 4)]
    pub max_queues: u32,
    /// `feature-max-indirect-segments` offered.
    #[arg(long, default_value_t = 256)]
    pub max_indirect_segments: u32,
    /// Do not offer persistent grants.
    #[arg(long)]
    pub no_persistent: bool,
    /// How long a vbd whose disk is held by a writer that may still write
    /// (another process or host) waits for that writer's hand-off record
    /// before it refuses (`30s`, `3m`).
    #[arg(long, default_value = "180s", value_parser = crate::nbd::config::parse_duration)]
    pub resume_wait: Duration,
    /// With an etcd epoch store: the TTL in seconds of this host's liveness
    /// lease; a holder whose lease ended is fenced without waiting
    /// --resume-wait (with --fence pr or sanlock).
    #[arg(long, default_value_t = 10)]
    pub host_lease_ttl: u64,
    /// Name the disk at PATH explicitly, `PATH=ID` (repeatable): for shared
    /// storage whose identity the host cannot read (a file on a share
    /// mounted at different paths). A vbd's `disk-id` node wins over it.
    #[arg(long = "disk-id", value_name = "PATH=ID")]
    pub disk_ids: Vec<String>,
    /// What keeps an older host's writes off a disk whose holder did not
    /// hand it over: none (refuse, unless `blkshim ctl takeover DISK
    /// --source-dead` or `blkshim-resume = takeover`), pr (persistent
    /// reservations through the vbd's device), sanlock (leases).
    #[arg(long, value_enum, default_value = "none")]
    pub fence: crate::storage::fencing::FenceMode,
    /// --fence pr: preempt-and-abort or preempt.
    #[arg(long, value_parser = crate::nbd::config::parse_preempt, default_value = "preempt-and-abort")]
    pub pr_preempt: crate::storage::fencing::PreemptMode,
    /// --fence sanlock: lockspace, host id, lease device, per-disk leases.
    #[command(flatten)]
    pub sanlock: crate::storage::fencing::sanlock::SanlockArgs,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics
    /// (HOST:PORT; a bare port binds 127.0.0.1) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl XenBackendArgs {
    /// The per-vbd configuration these options give (one disk registry
    /// and one ledger for all the daemon's vbds).
    pub fn config(&self) -> io::Result<BackendConfig> {
        Ok(BackendConfig {
            suspend_mode: crate::handoff::SuspendMode::Drain {
                timeout: Duration::from_millis(self.drain_timeout_ms),
            },
            max_queues: self.max_queues,
            max_indirect_segments: self.max_indirect_segments,
            persistent: !self.no_persistent,
            ledger: Some(Arc::new(HandoffLedger::open(&self.epoch_dir)?)),
            resume_wait: self.resume_wait,
            fence: self.fence,
            pr_preempt: self.pr_preempt,
            sanlock: match self.fence {
                crate::storage::fencing::FenceMode::Sanlock => {
                    let opts = self.sanlock.to_options().map_err(io::Error::other)?;
                    // One registration for the daemon: sanlock kills it if
                    // this host's lease renewal fails.
                    Some(Arc::new(
                        crate::storage::fencing::SanlockFence::open(opts)
                            .map_err(io::Error::other)?,
                    ))
                }
                _ => None,
            },
            ..BackendConfig::default()
        })
    }

    /// `--disk-id` as a map from path to name.
    pub fn disk_id_map(&self) -> io::Result<BTreeMap<PathBuf, String>> {
        let mut map = BTreeMap::new();
        for spec in &self.disk_ids {
            let (path, id) = spec.split_once('=').ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--disk-id {spec:?}: expected PATH=ID"),
                )
            })?;
            crate::epoch::validate_disk_name(id).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--disk-id {spec:?}: {e}"),
                )
            })?;
            map.insert(PathBuf::from(path), id.to_string());
        }
        Ok(map)
    }
}

/// Opens `params` images with `engine`, epochs in `epoch_dir`, each disk
/// named by its identity ([`disk_identity`]) unless `names` names its path.
pub fn file_opener(
    epoch_dir: PathBuf,
    engine: EngineKind,
    names: BTreeMap<PathBuf, String>,
) -> io::Result<DiskOpener> {
    std::fs::create_dir_all(&epoch_dir)?;
    let epochs: Arc<dyn EpochStore> = Arc::new(FileEpochStore::open(&epoch_dir)?);
    Ok(store_opener(epochs, engine, names))
}

/// Like [`file_opener`], epochs in any store (`--epoch-store`).
pub fn store_opener(
    epochs: Arc<dyn EpochStore>,
    engine: EngineKind,
    names: BTreeMap<PathBuf, String>,
) -> DiskOpener {
    Arc::new(move |params: &str| {
        let path = params_path(params);
        let name = match names.get(&path) {
            Some(n) => n.clone(),
            None => disk_identity(&path)?,
        };
        let storage = open_storage(
            &path,
            &OpenOptions {
                engine,
                ..OpenOptions::default()
            },
        )?;
        log::info!("{}: disk {name:?}", path.display());
        Ok(OpenedDisk {
            name,
            storage,
            epochs: Arc::clone(&epochs),
        })
    })
}

/// The vbd back ends under one root, kept in step with XenStore.
pub struct Supervisor<S: XenStore, F: Fn() -> io::Result<S>> {
    connect: F,
    watcher: S,
    root: String,
    platform: Arc<dyn Platform>,
    opener: DiskOpener,
    config: BackendConfig,
    vbds: BTreeMap<String, VbdHandle>,
    /// Back ends whose node is gone, finishing on their own (a hand-off
    /// still draining).
    retiring: Vec<VbdHandle>,
}

impl<S: XenStore + 'static, F: Fn() -> io::Result<S>> Supervisor<S, F> {
    /// `connect` opens a new XenStore connection (one per vbd, for its own
    /// watches).
    pub fn new(
        connect: F,
        root: &str,
        platform: Arc<dyn Platform>,
        opener: DiskOpener,
        config: BackendConfig,
    ) -> io::Result<Self> {
        let watcher = connect()?;
        watcher
            .watch(root, "vbds")
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Supervisor {
            connect,
            watcher,
            root: root.trim_end_matches('/').to_string(),
            platform,
            opener,
            config,
            vbds: BTreeMap::new(),
            retiring: Vec::new(),
        })
    }

    /// The vbd directories (`<root>/<domid>/<devid>`) that exist now.
    fn present(&self) -> Result<Vec<String>, XsError> {
        let mut out = Vec::new();
        let domains = match self.watcher.directory(XBT_NULL, &self.root) {
            Ok(d) => d,
            Err(XsError::NotFound(_)) => return Ok(out),
            Err(e) => return Err(e),
        };
        for d in domains {
            let dp = format!("{}/{d}", self.root);
            match self.watcher.directory(XBT_NULL, &dp) {
                Ok(devs) => out.extend(devs.into_iter().map(|v| format!("{dp}/{v}"))),
                Err(XsError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Starts back ends for new vbds, drops those whose node went away.
    pub fn reconcile(&mut self) -> io::Result<()> {
        let present = self
            .present()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let gone: Vec<String> = self
            .vbds
            .iter()
            .filter(|(path, h)| !present.contains(path) || h.is_finished())
            .map(|(path, _)| path.clone())
            .collect();
        for path in gone {
            if let Some(h) = self.vbds.remove(&path) {
                if h.is_finished() {
                    log::info!("vbd {path}: back end stopped");
                } else {
                    log::info!("vbd {path}: removed; its back end finishes on its own");
                    self.retiring.push(h);
                }
            }
        }
        self.reap();
        for path in present {
            if self.vbds.contains_key(&path) {
                continue;
            }
            let xs = (self.connect)()?;
            log::info!("vbd {path}: starting back end");
            let h = backend::spawn(
                xs,
                Arc::clone(&self.platform),
                &path,
                Arc::clone(&self.opener),
                self.config.clone(),
            )?;
            self.vbds.insert(path, h);
        }
        Ok(())
    }

    /// Back ends running, by path.
    pub fn vbds(&self) -> &BTreeMap<String, VbdHandle> {
        &self.vbds
    }

    /// Back ends of removed vbds still finishing (handing off).
    pub fn retiring(&self) -> &[VbdHandle] {
        &self.retiring
    }

    fn reap(&mut self) {
        self.retiring.retain(|h| {
            let done = h.is_finished();
            if done {
                log::info!("vbd {}: back end finished", h.path);
            }
            !done
        });
    }

    /// Reconciles on every watch event until `stop`.
    pub fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        while !stop.load(Ordering::Acquire) {
            let ev = self
                .watcher
                .read_watch(Some(Duration::from_millis(200)))
                .map_err(|e| io::Error::other(e.to_string()))?;
            if ev.is_some() {
                self.reconcile()?;
            } else {
                // Reap back ends that finished on their own.
                self.vbds.retain(|_, h| !h.is_finished());
                self.reap();
            }
        }
        Ok(())
    }
}

/// `blkshim xen-backend`: serve every vbd of this host until killed.
#[cfg(feature = "xen")]
pub fn run(args: XenBackendArgs) -> Result<(), Box<dyn std::error::Error>> {
    use crate::xen::platform::XenPlatform;
    use crate::xen::xenstore::XenStoreHandle;
    let url = args
        .epoch_store
        .clone()
        .unwrap_or_else(|| crate::epoch::StoreUrl::File(args.epoch_dir.clone()));
    std::fs::create_dir_all(&args.epoch_dir)?;
    let epochs = url
        .open()
        .map_err(|e| io::Error::other(format!("epoch store {url}: {e}")))?;
    let opener = store_opener(epochs, args.engine, args.disk_id_map()?);
    let platform: Arc<dyn Platform> = XenPlatform::open()?;
    let mut config = args.config()?;
    // This host's liveness lease (etcd), renewed while the daemon runs.
    let registration = match &config.ledger {
        Some(ledger) => url
            .register_host(ledger.host(), args.host_lease_ttl)
            .map_err(|e| io::Error::other(format!("epoch store {url}: host liveness: {e}")))?,
        None => None,
    };
    config.liveness = registration.as_ref().map(|r| Arc::clone(&r.liveness));
    if let Some(addr) = &args.metrics {
        let m = Arc::new(crate::metrics::Metrics::new());
        let bound = crate::metrics::http::serve(addr, Arc::clone(&m))?;
        log::info!("metrics on http://{bound}/metrics");
        config.metrics = Some(m);
    }
    let mut sup = Supervisor::new(
        XenStoreHandle::open,
        &args.backend_root,
        platform,
        opener,
        config,
    )?;
    log::info!("xen-backend: watching {}", args.backend_root);
    // The watch is set: a Type=notify unit is up (READY=1), and a SIGTERM
    // from systemd is announced (STOPPING=1) before it ends the daemon.
    crate::control::systemd::stopping_on_sigterm()?;
    crate::control::systemd::ready(&format!("watching {}", args.backend_root));
    let stop = AtomicBool::new(false);
    sup.run(&stop)?;
    Ok(())
}

/// `blkshim xen-backend` without feature `xen`: explain how to get it.
#[cfg(not(feature = "xen"))]
pub fn run(args: XenBackendArgs) -> Result<(), Box<dyn std::error::Error>> {
    let _ = args;
    Err(
        "this blkshim was built without Xen support: rebuild with `cargo build --features xen` \
         (needs libxen-dev) to run xen-backend"
            .into(),
    )
}
