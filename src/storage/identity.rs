//! Which disk a path is: the name a disk has in the epoch store, taken from
//! the storage itself, never from the path a toolstack wrote.
//!
//! Two paths to one disk (`/dev/mapper/slow` and `/dev/mapper/fast` over the
//! same LUN, a symlink and its target, an image and a loop device over it)
//! must be one disk to blkshim: otherwise each gets its own tracker and
//! epoch, and a destination on one path advances over the source's writes
//! still in flight on the other (seeds/003). The identity is, in order:
//! - a SCSI/NVMe world-wide name (`device/wwid`, `wwid`) or a multipath
//!   map's uuid, which every host sees the same;
//! - for a device-mapper device with a single underlying device of exactly
//!   its size (linear at offset 0, delay, a one-path multipath map): that
//!   device's identity, since its blocks are the same blocks;
//! - for a loop device: its backing file at its offset;
//! - for a partition: its disk's identity and the partition number;
//! - a virtio or other serial number (`serial`);
//! - for a file: its canonical path (shared images are mounted at one path
//!   on every host; name the disk explicitly where they are not);
//! - else the device number, which is only unique on this host (logged).
//!
//! An explicit name (`disk-id` in a vbd's nodes, `--disk-id` on the command
//! line) overrides all of this.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How deep device-mapper and loop stacks are followed.
const MAX_DEPTH: usize = 8;

/// The identity of the disk at `path`, as a name valid in the epoch store.
pub fn disk_identity(path: &Path) -> io::Result<String> {
    disk_identity_in(Path::new("/sys"), path)
}

/// [`disk_identity`] with sysfs at `sys` (tests lay out a fake one).
pub fn disk_identity_in(sys: &Path, path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    let raw = if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        block_identity(sys, libc::major(rdev), libc::minor(rdev), 0)?
    } else {
        file_identity(path)?
    };
    Ok(sanitize(&raw))
}

fn file_identity(path: &Path) -> io::Result<String> {
    let canon = fs::canonicalize(path)?;
    Ok(format!("file{}", canon.display()))
}

fn read_trimmed(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// A SCSI VPD page 0x83 designator as multipath and udev's scsi_id print it
/// (`naa.6001405...` -> `36001405...`), so a path device and its multipath
/// map name the disk alike.
fn scsi_id(wwid: &str) -> String {
    let w = wwid.trim();
    for (prefix, kind) in [("naa.", '3'), ("eui.", '2'), ("t10.", '1')] {
        if let Some(rest) = w.strip_prefix(prefix) {
            return format!("{kind}{}", rest.to_ascii_lowercase());
        }
    }
    w.to_string()
}

fn block_identity(sys: &Path, major: u32, minor: u32, depth: usize) -> io::Result<String> {
    let dev = sys.join(format!("dev/block/{major}:{minor}"));
    let fallback = || {
        log::warn!(
            "block device {major}:{minor}: no world-wide name or serial; its identity is its device number, which only this host knows (name the disk with disk-id on shared storage)"
        );
        format!("blockdev-{major}-{minor}")
    };
    if depth > MAX_DEPTH || !dev.exists() {
        return Ok(fallback());
    }
    // A partition: its disk's identity and its number.
    if let Some(part) = read_trimmed(&dev.join("partition")) {
        if let Ok(parent) = fs::canonicalize(dev.join("..")) {
            if let Some((ma, mi)) = read_trimmed(&parent.join("dev")).and_then(|d| parse_dev(&d)) {
                return Ok(format!(
                    "{}-part{part}",
                    block_identity(sys, ma, mi, depth + 1)?
                ));
            }
        }
    }
    for wwid in ["device/wwid", "wwid"] {
        if let Some(w) = read_trimmed(&dev.join(wwid)) {
            return Ok(format!("wwn-{}", scsi_id(&w)));
        }
    }
    if let Some(uuid) = read_trimmed(&dev.join("dm/uuid")) {
        if let Some(w) = uuid.strip_prefix("mpath-") {
            return Ok(format!("wwn-{}", scsi_id(w)));
        }
    }
    if dev.join("dm").exists() {
        if let Some(under) = single_same_size_slave(&dev) {
            return block_identity(sys, under.0, under.1, depth + 1);
        }
        if let Some(uuid) = read_trimmed(&dev.join("dm/uuid")) {
            return Ok(format!("dm-{uuid}"));
        }
    }
    if let Some(file) = read_trimmed(&dev.join("loop/backing_file")) {
        let offset = read_trimmed(&dev.join("loop/offset")).unwrap_or_else(|| "0".into());
        let base = file_identity(Path::new(&file)).unwrap_or_else(|_| format!("file{file}"));
        return Ok(if offset == "0" {
            base
        } else {
            format!("{base}@{offset}")
        });
    }
    for serial in ["serial", "device/serial"] {
        if let Some(s) = read_trimmed(&dev.join(serial)) {
            return Ok(format!("serial-{s}"));
        }
    }
    Ok(fallback())
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// The one device under a device-mapper device, when it has exactly one
/// and of exactly the same size: then the map covers it from offset 0 and
/// its blocks are that device's blocks.
fn single_same_size_slave(dev: &Path) -> Option<(u32, u32)> {
    let mut slaves = fs::read_dir(dev.join("slaves"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path());
    let only: PathBuf = slaves.next()?;
    if slaves.next().is_some() {
        return None;
    }
    let size = |p: &Path| read_trimmed(&p.join("size"));
    let target = fs::canonicalize(&only).ok()?;
    if size(dev)? != size(&target)? {
        return None;
    }
    parse_dev(&read_trimmed(&target.join("dev"))?)
}

/// Any identity as a name the epoch store accepts: `[A-Za-z0-9._-]`, no
/// leading dot, at most 128 characters (the tail is kept: it is the
/// distinguishing part of a path or a WWN).
pub fn sanitize(raw: &str) -> String {
    let s: String = raw
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    let s = if s.is_empty() { "disk".to_string() } else { s };
    let n = s.chars().count();
    let s: String = s.chars().skip(n.saturating_sub(128)).collect();
    // Cutting may expose a leading dot again.
    match s.strip_prefix('.') {
        Some(rest) if !rest.is_empty() => format!("_{rest}"),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    /// A fake sysfs: /sys/dev/block/M:m -> /sys/devices/virtual/block/NAME.
    fn blockdev(sys: &Path, name: &str, dev: &str, size: u64) -> PathBuf {
        let d = sys.join("devices/virtual/block").join(name);
        write(&d.join("dev"), &format!("{dev}\n"));
        write(&d.join("size"), &format!("{size}\n"));
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&d, sys.join("dev/block").join(dev)).unwrap();
        d
    }

    #[test]
    fn dm_views_of_one_loop_device_are_one_disk() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let img = t.path().join("disk.img");
        fs::write(&img, b"").unwrap();
        let lo = blockdev(sys, "loop0", "7:0", 2048);
        write(&lo.join("loop/backing_file"), &img.display().to_string());
        write(&lo.join("loop/offset"), "0");
        for (name, dev) in [("dm-0", "254:0"), ("dm-1", "254:1")] {
            let d = blockdev(sys, name, dev, 2048);
            write(&d.join("dm/name"), name);
            fs::create_dir_all(d.join("slaves")).unwrap();
            std::os::unix::fs::symlink(&lo, d.join("slaves/loop0")).unwrap();
        }
        let a = block_identity(sys, 254, 0, 0).unwrap();
        let b = block_identity(sys, 254, 1, 0).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, file_identity(&img).unwrap());
        // The image itself is the same disk as the loop device over it.
        assert_eq!(sanitize(&a), disk_identity_in(sys, &img).unwrap());
    }

    #[test]
    fn a_smaller_dm_slice_is_not_its_device() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let sd = blockdev(sys, "sdb", "8:16", 4096);
        write(&sd.join("device/wwid"), "naa.6001405ABC\n");
        let lv = blockdev(sys, "dm-3", "254:3", 2048);
        write(&lv.join("dm/uuid"), "LVM-xyz");
        fs::create_dir_all(lv.join("slaves")).unwrap();
        std::os::unix::fs::symlink(&sd, lv.join("slaves/sdb")).unwrap();
        assert_eq!(block_identity(sys, 254, 3, 0).unwrap(), "dm-LVM-xyz");
        assert_eq!(block_identity(sys, 8, 16, 0).unwrap(), "wwn-36001405abc");
    }

    #[test]
    fn multipath_map_and_its_paths_share_the_wwn() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let sd = blockdev(sys, "sdc", "8:32", 4096);
        write(&sd.join("device/wwid"), "naa.6001405abc");
        let mp = blockdev(sys, "dm-1", "254:1", 4096);
        write(&mp.join("dm/uuid"), "mpath-36001405abc");
        assert_eq!(
            block_identity(sys, 254, 1, 0).unwrap(),
            block_identity(sys, 8, 32, 0).unwrap()
        );
    }

    #[test]
    fn partitions_loops_with_offsets_serials_and_unknowns() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let vd = blockdev(sys, "vda", "252:0", 8192);
        write(&vd.join("serial"), "disk-7");
        let p = vd.join("vda2");
        write(&p.join("dev"), "252:2");
        write(&p.join("partition"), "2");
        std::os::unix::fs::symlink(&p, sys.join("dev/block/252:2")).unwrap();
        assert_eq!(
            block_identity(sys, 252, 2, 0).unwrap(),
            "serial-disk-7-part2"
        );
        let lo = blockdev(sys, "loop1", "7:1", 10);
        write(&lo.join("loop/backing_file"), "/gone/x.img");
        write(&lo.join("loop/offset"), "4096");
        assert_eq!(
            block_identity(sys, 7, 1, 0).unwrap(),
            "file/gone/x.img@4096"
        );
        assert_eq!(block_identity(sys, 9, 9, 0).unwrap(), "blockdev-9-9");
    }

    #[test]
    fn symlinks_to_one_file_are_one_disk_and_names_are_valid() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("vm 1.img");
        fs::write(&img, b"x").unwrap();
        let link = t.path().join("link.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let a = disk_identity(&img).unwrap();
        assert_eq!(a, disk_identity(&link).unwrap());
        crate::epoch::validate_disk_name(&a).unwrap();
        for raw in [
            "/../x/.y",
            "",
            "...",
            &"z".repeat(300),
            &format!("/{}", ".a".repeat(100)),
        ] {
            crate::epoch::validate_disk_name(&sanitize(raw)).unwrap();
        }
    }
}
