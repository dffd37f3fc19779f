//! The NBD wire format (fixed newstyle): constants, parsers and encoders.
//! Pure functions over byte slices, no I/O, so the fuzz target can drive
//! them directly. Every parser returns an error for malformed input; none
//! panics.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also the option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// TLS is required before this option (the listener's `--tls require`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Errors on the wire.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// Structured reply chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context offered, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Largest READ or WRITE payload accepted (also the advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest export name accepted (the spec's limit is 4096).
pub const MAX_NAME_LEN: usize = 4096;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Map a Linux errno (from a completion) to the NBD error sent to the client.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// A malformed message: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    BadMagic(u64),
    Truncated { need: usize, have: usize },
    OptionTooLong(u32),
    BadLength(&'static str),
    NameTooLong(usize),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            ProtoError::Truncated { need, have } => {
                write!(f, "truncated message: need {need} bytes, have {have}")
            }
            ProtoError::OptionTooLong(n) => write!(f, "option payload of {n} bytes is too long"),
            ProtoError::BadLength(what) => write!(f, "inconsistent length in {what}"),
            ProtoError::NameTooLong(n) => write!(f, "export name of {n} bytes is too long"),
        }
    }
}

impl std::error::Error for ProtoError {}

fn be_u16(b: &[u8], at: usize) -> Result<u16, ProtoError> {
    let s = b.get(at..at + 2).ok_or(ProtoError::Truncated {
        need: at + 2,
        have: b.len(),
    })?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, ProtoError> {
    let s = b.get(at..at + 4).ok_or(ProtoError::Truncated {
        need: at + 4,
        have: b.len(),
    })?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ProtoError> {
    let hi = be_u32(b, at)? as u64;
    let lo = be_u32(b, at + 4)? as u64;
    Ok(hi << 32 | lo)
}

/// An option request header; its `len` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse the 16-byte option header. Payloads over [`MAX_OPTION_LEN`] are
/// refused so a client cannot make the server buffer gigabytes.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(b, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = be_u32(b, 8)?;
    let len = be_u32(b, 12)?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok(OptionHeader { option, len })
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the
/// information types the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parse the data of INFO/GO.
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest, ProtoError> {
    let name_len = be_u32(d, 0)? as usize;
    if name_len > MAX_NAME_LEN {
        return Err(ProtoError::NameTooLong(name_len));
    }
    let name_bytes = d.get(4..4 + name_len).ok_or(ProtoError::Truncated {
        need: 4 + name_len,
        have: d.len(),
    })?;
    let count = be_u16(d, 4 + name_len)? as usize;
    let rest = &d[6 + name_len..];
    if rest.len() != 2 * count {
        return Err(ProtoError::BadLength("info request list"));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest {
        name: String::from_utf8_lossy(name_bytes).into_owned(),
        requests,
    })
}

/// Parse the data of SET/LIST_META_CONTEXT: export name and queries.
pub fn parse_meta_context_request(d: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let name_len = be_u32(d, 0)? as usize;
    if name_len > MAX_NAME_LEN {
        return Err(ProtoError::NameTooLong(name_len));
    }
    let name = d.get(4..4 + name_len).ok_or(ProtoError::Truncated {
        need: 4 + name_len,
        have: d.len(),
    })?;
    let count = be_u32(d, 4 + name_len)?;
    let mut at = 8 + name_len;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = be_u32(d, at)? as usize;
        let q = d
            .get(at + 4..at.saturating_add(4).saturating_add(len))
            .ok_or(ProtoError::Truncated {
                need: at.saturating_add(4).saturating_add(len),
                have: d.len(),
            })?;
        queries.push(String::from_utf8_lossy(q).into_owned());
        at += 4 + len;
    }
    if at != d.len() {
        return Err(ProtoError::BadLength("meta context request"));
    }
    Ok((String::from_utf8_lossy(name).into_owned(), queries))
}

/// An export name split into disk name and epoch: `vm1@6` or bare `vm1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportName {
    pub disk: String,
    pub epoch: Option<u64>,
}

/// Split `NAME@EPOCH`. A bad epoch (`vm1@x`, `vm1@`) is an error string
/// for the client, not a parse failure of the connection.
pub fn parse_export_name(name: &str) -> Result<ExportName, String> {
    match name.rsplit_once('@') {
        None => Ok(ExportName {
            disk: name.to_string(),
            epoch: None,
        }),
        Some((disk, e)) => match e.parse::<u64>() {
            Ok(epoch) if !e.starts_with('+') => Ok(ExportName {
                disk: disk.to_string(),
                epoch: Some(epoch),
            }),
            _ => Err(format!("invalid epoch {e:?} in export name {name:?}")),
        },
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parse a 28-byte request header. A bad magic is fatal to the connection.
pub fn parse_request_header(b: &[u8]) -> Result<RequestHeader, ProtoError> {
    if b.len() < REQUEST_LEN {
        return Err(ProtoError::Truncated {
            need: REQUEST_LEN,
            have: b.len(),
        });
    }
    let magic = be_u32(b, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4)?,
        kind: be_u16(b, 6)?,
        handle: be_u64(b, 8)?,
        offset: be_u64(b, 16)?,
        len: be_u32(b, 24)?,
    })
}

/// What the export allows, for validating requests.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    pub size: u64,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    pub trim: bool,
    pub structured: bool,
    /// `base:allocation` was negotiated: BLOCK_STATUS is allowed.
    pub block_status: bool,
    /// The client may only read (a read-only grant): writes, trims and
    /// zeroes are refused with EPERM.
    pub read_only: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_unmap: bool,
        fast_only: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// Why a request is refused without reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error to reply with.
    pub error: u32,
    /// Bytes of write payload the server must still read (and drop) to stay
    /// in step with the client; `None` when that is unreasonable (over
    /// [`MAX_PAYLOAD`]) and the connection must close after the reply.
    pub drain: Option<u32>,
    pub why: &'static str,
}

/// Check a request header against the export. Never panics.
pub fn validate_request(h: &RequestHeader, lim: &ExportLimits) -> Result<Command, Refusal> {
    let payload = if h.kind == CMD_WRITE { h.len } else { 0 };
    let refuse = |error, why| Refusal {
        error,
        drain: (payload <= MAX_PAYLOAD).then_some(payload),
        why,
    };
    let allowed_flags = match h.kind {
        CMD_READ if lim.structured => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    if h.flags & !allowed_flags != 0 {
        return Err(refuse(NBD_EINVAL, "unsupported command flags"));
    }
    if lim.read_only && matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(refuse(NBD_EPERM, "export is read-only for this client"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let needs_range = matches!(
        h.kind,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if needs_range {
        if h.kind == CMD_BLOCK_STATUS && !lim.block_status {
            return Err(refuse(NBD_EINVAL, "block status not negotiated"));
        }
        if h.kind == CMD_TRIM && !lim.trim {
            return Err(refuse(NBD_EINVAL, "trim not supported"));
        }
        if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > MAX_PAYLOAD {
            let error = if h.kind == CMD_READ {
                NBD_EOVERFLOW
            } else {
                NBD_EINVAL
            };
            return Err(refuse(error, "request larger than the maximum block size"));
        }
        if h.len == 0 {
            return Err(refuse(NBD_EINVAL, "zero-length request"));
        }
        let mb = lim.min_block.max(1) as u64;
        if h.offset % mb != 0 || h.len as u64 % mb != 0 {
            return Err(refuse(NBD_EINVAL, "request not aligned to the block size"));
        }
        let past_end = h
            .offset
            .checked_add(h.len as u64)
            .is_none_or(|end| end > lim.size);
        if past_end {
            let error = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                NBD_ENOSPC
            } else {
                NBD_EINVAL
            };
            return Err(refuse(error, "request past the end of the disk"));
        }
    } else if h.len != 0 && h.kind != CMD_DISC {
        return Err(refuse(NBD_EINVAL, "length on a command without range"));
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
        CMD_DISC => Command::Disconnect,
        _ => return Err(refuse(NBD_EINVAL, "unknown command")),
    })
}

// ---- Encoders -------------------------------------------------------------

/// The server's opening: magic, IHAVEOPT, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option reply with `data`.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT` payload.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` payload.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut b = INFO_NAME.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
pub fn encode_server_entry(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// A simple reply header (16 bytes); a read's data follows it.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes); `len` bytes of payload follow.
pub fn encode_chunk_header(handle: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A final structured error chunk with a message.
pub fn encode_error_chunk(handle: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut b = encode_chunk_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A final BLOCK_STATUS chunk for `base:allocation`: `(length, flags)` extents.
pub fn encode_block_status(handle: u64, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut b = encode_chunk_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// Encode a request header (for tests and clients).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// Encode an option request (for tests and clients).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Feed arbitrary bytes through every parser, as a stream of options and
/// then requests: the body of the fuzz target (and of a stable-Rust test
/// over a pseudo-random corpus). It must never panic.
pub fn fuzz_nbd_input(data: &[u8]) {
    let mut rest = data;
    // Options phase.
    while rest.len() >= OPTION_HEADER_LEN {
        let Ok(h) = parse_option_header(rest) else {
            break;
        };
        let body_end = (OPTION_HEADER_LEN + h.len as usize).min(rest.len());
        let body = &rest[OPTION_HEADER_LEN..body_end];
        match h.option {
            OPT_INFO | OPT_GO => {
                if let Ok(r) = parse_info_request(body) {
                    let _ = parse_export_name(&r.name);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let _ = parse_meta_context_request(body);
            }
            OPT_EXPORT_NAME => {
                let _ = parse_export_name(&String::from_utf8_lossy(body));
            }
            _ => {}
        }
        rest = &rest[body_end..];
    }
    // Transmission phase, with limits taken from the input itself.
    let lim = ExportLimits {
        size: rest.first().map_or(1 << 20, |&b| (b as u64) << 12),
        min_block: if rest.get(1).is_some_and(|&b| b & 1 == 1) {
            4096
        } else {
            512
        },
        trim: rest.get(2).is_some_and(|&b| b & 1 == 1),
        structured: rest.get(2).is_some_and(|&b| b & 2 == 2),
        block_status: rest.get(2).is_some_and(|&b| b & 4 == 4),
        read_only: rest.get(2).is_some_and(|&b| b & 8 == 8),
    };
    while rest.len() >= REQUEST_LEN {
        match parse_request_header(rest) {
            Ok(h) => {
                let r = validate_request(&h, &lim);
                if let Ok(Command::Read { offset, len } | Command::Write { offset, len, .. }) = r {
                    assert!(len <= MAX_PAYLOAD && offset + len as u64 <= lim.size);
                }
                if lim.read_only {
                    let writes = matches!(
                        r,
                        Ok(Command::Write { .. }
                            | Command::Trim { .. }
                            | Command::WriteZeroes { .. })
                    );
                    assert!(!writes, "a read-only export let a write through");
                }
                let skip = match r {
                    Ok(Command::Write { len, .. }) => len as usize,
                    Err(Refusal { drain: Some(n), .. }) => n as usize,
                    _ => 0,
                };
                rest = &rest[(REQUEST_LEN + skip).min(rest.len())..];
            }
            Err(_) => rest = &rest[1..],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> ExportLimits {
        ExportLimits {
            size: 1 << 20,
            min_block: 512,
            trim: true,
            structured: false,
            block_status: false,
            read_only: false,
        }
    }

    #[test]
    fn a_read_only_export_refuses_writes_trims_and_zeroes_with_eperm() {
        let ro = ExportLimits {
            read_only: true,
            ..lim()
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            let e = validate_request(&req(kind, 0, 0, 512), &ro).unwrap_err();
            assert_eq!(e.error, NBD_EPERM, "kind {kind}");
            // A refused write's payload is skipped, so the stream goes on.
            let drain = if kind == CMD_WRITE {
                Some(512)
            } else {
                Some(0)
            };
            assert_eq!(e.drain, drain);
        }
        assert!(validate_request(&req(CMD_READ, 0, 0, 512), &ro).is_ok());
        assert!(validate_request(&req(CMD_FLUSH, 0, 0, 0), &ro).is_ok());
        assert!(validate_request(&req(CMD_WRITE, 0, 0, 512), &lim()).is_ok());
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_roundtrip() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(parse_request_header(&encode_request(&h)).unwrap(), h);
        assert_eq!(
            validate_request(&h, &lim()),
            Ok(Command::Write {
                offset: 4096,
                len: 512,
                fua: true
            })
        );
    }

    #[test]
    fn refusals() {
        let l = lim();
        let e = |h| validate_request(&h, &l).unwrap_err();
        assert_eq!(e(req(CMD_READ, 0, (1 << 20) - 512, 1024)).error, NBD_EINVAL);
        assert_eq!(e(req(CMD_WRITE, 0, 1 << 20, 512)).error, NBD_ENOSPC);
        assert_eq!(e(req(CMD_WRITE, 0, 1 << 20, 512)).drain, Some(512));
        assert_eq!(e(req(CMD_READ, 0, 100, 512)).error, NBD_EINVAL);
        assert_eq!(e(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512)).drain, None);
        assert_eq!(
            e(req(CMD_READ, 0, 0, MAX_PAYLOAD + 512)).error,
            NBD_EOVERFLOW
        );
        assert_eq!(e(req(99, 0, 0, 0)).error, NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_FUA, 0, 512)).error, NBD_EINVAL);
        assert_eq!(e(req(CMD_FLUSH, 0, 0, 512)).error, NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, 0, u64::MAX - 511, 512)).error, NBD_EINVAL);
    }

    #[test]
    fn info_and_names() {
        let mut d = 5u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vm1@6");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_export_name(&r.name).unwrap(),
            ExportName {
                disk: "vm1".into(),
                epoch: Some(6)
            }
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_export_name("vm1@x").is_err());
        assert_eq!(parse_export_name("vm1").unwrap().epoch, None);
    }

    /// The fuzz body over a large deterministic pseudo-random corpus, with
    /// valid prefixes spliced in so the deeper branches are reached.
    #[test]
    fn fuzz_corpus_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = vec![
            encode_option(OPT_GO, b"\0\0\0\x03vm1\0\x01\0\x03"),
            encode_option(
                OPT_SET_META_CONTEXT,
                b"\0\0\0\0\0\0\0\x01\0\0\0\x0fbase:allocation",
            ),
            encode_request(&req(CMD_WRITE, 0, 512, 512)).to_vec(),
            encode_request(&req(CMD_WRITE_ZEROES, 0x13, 0, 4096)).to_vec(),
        ];
        for i in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 {
                let s = &seeds[(next() % seeds.len() as u64) as usize];
                let at = (next() as usize) % (data.len() + 1);
                data.splice(at..at, s.iter().copied());
                // Flip a byte of the spliced message sometimes.
                if i % 4 == 0 && !data.is_empty() {
                    let j = (next() as usize) % data.len();
                    data[j] ^= next() as u8;
                }
            }
            fuzz_nbd_input(&data);
        }
    }
}
