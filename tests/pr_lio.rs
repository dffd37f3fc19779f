//! seeds/002's SCSI-3 persistent-reservation validation, through blkshim's
//! `PrFencing`, on two paths (two I_T nexuses) to one logical unit.
//!
//! Needs two block devices that are one LU seen through two paths:
//! `BLKSHIM_PR_DEVS=/dev/sda,/dev/sdb`. Without it the test passes with a
//! note (the host has no PR-capable device); `qemu-harness/hostside.sh`
//! runs it in a guest where LIO exports one fileio backstore through two
//! tcm_loop targets. Every step prints
//! `HOSTSIDE-RESULT <step> PASS|FAIL <evidence>`; the test fails if any
//! step failed.
//!
//! Plain PREEMPT only: PREEMPT AND ABORT deadlocks LIO over tcm_loop on
//! Debian's 6.1 kernel (see `src/storage/fencing/pr.rs`).

use blkshim::storage::fencing::{
    encode_key, take_over, FenceError, KeyOwner, PrFencing, PrOptions, PreemptMode,
    ReservationType, StorageFencing, Transport, WriteFailure,
};
use blkshim::storage::AlignedBuf;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

const SECTOR: u64 = 11; // the sector seeds/002 writes
const WE: ReservationType = ReservationType::WriteExclusive;

fn k(epoch: u64) -> u64 {
    encode_key(epoch).unwrap()
}

/// A fence_scsi-style key: 4 hex digits of md5(cluster name), node id 1.
const FOREIGN: u64 = 0xa1b2_0001;

struct Path {
    name: String,
    pr: PrFencing,
    io: File,
}

impl Path {
    fn open(dev: &str) -> Result<Path, String> {
        let opts = PrOptions {
            preempt: PreemptMode::Preempt,
            rtype: WE,
        };
        let pr = PrFencing::open(dev, opts).map_err(|e| format!("{dev}: {e}"))?;
        let io = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .map_err(|e| format!("{dev}: {e}"))?;
        let name = dev.trim_start_matches("/dev/").to_string();
        Ok(Path { name, pr, io })
    }

    /// Write sector 11 filled with `byte` (O_DIRECT, so the storage answers).
    fn write(&self, byte: u8) -> io::Result<()> {
        let buf = AlignedBuf::from_slice(&[byte; 512]);
        self.io.write_all_at(buf.as_slice(), SECTOR * 512)?;
        self.io.sync_data()
    }

    /// The first byte of sector 11, checking the sector is uniform.
    fn read(&self) -> io::Result<u8> {
        let mut buf = AlignedBuf::zeroed(512);
        self.io.read_exact_at(buf.as_mut_slice(), SECTOR * 512)?;
        let s = buf.as_slice();
        if s.iter().any(|&b| b != s[0]) {
            return Err(io::Error::other("sector 11 is not uniform"));
        }
        Ok(s[0])
    }

    fn keys(&self) -> Vec<u64> {
        let mut v = self.pr.read_keys().map(|k| k.keys).unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn resv(&self) -> Option<(u64, Option<ReservationType>)> {
        self.pr
            .read_reservation()
            .ok()
            .flatten()
            .map(|r| (r.key, r.rtype))
    }
}

fn fmt_write(r: &io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{e} ({:?})", WriteFailure::of(e)),
    }
}

fn fenced(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBADE) && WriteFailure::of(e) == WriteFailure::Fenced && !WriteFailure::of(e).may_retry())
}

fn keys_hex(keys: &[u64]) -> String {
    let v: Vec<String> = keys.iter().map(|k| format!("{k:#x}")).collect();
    format!("[{}]", v.join(","))
}

fn short<T: std::fmt::Debug, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => format!("Err({e})"),
    }
}

fn is_conflict<T>(r: &Result<T, FenceError>) -> bool {
    matches!(r, Err(FenceError::Conflict { .. }))
}

struct Steps {
    passed: usize,
    failed: Vec<String>,
}

impl Steps {
    fn step(&mut self, name: &str, ok: bool, evidence: String) {
        let verdict = if ok { "PASS" } else { "FAIL" };
        println!("HOSTSIDE-RESULT {name} {verdict} {evidence}");
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(name.to_string());
        }
    }
}

#[test]
fn seeds_002_on_two_paths() {
    let Ok(devs) = std::env::var("BLKSHIM_PR_DEVS") else {
        eprintln!(
            "pr_lio: BLKSHIM_PR_DEVS unset (two paths to one PR-capable LU); \
             qemu-harness/hostside.sh runs this in a guest with LIO"
        );
        return;
    };
    let devs: Vec<&str> = devs.split(',').collect();
    assert_eq!(devs.len(), 2, "BLKSHIM_PR_DEVS=/dev/sdX,/dev/sdY");
    // libtest has printed "test seeds_002_on_two_paths ... " without a newline.
    println!();
    let mut s = Steps {
        passed: 0,
        failed: Vec::new(),
    };
    let (a, b) = match (Path::open(devs[0]), Path::open(devs[1])) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            s.step("open", false, format!("{:?} {:?}", a.err(), b.err()));
            panic!("cannot open the paths");
        }
    };
    let (an, bn) = (a.name.clone(), b.name.clone());

    s.step(
        "transport",
        a.pr.transport() == Transport::Scsi && b.pr.transport() == Transport::Scsi,
        format!("{an}={:?} {bn}={:?}", a.pr.transport(), b.pr.transport()),
    );

    // Both paths write and read before any reservation.
    let (w1, r1) = (a.write(0x11), b.read().ok());
    let (w2, r2) = (b.write(0x12), a.read().ok());
    s.step(
        "baseline-io",
        w1.is_ok() && r1 == Some(0x11) && w2.is_ok() && r2 == Some(0x12),
        format!(
            "{an} write {} -> {bn} reads {r1:x?}; {bn} write {} -> {an} reads {r2:x?}",
            fmt_write(&w1),
            fmt_write(&w2)
        ),
    );

    // Node 1 (epoch 1) registers and reserves.
    let r = a.pr.register(1);
    let keys = b.keys();
    s.step(
        "register-a",
        r.is_ok() && keys == vec![k(1)],
        format!(
            "register(1) {} keys seen from {bn} {}",
            short(&r),
            keys_hex(&keys)
        ),
    );
    let r = a.pr.preempt_and_abort(1);
    let resv = b.resv();
    s.step(
        "reserve-a",
        matches!(&r, Ok(p) if p.keys.is_empty()) && resv == Some((k(1), Some(WE))),
        format!(
            "take reservation at epoch 1 {} reservation seen from {bn} {resv:x?}",
            short(&r)
        ),
    );
    let (ra, rb) = (a.pr.reservation(), b.pr.reservation());
    let gen = b.pr.read_reservation_full().map(|r| r.generation);
    s.step(
        "read-pr",
        ra == Some(1) && rb == Some(1),
        format!("holder epoch via {an} {ra:?} via {bn} {rb:?}, generation {gen:?}"),
    );

    // Node 2, unregistered, cannot preempt.
    let r = b.pr.preempt_key(k(2), k(1), WE, false);
    s.step(
        "unregistered-preempt-refused",
        is_conflict(&r) && b.resv() == Some((k(1), Some(WE))),
        format!(
            "{bn} preempt(own={:#x}, victim={:#x}) {}",
            k(2),
            k(1),
            short(&r)
        ),
    );

    // Node 2 registers; its reserve is refused; its write is fenced.
    let r = b.pr.register(2);
    let keys = a.keys();
    s.step(
        "register-b",
        r.is_ok() && keys == vec![k(1), k(2)],
        format!("{bn} register(2) {} keys {}", short(&r), keys_hex(&keys)),
    );
    let r = b.pr.reserve_key(k(2), WE);
    s.step(
        "reserve-b-refused",
        is_conflict(&r) && a.resv() == Some((k(1), Some(WE))),
        format!("{bn} reserve({:#x}) {}", k(2), short(&r)),
    );
    let w = b.write(0xb0);
    s.step(
        "nonholder-write-ebade",
        fenced(&w),
        format!("{bn} (registered, not holder) write: {}", fmt_write(&w)),
    );
    let w = a.write(0xa1);
    let (ra, rb) = (a.read().ok(), b.read().ok());
    s.step(
        "holder-write",
        w.is_ok() && ra == Some(0xa1) && rb == Some(0xa1),
        format!(
            "{an} write {} -> reads {an} {ra:x?} {bn} {rb:x?}",
            fmt_write(&w)
        ),
    );
    let r = b.pr.unregister(2);
    let keys = a.keys();
    s.step(
        "unregister-b",
        r.is_ok() && keys == vec![k(1)],
        format!("{bn} unregister(2) {} keys {}", short(&r), keys_hex(&keys)),
    );

    // Defend: a stale writer at epoch 0 (registered behind blkshim's back,
    // as a stale node would) cannot take the reservation, and the holder
    // scrubs its registration.
    let raw = b.pr.register_key(0, k(0), false);
    let r = b.pr.preempt_and_abort(0);
    let t = take_over(&b.pr, 0);
    let refused = matches!(r, Err(FenceError::HeldByNewer { key: 0, holder: 1 }))
        && matches!(t, Err(FenceError::HeldByNewer { key: 0, holder: 1 }));
    let d = a.pr.preempt_and_abort(1);
    let keys = b.keys();
    s.step(
        "defend",
        raw.is_ok()
            && refused
            && matches!(&d, Ok(p) if p.keys == vec![0])
            && keys == vec![k(1)]
            && b.resv() == Some((k(1), Some(WE))),
        format!(
            "stale {bn} raw register(epoch 0) {}; its take-over {} / {}; holder {an} defends {} -> keys {}",
            short(&raw),
            short(&r),
            short(&t),
            short(&d),
            keys_hex(&keys)
        ),
    );

    // Node 2 takes over at epoch 2 with PREEMPT.
    let r = take_over(&b.pr, 2);
    let (resv, keys) = (a.resv(), a.keys());
    s.step(
        "preempt-newer",
        matches!(&r, Ok(p) if p.keys == vec![1])
            && resv == Some((k(2), Some(WE)))
            && keys == vec![k(2)],
        format!(
            "take_over({bn}, 2) {} reservation {resv:x?} keys {}",
            short(&r),
            keys_hex(&keys)
        ),
    );

    // The old holder is fenced: its write fails EBADE and never lands.
    let w = a.write(0xa2);
    s.step(
        "old-holder-write-ebade",
        fenced(&w),
        format!("{an} (preempted) write: {}", fmt_write(&w)),
    );
    let rb = b.read().ok();
    let wb = b.write(0xb2);
    let ra = a.read().ok();
    s.step(
        "data-check",
        rb == Some(0xa1) && wb.is_ok() && ra == Some(0xb2),
        format!(
            "{bn} reads {rb:x?} (0xa1, not the fenced 0xa2); {bn} write {} -> {an} reads {ra:x?}",
            fmt_write(&wb)
        ),
    );

    // ... and cannot come back with its stale key.
    let rr = a.pr.register_key(k(1), k(1), false);
    let rs = a.pr.reserve_key(k(1), WE);
    let rp = a.pr.preempt_key(k(1), k(2), WE, false);
    let br = a.pr.register(1);
    let bt = take_over(&a.pr, 1);
    s.step(
        "old-holder-reregister-refused",
        is_conflict(&rr)
            && is_conflict(&rs)
            && is_conflict(&rp)
            && matches!(br, Err(FenceError::HeldByNewer { key: 1, holder: 2 }))
            && matches!(bt, Err(FenceError::HeldByNewer { key: 1, holder: 2 }))
            && b.resv() == Some((k(2), Some(WE))),
        format!(
            "{an} stale-key register {} reserve {} preempt {}; blkshim register(1) {} take_over(1) {}",
            short(&rr),
            short(&rs),
            short(&rp),
            short(&br),
            short(&bt)
        ),
    );

    // Release, clear: access restored.
    let r = b.pr.release(2);
    let (resv, keys) = (a.resv(), a.keys());
    let w = a.write(0xa3);
    s.step(
        "release",
        r.is_ok() && resv.is_none() && keys == vec![k(2)] && w.is_ok(),
        format!(
            "{bn} release(2) {} reservation {resv:x?} keys {} {an} write {}",
            short(&r),
            keys_hex(&keys),
            fmt_write(&w)
        ),
    );
    let r = b.pr.clear(2);
    let (resv, keys) = (a.resv(), a.keys());
    s.step(
        "clear",
        r.is_ok() && resv.is_none() && keys.is_empty(),
        format!(
            "{bn} clear(2) {} reservation {resv:x?} keys {}",
            short(&r),
            keys_hex(&keys)
        ),
    );
    let (w1, r1) = (a.write(0xa4), b.read().ok());
    let (w2, r2) = (b.write(0xb4), a.read().ok());
    s.step(
        "access-restored",
        w1.is_ok() && r1 == Some(0xa4) && w2.is_ok() && r2 == Some(0xb4),
        format!(
            "{an} write {} -> {bn} reads {r1:x?}; {bn} write {} -> {an} reads {r2:x?}",
            fmt_write(&w1),
            fmt_write(&w2)
        ),
    );

    // Another cluster manager's key (fence_scsi-style) is never preempted.
    let rf = a.pr.register_key(0, FOREIGN, false);
    let t = take_over(&b.pr, 3);
    let keys = b.keys();
    let w = a.write(0xa5);
    s.step(
        "foreign-key-untouched",
        rf.is_ok()
            && matches!(&t, Ok(p) if p.keys.is_empty())
            && keys == vec![FOREIGN, k(3)]
            && b.pr.reservation() == Some(3)
            && fenced(&w),
        format!(
            "{an} registers {FOREIGN:#x} {}; take_over({bn}, 3) {} keys {} ({:?}); {an} write {}",
            short(&rf),
            short(&t),
            keys_hex(&keys),
            keys.iter().map(|&k| KeyOwner::of(k)).collect::<Vec<_>>(),
            fmt_write(&w)
        ),
    );
    let c = b.pr.clear(3);
    // A foreign exclusive reservation is refused; a registrants-only one is
    // shared (blkshim's path is a registrant and may write).
    let r1 = a.pr.register_key(0, FOREIGN, false);
    let r2 = a.pr.reserve_key(FOREIGN, WE);
    let t_we = take_over(&b.pr, 4);
    let resv_we = b.resv();
    let rel = a.pr.release_key(FOREIGN, WE);
    let r3 =
        a.pr.reserve_key(FOREIGN, ReservationType::WriteExclusiveRegistrantsOnly);
    let t_ro = take_over(&b.pr, 4);
    let resv_ro = b.resv();
    let wb = b.write(0xb5);
    s.step(
        "foreign-reservation",
        c.is_ok()
            && r1.is_ok()
            && r2.is_ok()
            && matches!(t_we, Err(FenceError::Foreign { key: FOREIGN }))
            && resv_we == Some((FOREIGN, Some(WE)))
            && rel.is_ok()
            && r3.is_ok()
            && t_ro.is_ok()
            && resv_ro
                == Some((
                    FOREIGN,
                    Some(ReservationType::WriteExclusiveRegistrantsOnly)
                ))
            && wb.is_ok(),
        format!(
            "foreign WE held: take_over({bn}, 4) {} reservation {resv_we:x?}; foreign WE_RO held: take_over {} reservation {resv_ro:x?} {bn} write {}",
            short(&t_we),
            short(&t_ro),
            fmt_write(&wb)
        ),
    );
    let c = a.pr.clear_key(FOREIGN);
    let (resv, keys) = (b.resv(), b.keys());
    s.step(
        "cleanup",
        c.is_ok() && resv.is_none() && keys.is_empty(),
        format!(
            "clear {} reservation {resv:x?} keys {}",
            short(&c),
            keys_hex(&keys)
        ),
    );

    println!(
        "pr_lio: {} passed, {} failed {:?}",
        s.passed,
        s.failed.len(),
        s.failed
    );
    assert!(s.failed.is_empty(), "failed steps: {:?}", s.failed);
}
