//! Where a host's sanlock leases live and how it joins their lockspace:
//! [`SanlockOptions`], and [`SanlockArgs`], the same as command-line flags
//! (flattened into `blkshim lease` and meant for `blkshim serve --fence
//! sanlock`).

use super::plan::{check_lockspace_name, Timings, LEASE_AREA, PATH_LEN};
use crate::storage::fencing::FenceError;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Most host ids a sanlock lockspace has (2000 delta-lease slots with
/// 512-byte sectors and 1 MiB alignment).
pub const MAX_HOST_ID: u64 = 2000;

/// How [`SanlockFence`](super::SanlockFence) reaches its leases.
///
/// One lease device (a small LU or LV every host sees; this host's path to
/// it in `path`) holds the lockspace at `lockspace_offset` (1 MiB) and a
/// paxos lease of 1 MiB per disk at the offset `resources` gives it.
/// Every host must use the same offsets and names; only `host_id` (unique
/// per host, 1..=2000) and `path` differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanlockOptions {
    pub lockspace: String,
    pub host_id: u64,
    pub path: PathBuf,
    pub lockspace_offset: u64,
    /// Disk name → offset of its lease on `path`.
    pub resources: BTreeMap<String, u64>,
    /// Seconds; 0 leaves the daemon's default (10). Every host of a
    /// lockspace must use the same value: the others' host_dead_seconds
    /// are computed from it.
    pub io_timeout: u32,
    /// At most this many acquire/release cycles to bring a lagging lease
    /// up to the epoch (see [`plan_acquire`](super::plan_acquire)).
    pub max_catch_up: u64,
}

impl SanlockOptions {
    pub fn new(lockspace: &str, host_id: u64, path: impl Into<PathBuf>) -> SanlockOptions {
        SanlockOptions {
            lockspace: lockspace.to_string(),
            host_id,
            path: path.into(),
            lockspace_offset: 0,
            resources: BTreeMap::new(),
            io_timeout: 0,
            max_catch_up: 64,
        }
    }

    /// The timings this lockspace runs with (the daemon's default
    /// io_timeout is 10 s).
    pub fn timings(&self) -> Timings {
        Timings::for_io_timeout(if self.io_timeout == 0 {
            10
        } else {
            u64::from(self.io_timeout)
        })
    }

    /// The offset of `disk`'s lease.
    pub fn resource_offset(&self, disk: &str) -> Result<u64, FenceError> {
        self.resources.get(disk).copied().ok_or_else(|| {
            FenceError::Config(format!(
                "no sanlock lease configured for disk {disk:?} (--sanlock-resource {disk}=OFFSET)"
            ))
        })
    }

    /// Refuse options sanlock would refuse later, or that would make two
    /// leases overlap.
    pub fn validate(&self) -> Result<(), FenceError> {
        let bad = |m: String| Err(FenceError::Config(m));
        check_lockspace_name(&self.lockspace).map_err(FenceError::Config)?;
        if self.host_id == 0 || self.host_id > MAX_HOST_ID {
            return bad(format!(
                "host id {} is not in 1..={MAX_HOST_ID}",
                self.host_id
            ));
        }
        let p = self.path.to_string_lossy();
        if p.is_empty() || p.len() >= PATH_LEN {
            return bad(format!("lease path {p:?} is empty or too long"));
        }
        let mut areas = vec![("lockspace".to_string(), self.lockspace_offset)];
        areas.extend(
            self.resources
                .iter()
                .map(|(d, &o)| (format!("disk {d:?}"), o)),
        );
        for (what, off) in &areas {
            if off % LEASE_AREA != 0 {
                return bad(format!(
                    "{what}: offset {off} is not a multiple of 1 MiB (sanlock's 1M alignment)"
                ));
            }
        }
        areas.sort_by_key(|a| a.1);
        for w in areas.windows(2) {
            if w[0].1 == w[1].1 {
                return bad(format!(
                    "{} and {} share the lease offset {}",
                    w[0].0, w[1].0, w[0].1
                ));
            }
        }
        Ok(())
    }
}

/// Parse `DISK=OFFSET` (offset in bytes, or with a K/M/G suffix).
pub fn parse_resource_arg(s: &str) -> Result<(String, u64), String> {
    let (disk, off) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected DISK=OFFSET"))?;
    if disk.is_empty() {
        return Err(format!("{s:?}: empty disk name"));
    }
    let off = crate::nbd::config::parse_size(off)?;
    Ok((disk.to_string(), off))
}

/// The sanlock fence's command-line flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SanlockArgs {
    /// sanlock lockspace name (the same on every host).
    #[arg(
        long = "sanlock-lockspace",
        id = "sanlock_lockspace",
        default_value = "blkshim"
    )]
    pub lockspace: String,
    /// This host's id in the lockspace, 1..=2000, unique per host
    /// (required with the sanlock fence; optional here so that the flags
    /// can sit on commands where the fence is another).
    #[arg(long = "sanlock-host-id", id = "sanlock_host_id")]
    pub host_id: Option<u64>,
    /// This host's path to the lease device (required with the sanlock fence).
    #[arg(long = "sanlock-path", id = "sanlock_path")]
    pub path: Option<PathBuf>,
    /// Offset of the lockspace on the lease device (multiple of 1 MiB).
    #[arg(long = "sanlock-lockspace-offset", id = "sanlock_lockspace_offset", value_parser = crate::nbd::config::parse_size, default_value = "0")]
    pub lockspace_offset: u64,
    /// DISK=OFFSET: where DISK's 1 MiB lease is on the lease device
    /// (repeat per disk).
    #[arg(long = "sanlock-resource", id = "sanlock_resource", value_parser = parse_resource_arg)]
    pub resources: Vec<(String, u64)>,
    /// sanlock io_timeout in seconds (0: the daemon's, 10). host_dead is
    /// 8 × io_timeout + 60 s.
    #[arg(
        long = "sanlock-io-timeout",
        id = "sanlock_io_timeout",
        default_value_t = 0
    )]
    pub io_timeout: u32,
    /// Most acquire/release cycles that bring a lagging lease's lver up
    /// to the epoch.
    #[arg(
        long = "sanlock-max-catch-up",
        id = "sanlock_max_catch_up",
        default_value_t = 64
    )]
    pub max_catch_up: u64,
}

impl SanlockArgs {
    pub fn to_options(&self) -> Result<SanlockOptions, FenceError> {
        let host_id = self.host_id.ok_or_else(|| {
            FenceError::Config("the sanlock fence needs --sanlock-host-id".into())
        })?;
        let path = self
            .path
            .clone()
            .ok_or_else(|| FenceError::Config("the sanlock fence needs --sanlock-path".into()))?;
        let mut o = SanlockOptions::new(&self.lockspace, host_id, path);
        o.lockspace_offset = self.lockspace_offset;
        o.io_timeout = self.io_timeout;
        o.max_catch_up = self.max_catch_up;
        for (d, off) in &self.resources {
            if o.resources.insert(d.clone(), *off).is_some() {
                return Err(FenceError::Config(format!(
                    "disk {d:?} given twice in --sanlock-resource"
                )));
            }
        }
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SanlockOptions {
        let mut o = SanlockOptions::new("blkshim", 1, "/dev/mapper/lease");
        o.resources.insert("vm1".into(), 1 << 20);
        o
    }

    #[test]
    fn validation() {
        assert!(opts().validate().is_ok());
        let mut o = opts();
        o.host_id = 0;
        assert!(o.validate().is_err());
        o.host_id = 2001;
        assert!(o.validate().is_err());
        let mut o = opts();
        o.resources.insert("vm2".into(), 0);
        assert!(o.validate().is_err(), "overlaps the lockspace");
        let mut o = opts();
        o.resources.insert("vm2".into(), 4096);
        assert!(o.validate().is_err(), "misaligned");
        let mut o = opts();
        o.lockspace = "a:b".into();
        assert!(o.validate().is_err());
        assert!(opts().resource_offset("vm1").is_ok());
        assert!(matches!(
            opts().resource_offset("vm9"),
            Err(FenceError::Config(_))
        ));
        assert_eq!(opts().timings().host_dead, 140);
    }

    #[test]
    fn args_need_host_and_path() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            s: SanlockArgs,
        }
        let none = Cli::parse_from(["x"]);
        assert!(matches!(none.s.to_options(), Err(FenceError::Config(_))));
        let ok = Cli::parse_from([
            "x",
            "--sanlock-host-id",
            "2",
            "--sanlock-path",
            "/dev/mapper/lease",
            "--sanlock-resource",
            "vm1=1M",
            "--sanlock-io-timeout",
            "3",
        ]);
        let o = ok.s.to_options().unwrap();
        assert_eq!(
            (o.host_id, o.io_timeout, o.lockspace.as_str()),
            (2, 3, "blkshim")
        );
        assert_eq!(o.resource_offset("vm1").unwrap(), 1 << 20);
        let twice = Cli::parse_from([
            "x",
            "--sanlock-host-id",
            "1",
            "--sanlock-path",
            "/d",
            "--sanlock-resource",
            "vm1=1M",
            "--sanlock-resource",
            "vm1=2M",
        ]);
        assert!(twice.s.to_options().is_err());
    }

    #[test]
    fn resource_args() {
        assert_eq!(
            parse_resource_arg("vm1=1M").unwrap(),
            ("vm1".into(), 1 << 20)
        );
        assert_eq!(parse_resource_arg("vm1=2097152").unwrap().1, 2 << 20);
        assert!(parse_resource_arg("vm1").is_err());
        assert!(parse_resource_arg("=1M").is_err());
    }
}
