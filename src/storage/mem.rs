//! An in-memory disk: for tests, examples and library users who want the
//! core without files. Completes every I/O synchronously, in submit order.

use super::{AlignedBuf, BlockStorage, Capabilities, IoDone, IoOutcome, StorageIo};
use parking_lot::Mutex;
use std::io;

/// A RAM-backed [`BlockStorage`].
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// What a disk held in memory can do (and the in-memory test storages
    /// built on it): discard and write-zeroes cost nothing, through the
    /// page cache, sector-aligned.
    pub const CAPABILITIES: Capabilities = Capabilities {
        direct: false,
        discard: true,
        fast_zero: true,
        alignment: 512,
    };

    /// A zero-filled disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemStorage {
            data: Mutex::new(vec![0; size as usize]),
        }
    }

    /// A copy of `len` bytes at `offset` (panics outside the disk: test helper).
    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock()[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockStorage for MemStorage {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        let outcome = apply_io(&mut self.data.lock(), io);
        done(outcome)
    }
}

/// Carry out `io` on a disk image held in memory: the one implementation
/// behind [`MemStorage`] and the test storages built on plain byte arrays.
/// An I/O outside the image fails with `EINVAL` and touches nothing.
pub fn apply_io(data: &mut [u8], io: StorageIo) -> IoOutcome {
    let size = data.len() as u64;
    let in_range = io
        .byte_range()
        .is_none_or(|(o, l)| o.checked_add(l).is_some_and(|end| end <= size));
    if !in_range {
        return IoOutcome {
            result: Err(io::Error::from_raw_os_error(libc::EINVAL)),
            buf: None,
        };
    }
    let buf: Option<AlignedBuf> = match io {
        StorageIo::Read { offset, mut buf } => {
            let o = offset as usize;
            let n = buf.len();
            buf.as_mut_slice().copy_from_slice(&data[o..o + n]);
            Some(buf)
        }
        StorageIo::Write { offset, buf, .. } => {
            let o = offset as usize;
            data[o..o + buf.len()].copy_from_slice(buf.as_slice());
            Some(buf)
        }
        StorageIo::Flush => None,
        StorageIo::Discard { offset, len } | StorageIo::WriteZeroes { offset, len, .. } => {
            data[offset as usize..(offset + len) as usize].fill(0);
            None
        }
    };
    IoOutcome {
        result: Ok(()),
        buf,
    }
}
