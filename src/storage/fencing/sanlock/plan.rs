//! The pure parts of the sanlock fence: lease names, where leases live,
//! what an acquisition at an epoch must do with the lease's `lver`, the
//! timings an `io_timeout` implies, and the names of sanlock's error codes.
//! No FFI here: all of it compiles (and is tested) without libsanlock.

use crate::tracking::Epoch;
use std::fmt;
use std::time::Duration;

/// sanlock's `SANLK_NAME_LEN`: lockspace and resource names are at most 48
/// bytes (no terminating NUL needed at full length).
pub const NAME_LEN: usize = 48;

/// sanlock's `SANLK_PATH_LEN` (including the terminating NUL).
pub const PATH_LEN: usize = 1024;

/// Bytes a lockspace (2000 delta-lease slots of 512-byte sectors, aligned
/// to 1 MiB) and a paxos resource lease occupy with `SANLK_*_ALIGN1M` and
/// 512-byte sectors, the geometry blkshim asks for. Offsets of both must be
/// multiples of it.
pub const LEASE_AREA: u64 = 1 << 20;

/// `WATCHDOG_FIRE_TIMEOUT` in sanlock's `timeouts.h`: how long after its
/// last keepalive wdmd lets `/dev/watchdog` reset the host. It does not
/// scale with `io_timeout`.
pub const WATCHDOG_FIRE_SECONDS: u64 = 60;

/// What an `io_timeout` means for a lease (sanlock `src/timeouts.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub io_timeout: u64,
    /// A host renews its delta lease this often (2 × io_timeout).
    pub renewal: u64,
    /// After this long without a successful renewal a host starts recovery:
    /// it kills the processes holding leases in the lockspace (8 × io_timeout).
    pub renewal_fail: u64,
    /// Its watchdog resets it this long after the last successful renewal if
    /// recovery did not finish (renewal_fail + 60).
    pub watchdog_fire: u64,
    /// Another host may take a lease of a host whose delta lease stopped
    /// changing this long ago (renewal_fail + 60): the owner is dead or
    /// reset by then, never still writing.
    pub host_dead: u64,
}

impl Timings {
    pub fn for_io_timeout(io_timeout: u64) -> Timings {
        let renewal_fail = 8 * io_timeout;
        Timings {
            io_timeout,
            renewal: 2 * io_timeout,
            renewal_fail,
            watchdog_fire: renewal_fail + WATCHDOG_FIRE_SECONDS,
            host_dead: renewal_fail + WATCHDOG_FIRE_SECONDS,
        }
    }

    pub fn host_dead_duration(&self) -> Duration {
        Duration::from_secs(self.host_dead)
    }
}

/// The resource (paxos lease) name of a blkshim disk. Disk names made of
/// `[A-Za-z0-9._+-]` that fit in 48 bytes are used as they are (readable in
/// `sanlock client status`); any other name becomes `h-<FNV-1a 64 of the
/// name>-<its readable prefix>`, which is the same on every host (the
/// hash is fixed, not std's per-process one) and never contains the `:`
/// and spaces that sanlock's resource strings use as separators.
pub fn resource_name(disk: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-');
    if !disk.is_empty() && disk.len() <= NAME_LEN && disk.chars().all(plain) {
        return disk.to_string();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in disk.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut name = format!("h-{h:016x}-");
    for c in disk.chars().filter(|&c| plain(c)) {
        if name.len() >= NAME_LEN {
            break;
        }
        name.push(c);
    }
    name
}

/// A lockspace name: 1..=48 bytes without `:`, spaces, NUL or `\`.
pub fn check_lockspace_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_LEN {
        return Err(format!(
            "lockspace name {name:?} must be 1 to {NAME_LEN} bytes"
        ));
    }
    if name
        .bytes()
        .any(|b| b == b':' || b == b'\\' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(format!(
            "lockspace name {name:?} may not contain ':', '\\', spaces or NUL"
        ));
    }
    Ok(())
}

/// What `acquire(disk, epoch)` does given the lease's current `lver`.
///
/// blkshim's rule: **after a writer at epoch E acquired the lease, its lver
/// is E.** sanlock sets `lver = previous lver + 1` at every acquisition and
/// `SANLK_RES_LVER` makes an acquisition demand the previous lver it read
/// (compare-and-advance), so a writer at E acquires expecting E − 1.
/// - lver ≥ E: a writer at E or newer already took the lease: E is stale
///   and is refused, whatever the epoch store said.
/// - lver = E − 1: one acquisition.
/// - lver < E − 1 (epochs the store admitted never took the lease, or the
///   lease area was just initialised at lver 0): the writer at E first
///   advances the lease by acquiring and releasing it E − 1 − lver times
///   (each step exclusive like any acquisition, bounded by
///   `max_catch_up`), so that no writer in between can take it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LverPlan {
    /// `catch_up` acquire/release cycles starting at `lver`, then one
    /// acquisition expecting `epoch - 1`.
    Acquire { lver: u64, catch_up: u64 },
    /// The lease is at `lver` ≥ `epoch`: a writer at least as new took it.
    Stale { lver: u64 },
    /// The lease lags the epoch store by more than allowed.
    TooFarBehind { lver: u64, gap: u64 },
    /// Epoch 0 is never a writer's epoch (lver 0 is a fresh lease).
    ZeroEpoch,
}

pub fn plan_acquire(lver: u64, epoch: Epoch, max_catch_up: u64) -> LverPlan {
    if epoch == 0 {
        return LverPlan::ZeroEpoch;
    }
    if lver >= epoch {
        return LverPlan::Stale { lver };
    }
    let gap = epoch - 1 - lver;
    if gap > max_catch_up {
        return LverPlan::TooFarBehind { lver, gap };
    }
    LverPlan::Acquire {
        lver,
        catch_up: gap,
    }
}

/// How sanlock (client library or daemon) answered: negative errnos and
/// its own `SANLK_*` codes (`sanlock_rv.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SanlockRv(pub i32);

impl SanlockRv {
    /// The `SANLK_*` name of the code, when it is one of sanlock's own.
    pub fn sanlock_name(self) -> Option<&'static str> {
        Some(match self.0 {
            -201 => "SANLK_ERROR",
            -202 => "SANLK_AIO_TIMEOUT",
            -203 => "SANLK_WD_ERROR",
            -210 => "SANLK_DBLOCK_READ",
            -211 => "SANLK_DBLOCK_WRITE",
            -212 => "SANLK_DBLOCK_LVER",
            -213 => "SANLK_DBLOCK_MBAL",
            -214 => "SANLK_DBLOCK_CHECKSUM",
            -220 => "SANLK_LEADER_READ",
            -221 => "SANLK_LEADER_WRITE",
            -222 => "SANLK_LEADER_DIFF",
            -223 => "SANLK_LEADER_MAGIC",
            -224 => "SANLK_LEADER_VERSION",
            -225 => "SANLK_LEADER_SECTORSIZE",
            -226 => "SANLK_LEADER_LOCKSPACE",
            -227 => "SANLK_LEADER_RESOURCE",
            -228 => "SANLK_LEADER_NUMHOSTS",
            -229 => "SANLK_LEADER_CHECKSUM",
            -230 => "SANLK_ADDLS_SIZES",
            -231 => "SANLK_ADDLS_INVALID_HOSTID",
            -240 => "SANLK_ACQUIRE_LVER",
            -241 => "SANLK_ACQUIRE_LOCKSPACE",
            -242 => "SANLK_ACQUIRE_IDDISK",
            -243 => "SANLK_ACQUIRE_IDLIVE",
            -244 => "SANLK_ACQUIRE_OWNED",
            -245 => "SANLK_ACQUIRE_OTHER",
            -246 => "SANLK_ACQUIRE_SHRETRY",
            -247 => "SANLK_ACQUIRE_OWNED_RETRY",
            -250 => "SANLK_RELEASE_LVER",
            -251 => "SANLK_RELEASE_OWNER",
            -260 => "SANLK_RENEW_OWNER",
            -261 => "SANLK_RENEW_DIFF",
            -262 => "SANLK_HOSTID_BUSY",
            _ => return None,
        })
    }

    /// Another, live host holds the lease (sanlock answers `-EAGAIN` to the
    /// client, or one of the `ACQUIRE_ID*`/`OWNED` codes): retrying now
    /// cannot succeed and waiting would be waiting for that host to die.
    pub fn is_held_by_live_host(self) -> bool {
        matches!(self.0, -11 | -243 | -244 | -245 | -247)
    }

    /// The lease's lver was not the one the acquisition demanded: someone
    /// acquired it since it was read.
    pub fn is_lver_mismatch(self) -> bool {
        self.0 == -240
    }

    /// The lockspace is not joined (`-ENOSPC` from acquire, sanlock's way
    /// of saying "no such lockspace") or the lockspace code itself.
    pub fn is_no_lockspace(self) -> bool {
        matches!(self.0, -28 | -241)
    }
}

impl fmt::Display for SanlockRv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sanlock_name() {
            Some(n) => write!(f, "{n} ({})", self.0),
            None if self.0 < 0 && self.0 > -200 => write!(
                f,
                "{} ({})",
                std::io::Error::from_raw_os_error(-self.0),
                self.0
            ),
            None => write!(f, "sanlock error {}", self.0),
        }
    }
}

/// Copy `s` into a fixed sanlock name/path field, refusing what does not
/// fit (names may fill all 48 bytes; paths need room for their NUL).
pub fn fill_field(field: &mut [u8], s: &str, need_nul: bool) -> Result<(), String> {
    let room = if need_nul {
        field.len().saturating_sub(1)
    } else {
        field.len()
    };
    if s.len() > room || s.as_bytes().contains(&0) {
        return Err(format!(
            "{s:?} does not fit sanlock's {}-byte field (or contains NUL)",
            field.len()
        ));
    }
    field.iter_mut().for_each(|b| *b = 0);
    field[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_match_sanlock_tables() {
        let t = Timings::for_io_timeout(10);
        assert_eq!((t.renewal, t.renewal_fail, t.host_dead), (20, 80, 140));
        let t = Timings::for_io_timeout(1);
        assert_eq!((t.renewal, t.renewal_fail, t.host_dead), (2, 8, 68));
        assert_eq!(t.watchdog_fire, 68);
    }

    #[test]
    fn plain_names_are_kept_and_others_hashed() {
        assert_eq!(resource_name("vm1"), "vm1");
        assert_eq!(resource_name("vm-1.disk_0+a"), "vm-1.disk_0+a");
        let odd = resource_name("vm 1:disk");
        assert!(odd.starts_with("h-") && odd.len() <= NAME_LEN, "{odd}");
        assert!(!odd.contains(':') && !odd.contains(' '));
        assert_eq!(odd, resource_name("vm 1:disk"), "deterministic");
        assert_ne!(odd, resource_name("vm 1:disk2"));
        let long = "x".repeat(49);
        let n = resource_name(&long);
        assert!(n.len() <= NAME_LEN && n.starts_with("h-"), "{n}");
        assert!(resource_name("").starts_with("h-"));
        // Unicode: only the plain characters survive, still within 48 bytes.
        assert!(resource_name("диск-é").len() <= NAME_LEN);
    }

    #[test]
    fn lockspace_names() {
        assert!(check_lockspace_name("blkshim").is_ok());
        assert!(check_lockspace_name(&"a".repeat(48)).is_ok());
        assert!(check_lockspace_name(&"a".repeat(49)).is_err());
        assert!(check_lockspace_name("").is_err());
        assert!(check_lockspace_name("a:b").is_err());
        assert!(check_lockspace_name("a b").is_err());
    }

    #[test]
    fn lver_plans() {
        assert_eq!(plan_acquire(0, 0, 8), LverPlan::ZeroEpoch);
        assert_eq!(
            plan_acquire(0, 1, 0),
            LverPlan::Acquire {
                lver: 0,
                catch_up: 0
            }
        );
        assert_eq!(
            plan_acquire(4, 5, 0),
            LverPlan::Acquire {
                lver: 4,
                catch_up: 0
            }
        );
        assert_eq!(plan_acquire(5, 5, 8), LverPlan::Stale { lver: 5 });
        assert_eq!(plan_acquire(9, 5, 8), LverPlan::Stale { lver: 9 });
        assert_eq!(
            plan_acquire(2, 5, 2),
            LverPlan::Acquire {
                lver: 2,
                catch_up: 2
            }
        );
        assert_eq!(
            plan_acquire(1, 5, 2),
            LverPlan::TooFarBehind { lver: 1, gap: 3 }
        );
        assert_eq!(
            plan_acquire(0, u64::MAX, u64::MAX),
            LverPlan::Acquire {
                lver: 0,
                catch_up: u64::MAX - 1
            }
        );
    }

    #[test]
    fn rv_names() {
        assert_eq!(SanlockRv(-243).to_string(), "SANLK_ACQUIRE_IDLIVE (-243)");
        assert!(SanlockRv(-11).is_held_by_live_host());
        assert!(SanlockRv(-240).is_lver_mismatch());
        assert!(SanlockRv(-2).to_string().contains("(-2)"));
        assert_eq!(SanlockRv(-999).to_string(), "sanlock error -999");
    }

    #[test]
    fn fields() {
        let mut f = [0xffu8; 8];
        assert!(fill_field(&mut f, "abcdefgh", false).is_ok());
        assert!(fill_field(&mut f, "abcdefgh", true).is_err());
        assert!(fill_field(&mut f, "abc", true).is_ok());
        assert_eq!(&f, b"abc\0\0\0\0\0");
        assert!(fill_field(&mut f, "a\0b", true).is_err());
    }
}
