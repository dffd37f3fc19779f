//! [`SanlockFence`] over the sanlock daemon (feature `sanlock`).

use super::ffi::{self, SanlkDisk, SanlkLockspace, SanlkResource1};
use super::inquire::{parse_state, HeldResource};
use super::options::SanlockOptions;
use super::plan::{fill_field, plan_acquire, resource_name, LverPlan, SanlockRv};
use crate::storage::fencing::writer::{FenceMode, WriterFence};
use crate::storage::fencing::FenceError;
use crate::tracking::Epoch;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_int};
use std::time::Instant;

fn config(m: String) -> FenceError {
    FenceError::Config(m)
}

fn sanlock_err(op: &'static str, rv: c_int) -> FenceError {
    FenceError::Sanlock { op, rv }
}

/// What a registered connection holds. The mutex around it serializes
/// every call on the registered socket, as libsanlock requires.
struct Held {
    sock: OwnedFd,
    /// Disk → the epoch this process acquired its lease at (= its lver).
    disks: HashMap<String, Epoch>,
}

/// sanlock paxos leases as a [`WriterFence`]: see the module doc of
/// [`super`] for the protocol, lver = epoch, and the timings.
pub struct SanlockFence {
    opts: SanlockOptions,
    held: Mutex<Held>,
}

impl std::fmt::Debug for SanlockFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SanlockFence(lockspace {:?}, host id {}, {})",
            self.opts.lockspace,
            self.opts.host_id,
            self.opts.path.display()
        )
    }
}

impl SanlockFence {
    /// Join the lockspace (blocks until this host owns its host id: a few
    /// renewal intervals, longer if the slot's previous owner must time out
    /// first) and register this process with the daemon. From then on,
    /// if this host cannot renew its lockspace, the daemon SIGKILLs this
    /// process (it registered with `SANLK_RESTRICT_SIGTERM`) before any
    /// other host may take its leases; if that fails, the watchdog resets
    /// the host.
    pub fn open(opts: SanlockOptions) -> Result<SanlockFence, FenceError> {
        opts.validate()?;
        let mut ls = lockspace(&opts)?;
        // SAFETY: `ls` is a fully initialised sanlk_lockspace that outlives
        // the call; the library only reads it.
        let rv = unsafe { ffi::sanlock_add_lockspace_timeout(&mut ls, 0, opts.io_timeout) };
        if rv < 0 && rv != -libc::EEXIST {
            return Err(sanlock_err("add_lockspace", rv));
        }
        // SAFETY: no arguments; returns a new socket fd or -errno.
        let fd = unsafe { ffi::sanlock_register() };
        if fd < 0 {
            return Err(sanlock_err("register", fd));
        }
        // SAFETY: `fd` was just returned by sanlock_register and nothing
        // else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // A child must not inherit the registration: the daemon considers
        // this client alive (its leases held) until every copy of the
        // socket is closed.
        // SAFETY: fcntl on an fd this function owns.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(FenceError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: a registered socket fd and a flags word.
        let rv = unsafe { ffi::sanlock_restrict(fd, ffi::SANLK_RESTRICT_SIGTERM) };
        if rv < 0 {
            return Err(sanlock_err("restrict", rv));
        }
        log::info!(
            "sanlock: joined lockspace {:?} as host {} on {} (io_timeout {}: host_dead {} s)",
            opts.lockspace,
            opts.host_id,
            opts.path.display(),
            opts.timings().io_timeout,
            opts.timings().host_dead
        );
        Ok(SanlockFence {
            opts,
            held: Mutex::new(Held {
                sock,
                disks: HashMap::new(),
            }),
        })
    }

    /// Provisioning, once, from one host: write the lockspace and a fresh
    /// lease (lver 0) for every configured disk. Destroys whatever leases
    /// were there: never run it while any host uses them. Needs a running
    /// daemon (it does the I/O) but not a joined lockspace.
    pub fn init_lease_area(opts: &SanlockOptions) -> Result<(), FenceError> {
        opts.validate()?;
        let mut ls = lockspace(opts)?;
        // SAFETY: `ls` is initialised and outlives the call; max_hosts 0 is
        // sanlock's default (derived from the alignment).
        let rv = unsafe { ffi::sanlock_write_lockspace(&mut ls, 0, 0, opts.io_timeout) };
        if rv < 0 {
            return Err(sanlock_err("write_lockspace", rv));
        }
        for disk in opts.resources.keys() {
            let mut res = resource(opts, disk)?;
            // SAFETY: `res` is one sanlk_resource with num_disks = 1 and
            // its one disk right behind it, as the C flexible array wants.
            let rv = unsafe { ffi::sanlock_write_resource(&mut res, 0, 0, 0) };
            if rv < 0 {
                return Err(sanlock_err("write_resource", rv));
            }
        }
        Ok(())
    }

    /// The lver of `disk`'s lease as on the storage now (the epoch of the
    /// last writer that acquired it; 0 for a fresh lease).
    pub fn read_lver(opts: &SanlockOptions, disk: &str) -> Result<u64, FenceError> {
        let mut res = resource(opts, disk)?;
        // SAFETY: as in init_lease_area; the daemon writes the struct back
        // (its disks untouched).
        let rv = unsafe { ffi::sanlock_read_resource(&mut res, 0) };
        if rv < 0 {
            return Err(sanlock_err("read_resource", rv));
        }
        Ok(res.lver)
    }

    pub fn options(&self) -> &SanlockOptions {
        &self.opts
    }

    /// The leases this process holds, as the daemon reports them.
    pub fn inquire(&self) -> Result<Vec<HeldResource>, FenceError> {
        let held = self.held.lock();
        inquire(held.sock.as_raw_fd())
    }

    /// One acquisition of `disk`'s lease expecting it at `lver` (so it
    /// ends at lver + 1).
    fn acquire_at(
        &self,
        sock: c_int,
        disk: &str,
        lver: u64,
        epoch: Epoch,
    ) -> Result<(), FenceError> {
        let mut res = resource(&self.opts, disk)?;
        res.flags |= ffi::SANLK_RES_LVER;
        res.lver = lver;
        let mut list = [&mut res as *mut SanlkResource1];
        // SAFETY: `list` points at one valid resource (with its disk) that
        // outlives the call; no options. Blocks while the owner's host
        // times out.
        let rv = unsafe {
            ffi::sanlock_acquire(sock, -1, 0, 1, list.as_mut_ptr(), std::ptr::null_mut())
        };
        if rv >= 0 {
            return Ok(());
        }
        let r = SanlockRv(rv);
        if r.is_held_by_live_host() {
            return Err(FenceError::LeaseBusy {
                resource: resource_name(disk),
                rv,
            });
        }
        if r.is_lver_mismatch() {
            // Someone acquired it since we read it: say who is newer if so.
            let now = SanlockFence::read_lver(&self.opts, disk)?;
            if now >= epoch {
                return Err(FenceError::HeldByNewer {
                    key: epoch,
                    holder: now,
                });
            }
            log::warn!("disk {disk:?}: lease moved from lver {lver} to {now} during acquire");
        }
        Err(sanlock_err("acquire", rv))
    }

    fn release_one(&self, sock: c_int, disk: &str) -> Result<(), FenceError> {
        let mut res = resource(&self.opts, disk)?;
        let mut list = [&mut res as *mut SanlkResource1];
        // SAFETY: as in acquire_at.
        let rv = unsafe { ffi::sanlock_release(sock, -1, 0, 1, list.as_mut_ptr()) };
        if rv < 0 {
            return Err(sanlock_err("release", rv));
        }
        Ok(())
    }
}

fn disk_field(path: &std::path::Path, offset: u64) -> Result<SanlkDisk, FenceError> {
    let mut d = SanlkDisk::zeroed();
    fill_field(&mut d.path, &path.to_string_lossy(), true).map_err(config)?;
    d.offset = offset;
    Ok(d)
}

fn lockspace(opts: &SanlockOptions) -> Result<SanlkLockspace, FenceError> {
    let mut ls = SanlkLockspace {
        name: [0; ffi::SANLK_NAME_LEN],
        host_id: opts.host_id,
        flags: ffi::SANLK_LSF_ALIGN1M | ffi::SANLK_LSF_SECTOR512,
        host_id_disk: disk_field(&opts.path, opts.lockspace_offset)?,
    };
    fill_field(&mut ls.name, &opts.lockspace, false).map_err(config)?;
    Ok(ls)
}

fn resource(opts: &SanlockOptions, disk: &str) -> Result<SanlkResource1, FenceError> {
    let mut res = SanlkResource1 {
        lockspace_name: [0; ffi::SANLK_NAME_LEN],
        name: [0; ffi::SANLK_NAME_LEN],
        lver: 0,
        data64: 0,
        data32: 0,
        unused: 0,
        flags: ffi::SANLK_RES_ALIGN1M | ffi::SANLK_RES_SECTOR512,
        num_disks: 1,
        disks: [disk_field(&opts.path, opts.resource_offset(disk)?)?],
    };
    fill_field(&mut res.lockspace_name, &opts.lockspace, false).map_err(config)?;
    fill_field(&mut res.name, &resource_name(disk), false).map_err(config)?;
    Ok(res)
}

fn inquire(sock: c_int) -> Result<Vec<HeldResource>, FenceError> {
    let mut count: c_int = 0;
    let mut state: *mut c_char = std::ptr::null_mut();
    // SAFETY: out-pointers to locals; on success `state` is NULL or a
    // malloc'd NUL-terminated string this function frees.
    let rv = unsafe { ffi::sanlock_inquire(sock, -1, 0, &mut count, &mut state) };
    if rv < 0 {
        return Err(sanlock_err("inquire", rv));
    }
    if state.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: non-NULL `state` is a NUL-terminated C string from the
    // library; copied out before it is freed, and freed exactly once.
    let text = unsafe {
        let s = std::ffi::CStr::from_ptr(state)
            .to_string_lossy()
            .into_owned();
        libc::free(state.cast());
        s
    };
    let all = parse_state(&text)
        .map_err(|e| FenceError::BadResponse(format!("sanlock inquire state {text:?}: {e}")))?;
    if usize::try_from(count).ok() != Some(all.len()) {
        return Err(FenceError::BadResponse(format!(
            "sanlock inquire said {count} resources but sent {}",
            all.len()
        )));
    }
    Ok(all)
}

impl WriterFence for SanlockFence {
    fn mode(&self) -> FenceMode {
        FenceMode::Sanlock
    }

    /// Compare-and-advance the disk's lease to lver = `epoch` (see
    /// [`plan_acquire`]). Fails at once when a live host holds it
    /// ([`FenceError::LeaseBusy`]) or a writer at `epoch` or newer took it
    /// ([`FenceError::HeldByNewer`]); blocks while the holder's host times
    /// out (host_dead_seconds after its last renewal), holding the
    /// registered socket (so other disks' acquisitions wait too).
    fn acquire(&self, disk: &str, epoch: Epoch) -> Result<(), FenceError> {
        let mut held = self.held.lock();
        let sock = held.sock.as_raw_fd();
        match held.disks.get(disk).copied() {
            Some(e) if e == epoch => return Ok(()),
            Some(e) if e > epoch => {
                return Err(FenceError::HeldByNewer {
                    key: epoch,
                    holder: e,
                })
            }
            Some(_) => {
                self.release_one(sock, disk)?;
                held.disks.remove(disk);
            }
            None => {}
        }
        let lver = SanlockFence::read_lver(&self.opts, disk)?;
        let (mut cur, catch_up) = match plan_acquire(lver, epoch, self.opts.max_catch_up) {
            LverPlan::Acquire { lver, catch_up } => (lver, catch_up),
            LverPlan::Stale { lver } => {
                return Err(FenceError::HeldByNewer {
                    key: epoch,
                    holder: lver,
                })
            }
            LverPlan::TooFarBehind { lver, gap } => {
                return Err(config(format!(
                    "disk {disk:?}: the lease is at lver {lver}, {gap} versions behind epoch \
                     {epoch} (more than --sanlock-max-catch-up {}): lease area and epoch \
                     store disagree",
                    self.opts.max_catch_up
                )))
            }
            LverPlan::ZeroEpoch => return Err(config("epoch 0 cannot take a lease".into())),
        };
        let start = Instant::now();
        for _ in 0..catch_up {
            self.acquire_at(sock, disk, cur, epoch)?;
            self.release_one(sock, disk)?;
            cur += 1;
        }
        self.acquire_at(sock, disk, cur, epoch)?;
        // Trust, but verify: the daemon's view must be lver = epoch.
        let name = resource_name(disk);
        let mine = inquire(sock).and_then(|all| {
            all.into_iter()
                .find(|r| r.name == name && r.lockspace == self.opts.lockspace)
                .ok_or_else(|| {
                    FenceError::BadResponse(format!("acquired {name:?} but inquire omits it"))
                })
        });
        match mine {
            Ok(r) if r.lver == epoch => {}
            other => {
                let _ = self.release_one(sock, disk);
                return match other {
                    Ok(r) => Err(FenceError::BadResponse(format!(
                        "disk {disk:?}: acquired at lver {} but the epoch is {epoch}",
                        r.lver
                    ))),
                    Err(e) => Err(e),
                };
            }
        }
        held.disks.insert(disk.to_string(), epoch);
        log::info!(
            "disk {disk:?}: sanlock lease {name:?} acquired at lver {epoch} (from {lver}, {catch_up} catch-up step(s)) in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Release the lease if this process holds it at `epoch`; a lease held
    /// at another epoch, or not held, is left as it is.
    fn release(&self, disk: &str, epoch: Epoch) -> Result<(), FenceError> {
        let mut held = self.held.lock();
        if held.disks.get(disk) != Some(&epoch) {
            return Ok(());
        }
        let sock = held.sock.as_raw_fd();
        self.release_one(sock, disk)?;
        held.disks.remove(disk);
        log::info!("disk {disk:?}: sanlock lease released at epoch {epoch}");
        Ok(())
    }
}
