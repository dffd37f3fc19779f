//! `base:allocation` block status from the image file's holes
//! (`SEEK_DATA` / `SEEK_HOLE`), so qemu-img and nbdcopy can skip what was
//! never written. Advisory by nature: a write in flight may change it.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::proto::{STATE_HOLE, STATE_ZERO};

/// Where a served image has data and where it has holes.
pub struct AllocationMap {
    file: File,
    size: u64,
}

/// At most this many extents per reply.
const MAX_EXTENTS: usize = 1024;

impl AllocationMap {
    /// Open `path` read-only; `None` for block devices (no holes to report:
    /// BLOCK_STATUS is then not offered).
    pub fn open(path: &Path, size: u64) -> io::Result<Option<AllocationMap>> {
        let file = File::open(path)?;
        if !file.metadata()?.is_file() {
            return Ok(None);
        }
        Ok(Some(AllocationMap { file, size }))
    }

    fn seek(&self, pos: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an owned fd.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Extents `(length, flags)` from `offset` covering up to `len` bytes,
    /// every boundary a multiple of `block` (partly written blocks count as
    /// data). With `one`, a single extent.
    pub fn extents(
        &self,
        offset: u64,
        len: u32,
        block: u64,
        one: bool,
    ) -> io::Result<Vec<(u32, u32)>> {
        let block = block.max(1);
        let end = (offset + len as u64).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < if one { 1 } else { MAX_EXTENTS } {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(self.size);
            let (stop, flags) = if data > pos {
                // A hole up to `data`, trimmed to whole blocks.
                let hole_end = (data.min(end) / block) * block;
                if hole_end > pos {
                    (hole_end, STATE_HOLE | STATE_ZERO)
                } else {
                    // Data starts inside this block: the block is data.
                    (pos + block, 0)
                }
            } else {
                let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(self.size);
                (round_up(hole.min(end), block).max(pos + block), 0)
            };
            let stop = stop.min(end).max(pos + 1);
            let n = (stop - pos) as u32;
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += n,
                _ => out.push((n, flags)),
            }
            pos = stop;
        }
        Ok(out)
    }
}

fn round_up(x: u64, b: u64) -> u64 {
    x.div_ceil(b) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let m = AllocationMap::open(&p, 4 << 20).unwrap().unwrap();
        let e = m.extents(0, 4 << 20, 512, false).unwrap();
        let total: u64 = e.iter().map(|(l, _)| *l as u64).sum();
        assert_eq!(total, 4 << 20);
        assert_eq!(e[0], (1 << 20, STATE_HOLE | STATE_ZERO));
        assert_eq!(e[1].1, 0);
        assert!(e[1].0 >= 4096);
        assert_eq!(e.last().unwrap().1, STATE_HOLE | STATE_ZERO);
        assert_eq!(m.extents(0, 4 << 20, 512, true).unwrap().len(), 1);
        assert_eq!(
            m.extents(1 << 20, 4096, 512, false).unwrap(),
            vec![(4096, 0)]
        );
    }
}
