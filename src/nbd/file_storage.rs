//! A minimal file engine for the NBD gateway until the real engines
//! (io_uring, thread pool) land in `storage`: synchronous
//! pread/pwrite/fdatasync/fallocate run by a few worker threads, behind
//! [`BlockStorage`]. [`open_disk_storage`] is the one place that picks the
//! engine, so swapping to `storage::open_storage` is a one-line change.

use crate::storage::{AlignedBuf, BlockStorage, Capabilities, IoDone, IoOutcome, StorageIo};
use crossbeam_channel::{Receiver, Sender};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Page cache or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: data bypasses the page cache (like qemu's cache=none).
    None,
    /// Buffered I/O through the page cache.
    Writeback,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "direct" => Ok(CacheMode::None),
            "writeback" | "buffered" => Ok(CacheMode::Writeback),
            _ => Err(format!("unknown cache mode {s:?} (none or writeback)")),
        }
    }
}

/// Open (creating a sparse file of `create_size` bytes when missing) the
/// storage a served disk uses. The single place that chooses the engine.
pub fn open_disk_storage(
    path: &Path,
    create_size: Option<u64>,
    cache: CacheMode,
) -> io::Result<Arc<dyn BlockStorage>> {
    if !path.exists() {
        let size = create_size.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist and no --size was given", path.display()),
            )
        })?;
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        f.set_len(size)?;
        log::info!("created sparse image {} of {size} bytes", path.display());
    }
    Ok(Arc::new(FileStorage::open(path, cache)?))
}

struct Job {
    io: StorageIo,
    done: IoDone,
}

/// A file or block device served by a few synchronous worker threads.
pub struct FileStorage {
    size: u64,
    caps: Capabilities,
    file: Arc<File>,
    jobs: Sender<Job>,
}

const WORKERS: usize = 32;

impl FileStorage {
    pub fn open(path: &Path, cache: CacheMode) -> io::Result<FileStorage> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if cache == CacheMode::None {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        let block_device = file.metadata()?.file_type().is_block_device();
        // lseek(SEEK_END) gives the size of files and block devices alike.
        // SAFETY: plain syscall on an owned fd.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        let size = end as u64;
        let discard = block_device || punch_hole(&file, size, 4096).is_ok();
        let caps = Capabilities {
            direct: cache == CacheMode::None,
            discard,
            fast_zero: !block_device && discard,
            alignment: if cache == CacheMode::None { 4096 } else { 512 },
        };
        let file = Arc::new(file);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..WORKERS {
            let rx: Receiver<Job> = rx.clone();
            let file = Arc::clone(&file);
            std::thread::Builder::new()
                .name(format!("file-io-{i}"))
                .spawn(move || {
                    for job in rx {
                        run(&file, block_device, job);
                    }
                })?;
        }
        Ok(FileStorage {
            size,
            caps,
            file,
            jobs: tx,
        })
    }
}

impl BlockStorage for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn submit(&self, io: StorageIo, done: IoDone) {
        // Buffered I/O the page cache can serve without blocking completes
        // right here (RWF_NOWAIT), saving two thread hops; the rest goes to
        // the workers.
        let io = if self.caps.direct || !matches!(io, StorageIo::Read { .. }) {
            io
        } else {
            match try_nowait(&self.file, io) {
                Ok(outcome) => return done(outcome),
                Err(io) => io,
            }
        };
        if let Err(e) = self.jobs.send(Job { io, done }) {
            let Job { done, .. } = e.into_inner();
            done(IoOutcome {
                result: Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)),
                buf: None,
            });
        }
    }
}

/// One `preadv2`/`pwritev2` with `RWF_NOWAIT`: the whole transfer done
/// from/into the page cache, or the I/O handed back (a partial transfer
/// is simply redone in full by a worker: same data, same place).
fn try_nowait(file: &File, io: StorageIo) -> Result<IoOutcome, StorageIo> {
    let fd = file.as_raw_fd();
    match io {
        StorageIo::Read { offset, mut buf } => {
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: iov points into `buf`, valid for its length.
            let n = unsafe { libc::preadv2(fd, &iov, 1, offset as i64, libc::RWF_NOWAIT) };
            if n >= 0 && n as usize == buf.len() {
                Ok(IoOutcome {
                    result: Ok(()),
                    buf: Some(buf),
                })
            } else {
                Err(StorageIo::Read { offset, buf })
            }
        }
        StorageIo::Write {
            offset,
            buf,
            fua: false,
        } => {
            let iov = libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: iov points into `buf`, valid for its length; pwritev2 only reads it.
            let n = unsafe { libc::pwritev2(fd, &iov, 1, offset as i64, libc::RWF_NOWAIT) };
            if n >= 0 && n as usize == buf.len() {
                Ok(IoOutcome {
                    result: Ok(()),
                    buf: Some(buf),
                })
            } else {
                Err(StorageIo::Write {
                    offset,
                    buf,
                    fua: false,
                })
            }
        }
        other => Err(other),
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// `ioctl(BLKDISCARD / BLKZEROOUT)` on a block device.
fn block_range_ioctl(file: &File, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: the ioctl reads two u64s from `range`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn write_zeroes_slowly(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let chunk = AlignedBuf::zeroed(len.min(1 << 20) as usize);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk.as_slice()[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

fn run(file: &File, block_device: bool, job: Job) {
    let Job { io, done } = job;
    let (result, buf) = match io {
        StorageIo::Read { offset, mut buf } => {
            let r = file.read_exact_at(buf.as_mut_slice(), offset);
            (r, Some(buf))
        }
        StorageIo::Write { offset, buf, fua } => {
            let r = file.write_all_at(buf.as_slice(), offset).and_then(|()| {
                if fua {
                    fdatasync(file)
                } else {
                    Ok(())
                }
            });
            (r, Some(buf))
        }
        StorageIo::Flush => (fdatasync(file), None),
        StorageIo::Discard { offset, len } => {
            let r = if block_device {
                block_range_ioctl(file, BLKDISCARD, offset, len)
            } else {
                punch_hole(file, offset, len)
            };
            (r, None)
        }
        StorageIo::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => {
            let r = if block_device {
                block_range_ioctl(file, BLKZEROOUT, offset, len)
            } else {
                let mode = if may_unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                fallocate(file, mode, offset, len)
            };
            let r = match r {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    write_zeroes_slowly(file, offset, len)
                }
                r => r,
            };
            (r, None)
        }
    };
    done(IoOutcome { result, buf });
}
