//! The virtio-blk request parser: a descriptor chain in, a checked request
//! (or the status to answer it with) out.
//!
//! Pure: it sees the chain as a list of [`Desc`] and reads guest memory
//! only through the `read` callback, so the fuzz target
//! (`fuzz/fuzz_targets/vhost_request.rs`) drives it with arbitrary chains
//! over a byte array, and the device (`super::device`) with the guest's
//! memory.
//!
//! A request is `header (16 bytes, device-readable) | data | status (1
//! byte, device-writable)`, with no assumption on how the driver cut it
//! into descriptors (VIRTIO_F_ANY_LAYOUT; virtio 1.x): the device-readable
//! bytes come first and start with the header, the device-writable bytes
//! end with the status byte.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// virtio-blk's sector: always 512 bytes, whatever `blk_size` says.
pub const SECTOR: u64 = 512;
/// The request header: type (u32), reserved/ioprio (u32), sector (u64).
pub const HEADER_LEN: usize = 16;
/// One discard / write-zeroes segment: sector (u64), sectors (u32), flags (u32).
pub const SEGMENT_LEN: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = 1;

/// One descriptor of a chain, as the driver wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// VIRTQ_DESC_F_WRITE: the device writes it.
    pub write_only: bool,
}

/// A piece of guest memory a request reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the request's data segments.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the data segments (`len` bytes) at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the disk's id (up to 20 bytes) into the data segments.
    GetId,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Guest memory the data comes from (write) or goes to (read, get-id),
    /// in order; the header and the status byte are not in it.
    pub data: Vec<Segment>,
    /// Address of the status byte.
    pub status: u64,
}

impl Request {
    /// Bytes of `data`.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A chain that is not a request this device serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Answer with `status` (`VIRTIO_BLK_S_IOERR` or `_UNSUPP`) at `addr`.
    Answer {
        addr: u64,
        status: u8,
        reason: String,
    },
    /// The chain has no device-writable last byte: there is nowhere to put
    /// a status. The chain is returned to the driver with length 0.
    NoStatus { reason: String },
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Answer { reason, .. } | Refusal::NoStatus { reason } => reason,
        }
    }
}

/// What the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in bytes.
    pub capacity: u64,
    /// Offsets and lengths must be multiples of this (`blk_size`, ≥ 512).
    pub block: u64,
    /// Largest read or write, in bytes.
    pub max_data: u64,
    /// Largest discard / write-zeroes segment, in sectors.
    pub max_discard_sectors: u32,
    /// Segments per discard / write-zeroes request (`max_discard_seg`).
    pub max_discard_seg: u32,
}

/// Parse a descriptor chain. `read(addr, buf)` fills `buf` from guest
/// memory at `addr`, false when that memory is not the guest's.
pub fn parse(
    descs: &[Desc],
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    limits: &Limits,
) -> Result<Request, Refusal> {
    // The status byte: the last byte of the last descriptor, device-writable.
    let last = match descs.last() {
        Some(d) if d.write_only && d.len > 0 => *d,
        Some(_) => {
            return Err(Refusal::NoStatus {
                reason: "the last descriptor is not a device-writable status byte".into(),
            })
        }
        None => {
            return Err(Refusal::NoStatus {
                reason: "empty chain".into(),
            })
        }
    };
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Err(Refusal::NoStatus {
            reason: "status byte address overflows".into(),
        });
    };
    let answer = |code: u32, reason: String| Refusal::Answer {
        addr: status,
        status: code as u8,
        reason,
    };
    let ioerr = |reason: String| answer(VIRTIO_BLK_S_IOERR, reason);
    // Device-readable descriptors first, then device-writable ones.
    let split = descs
        .iter()
        .position(|d| d.write_only)
        .unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.write_only) {
        return Err(ioerr(
            "a device-readable descriptor after a device-writable one".into(),
        ));
    }
    let out: Vec<Segment> = descs[..split]
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    let mut inp: Vec<Segment> = descs[split..]
        .iter()
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    // Drop the status byte from the device-writable bytes.
    if let Some(l) = inp.last_mut() {
        l.len -= 1;
    }
    inp.retain(|s| s.len > 0);

    let mut header = [0u8; HEADER_LEN];
    let out_data = take_front(&out, &mut header, read)
        .ok_or_else(|| ioerr("no complete 16-byte request header".into()))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let in_len: u64 = inp.iter().map(|s| u64::from(s.len)).sum();
    let out_len: u64 = out_data.iter().map(|s| u64::from(s.len)).sum();
    let range = |len: u64, what: &str| -> Result<u64, Refusal> {
        let offset = sector
            .checked_mul(SECTOR)
            .ok_or_else(|| ioerr(format!("{what}: sector {sector} overflows")))?;
        if len == 0 {
            return Err(ioerr(format!("{what}: no data")));
        }
        if len > limits.max_data {
            return Err(ioerr(format!(
                "{what}: {len} bytes, more than {}",
                limits.max_data
            )));
        }
        if offset % limits.block != 0 || len % limits.block != 0 {
            return Err(ioerr(format!(
                "{what}: {len} bytes at {offset} not aligned to {}",
                limits.block
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= limits.capacity => Ok(offset),
            _ => Err(ioerr(format!(
                "{what}: {len} bytes at {offset} past the end ({})",
                limits.capacity
            ))),
        }
    };
    let (op, data) = match kind {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(ioerr("read with device-readable data".into()));
            }
            let offset = range(in_len, "read")?;
            (
                Op::Read {
                    offset,
                    len: in_len,
                },
                inp,
            )
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(ioerr("write with device-writable data".into()));
            }
            let offset = range(out_len, "write")?;
            (
                Op::Write {
                    offset,
                    len: out_len,
                },
                out_data,
            )
        }
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => {
            if in_len == 0 {
                return Err(ioerr("get-id without a buffer".into()));
            }
            // At most 20 bytes are written: keep only those.
            let mut left = u64::from(VIRTIO_BLK_ID_BYTES);
            let mut segs = Vec::new();
            for s in inp {
                if left == 0 {
                    break;
                }
                let len = u64::from(s.len).min(left);
                left -= len;
                segs.push(Segment {
                    addr: s.addr,
                    len: len as u32,
                });
            }
            (Op::GetId, segs)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let what = if kind == VIRTIO_BLK_T_DISCARD {
                "discard"
            } else {
                "write-zeroes"
            };
            if out_len == 0 || out_len % SEGMENT_LEN as u64 != 0 {
                return Err(ioerr(format!(
                    "{what}: {out_len} bytes of segments, not a multiple of 16"
                )));
            }
            let count = out_len / SEGMENT_LEN as u64;
            if count > u64::from(limits.max_discard_seg) {
                return Err(answer(
                    VIRTIO_BLK_S_UNSUPP,
                    format!(
                        "{what}: {count} segments, more than {}",
                        limits.max_discard_seg
                    ),
                ));
            }
            let mut seg = [0u8; SEGMENT_LEN];
            take_front(&out_data, &mut seg, read)
                .ok_or_else(|| ioerr(format!("{what}: segment not readable")))?;
            let mut b8 = [0u8; 8];
            b8.copy_from_slice(&seg[0..8]);
            let seg_sector = u64::from_le_bytes(b8);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed = if kind == VIRTIO_BLK_T_DISCARD {
                0
            } else {
                FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(answer(
                    VIRTIO_BLK_S_UNSUPP,
                    format!("{what}: unsupported flags {flags:#x}"),
                ));
            }
            if sectors > limits.max_discard_sectors {
                return Err(ioerr(format!(
                    "{what}: {sectors} sectors, more than {}",
                    limits.max_discard_sectors
                )));
            }
            let len = u64::from(sectors) * SECTOR;
            let offset = {
                // The segment's sector counts; the header's is ignored.
                let offset = seg_sector
                    .checked_mul(SECTOR)
                    .ok_or_else(|| ioerr(format!("{what}: sector {seg_sector} overflows")))?;
                if len == 0 || offset % limits.block != 0 || len % limits.block != 0 {
                    return Err(ioerr(format!(
                        "{what}: {len} bytes at {offset}: empty or not aligned to {}",
                        limits.block
                    )));
                }
                match offset.checked_add(len) {
                    Some(end) if end <= limits.capacity => offset,
                    _ => {
                        return Err(ioerr(format!(
                            "{what}: {len} bytes at {offset} past the end ({})",
                            limits.capacity
                        )))
                    }
                }
            };
            let op = if kind == VIRTIO_BLK_T_DISCARD {
                Op::Discard { offset, len }
            } else {
                Op::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & FLAG_UNMAP != 0,
                }
            };
            (op, Vec::new())
        }
        other => {
            return Err(answer(
                VIRTIO_BLK_S_UNSUPP,
                format!("request type {other} not supported"),
            ))
        }
    };
    Ok(Request { op, data, status })
}

/// The fuzz target's entry (`fuzz/fuzz_targets/vhost_request.rs`): the
/// first byte is the number of descriptors (mod 8), each 13 bytes (address
/// (8, only the low 16 bits kept, so chains hit the memory), length (4,
/// mod 64 KiB), flags (1)); the rest is guest memory at address 0. Checks
/// that a parsed request stays within the disk and the chain.
pub fn fuzz_input(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < 13 * n {
        return;
    }
    let (table, mem) = rest.split_at(13 * n);
    let descs: Vec<Desc> = table
        .chunks_exact(13)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[..8]);
            let raw = u64::from_le_bytes(a);
            Desc {
                // Mostly inside the memory; sometimes far outside it.
                addr: if c[12] & 2 != 0 { raw } else { raw & 0xffff },
                len: u32::from_le_bytes([c[8], c[9], c[10], c[11]]) % 65536,
                write_only: c[12] & 1 != 0,
            }
        })
        .collect();
    let mut read = |addr: u64, buf: &mut [u8]| {
        let Ok(a) = usize::try_from(addr) else {
            return false;
        };
        match a.checked_add(buf.len()) {
            Some(end) if end <= mem.len() => {
                buf.copy_from_slice(&mem[a..end]);
                true
            }
            _ => false,
        }
    };
    let limits = Limits {
        capacity: 1 << 20,
        block: 512,
        max_data: 1 << 16,
        max_discard_sectors: 1 << 10,
        max_discard_seg: 1,
    };
    if let Ok(req) = parse(&descs, &mut read, &limits) {
        let in_chain: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        assert!(req.data_len() <= in_chain);
        match req.op {
            Op::Read { offset, len } | Op::Write { offset, len } => {
                assert!(offset + len <= limits.capacity && len == req.data_len());
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                assert!(offset + len <= limits.capacity && len > 0);
            }
            Op::GetId => assert!(req.data_len() <= 20),
            Op::Flush => {}
        }
    }
}

/// Fill `buf` from the front of `segs`; returns the segments after those
/// bytes, `None` when `segs` hold fewer bytes or memory is not readable.
fn take_front(
    segs: &[Segment],
    buf: &mut [u8],
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Option<Vec<Segment>> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for s in segs {
        if filled == buf.len() {
            rest.push(*s);
            continue;
        }
        let take = (buf.len() - filled).min(s.len as usize);
        if !read(s.addr, &mut buf[filled..filled + take]) {
            return None;
        }
        filled += take;
        if take < s.len as usize {
            rest.push(Segment {
                addr: s.addr.checked_add(take as u64)?,
                len: s.len - take as u32,
            });
        }
    }
    (filled == buf.len()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        capacity: 1 << 20,
        block: 512,
        max_data: 1 << 20,
        max_discard_sectors: 2048,
        max_discard_seg: 1,
    };

    /// Guest memory: a flat array at address 0.
    fn mem_reader(mem: &[u8]) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
        move |addr, buf| {
            let Ok(a) = usize::try_from(addr) else {
                return false;
            };
            match a.checked_add(buf.len()) {
                Some(end) if end <= mem.len() => {
                    buf.copy_from_slice(&mem[a..end]);
                    true
                }
                _ => false,
            }
        }
    }

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn d(addr: u64, len: u32, write_only: bool) -> Desc {
        Desc {
            addr,
            len,
            write_only,
        }
    }

    #[test]
    fn read_write_flush_getid() {
        let mut mem = vec![0u8; 8192];
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_IN, 2));
        let r = parse(
            &[d(0, 16, false), d(1024, 4096, true), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Read {
                offset: 1024,
                len: 4096
            }
        );
        assert_eq!(r.status, 6000);
        // Data and status in one descriptor (any layout).
        let r = parse(
            &[d(0, 16, false), d(1024, 513, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.data_len(), 512);
        assert_eq!(r.status, 1024 + 512);
        // Header and data in one descriptor.
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_OUT, 0));
        let r = parse(
            &[d(0, 16 + 512, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Write {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(r.data, vec![Segment { addr: 16, len: 512 }]);
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_FLUSH, 0));
        let r = parse(
            &[d(0, 16, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.op, Op::Flush);
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_GET_ID, 0));
        let r = parse(
            &[d(0, 16, false), d(100, 64, true), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.op, Op::GetId);
        assert_eq!(r.data_len(), 20);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut mem = vec![0u8; 8192];
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0));
        mem[16..24].copy_from_slice(&8u64.to_le_bytes());
        mem[24..28].copy_from_slice(&16u32.to_le_bytes());
        mem[28..32].copy_from_slice(&FLAG_UNMAP.to_le_bytes());
        let r = parse(
            &[d(0, 32, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::WriteZeroes {
                offset: 4096,
                len: 8192,
                unmap: true
            }
        );
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_DISCARD, 0));
        let e = parse(
            &[d(0, 32, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::Answer { status: 2, .. }), "{e:?}");
        mem[28..32].copy_from_slice(&0u32.to_le_bytes());
        let r = parse(
            &[d(0, 32, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Discard {
                offset: 4096,
                len: 8192
            }
        );
        // Two segments: more than max_discard_seg.
        let e = parse(
            &[d(0, 48, false), d(6000, 1, true)],
            &mut mem_reader(&mem),
            &LIMITS,
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::Answer { status: 2, .. }), "{e:?}");
    }

    /// The fuzz entry over pseudo-random inputs (what `cargo fuzz run
    /// vhost_request` does at length), with valid headers mixed in.
    #[test]
    fn fuzz_entry_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let len = (next() % 400) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && data.len() > 1 + 13 * 3 + 32 {
                // Point descriptors at a plausible header in the memory.
                let n = usize::from(data[0] % 8).min(3);
                let mem = 1 + 13 * n;
                let kind = [0u32, 1, 4, 8, 11, 13][i % 6];
                data[mem..mem + 4].copy_from_slice(&kind.to_le_bytes());
                data[mem + 8..mem + 16].copy_from_slice(&(next() % 4096).to_le_bytes());
            }
            fuzz_input(&data);
        }
    }

    #[test]
    fn malformed() {
        let mut mem = vec![0u8; 8192];
        let rd = |m: &[u8], descs: &[Desc]| parse(descs, &mut mem_reader(m), &LIMITS);
        assert!(matches!(rd(&mem, &[]), Err(Refusal::NoStatus { .. })));
        assert!(matches!(
            rd(&mem, &[d(0, 16, false)]),
            Err(Refusal::NoStatus { .. })
        ));
        // Short header.
        assert!(matches!(
            rd(&mem, &[d(0, 8, false), d(6000, 1, true)]),
            Err(Refusal::Answer { status: 1, .. })
        ));
        // Header outside memory.
        assert!(matches!(
            rd(&mem, &[d(1 << 40, 16, false), d(6000, 1, true)]),
            Err(Refusal::Answer { status: 1, .. })
        ));
        // Unknown type.
        mem[..16].copy_from_slice(&header(99, 0));
        assert!(matches!(
            rd(&mem, &[d(0, 16, false), d(6000, 1, true)]),
            Err(Refusal::Answer { status: 2, .. })
        ));
        // Past the end, misaligned, readable after writable.
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_IN, 2047));
        assert!(matches!(
            rd(
                &mem,
                &[d(0, 16, false), d(100, 1024, true), d(6000, 1, true)]
            ),
            Err(Refusal::Answer { status: 1, .. })
        ));
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_IN, 0));
        assert!(matches!(
            rd(
                &mem,
                &[d(0, 16, false), d(100, 100, true), d(6000, 1, true)]
            ),
            Err(Refusal::Answer { status: 1, .. })
        ));
        assert!(matches!(
            rd(
                &mem,
                &[
                    d(0, 16, false),
                    d(100, 512, true),
                    d(200, 1, false),
                    d(6000, 1, true)
                ]
            ),
            Err(Refusal::Answer { status: 1, .. })
        ));
        mem[..16].copy_from_slice(&header(VIRTIO_BLK_T_IN, u64::MAX));
        assert!(matches!(
            rd(
                &mem,
                &[d(0, 16, false), d(100, 512, true), d(6000, 1, true)]
            ),
            Err(Refusal::Answer { status: 1, .. })
        ));
        assert!(matches!(
            rd(&mem, &[d(0, 16, false), d(u64::MAX, 1, true)]),
            Err(Refusal::Answer { .. })
        ));
    }
}
