//! The backends the frontend and the stale node talk to: endpoints over
//! real `Disk`s or straight to the storage, hosts, and booting the VM.

use super::{Protection, World, DISK_NAME};
use crate::epoch::EpochStore;
use crate::handoff::{Disk, DiskError, DiskOptions, Writer};
use crate::sim::scenario::{ActionKind, Deployment, HOST_X, HOST_Z};
use crate::sim::sched::Event;
use crate::sim::storage_model::StoragePath;
use crate::storage::fencing::{take_over, FenceMode, StorageFencing};
use crate::storage::{AlignedBuf, BlockStorage};
use parking_lot::Mutex;
use std::sync::Arc;

/// A backend connection the frontend (or the stale node) talks to.
pub(super) struct Endpoint {
    pub(super) kind: EpKind,
}

pub(super) enum EpKind {
    /// Through blkshim: a writer of a real `Disk`.
    Disk {
        disk: Arc<Disk>,
        writer: Option<Writer>,
    },
    /// Straight to the storage (protection off), as a writer of `epoch`:
    /// the order in which the unprotected hosts took the disk.
    Raw { path: Arc<dyn BlockStorage> },
}

/// A completion handed back by a backend, delivered by the loop.
pub(super) struct Done {
    pub(super) ep: usize,
    pub(super) tag: u64,
    pub(super) result: Result<(), i32>,
    pub(super) buf: Option<AlignedBuf>,
}

pub(super) type Inbox = Arc<Mutex<Vec<Done>>>;

pub(super) struct Host {
    pub(super) path: Arc<StoragePath>,
    /// Host-side deployment: this host's backend.
    pub(super) disk: Option<Arc<Disk>>,
    /// The host's wall clock (only the unprotected stale-promote looks at it).
    pub(super) wall_clock: u64,
}

pub(super) fn errno_of(r: &std::io::Result<()>) -> Result<(), i32> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl World {
    /// The path a host's I/O takes (the gateway has one for everybody).
    pub(super) fn path_of(&self, host: usize) -> Arc<StoragePath> {
        match self.scenario.deployment {
            Deployment::Gateway => Arc::clone(&self.hosts[HOST_X].path),
            Deployment::HostSide => Arc::clone(&self.hosts[host].path),
        }
    }

    pub(super) fn options(&self) -> DiskOptions {
        match self.scenario.deployment {
            // The NBD gateway: a newer writer's first write advances the
            // epoch; the fence timer runs on the simulation's clock.
            Deployment::Gateway => DiskOptions {
                auto_advance: true,
                fence_timeout: None,
            },
            Deployment::HostSide => DiskOptions {
                auto_advance: false,
                fence_timeout: None,
            },
        }
    }

    pub(super) fn open_disk(&mut self, host: usize) -> Result<Arc<Disk>, DiskError> {
        let storage: Arc<dyn BlockStorage> = self.path_of(host);
        let epochs: Arc<dyn EpochStore> = self.epochs.clone();
        let disk = Disk::open(DISK_NAME, storage, epochs, self.options())?;
        self.disks.push(Arc::clone(&disk));
        Ok(disk)
    }

    /// The `Disk` a host's writers use (the gateway's, or the host's own).
    pub(super) fn disk_of(&mut self, host: usize) -> Result<Arc<Disk>, DiskError> {
        if let Some(d) = match self.scenario.deployment {
            Deployment::Gateway => self.gateway.clone(),
            Deployment::HostSide => self.hosts[host].disk.clone(),
        } {
            return Ok(d);
        }
        let d = self.open_disk(host)?;
        match self.scenario.deployment {
            Deployment::Gateway => self.gateway = Some(Arc::clone(&d)),
            Deployment::HostSide => self.hosts[host].disk = Some(Arc::clone(&d)),
        }
        Ok(d)
    }

    pub(super) fn add_endpoint(&mut self, kind: EpKind) -> usize {
        self.endpoints.push(Endpoint { kind });
        self.endpoints.len() - 1
    }

    /// Host-side with `--fence pr`: fence the storage for `epoch` (sanlock
    /// and none leave the reservations unused).
    pub(super) fn fence_storage(&mut self, host: usize, epoch: u64) -> Result<(), String> {
        if !self.host_side()
            || self.protection != Protection::On
            || self.fence.mode != FenceMode::Pr
        {
            return Ok(());
        }
        let path = self.path_of(host);
        take_over(&*path, epoch)
            .map(|_| ())
            .map_err(|e| format!("storage take-over at epoch {epoch}: {e}"))
    }

    /// Admit a writer at `epoch` on `host` and return its endpoint.
    pub(super) fn disk_endpoint(
        &mut self,
        host: usize,
        epoch: u64,
        label: &str,
    ) -> Result<usize, String> {
        let disk = self.disk_of(host).map_err(|e| e.to_string())?;
        // Each writer reaches the storage through its own tagged path, so
        // the checker knows whose data lands.
        let path = self.path_of(host).tagged(epoch);
        let writer = disk
            .register_on(Some(epoch), label, path)
            .map_err(|e| format!("register {label} at epoch {epoch}: {e}"))?;
        Ok(self.add_endpoint(EpKind::Disk {
            disk,
            writer: Some(writer),
        }))
    }

    /// An unprotected writer on `host`, at the next epoch in the order
    /// the hosts took the disk (what blkshim would have given it).
    pub(super) fn raw_endpoint(&mut self, host: usize) -> usize {
        self.raw_epochs += 1;
        let epoch = self.raw_epochs;
        self.raw_endpoint_at(host, epoch)
    }

    pub(super) fn raw_endpoint_at(&mut self, host: usize, epoch: u64) -> usize {
        let path = self.path_of(host).tagged(epoch);
        self.add_endpoint(EpKind::Raw { path })
    }

    /// Start the VM on X at epoch 1 (and, for stale-promote, give Z the
    /// stale view it will act on later).
    pub(super) fn boot(&mut self) {
        let ep = if self.protected() {
            match self.boot_protected() {
                Ok(ep) => ep,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        } else {
            self.raw_endpoint(HOST_X)
        };
        self.front.endpoint = Some(ep);
        self.guest.running = true;
        self.schedule_tick(0);
        if let Some(a) = self.actions.first() {
            let gap = a.gap;
            self.after(gap, Event::Control(0));
        }
    }

    pub(super) fn boot_protected(&mut self) -> Result<usize, String> {
        let disk = self.disk_of(HOST_X).map_err(|e| e.to_string())?;
        disk.advance_to(1).map_err(|e| e.to_string())?;
        self.fence_storage(HOST_X, 1)?;
        let ep = self.disk_endpoint(HOST_X, 1, "X")?;
        let stale = self
            .actions
            .iter()
            .any(|a| matches!(a.kind, ActionKind::StalePromote { .. }));
        if stale {
            // Z once had the disk at epoch 1 too (its registration and its
            // writer survive in its memory), then went quiet.
            if self.host_side() {
                let zpath = self.path_of(HOST_Z);
                zpath.register(1).map_err(|e| e.to_string())?;
            }
            let zep = self.disk_endpoint(HOST_Z, 1, "Z")?;
            self.stale_ep = Some(zep);
            if self.gated() {
                // Without reservations Z's old writer cannot have outlived
                // its epoch: X could take the disk only after Z handed it
                // over (none) or released its lease (sanlock), and both
                // close Z's writer. Its later writes fail at Z's blkshim;
                // its takeover attempts still run (and must be refused).
                self.close_endpoint(zep);
                self.note(|| {
                    "host 2 (Z) handed the disk over at epoch 1; its writer is closed".into()
                });
            }
        }
        if self.gated() {
            let now = self.now();
            self.holder = Some(self.new_holder(HOST_X, 1, now));
            let mode = self.fence.mode.name();
            self.note(|| format!("fence {mode}: host 0 takes the free disk at epoch 1"));
            if self.fence.mode == FenceMode::Sanlock {
                self.start_lease_ticks();
            }
        }
        Ok(ep)
    }
}
