//! Shared by the tests/xen_backend_*.rs tests: a "host" (its own XenStore,
//! grant/event emulation and blkshim back end), the toolstack's steps, and a
//! verifying guest workload.
#![allow(dead_code)]

use blkshim::epoch::EpochStore;
use blkshim::handoff::{DiskRegistry, HandoffLedger};
use blkshim::sim::rng::SimRng;
use blkshim::storage::BlockStorage;
use blkshim::xen::backend::{self, BackendConfig, DiskOpener, OpenedDisk, Phase, VbdHandle};
use blkshim::xen::blkif::Status;
use blkshim::xen::frontend_emu::{Bio, BioOp, EmulatedFrontend};
use blkshim::xen::platform::EmulatedPlatform;
use blkshim::xen::xenstore::{EmulatedXenStore, XenStore, XBT_NULL};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DOMID: u16 = 7;
pub const FE: &str = "/local/domain/7/device/vbd/51712";
pub const BE: &str = "/local/domain/0/backend/vbd/7/51712";

/// One Xen host: XenStore, grant/event emulation, a back end for the vbd,
/// and that back end's own disk registry and ledger instance, as a
/// separate `blkshim xen-backend` process on another host would have.
pub struct Host {
    pub xs: EmulatedXenStore,
    pub platform: Arc<EmulatedPlatform>,
    pub vbd: Option<VbdHandle>,
    pub registry: Arc<DiskRegistry>,
    ledgers: HashMap<std::path::PathBuf, Arc<HandoffLedger>>,
}

/// The backend/vbd root `xen-backend` watches.
pub const VBD_ROOT: &str = "/local/domain/0/backend/vbd";

/// A `xen-backend` supervisor over a fresh emulated XenStore and platform
/// (returned, to play the toolstack and a frontend with), opening every vbd
/// as `opener`.
pub fn supervisor(
    opener: DiskOpener,
    config: BackendConfig,
) -> (
    EmulatedXenStore,
    Arc<EmulatedPlatform>,
    blkshim::xen::daemon::Supervisor<
        EmulatedXenStore,
        impl Fn() -> std::io::Result<EmulatedXenStore>,
    >,
) {
    let store = EmulatedXenStore::new();
    let platform = EmulatedPlatform::new();
    let s2 = store.connect();
    let sup = blkshim::xen::daemon::Supervisor::new(
        move || Ok(s2.connect()),
        VBD_ROOT,
        platform.clone() as Arc<dyn blkshim::xen::platform::Platform>,
        opener,
        config,
    )
    .expect("supervisor");
    (store, platform, sup)
}

pub fn opener(
    name: &str,
    storage: Arc<dyn BlockStorage>,
    epochs: Arc<dyn EpochStore>,
) -> DiskOpener {
    let name = name.to_string();
    Arc::new(move |_params: &str| {
        Ok(OpenedDisk {
            name: name.clone(),
            storage: Arc::clone(&storage),
            epochs: Arc::clone(&epochs),
        })
    })
}

impl Host {
    pub fn new() -> Host {
        Host {
            xs: EmulatedXenStore::new(),
            platform: EmulatedPlatform::new(),
            vbd: None,
            registry: DiskRegistry::new(),
            ledgers: HashMap::new(),
        }
    }

    /// The toolstack creates the vbd (back-end and front-end nodes) and the
    /// back end starts on it. `resume`: the `blkshim-resume` node, if any.
    pub fn create_vbd(&mut self, opener: DiskOpener, config: BackendConfig, resume: Option<&str>) {
        let h = self.spawn_vbd(BE, FE, opener, config, resume);
        self.vbd = Some(h);
    }

    /// [`Host::create_vbd`] at other paths (another domain of the same
    /// guest: a restore or migration on this host), returning the handle.
    /// The guest's grants stay those of `DOMID`.
    pub fn spawn_vbd(
        &mut self,
        be: &str,
        fe: &str,
        opener: DiskOpener,
        mut config: BackendConfig,
        resume: Option<&str>,
    ) -> VbdHandle {
        config.registry = Arc::clone(&self.registry);
        if let Some(l) = config.ledger.take() {
            let mine = self
                .ledgers
                .entry(l.dir().to_path_buf())
                .or_insert_with(|| Arc::new(HandoffLedger::open(l.dir()).unwrap()));
            config.ledger = Some(Arc::clone(mine));
        }
        let w = |p: &str, v: &str| self.xs.write_str(XBT_NULL, p, v).unwrap();
        w(&format!("{be}/params"), "aio:/shared/vm1.img");
        w(&format!("{be}/mode"), "w");
        w(&format!("{be}/frontend"), fe);
        w(&format!("{be}/frontend-id"), &DOMID.to_string());
        w(&format!("{be}/state"), "1");
        if let Some(r) = resume {
            w(&format!("{be}/blkshim-resume"), r);
        }
        w(&format!("{fe}/backend"), be);
        w(&format!("{fe}/backend-id"), "0");
        w(&format!("{fe}/state"), "1");
        backend::spawn(self.xs.connect(), self.platform.clone(), be, opener, config).unwrap()
    }

    /// What libxl does to a domain's vbd at `xl save`, `xl destroy` and the
    /// end of `xl migrate`, in the order real Xen showed
    /// (qemu-harness/xen-README.md): remove the frontend directory, write
    /// the back end's `state` = 5 and `online` = 0, wait up to 10 s for
    /// `state` = 6, then remove the back-end directory. Returns how long the
    /// back end took to answer Closed (`None`: libxl's 10 s ran out) and
    /// the back end's handle, left to finish on its own.
    pub fn libxl_destroy(&mut self) -> (Option<Duration>, Option<VbdHandle>) {
        self.xs.rm(XBT_NULL, "/local/domain/7").unwrap();
        self.xs
            .write_str(XBT_NULL, &format!("{BE}/state"), "5")
            .unwrap();
        self.xs
            .write_str(XBT_NULL, &format!("{BE}/online"), "0")
            .unwrap();
        let t = Instant::now();
        let mut closed = None;
        while t.elapsed() < Duration::from_secs(10) {
            if self
                .xs
                .read_optional(XBT_NULL, &format!("{BE}/state"))
                .unwrap()
                .as_deref()
                == Some("6")
            {
                closed = Some(t.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.xs.rm(XBT_NULL, BE).unwrap();
        (closed, self.vbd.take())
    }

    /// The toolstack destroys the source domain (`xl destroy`, or the end
    /// of `xl save`) without asking anything of the back end: its nodes go,
    /// and its back end is left to finish on its own, as the supervisor
    /// leaves it.
    pub fn remove_vbd_nodes(&mut self) -> Option<VbdHandle> {
        self.xs.rm(XBT_NULL, BE).unwrap();
        self.xs.rm(XBT_NULL, "/local/domain/7").unwrap();
        self.vbd.take()
    }

    pub fn vbd(&self) -> &VbdHandle {
        self.vbd.as_ref().unwrap()
    }

    /// The toolstack asks the back end to suspend, waits for the record.
    pub fn suspend(&self, mode: &str) -> String {
        self.xs
            .write_str(XBT_NULL, &format!("{BE}/blkshim-suspend"), mode)
            .unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self
                .xs
                .read_optional(XBT_NULL, &format!("{BE}/blkshim-handoff"))
                .unwrap()
            {
                return r;
            }
            assert!(
                Instant::now() < end,
                "no hand-off record: {:?}",
                self.vbd().status()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The toolstack destroys the (suspended) source domain's devices.
    pub fn destroy_vbd(&mut self) {
        self.xs.rm(XBT_NULL, "/local/domain/0/backend").unwrap();
        self.xs.rm(XBT_NULL, "/local/domain/7").unwrap();
        if let Some(mut h) = self.vbd.take() {
            h.stop();
        }
    }
}

/// 4 KiB blocks the workload writes, each stamped with (block, version).
pub const BLOCK_SECTORS: u64 = 8;

pub fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut d = vec![0u8; (BLOCK_SECTORS * 512) as usize];
    for (i, c) in d.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..16].copy_from_slice(&(version ^ (i as u64).rotate_left(40)).to_le_bytes());
    }
    d
}

/// The version a block holds, if the data is a stamp of that block.
pub fn version_of(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let v = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (block_data(block, v) == data).then_some(v)
}

/// A guest that writes versions of blocks, never two writes to one block at
/// once, and remembers the last version it was told completed.
pub struct Workload {
    pub blocks: u64,
    pub acked: HashMap<u64, u64>,
    in_flight: HashMap<u64, (u64, u64, u64)>, // tag -> (first block, span, version)
    busy: HashMap<u64, u64>,                  // block -> tag
    next_tag: u64,
    next_version: u64,
    rng: SimRng,
    pub failures: u64,
    pub completed: u64,
    /// Reads (of a block with no write in flight) that did not return the
    /// last acknowledged version.
    pub read_mismatches: u64,
    pub reads: u64,
    reading: HashMap<u64, (u64, u64)>, // tag -> (block, expected version)
}

impl Workload {
    pub fn new(blocks: u64, seed: u64) -> Workload {
        Workload {
            blocks,
            acked: HashMap::new(),
            in_flight: HashMap::new(),
            busy: HashMap::new(),
            next_tag: 1,
            next_version: 1,
            rng: SimRng::new(seed),
            failures: 0,
            completed: 0,
            read_mismatches: 0,
            reads: 0,
            reading: HashMap::new(),
        }
    }

    /// Issues writes until `depth` are in flight. Some are multi-block
    /// writes (so the frontend sends multi-segment / indirect requests), a
    /// few are FUA.
    pub fn fill(&mut self, fe: &mut EmulatedFrontend, depth: usize) {
        let mut tries = 0;
        while self.in_flight.len() + self.reading.len() < depth && tries < 4 * depth {
            tries += 1;
            if self.rng.below(4) == 0 {
                // A verifying read of one idle block.
                let b = self.rng.below(self.blocks);
                if self.busy.contains_key(&b) {
                    continue;
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                self.busy.insert(b, tag);
                let want = self.acked.get(&b).copied().unwrap_or(0);
                self.reading.insert(tag, (b, want));
                fe.submit(Bio {
                    tag,
                    op: BioOp::Read,
                    sector: b * BLOCK_SECTORS,
                    nr_sectors: BLOCK_SECTORS,
                    data: Vec::new(),
                })
                .unwrap();
                continue;
            }
            // Mostly small writes; some of 12 blocks (96 sectors: more
            // segments than a direct request holds, so indirect when offered).
            let span = if self.rng.below(8) == 0 {
                12.min(self.blocks)
            } else {
                1 + self.rng.below(3)
            };
            let first = self.rng.below(self.blocks - span + 1);
            if (first..first + span).any(|b| self.busy.contains_key(&b)) {
                continue;
            }
            let tag = self.next_tag;
            self.next_tag += 1;
            let version = self.next_version;
            self.next_version += 1;
            let mut data = Vec::new();
            for b in first..first + span {
                data.extend(block_data(b, version));
                self.busy.insert(b, tag);
            }
            let fua = self.rng.below(16) == 0;
            self.in_flight.insert(tag, (first, span, version));
            fe.submit(Bio {
                tag,
                op: if fua { BioOp::WriteFua } else { BioOp::Write },
                sector: first * BLOCK_SECTORS,
                nr_sectors: span * BLOCK_SECTORS,
                data,
            })
            .unwrap();
        }
    }

    /// Takes completions; returns how many.
    pub fn reap(&mut self, fe: &mut EmulatedFrontend) -> usize {
        let done = fe.poll().unwrap();
        for c in &done {
            if let Some((b, want)) = self.reading.remove(&c.tag) {
                self.busy.remove(&b);
                self.reads += 1;
                if c.status != Status::Okay {
                    self.failures += 1;
                } else if version_of(b, &c.data) != Some(want) {
                    self.read_mismatches += 1;
                }
                continue;
            }
            let Some((first, span, version)) = self.in_flight.remove(&c.tag) else {
                continue;
            };
            for b in first..first + span {
                self.busy.remove(&b);
                if c.status == Status::Okay {
                    self.acked.insert(b, version);
                }
            }
            if c.status == Status::Okay {
                self.completed += 1;
            } else {
                self.failures += 1;
            }
        }
        done.len()
    }

    /// Runs for `n` completions at `depth`.
    pub fn run(&mut self, fe: &mut EmulatedFrontend, depth: usize, n: u64) {
        let target = self.completed + self.failures + n;
        let end = Instant::now() + Duration::from_secs(20);
        while self.completed + self.failures < target {
            self.fill(fe, depth);
            if self.reap(fe) == 0 {
                fe.wait(Duration::from_millis(5)).unwrap();
            }
            assert!(Instant::now() < end, "workload stalled");
        }
    }

    /// Waits for everything in flight.
    pub fn drain(&mut self, fe: &mut EmulatedFrontend) {
        let end = Instant::now() + Duration::from_secs(20);
        while !self.in_flight.is_empty() || !self.reading.is_empty() {
            if self.reap(fe) == 0 {
                fe.wait(Duration::from_millis(5)).unwrap();
            }
            assert!(
                Instant::now() < end,
                "drain stalled: {} left",
                self.in_flight.len()
            );
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Blocks whose content is not the last acknowledged version.
    pub fn stale_blocks(&self, read: impl Fn(u64) -> Vec<u8>) -> Vec<(u64, u64, Option<u64>)> {
        let mut bad = Vec::new();
        for b in 0..self.blocks {
            let want = self.acked.get(&b).copied().unwrap_or(0);
            let got = version_of(b, &read(b));
            // A block may hold a newer, not yet acknowledged version only if
            // a write to it is still in flight.
            let in_flight = self.busy.contains_key(&b);
            if got != Some(want) && !in_flight {
                bad.push((b, want, got));
            }
        }
        bad
    }
}

pub fn wait_phase(h: &VbdHandle, p: Phase) {
    assert!(
        h.wait_phase(p, Duration::from_secs(10)),
        "phase {p:?} not reached: {:?}",
        h.status()
    );
}
